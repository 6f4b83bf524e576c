"""lib.families.rsna_aneurysm and rsna_aneurysm_submit: the box around the Circle of Willis lands where the
anatomy says, localizers reach the right token, the arms and the plan, the held-out rows, and the submission's
predict (the converter's reading, the fallback for a series it refuses, save and load)."""

import numpy as np
import pandas as pd
import pytest
import torch

from lib import config
from lib.families import rsna_aneurysm as rsna
from lib.families import rsna_aneurysm_submit as sub
from lib.models.waveformer import WaveFormer3D

NB = "09_rsna_aneurysm"


def _head(shape=(80, 100, 80), spacing=2.0, top_mm=70.0):
    """A CT 'head' (40 HU ellipsoid in air) whose top is at S = ``top_mm`` (RAS, 2 mm voxels, origin at the
    volume centre), and its affine."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = (ijk * spacing + affine[:3, 3]).reshape(*shape, 3)
    centre = np.array([5.0, -10.0, top_mm - 70.0])
    inside = (((xyz - centre) / np.array([65.0, 80.0, 70.0])) ** 2).sum(-1) <= 1
    return np.where(inside, 40.0, -1024.0).astype(np.float32), affine, centre


def test_the_box_sits_below_the_top_of_the_head_at_its_centre():
    hu, affine, centre = _head()
    assert rsna.extent_s(hu, affine) == pytest.approx(158.0)
    c = rsna.roi_centre(hu, affine, "CT", depth_mm=90.0)  # the top of the head is at S = 70 (one voxel: 2 mm)
    assert c[2] == pytest.approx(70.0 - 90.0, abs=2.0) and c[:2] == pytest.approx(centre[:2], abs=1.5)
    slab = hu[:, :, :30]  # 60 mm of it: too short to hold the vertex and the depth -> its own centre
    assert rsna.roi_centre(slab, affine, "CT", 90.0) == pytest.approx(affine[:3, :3] @ ((np.array(slab.shape) - 1) / 2) + affine[:3, 3])


def test_a_point_in_the_box_reaches_its_voxel_and_its_token():
    hu, affine, _ = _head()
    ijk = np.round(np.linalg.solve(affine[:3, :3], np.array([12.0, -20.0, -30.0]) - affine[:3, 3])).astype(int)
    hu[tuple(ijk)] = 3000.0
    point = affine[:3, :3] @ ijk + affine[:3, 3]  # the bright voxel's centre
    centre, roi, size = np.array([10.0, -14.0, -25.0]), (64.0, 64.0, 48.0), 32
    box = rsna.sample_box(hu, affine, centre, roi, size, cval=-1024.0)
    peak = np.array(np.unravel_index(int(np.argmax(box)), box.shape))
    expected = (point - (centre - np.array(roi) / 2)) / np.array(roi) * size - 0.5
    assert np.abs(peak - expected).max() <= 1.0
    tokens = rsna.point_tokens(np.stack([point, centre + np.array(roi)]), centre, roi, grid=4)
    assert tokens[0].tolist() == list(np.floor((point - (centre - np.array(roi) / 2)) / np.array(roi) * 4).astype(int))
    assert tokens[1].tolist() == [-1, -1, -1]  # on the far corner: outside
    x, c = rsna.model_input(hu, affine, "CT", roi, 90.0, 16)
    assert x.shape == (3, 16, 16, 16) and 0 <= x.min() and x.max() <= 1


def test_plan_trains_every_arm_on_all_labels_and_two_arms_on_fractions():
    cfg = config.resolve(NB, "demo", seeds=2, label_fractions=(0.25, 1.0))
    plan = rsna.plan(cfg)
    assert sorted(plan) == sorted([(a, 1.0, s) for a in ("finetune", "scratch", "probe") for s in (0, 1)]
                                  + [(a, 0.25, s) for a in ("finetune", "scratch") for s in (0, 1)])


def test_heldout_rows_put_finetune_against_scratch_as_the_headline():
    table = pd.DataFrame([{"arm": a, "label_fraction": f, "seed": s, "weighted_auc": v}
                          for (a, f), vs in {("finetune", 1.0): (0.8, 0.7), ("scratch", 1.0): (0.6, 0.7),
                                             ("probe", 1.0): (0.55, 0.45), ("finetune", 0.5): (0.6, 0.6),
                                             ("scratch", 0.5): (0.65, 0.75)}.items() for s, v in enumerate(vs)])
    rows = rsna.heldout_rows(table, n_test=10)
    head = [r for r in rows if r["headline"]]
    assert len(head) == 1 and head[0]["value"] == pytest.approx(0.75) and head[0]["baseline_value"] == pytest.approx(0.65)
    half = [r for r in rows if "0.5 of the training labels" in r["task"]]
    assert len(half) == 1 and half[0]["value"] == pytest.approx(0.6) and half[0]["baseline_value"] == pytest.approx(0.7)
    assert all(r["n"] == 10 and r["seeds"] == "0,1" for r in rows)


@pytest.fixture(scope="module")
def rsna_fixture(convert_fixture):
    return convert_fixture("rsna2025_aneurysm")


def _encoder():
    torch.manual_seed(0)
    return WaveFormer3D(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2)


def test_series_sets_points_and_the_probe_keeps_the_encoder(rsna_fixture, tmp_path):
    tmp, _, _, ds = rsna_fixture
    cfg = config.resolve(NB, "smoke", real_data=str(ds.root))
    enc = _encoder()
    sets = rsna.split_sets(ds, enc, rsna.DEFAULT_ROI_MM, 95.0)
    labelled = set(ds.labels["image_id"])
    assert all(set(s.rows["image_id"]) <= labelled for v in sets.values() for s in v.values())
    item = next(s[i] for v in sets.values() for s in v.values() for i in range(len(s)) if s[i]["has_points"])
    assert item["points"].shape == (13, 4, 4, 4) and item["points"].sum() >= 1
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    model = rsna.train_arm(cfg, "probe", 1.0, 0, enc, sets, tmp_path / "probe", torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    pred = rsna.predict_split(model, sets["val"], torch.device("cpu"))
    assert list(pred.columns[2:]) == list(rsna.LABELS) and pred[list(rsna.LABELS)].stack().between(0, 1).all()


def test_predict_reads_like_the_converter_and_falls_back_for_a_refused_series(rsna_fixture, tmp_path):
    tmp, facts, _, ds = rsna_fixture
    model = rsna.make_model("scratch", _encoder(), 0).eval()
    prevalence = np.linspace(0.1, 0.9, 14)
    sub.save_classifier(tmp_path / "model.pt", model, (120.0, 120.0, 90.0), 95.0, prevalence)
    loaded, meta = sub.load_classifier(tmp_path)
    predictor = sub.Predictor(loaded, meta, torch.device("cpu"), amp=False)
    good = tmp / "raw" / ds.images(split="test")["source"].iloc[0]
    row = predictor(good)
    assert list(row.columns) == list(rsna.LABELS) and len(row) == 1 and not predictor.log[-1]["fallback"]
    v = ds.images(split="test").iloc[0]
    from lib.data.io import load_volume
    vol = load_volume(ds.file(v["image_id"]), channels=(1,))
    x, _ = rsna.model_input(vol.array[0], vol.affine, v["modality"], meta["roi_mm"], 95.0, 16)
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(x)[None]))[0].numpy()
    np.testing.assert_allclose(row.iloc[0].to_numpy(float), expected, atol=1e-4)  # training and submission agree
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "1.dcm").write_bytes(b"not a dicom file")
    fallback = predictor(bad)
    assert fallback.iloc[0].to_numpy(float) == pytest.approx(prevalence) and predictor.log[-1]["fallback"]
    with pytest.raises(ValueError, match="not a 09_rsna_aneurysm classifier"):
        from lib.checkpoint import save
        save(tmp_path / "other.pt", {"format": "something else"})
        sub.load_classifier(tmp_path / "other.pt")
    times = sub.timing(predictor.log, sub.model_flops(loaded))
    assert {"read_s", "model_s", "total_s"} <= set(times["stage"]) and times["mean_s"].notna().all()



def test_07_reports_09_as_the_ssl_headline_and_demotes_the_blob_task(tmp_path, monkeypatch):
    from lib.checkpoint import save_encoder
    from lib.families import downstream, pretrain
    from lib.families.results import write_heldout
    from lib.runs import start_run

    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "results"))
    cfg = config.resolve("07_evaluate", "smoke")
    assert pretrain.rsna_rows(cfg) == []  # no 09 run: the blob task stays the headline
    run = start_run(NB, "smoke")
    table = pd.DataFrame([{"arm": a, "label_fraction": 1.0, "seed": 0, "weighted_auc": v}
                          for a, v in (("finetune", 0.61), ("scratch", 0.66), ("probe", 0.52))])
    write_heldout(run.dir, rsna.heldout_rows(table, n_test=12))
    run.finish()
    start_run(NB, "smoke", mode="submit").finish()  # a newer submission run, which scores nothing
    save_encoder(_encoder(), tmp_path / "03" / "encoder.pt")
    blob = pd.DataFrame([{"arm": a, "seed": 0, "test_auc": v, "n_test": 8} for a, v in
                         (("scratch", 0.9), ("finetune", 0.95), ("probe", 0.8))])
    monkeypatch.setattr(downstream, "compare", lambda *a, **k: blob)
    monkeypatch.setattr(pretrain.demo, "ensure", lambda *a, **k: (tmp_path, {}))
    rows = pretrain.downstream_rows(tmp_path / "03", cfg, tmp_path / "07", torch.device("cpu"))
    heads = [r for r in rows if r["headline"]]
    assert len(heads) == 1 and "RSNA 2025" in heads[0]["task"] and heads[0]["run_id"] == run.run_id
    assert heads[0]["value"] == pytest.approx(0.61) and heads[0]["baseline_value"] == pytest.approx(0.66)
    assert any("blob" in r["task"] and not r["headline"] for r in rows)
    from lib.summary import verdict
    assert verdict(heads[0]) == "WORSE than baseline"  # said as measured


def test_the_box_matches_the_field_the_encoder_was_pretrained_on(rsna_fixture, tmp_path):
    import json

    _, _, _, ds = rsna_fixture
    run = tmp_path / "03run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"prep_size": 64, "spacing": 1.5}}))
    assert rsna.pretraining_field_mm(run) == pytest.approx(96.0)
    cfg = config.resolve(NB, "smoke")
    assert rsna.box_of(cfg, run) == (96.0, 96.0, 96.0)
    assert rsna.box_of(cfg, run / "encoder.pt") == (96.0, 96.0, 96.0)  # a checkpoint inside the run folder
    assert rsna.box_of(config.resolve(NB, "smoke", roi_mm=(100.0, 90.0, 80.0)), run) == (100.0, 90.0, 80.0)
    assert rsna.box_of(cfg, tmp_path / "elsewhere.pt") == rsna.DEFAULT_ROI_MM  # not a run: the default
    (run / "run.json").write_text(json.dumps({"config": {"prep_size": 10, "spacing": None, "real_data": str(ds.root)}}))
    spacings = [np.mean([float(v) for v in t.split()]) for t in ds.index["spacing_mm"]]
    assert rsna.pretraining_field_mm(run) == pytest.approx(10 * float(np.median(spacings)))
