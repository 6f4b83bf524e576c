"""RSNA 2025 aneurysm: the raw fixture (lib.data.fixtures.rsna2025_aneurysm) converted, every quirk accounted
for, and the DICOM path cross-checked against dcm2niix and SimpleITK."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lib.data import convert, fixtures, prepared
from lib.data.convert import rsna2025_aneurysm as rsna

FIX = fixtures.get("rsna2025_aneurysm")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rsna")
    facts = fixtures.write("rsna2025_aneurysm", tmp / "raw")
    summary = convert.run("rsna2025_aneurysm", tmp / "raw", tmp / "prepared", progress=False)
    return tmp, facts, summary, prepared.open_dataset(tmp / "prepared")


def _by_quirk(facts, quirk):
    return next(s for s in facts["series"].values() if s["quirk"] == quirk)


def test_every_series_is_converted_or_refused_with_its_reason(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert len(report) == len(facts["series"]) == summary["items"]
    for uid, s in facts["series"].items():
        assert report.loc[f"series/{uid}", "status"] == s["status"], s["name"]
    reason = {s["quirk"]: report.loc[f"series/{s['uid']}", "reason"] for s in facts["series"].values() if s["quirk"]}
    assert "1 32x32 coronal" in reason["scout_blank"] and "1 blank" in reason["scout_blank"]
    assert "dropped 2 image(s) at duplicate slice positions" in reason["duplicates"]
    assert reason["uneven"].startswith("resampled: uneven slice gaps from 1 to 1.75 mm")
    assert "assumed geometry" in reason["multiframe_nogeometry"]
    assert "one slice position" in reason["one_position"]
    assert "pixel data could not be decoded (first: " in reason["truncated"]
    assert "series folder" in reason["no_folder"] and "missing" in reason["no_folder"]
    assert "not in train.csv" in reason["not_in_csv"]
    ct = facts["series"][f"{FIX.ROOT_UID}1000"]["uid"]
    assert "absent from the series" in report.loc[f"series/{ct}", "reason"]
    by_id = ds.index.set_index("image_id")
    assert by_id.loc[_by_quirk(facts, "multiframe_nogeometry")["uid"], "assumed_geometry"] == "1"
    assert by_id.loc[_by_quirk(facts, "truncated")["uid"], "shape"].endswith(" 7")  # lost its last slice


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
        if s["quirk"] not in ("uneven", "multiframe_nogeometry"):  # true geometry: exact position, blob value
            assert data[tuple(ijk)] == FIX.BLOB
            lps = np.array(s["point"]["lps"])
            np.testing.assert_allclose([float(p["x"]), float(p["y"]), float(p["z"])], [-lps[0], -lps[1], lps[2]], atol=1e-3)
    assert len(points) == sum(s["status"] == "converted" for s in facts["series"].values())  # the absent SOP left out


def test_uneven_series_is_resampled_onto_the_median_gap(converted):
    _, facts, _, ds = converted
    s = _by_quirk(facts, "uneven")
    img = nib.load(ds.file(s["uid"]))
    data = img.get_fdata()
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = (img.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    expected = FIX.field(ras * [-1, -1, 1]).reshape(data.shape) + 0.0
    far = np.abs(data - FIX.BLOB) > 1000  # away from the blob the linear field is reproduced exactly
    np.testing.assert_allclose(data[far], expected[far], atol=1.0)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [0.6, 0.6, 1.0], atol=1e-6)


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


def _sitk(folder):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)
    return nib.as_closest_canonical(nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps))


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


def test_rerun_shards_workers_limit_and_cli(converted, tmp_path, capsys):
    tmp, facts, _, ds = converted
    raw = tmp / "raw"
    again = convert.run("rsna2025_aneurysm", raw, tmp / "prepared", progress=False)
    assert again["converted"] == 0 and again["skipped"] == len(ds.index)
    skipped = prepared.open_dataset(tmp / "prepared").report.set_index("source")
    scout = _by_quirk(facts, "scout_blank")["uid"]
    assert skipped.loc[f"series/{scout}", "status"] == "skipped"
    assert "32x32 coronal" in skipped.loc[f"series/{scout}", "reason"]  # what the conversion did is kept
    for shard in ("1/2", "2/2"):
        convert.run("rsna2025_aneurysm", raw, tmp_path / "sharded", shard=shard, workers=2, progress=False)
    cols = ["image_id", "split", "shape", "sha256", "mask_path"]
    sort = lambda d: d.index[cols].sort_values("image_id").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(sort(prepared.open_dataset(tmp_path / "sharded")), sort(ds))
    from lib.data.convert.__main__ import main

    capsys.readouterr()
    assert main(["rsna2025_aneurysm", "--src", str(raw), "--out", str(tmp_path / "cli"), "--limit", "3",
                 "--modalities", "CTA", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 3
    assert set(prepared.open_dataset(tmp_path / "cli").index["sequence"]) <= {"CTA"}


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
