"""DeepLesion: the raw fixture (lib.data.fixtures.deeplesion) converted, from the folder and from the zip parts."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.data import convert, fixtures, prepared


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deeplesion")
    facts = fixtures.write("deeplesion", tmp / "raw")
    convert.run("deeplesion", tmp / "raw", tmp / "prepared", workers=2, progress=False)
    return tmp, facts, prepared.open_dataset(tmp / "prepared")


def test_runs_become_sub_volumes_and_bad_runs_are_refused(converted):
    _, facts, ds = converted
    report = ds.report.set_index("source")
    assert {s.removeprefix("Images_png/"): st for s, st in report["status"].items()} == facts["runs"]
    refused = report[report["status"] == "refused"]["reason"]
    for fragment in ("unreadable PNG", "L PNG; DeepLesion slices are 16-bit", "different sizes",
                     "no row in DL_info.csv", "a run of 1 slice"):
        assert refused.str.contains(fragment, regex=False).sum() == 1, fragment
    assert not refused.str.contains("0x").any()  # no memory addresses in reasons
    assert len(ds.index[ds.index["image_id"].str.startswith("000001_01_01/")]) == 2  # one folder, two runs


def test_hu_voxels_and_geometry(converted):
    tmp, _, ds = converted
    info = pd.read_csv(tmp / "raw" / "DL_info.csv", dtype=str)
    for row in ds.images().itertuples():
        folder, run = row.image_id.split("/")
        first, last = (int(v) for v in run.split("-"))
        slices = [np.array(Image.open(io.BytesIO((tmp / "raw" / "Images_png" / folder / f"{k:03d}.png").read_bytes())),
                           dtype=np.int32) - 32768 for k in range(first, last + 1)]
        img = nib.load(row.file)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = img.get_fdata()
        # RAS: i runs to the patient's right (image columns reversed), j anterior (rows reversed), k superior
        expected = np.stack(slices)[::-1, ::-1, ::-1].transpose(2, 1, 0)
        np.testing.assert_array_equal(data, expected)
        spacing = [float(v) for v in info.loc[info["File_name"].str.startswith(folder), "Spacing_mm_px_"].iloc[0].split(",")]
        np.testing.assert_allclose(img.header.get_zooms(), spacing)


def test_lesion_points_land_on_the_blob_and_splits_are_the_datasets(converted):
    _, facts, ds = converted
    assert len(ds.points) == 5
    for p in ds.points.itertuples():
        img = nib.load(ds.file(p.image_id))
        ijk = np.array([int(p.i), int(p.j), int(p.k)])
        assert img.get_fdata()[tuple(ijk)] == fixtures.get("deeplesion").BLOB_HU
        np.testing.assert_allclose((img.affine @ [*ijk, 1])[:3], [float(p.x), float(p.y), float(p.z)], atol=1e-3)
    splits = ds.index.assign(folder=ds.index["image_id"].str.split("/").str[0]).set_index("folder")["split"]
    for folder, split in splits.items():
        assert split == {1: "train", 2: "val", 3: "test"}[facts["splits"][folder]]
    assert ds.index.groupby("subject")["split"].nunique().max() == 1


def test_the_zip_parts_convert_to_the_same_images(converted, tmp_path):
    fixtures.get("deeplesion").write(tmp_path / "raw", zipped=True)
    assert not (tmp_path / "raw" / "Images_png").exists()
    convert.run("deeplesion", tmp_path / "raw", tmp_path / "prepared", progress=False)
    cols = ["image_id", "split", "shape", "spacing_mm", "sha256"]
    a = prepared.open_dataset(tmp_path / "prepared").index[cols].sort_values("image_id").reset_index(drop=True)
    b = converted[2].index[cols].sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
