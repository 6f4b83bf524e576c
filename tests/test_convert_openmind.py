"""OpenMind: the raw fixture (lib.data.fixtures.openmind) converted; voxels against nibabel's own RAS."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lib.data import convert, prepared


@pytest.fixture(scope="module")
def converted(convert_fixture):
    return convert_fixture("openmind")


def test_every_row_is_converted_or_refused_with_its_reason(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert len(report) == len(facts["images"]) == summary["items"]
    for rel, status in facts["images"].items():
        assert report.loc[f"OpenMind/{rel}", "status"] == status, rel
    for rel, fragment in facts["refused"].items():
        assert fragment in report.loc[f"OpenMind/{rel}", "reason"], rel
    assert summary["refused"] == len(facts["refused"]) and summary["converted"] == len(ds.index)
    assert set(ds.index["modality"]) == {"MRI"} and {"T1w", "T2w", "FLAIR", "PDw"} <= set(ds.index["sequence"])
    assert set(ds.index["converter_version"]) == {"2"}


def test_images_and_masks_are_the_sources_voxels_in_ras(converted):
    tmp, facts, _, ds = converted
    assert {"LPS", "LAS", "RAS", "oblique"} <= set(facts["orientation"].values())
    for row in ds.images().itertuples():
        source = nib.as_closest_canonical(nib.load(tmp / "raw" / row.source))
        out = nib.load(row.file)
        assert nib.aff2axcodes(out.affine) == ("R", "A", "S"), row.image_id
        np.testing.assert_allclose(out.affine, source.affine, atol=1e-4)
        np.testing.assert_array_equal(out.get_fdata(), source.get_fdata())
        assert row.spacing_mm == prepared.fmt_tuple(source.header.get_zooms()[:3])
        for column in ("mask_path", "deface_mask_path"):
            if getattr(row, column):
                mask = nib.load(ds.root / getattr(row, column))
                assert mask.shape == out.shape and np.allclose(mask.affine, out.affine)
                assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
    by_id = ds.index.set_index("image_id")
    assert by_id.loc["ds000002/sub-01/anat/sub-01_T1w.nii.gz", ["mask_path", "deface_mask_path"]].tolist() == ["", ""]
    assert by_id.loc["ds000001/sub-01/anat/sub-01_T2w.nii.gz", "deface_mask_path"] == ""  # anatomy mask only
    derived = by_id.loc["ds000001/sub-01/anat/sub-01_T1w__Data/sub-01_T1w_brain.nii.gz"]
    assert derived["meta_derived_from"] == "ds000001/sub-01/anat/sub-01_T1w.nii.gz"
    assert derived["subject"] == "ds000001/sub-01" and derived["meta_is_brain_extract"] == "True"


def test_a_mask_off_the_image_grid_is_dropped_with_a_note(converted):
    *_, facts, _, ds = converted
    (rel,) = facts["mask_dropped"]
    row = ds.index.set_index("image_id").loc[rel]
    assert row["mask_path"] == "" and row["deface_mask_path"] != ""  # the deface mask is on the grid: kept
    reason = ds.report.set_index("source").loc[f"OpenMind/{rel}", "reason"]
    assert "fb_mask.nii.gz dropped: not on the image's grid" in reason


def test_sessions_of_a_subject_share_a_split_and_every_split_is_used(converted):
    *_, ds = converted
    assert ds.index.groupby("subject")["split"].nunique().max() == 1
    sessions = ds.index[ds.index["subject"] == "ds000001/sub-02"]
    assert sorted(sessions["session"]) == ["ses-1", "ses-2"]
    assert set(ds.index["split"]) == {"train", "val", "test"}


def test_filters_refuse_with_the_reason(tmp_path, converted):
    tmp, facts, _, _ = converted
    convert.run("openmind", tmp / "raw", tmp_path / "p", options={"modalities": "T1w", "min_quality": 2.0}, progress=False)
    ds = prepared.open_dataset(tmp_path / "p")
    assert set(ds.index["sequence"]) == {"T1w"}
    assert (ds.index["meta_image_quality_score"].astype(float) >= 2).all()
    reasons = ds.report.set_index("source")["reason"]
    assert reasons["OpenMind/ds000001/sub-03/anat/sub-03_FLAIR.nii.gz"] == "filtered: modality FLAIR not in T1w"
    assert reasons["OpenMind/ds000001/sub-01/anat/sub-01_T2w.nii.gz"].startswith("filtered: modality T2w")

    convert.run("openmind", tmp / "raw", tmp_path / "q", options={"min_quality": 2.0}, progress=False)
    ds = prepared.open_dataset(tmp_path / "q")
    report = ds.report.set_index("source")
    for rel in facts["low_quality"]:
        assert report.loc[f"OpenMind/{rel}", "reason"] == "filtered: image_quality_score 1.2 < 2"
    filtered = report[report["reason"].str.startswith("filtered:")]
    assert (filtered["status"] == "refused").all() and len(filtered) == len(facts["low_quality"])
    assert len(ds.index) == sum(s == "converted" for s in facts["images"].values()) - len(facts["low_quality"])


def test_a_second_run_skips_what_it_converted(converted):
    tmp, facts, first, ds = converted
    sha = dict(zip(ds.index["image_id"], ds.index["sha256"]))
    again = convert.run("openmind", tmp / "raw", tmp / "prepared", progress=False)
    assert again["skipped"] == first["converted"] and again["converted"] == 0
    assert again["refused"] == len(facts["refused"])  # refused rows are tried again (they may have been fixed)
    ds2 = prepared.open_dataset(tmp / "prepared")
    assert dict(zip(ds2.index["image_id"], ds2.index["sha256"])) == sha and not ds2.verify_checksums()
    skipped = ds2.report[ds2.report["status"] == "skipped"]["reason"]
    assert skipped.str.startswith(convert.SKIPPED).all() and len(skipped) == first["converted"]


def test_cli_and_fixture_cli(tmp_path, capsys):
    from lib.data.convert.__main__ import main
    from lib.data.fixtures.__main__ import main as fixture_main

    assert fixture_main(["openmind", "--out", str(tmp_path / "raw")]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "openmind"
    assert (tmp_path / "raw" / "openneuro_metadata.csv").is_file()
    assert main(["openmind", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "p"), "--quiet",
                 "--min-quality", "3.5", "--modalities", "T1w,T2w", "--limit", "6"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 6 and summary["converted"] + summary["refused"] == 6
    ds = prepared.open_dataset(tmp_path / "p")
    assert ds.info["options"]["min_quality"] == 3.5 and ds.info["options"]["modalities"] == "T1w,T2w"
    assert set(ds.index["sequence"]) <= {"T1w", "T2w"} and ds.info["licence"].startswith("CC-BY-4.0")


def test_spacing_resamples_images_and_masks_onto_one_grid(converted, tmp_path):
    tmp, *_ = converted
    convert.run("openmind", tmp / "raw", tmp_path / "p", options={"spacing": 1.5, "modalities": "T1w"}, progress=False)
    ds = prepared.open_dataset(tmp_path / "p")
    assert set(ds.index["spacing_mm"]) == {"1.5 1.5 1.5"}
    for row in ds.images().itertuples():
        img = nib.load(row.file)
        for column in ("mask_path", "deface_mask_path"):
            if getattr(row, column):
                mask = nib.load(ds.root / getattr(row, column))
                assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
                assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
