"""DeepLesion: the raw fixture (lib.data.fixtures.deeplesion) converted, from the folder and from the zip parts."""

from __future__ import annotations

import io
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.data import convert, fixtures, prepared


@pytest.fixture(scope="module")
def converted(convert_fixture):
    return convert_fixture("deeplesion", workers=2)


def _hu(raw, folder, first, last):
    """The run's slices as the official script reads them: PNG - 32768, stacked [row, column, slice]."""
    return np.stack([np.array(Image.open(io.BytesIO((raw / "Images_png" / folder / f"{k:03d}.png").read_bytes())),
                              dtype=np.int32) - 32768 for k in range(first, last + 1)], axis=-1)


def test_runs_become_sub_volumes_and_bad_runs_are_refused(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert {s.removeprefix("Images_png/"): st for s, st in report["status"].items()} == facts["runs"]
    for key, fragment in facts["refused"].items():
        assert fragment in report.loc[f"Images_png/{key}", "reason"], key
    assert not report["reason"].str.contains("0x").any()  # no memory addresses in reasons
    assert summary["refused"] == len(facts["refused"]) and summary["converted"] == len(ds.index)
    assert len(ds.index[ds.index["image_id"].str.startswith("000001_01_01/")]) == 2  # one folder, two runs
    assert set(ds.index["path"]) == {f"images/{k.replace('/', '_')}.nii.gz" for k in ds.index["image_id"]}
    assert set(ds.index["modality"]) == {"CT"} and "unconfirmed" in ds.info["licence"]


def test_hu_voxels_and_geometry_are_the_official_scripts(converted):
    """Voxels are PNG - 32768; the image is the official DL_save_nifti.py volume (its affine), made RAS."""
    tmp, _, _, ds = converted
    info = pd.read_csv(tmp / "raw" / "DL_info.csv", dtype=str)
    for row in ds.images().itertuples():
        folder, run = row.image_id.split("/")
        first, last = (int(v) for v in run.split("-"))
        hu = _hu(tmp / "raw", folder, first, last)
        img = nib.load(row.file)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and img.get_data_dtype() == np.int16
        # RAS: i runs to the patient's right (image columns reversed), j anterior (rows reversed), k superior
        np.testing.assert_array_equal(img.get_fdata(), hu[::-1, ::-1, ::-1].transpose(1, 0, 2))
        spacing = [float(v) for v in info.loc[info["File_name"].str.startswith(folder), "Spacing_mm_px_"].iloc[0].split(",")]
        np.testing.assert_allclose(img.header.get_zooms(), spacing)
        official = np.array([[0, -spacing[1], 0, 0], [-spacing[0], 0, 0, 0], [0, 0, -spacing[2], 0], [0, 0, 0, 1]])
        canonical = nib.as_closest_canonical(nib.Nifti1Image(hu.astype(np.int16), official))
        np.testing.assert_allclose(img.affine, canonical.affine, atol=1e-6)
        np.testing.assert_array_equal(img.get_fdata(), canonical.get_fdata())


def test_lesion_points_land_on_the_blob_with_their_type(converted):
    _, facts, _, ds = converted
    converted_runs = set(ds.index["image_id"])
    expected = [les for les in facts["lesions"] if les["run"] in converted_runs]
    assert len(ds.points) == len(expected) == 7
    blob = fixtures.get("deeplesion").BLOB_HU
    for p in ds.points.itertuples():
        img = nib.load(ds.file(p.image_id))
        ijk = np.array([int(p.i), int(p.j), int(p.k)])
        assert img.get_fdata()[tuple(ijk)] == blob
        np.testing.assert_allclose((img.affine @ [*ijk, 1])[:3], [float(p.x), float(p.y), float(p.z)], atol=1e-3)
    types = fixtures.get("deeplesion").FOLDERS
    split_of = {f: v[1] for f, v in types.items()}
    for p in ds.points.itertuples():
        folder = p.image_id.split("/")[0]
        assert (p.label == "unknown") == (split_of[folder] == 1), p  # the training split is untyped
    assert sorted(ds.points[ds.points["image_id"] == "000002_01_01/020-027"]["label"]) == ["kidney", "liver"]
    counts = ds.labels.set_index("image_id")["lesions"].astype(int)
    assert counts["000002_01_01/020-027"] == 2 and counts["000001_01_01/030-034"] == 1 and counts.sum() == 7


def test_splits_are_the_datasets_and_patients_do_not_leak(converted):
    _, facts, _, ds = converted
    folders = ds.index.assign(folder=ds.index["image_id"].str.split("/").str[0])
    for folder, split in zip(folders["folder"], folders["split"]):
        assert split == {1: "train", 2: "val", 3: "test"}[facts["splits"][folder]]
    assert ds.index.groupby("subject")["split"].nunique().max() == 1
    assert len(ds.index[ds.index["subject"] == "1"]) == 3  # patient 1: two studies, three runs, one split


def test_the_zip_parts_convert_to_the_same_images(converted, tmp_path):
    fixtures.get("deeplesion").write(tmp_path / "raw", zipped=True)
    assert not (tmp_path / "raw" / "Images_png").exists()
    convert.run("deeplesion", tmp_path / "raw", tmp_path / "prepared", progress=False)
    cols = ["image_id", "split", "shape", "spacing_mm", "sha256"]
    a = prepared.open_dataset(tmp_path / "prepared").index[cols].sort_values("image_id").reset_index(drop=True)
    b = converted[3].index[cols].sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_a_second_run_skips_what_it_converted(converted):
    tmp, facts, first, ds = converted
    again = convert.run("deeplesion", tmp / "raw", tmp / "prepared", progress=False)
    assert again["skipped"] == first["converted"] and again["converted"] == 0 and again["refused"] == len(facts["refused"])
    ds2 = prepared.open_dataset(tmp / "prepared")
    assert ds2.index["sha256"].tolist() == ds.index["sha256"].tolist() and len(ds2.points) == len(ds.points)


def test_cli_keeps_single_slice_runs_with_min_slices_1(tmp_path, capsys):
    from lib.data.convert.__main__ import main
    from lib.data.fixtures.__main__ import main as fixture_main

    assert fixture_main(["deeplesion", "--out", str(tmp_path / "raw")]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "deeplesion"
    assert main(["deeplesion", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "p"), "--quiet",
                 "--min-slices", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ds = prepared.open_dataset(tmp_path / "p")
    assert ds.info["options"]["min_slices"] == 1 and summary["converted"] == len(ds.index)
    single = ds.index.set_index("image_id").loc["000008_01_01/060-060"]
    assert single["shape"] == "48 48 1" and single["split"] == "test"
    assert ds.report.set_index("source").loc["Images_png/000008_01_01/060-060", "status"] == "converted"


def test_spacing_resamples_and_points_follow_the_written_grid(converted, tmp_path):
    tmp, *_ = converted
    convert.run("deeplesion", tmp / "raw", tmp_path / "p", options={"spacing": 1.0}, progress=False)
    ds = prepared.open_dataset(tmp_path / "p")
    assert set(ds.index["spacing_mm"]) == {"1 1 1"} and len(ds.points) == 7
    for p in ds.points.itertuples():
        img = nib.load(ds.file(p.image_id))
        ijk = np.array([int(p.i), int(p.j), int(p.k)])
        world = (img.affine @ [*ijk, 1])[:3]
        assert np.abs(world - [float(p.x), float(p.y), float(p.z)]).max() <= 0.5 + 1e-6  # the nearest voxel
        assert img.get_fdata()[tuple(ijk)] > 400  # on the blob (900 HU, body 40 HU), after linear resampling
