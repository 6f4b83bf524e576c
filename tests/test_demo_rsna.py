"""The mini RSNA 2025 aneurysm competition (lib.data.demo_rsna): built at smoke size, converted by the real
converter without a refusal, its labels, localizers and sides right, its bytes reproducible."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from lib.data import demo_rsna, prepared
from lib.data.convert import rsna2025_aneurysm as rsna


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """``(root, raw, dataset)``: ensure() and prepared() of the smoke size under a fresh data root."""
    root = tmp_path_factory.mktemp("rsna_mini")
    raw = demo_rsna.ensure("smoke", root=root)
    out = demo_rsna.prepared("smoke", root=root)
    return root, raw, prepared.open_dataset(out)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_stamp_and_counts(mini):
    root, raw, _ = mini
    assert raw == root / "smoke_rsna" / "raw"
    stamp = json.loads((raw / "competition.json").read_text())
    assert stamp["version"] == demo_rsna.VERSION and stamp["size"] == "smoke" and stamp["seed"] == 0
    train = pd.read_csv(raw / "train.csv")
    assert list(train.columns) == ["SeriesInstanceUID", "PatientAge", "PatientSex", "Modality", *rsna.LABELS]
    assert len(train) == stamp["counts"]["series"] == demo_rsna.SIZES["smoke"]
    assert set(train["Modality"]) == {"CTA", "MRA"} and 0.5 <= (train["Modality"] == "CTA").mean() <= 0.7
    assert 0.4 <= train["Aneurysm Present"].mean() <= 0.6
    assert (train["Aneurysm Present"] == train[rsna.LABELS[:-1]].max(axis=1)).all()  # the OR of the locations
    assert sorted(p.name for p in (raw / "series").iterdir()) == sorted(train["SeriesInstanceUID"])
    shape = stamp["grid"]["shape"]
    for uid in train["SeriesInstanceUID"]:
        assert len(list((raw / "series" / uid).glob("*.dcm"))) == shape[2]
    loc = pd.read_csv(raw / "train_localizers.csv")
    assert list(loc.columns) == ["SeriesInstanceUID", "SOPInstanceUID", "coordinates", "location"]
    assert len(loc) == stamp["counts"]["aneurysms"] == len(stamp["aneurysms"])
    for row in loc.itertuples(index=False):
        assert set(ast.literal_eval(row.coordinates)) == {"x", "y"}  # the real Python-dict string
        assert (raw / "series" / row.SeriesInstanceUID / f"{row.SOPInstanceUID}.dcm").is_file()
        assert train.set_index("SeriesInstanceUID").loc[row.SeriesInstanceUID, row.location] == 1
    assert (train[rsna.LABELS[:-1]].sum(axis=1) == train["SeriesInstanceUID"].map(
        loc["SeriesInstanceUID"].value_counts()).fillna(0)).all()  # one localizer per labelled location


def test_dicom_headers(mini):
    import pydicom

    _, raw, _ = mini
    train = pd.read_csv(raw / "train.csv").set_index("SeriesInstanceUID")
    sx, sy, sz = json.loads((raw / "competition.json").read_text())["grid"]["spacing_mm"]
    for uid, modality in train["Modality"].items():
        ds = pydicom.dcmread(next((raw / "series" / uid).glob("*.dcm")))
        assert ds.Modality == {"CTA": "CT", "MRA": "MR"}[modality] and ds.SeriesInstanceUID == uid
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == sz and [float(v) for v in ds.PixelSpacing] == [sy, sx]  # rows, columns
        assert ("RescaleIntercept" in ds) == (modality == "CTA")
        assert "StudyDate" not in ds and "ContentTime" not in ds  # nothing that changes between builds


def test_every_series_converts_with_its_labels(mini):
    _, raw, ds = mini
    train = pd.read_csv(raw / "train.csv", dtype=str).set_index("SeriesInstanceUID")
    assert len(ds.report) == len(train) and set(ds.report["status"]) == {"converted"}
    assert ds.report["reason"].str.startswith("shape ").all()  # nothing dropped, assumed or left out
    assert set(ds.index["dropped_images"]) == {"0"} and set(ds.index["assumed_geometry"]) == {"0"}
    by_id = ds.index.set_index("image_id")
    assert (by_id.loc[train.index, "sequence"] == train["Modality"]).all()
    labels = ds.labels.set_index("image_id").loc[train.index, rsna.LABELS]
    assert (labels.astype(str) == train[rsna.LABELS]).all().all()


def test_localizers_land_on_their_blob_on_their_side(mini):
    _, raw, ds = mini
    truth = {(a["SeriesInstanceUID"], a["location"]): a
             for a in json.loads((raw / "competition.json").read_text())["aneurysms"]}
    assert len(ds.points) == len(truth)
    modality = ds.index.set_index("image_id")["modality"]
    for p in ds.points.itertuples(index=False):
        assert p.inside == "1", p
        img = nib.load(ds.file(p.image_id))
        data, (i, j, k) = img.get_fdata(), (int(p.i), int(p.j), int(p.k))
        xyz = np.array([float(p.x), float(p.y), float(p.z)])
        a = truth[(p.image_id, p.label)]
        assert np.linalg.norm(xyz - a["ras_mm"]) <= a["radius_mm"], p  # on its blob
        if modality[p.image_id] == "CT":
            assert data[i, j, k] >= 200, p  # contrast-filled aneurysm (HU); brain is ~40, blood ~300
            head = data > -500
        else:
            head = ndimage.uniform_filter(data, 3) > 0.06 * demo_rsna.MR_SCALE
            assert data[i, j, k] >= 1.5 * np.percentile(data[head], 99), p  # as bright as the arteries
        centre = img.affine[0, 0] * np.flatnonzero(head[:, j, k]).mean() + img.affine[0, 3]  # head's centre on the row
        side = {"Left": -1, "Right": 1}.get(p.label.split()[0], 0)
        assert side * (xyz[0] - centre) > 0 or side == 0, (p.label, xyz[0], centre)


def test_every_location_occurs_in_the_demo_size():
    entries = demo_rsna.plan("demo", 0)
    located = [loc for e in entries for loc in e["locations"]]
    assert set(located) == set(rsna.LABELS[:-1]) == set(demo_rsna.SITES)
    assert all(len(e["locations"]) == len(set(e["locations"])) <= 2 for e in entries)
    assert 60 <= len(entries) <= 80 and abs(sum(bool(e["locations"]) for e in entries) / len(entries) - 0.5) < 0.1
    assert len({e["uid"] for e in entries}) == len(entries) and all(len(e["uid"]) <= 64 for e in entries)


def test_place_aneurysm_follows_its_artery():
    from lib.data import phantoms as ph

    rng = np.random.default_rng(0)
    tree = ph.vessel_tree(rng)
    for location, (side, _, _) in demo_rsna.SITES.items():
        centre, radius = demo_rsna.place_aneurysm(rng, tree, location)
        assert 4.0 <= radius <= 7.0 and centre.shape == (3,)
        if side:  # MNI x > 0 is the patient's Right
            assert side * centre[0] > 0, location
    with pytest.raises(ValueError, match="unknown location"):
        demo_rsna.place_aneurysm(rng, tree, "Aneurysm Present")


def test_the_fixtures_cli_writes_the_same_bytes(mini, tmp_path, capsys):
    from lib.data.fixtures.__main__ import main

    _, raw, _ = mini  # built by ensure() on up to 2 processes; the fixture builds on one
    assert main(["rsna_mini", "--out", str(tmp_path / "again")]) == 0
    assert json.loads(capsys.readouterr().out)["series"] == demo_rsna.SIZES["smoke"]
    assert _hashes(tmp_path / "again") == _hashes(raw)


def test_ensure_and_prepared_skip_what_is_done_and_rebuild_another_version(mini, monkeypatch):
    root, raw, _ = mini
    stamp_time = (raw / "competition.json").stat().st_mtime_ns
    assert demo_rsna.ensure("smoke", root=root) == raw and (raw / "competition.json").stat().st_mtime_ns == stamp_time
    out = demo_rsna.prepared("smoke", root=root)
    assert set(pd.read_csv(out / "report.csv")["status"]) == {"skipped"}
    calls = []

    def fake_build(out, size, seed, **kw):
        calls.append((size, seed))
        (Path(out) / "competition.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "competition.json").write_text(json.dumps({"version": demo_rsna.VERSION, "size": size, "seed": seed}))

    other = root / "other"
    (other / "smoke_rsna" / "raw").mkdir(parents=True)
    (other / "smoke_rsna" / "raw" / "competition.json").write_text(json.dumps({"version": "0", "size": "smoke", "seed": 0}))
    (other / "smoke_rsna" / "prepared").mkdir()
    monkeypatch.setattr(demo_rsna, "build", fake_build)
    assert demo_rsna.ensure("smoke", root=other) == other / "smoke_rsna" / "raw" and calls == [("smoke", 0)]
    assert not (other / "smoke_rsna" / "prepared").exists()  # a conversion of the old build goes with it
    with pytest.raises(ValueError, match="unknown size"):
        demo_rsna.ensure("huge", root=other)


def test_the_converted_volume_is_the_generated_one(mini):
    from lib.data import phantoms as ph

    _, _, ds = mini
    entries = demo_rsna.plan("smoke", 0)
    grid = ph.BRAIN_GRID["smoke"]
    for modality in ("CTA", "MRA"):  # DICOM geometry and rescale undone exactly: same voxels, same affine
        entry = next(e for e in entries if e["modality"] == modality and e["locations"])
        img = nib.load(ds.file(entry["uid"]))
        volume, _ = demo_rsna.series_volume(entry, grid, 0)
        np.testing.assert_allclose(img.affine, grid.affine)
        np.testing.assert_array_equal(np.asarray(img.dataobj), volume)
