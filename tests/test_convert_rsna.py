"""RSNA 2025 aneurysm: the raw fixture (lib.data.fixtures.rsna2025_aneurysm) converted, every quirk accounted
for, and the DICOM path cross-checked against dcm2niix and SimpleITK."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from references import sitk_series

from lib.data import convert, fixtures, prepared
from lib.data.convert import rsna2025_aneurysm as rsna

FIX = fixtures.get("rsna2025_aneurysm")


@pytest.fixture(scope="module")
def converted(convert_fixture):
    return convert_fixture("rsna2025_aneurysm")


def _by_quirk(facts, quirk):
    return next(s for s in facts["series"].values() if s["quirk"] == quirk)


def test_every_series_is_converted_or_refused_with_its_reason(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert len(report) == len(facts["series"]) == summary["items"]
    for uid, s in facts["series"].items():
        assert report.loc[f"series/{uid}", "status"] == s["status"], s["name"]
    reason = {s["quirk"]: report.loc[f"series/{s['uid']}", "reason"] for s in facts["series"].values() if s["quirk"]}
    assert reason["scout_blank"] == "dropped 2 of 10 files: 1 scout (32x32, coronal; kept 24x24, axial), 1 blank"
    assert reason["duplicates"] == "dropped 2 of 10 files: 2 at a duplicate position"
    assert reason["uneven"].startswith("resampled: uneven slice gaps from 1 to 1.75 mm, now 9 slices 1 mm apart")
    assert "ASSUMED GEOMETRY" in reason["multiframe_nogeometry"]
    assert "assumed" not in reason["multiframe"].lower()  # its geometry is in the functional groups
    assert reason["one_position"].startswith("all 5 image(s) lie at one slice position")
    t = _by_quirk(facts, "truncated")
    assert reason["truncated"].startswith(f"dropped 2 of 9 files: 1 unreadable ({t['uid']}.999.dcm), "
                                          f"1 damaged (pixel data not decodable; first: {t['sops'][-1]}.dcm: ")
    assert "series folder" in reason["no_folder"] and "missing" in reason["no_folder"]
    assert "not in train.csv" in reason["not_in_csv"]
    ct = facts["series"][f"{FIX.ROOT_UID}1000"]["uid"]
    assert f"on SOP {ct}.99 absent from the series: left out" in report.loc[f"series/{ct}", "reason"]
    for s in facts["series"].values():  # clean series: nothing to say but their shape
        if s["quirk"] is None and s["uid"] != ct:
            assert report.loc[f"series/{s['uid']}", "reason"].startswith("shape "), s["name"]
    by_id = ds.index.set_index("image_id")
    assert by_id.loc[_by_quirk(facts, "multiframe_nogeometry")["uid"], "assumed_geometry"] == "1"
    assert (by_id["assumed_geometry"] == "1").sum() == 1
    assert by_id.loc[_by_quirk(facts, "truncated")["uid"], "shape"].endswith(" 7")  # lost its last slice
    for s in facts["series"].values():
        if s["status"] == "converted":
            assert int(by_id.loc[s["uid"], "dropped_images"]) == s["dropped"], s["name"]


def test_ct_is_int16_hounsfield_even_when_resampled(converted):
    _, facts, _, ds = converted
    for uid, s in facts["series"].items():
        if s["status"] == "converted" and s["modality"] == "CT":
            img = nib.load(ds.file(uid))
            assert img.get_data_dtype() == np.int16, s["name"]
            data = np.asanyarray(img.dataobj).astype(float)
            far = _away_from_blob(data)
            hu = FIX.field(_world(img) * [-1, -1, 1])  # stored +1024 with intercept -1024: HU is the field itself
            np.testing.assert_allclose(data[far], hu[far], atol=1.0 if s["quirk"] == "uneven" else 0, err_msg=s["name"])


def _away_from_blob(data, margin=2):
    """Every voxel more than ``margin`` voxels (per axis) away from the brightest one."""
    peak = np.array(np.unravel_index(np.argmax(data), data.shape))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
    return np.abs(ijk - peak).max(-1) > margin


def _world(img):
    """RAS mm of every voxel of a NIfTI image, ``[X, Y, Z, 3]``."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in img.shape[:3]], indexing="ij"), -1)
    return ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
def test_modalities_labels_and_splits(converted):
    tmp, facts, _, ds = converted
    by_id = ds.index.set_index("image_id")
    for uid, s in facts["series"].items():
        if s["status"] == "converted":
            assert by_id.loc[uid, "modality"] == s["modality"]
    train = pd.read_csv(tmp / "raw" / "train.csv", dtype=str).set_index("SeriesInstanceUID")
    assert list(ds.labels.columns[1:15]) == rsna.LABELS == FIX.LABELS  # the competition's order
    for row in ds.labels.itertuples(index=False):
        assert [str(v) for v in row[1:15]] == list(train.loc[row[0], rsna.LABELS])
    assert set(ds.index["sequence"]) >= {"CTA", "MRA", "MRI T2", "MRI T1post"}
    assert ds.index["subject"].is_unique and set(ds.index["split"]) == {"train", "val", "test"}


def test_localizers_land_on_the_blob(converted):
    _, facts, _, ds = converted
    points = ds.points.set_index("image_id")
    for uid, s in facts["series"].items():
        if s["status"] != "converted":
            continue
        p = points.loc[uid]
        img = nib.load(ds.file(uid))
        data, ijk = img.get_fdata(), np.array([int(p["i"]), int(p["j"]), int(p["k"])])
        world = img.affine @ [*ijk, 1]
        assert np.abs(world[:3] - [float(p["x"]), float(p["y"]), float(p["z"])]).max() <= np.abs(img.affine[:3, :3]).max()
        peak = np.unravel_index(np.argmax(data), data.shape)
        assert np.abs(np.array(peak) - ijk).max() <= 1, (s["name"], peak, ijk)  # on the blob, within a voxel
        assert p["inside"] == "1"
        if s["quirk"] not in ("uneven", "multiframe_nogeometry"):  # true geometry: exact position, blob value
            assert data[tuple(ijk)] == FIX.BLOB
            np.testing.assert_allclose(world[:3], [float(p["x"]), float(p["y"]), float(p["z"])], atol=1e-3)
            lps = np.array(s["point"]["lps"])
            np.testing.assert_allclose([float(p["x"]), float(p["y"]), float(p["z"])], [-lps[0], -lps[1], lps[2]], atol=1e-3)
    assert len(points) == sum(s["status"] == "converted" for s in facts["series"].values())  # the absent SOP left out


def test_uneven_series_is_resampled_onto_the_median_gap(converted):
    _, facts, _, ds = converted
    s = _by_quirk(facts, "uneven")
    img = nib.load(ds.file(s["uid"]))
    data = img.get_fdata()
    expected = FIX.field(_world(img) * [-1, -1, 1])
    far = _away_from_blob(data)  # away from the blob the linear field is reproduced (CT rounded to HU)
    np.testing.assert_allclose(data[far], expected[far], atol=1.0)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [0.6, 0.6, 1.0], atol=1e-6)
    assert img.shape[2] == 9  # 0 .. 8.25 mm at 1 mm: 0, 1, ..., 8


def test_segmentations_are_reoriented_onto_the_image(converted):
    _, facts, _, ds = converted
    by_id = ds.index.set_index("image_id")
    for uid, seg in facts["segmentations"].items():
        mask = nib.load(ds.root / by_id.loc[uid, "mask_path"])
        image = nib.load(ds.file(uid))
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        labels = np.asarray(mask.dataobj)
        assert set(np.unique(labels)) == {0, 6, 13}
        for label, world in seg["world_label"].items():
            i, j, k = np.round(np.linalg.solve(mask.affine, [*world, 1])[:3]).astype(int)
            assert labels[i, j, k] == int(label)


def _dcm2niix(folder, out):
    import dcm2niix

    out.mkdir(parents=True)
    subprocess.run([dcm2niix.bin, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)],
                   check=True, capture_output=True)
    (path,) = out.glob("ref*.nii")
    return nib.as_closest_canonical(nib.load(path))


_sitk = sitk_series  # SimpleITK: the independent reader


@pytest.mark.parametrize("reference", ["dcm2niix", "SimpleITK"])
def test_clean_series_match_independent_readers(converted, reference, tmp_path):
    tmp, facts, _, ds = converted
    assert len(facts["clean"]) >= 8
    for n, uid in enumerate(facts["clean"]):
        folder = tmp / "raw" / "series" / uid
        ref = _dcm2niix(folder, tmp_path / str(n)) if reference == "dcm2niix" else _sitk(folder)
        ours = nib.load(ds.file(uid))
        assert ours.shape == ref.shape, (uid, ours.shape, ref.shape)
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
        np.testing.assert_array_equal(ours.get_fdata(), ref.get_fdata())


def _index(root):
    cols = ["image_id", "subject", "split", "modality", "sequence", "shape", "spacing_mm", "sha256", "mask_path"]
    return prepared.open_dataset(root).index[cols].sort_values("image_id").reset_index(drop=True)


def test_rerun_skips_everything_and_keeps_the_notes(converted):
    tmp, facts, _, ds = converted
    again = convert.run("rsna2025_aneurysm", tmp / "raw", tmp / "prepared", progress=False)
    assert again["converted"] == 0 and again["skipped"] == len(ds.index)
    assert again["refused"] == sum(s["status"] == "refused" for s in facts["series"].values())  # tried again
    report = prepared.open_dataset(tmp / "prepared").report.set_index("source")
    scout = _by_quirk(facts, "scout_blank")["uid"]
    assert report.loc[f"series/{scout}", "status"] == "skipped"
    assert report.loc[f"series/{scout}", "reason"] == convert.SKIPPED + ds.report.set_index("source").loc[
        f"series/{scout}", "reason"]  # what the conversion did is kept
    pd.testing.assert_frame_equal(_index(tmp / "prepared"), _index(ds.root))


def test_two_workers_and_two_shards_give_the_same_dataset(converted, tmp_path):
    tmp, _, _, ds = converted
    convert.run("rsna2025_aneurysm", tmp / "raw", tmp_path / "workers", workers=2, progress=False)
    pd.testing.assert_frame_equal(_index(tmp_path / "workers"), _index(ds.root))
    two = prepared.open_dataset(tmp_path / "workers")
    pd.testing.assert_frame_equal(two.points.sort_values(["image_id", "label"]).reset_index(drop=True),
                                  ds.points.sort_values(["image_id", "label"]).reset_index(drop=True))
    sizes = [convert.run("rsna2025_aneurysm", tmp / "raw", tmp_path / "sharded", shard=shard, progress=False)["items"]
             for shard in ("1/2", "2/2")]
    assert min(sizes) > 0 and sum(sizes) == len(ds.report)
    pd.testing.assert_frame_equal(_index(tmp_path / "sharded"), _index(ds.root))


def test_cli_limit_and_modalities(converted, tmp_path, capsys):
    from lib.data.convert.__main__ import main

    tmp, *_ = converted
    capsys.readouterr()
    assert main(["rsna2025_aneurysm", "--src", str(tmp / "raw"), "--out", str(tmp_path / "cli"), "--limit", "5",
                 "--modalities", "CTA", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 5 and summary["converted"] + summary["refused"] == 5
    ds = prepared.open_dataset(tmp_path / "cli")
    assert len(ds.report) == 5 and set(ds.index["sequence"]) <= {"CTA"}
    filtered = ds.report[ds.report["reason"].str.startswith("filtered: modality")]
    assert len(filtered) + len(ds.index) + (ds.report["reason"].str.contains("missing|one slice position")).sum() == 5
    assert ds.info["options"]["modalities"] == "CTA" and ds.info["source"] == rsna.INFO["source"]


def test_localizers_on_missing_frames_are_left_out_with_a_reason():
    from lib.data.dicom_lenient import Frame

    def frame(sop, f):
        return Frame(Path(sop), f, sop, 1, np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), (1.0, 1.0), 4, 4, None)

    by_sop = {"single": {None: frame("single", None)}, "multi": {0: frame("multi", 0), 1: frame("multi", 1)}}
    assert rsna._frame_of(by_sop, "single", 7)[0] is by_sop["single"][None]  # 'f' on a single-frame file: ignored
    assert rsna._frame_of(by_sop, "multi", 1)[0] is by_sop["multi"][1]
    assert "has no 'f'" in rsna._frame_of(by_sop, "multi", None)[1]
    assert "no frame 2 (0-based; 2 frames)" in rsna._frame_of(by_sop, "multi", 2)[1]
    assert "absent from the series" in rsna._frame_of(by_sop, "other", None)[1]


def test_fixture_cli(tmp_path, capsys):
    from lib.data.fixtures.__main__ import main as fixture_main

    assert fixture_main(["rsna2025_aneurysm", "--out", str(tmp_path / "raw"), "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "rsna2025_aneurysm" and out["series"] == len(FIX.SERIES)
    raw = tmp_path / "raw"
    assert (raw / "train.csv").is_file() and (raw / "train_localizers.csv").is_file()
    assert (raw / "kaggle_evaluation").is_dir() and len(list((raw / "series").iterdir())) == len(FIX.SERIES) - 1
    train = pd.read_csv(raw / "train.csv")
    assert list(train.columns) == ["SeriesInstanceUID", "PatientAge", "PatientSex", "Modality", *FIX.LABELS]
    assert set(train["Modality"]) == {"CTA", "MRA", "MRI T2", "MRI T1post"}
    assert len(list((raw / "segmentations").glob("*_cowseg.nii"))) == 1  # one flat, one nested
    assert len(list((raw / "segmentations").glob("*/*_cowseg.nii"))) == 1
    loc = pd.read_csv(raw / "train_localizers.csv")
    assert list(loc.columns) == ["SeriesInstanceUID", "SOPInstanceUID", "coordinates", "location"]
    assert loc["coordinates"].str.contains("'f'").sum() == 2  # the two multi-frame series


def test_spacing_resamples_everything_together_and_new_options_convert_again(converted, tmp_path):
    tmp, facts, _, _ = converted
    out = tmp_path / "iso"
    first = convert.run("rsna2025_aneurysm", tmp / "raw", out, options={"spacing": 1.2}, progress=False)
    ds = prepared.open_dataset(out)
    assert set(ds.index["spacing_mm"]) == {"1.2 1.2 1.2"}
    by_id = ds.index.set_index("image_id")
    for uid in facts["segmentations"]:
        mask, image = nib.load(ds.root / by_id.loc[uid, "mask_path"]), nib.load(ds.file(uid))
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) == {0, 6, 13}
    for p in ds.points.itertuples():
        data = nib.load(ds.file(p.image_id)).get_fdata()
        peak = np.unravel_index(np.argmax(data), data.shape)
        assert np.abs(np.array(peak) - [int(p.i), int(p.j), int(p.k)]).max() <= 1, p.image_id
    assert first["converted"] == len(ds.index)
    again = convert.run("rsna2025_aneurysm", tmp / "raw", out, options={"spacing": 1.5}, progress=False)
    assert again["skipped"] == 0 and again["converted"] == first["converted"]  # other options: converted again
    assert set(prepared.open_dataset(out).index["spacing_mm"]) == {"1.5 1.5 1.5"}


def test_openmind_masks_follow_the_resampled_image(tmp_path):
    fixtures.write("openmind", tmp_path / "raw")
    convert.run("openmind", tmp_path / "raw", tmp_path / "p", options={"spacing": 2.0}, progress=False)
    ds = prepared.open_dataset(tmp_path / "p")
    for row in ds.images().itertuples():
        image = nib.load(row.file)
        assert np.allclose(image.header.get_zooms(), 2.0)
        if row.mask_path:
            mask = nib.load(ds.root / row.mask_path)
            assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
