"""OpenMind: the raw fixture (lib.data.fixtures.openmind) converted; voxels against nibabel's own RAS."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lib.data import convert, fixtures, prepared


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openmind")
    facts = fixtures.write("openmind", tmp / "raw")
    summary = convert.run("openmind", tmp / "raw", tmp / "prepared", progress=False)
    return tmp, facts, summary, prepared.open_dataset(tmp / "prepared")


def test_every_row_is_converted_or_refused_with_its_reason(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert len(report) == len(facts["images"]) == summary["items"]
    for rel, status in facts["images"].items():
        assert report.loc[f"OpenMind/{rel}", "status"] == status, rel
    reasons = report[report["status"] == "refused"]["reason"]
    assert reasons.str.contains("voxel data unreadable").sum() == 1
    assert reasons.str.contains("not in the download").sum() == 1
    assert reasons.str.contains("4D image").sum() == 1
    assert set(ds.index["modality"]) == {"MRI"} and {"T1w", "T2w", "FLAIR", "PDw"} <= set(ds.index["sequence"])


def test_images_and_masks_are_the_sources_voxels_in_ras(converted):
    tmp, facts, _, ds = converted
    for row in ds.images().itertuples():
        source = nib.as_closest_canonical(nib.load(tmp / "raw" / row.source))
        out = nib.load(row.file)
        assert nib.aff2axcodes(out.affine) == ("R", "A", "S"), row.image_id
        np.testing.assert_allclose(out.affine, source.affine, atol=1e-4)
        np.testing.assert_array_equal(out.get_fdata(), source.get_fdata())
        for column in ("mask_path", "deface_mask_path"):
            if getattr(row, column):
                mask = nib.load(ds.root / getattr(row, column))
                assert mask.shape == out.shape and np.allclose(mask.affine, out.affine)
                assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
    by_id = ds.index.set_index("image_id")
    assert by_id.loc["ds000002/sub-01/anat/sub-01_T1w.nii.gz", "mask_path"] == ""  # the image without masks
    derived = by_id.loc["ds000001/sub-01/anat/sub-01_T1w__Data/sub-01_T1w_brain.nii.gz"]
    assert derived["meta_derived_from"] == "ds000001/sub-01/anat/sub-01_T1w.nii.gz"
    assert derived["subject"] == "ds000001/sub-01"


def test_sessions_of_a_subject_share_a_split_and_every_split_is_used(converted):
    *_, ds = converted
    assert ds.index.groupby("subject")["split"].nunique().max() == 1
    assert len(ds.index[ds.index["subject"] == "ds000001/sub-02"]) == 2  # two sessions
    assert set(ds.index["split"]) == {"train", "val", "test"}


def test_filters_refuse_with_the_reason(tmp_path, converted):
    raw = converted[0] / "raw"
    convert.run("openmind", raw, tmp_path / "p", options={"modalities": "T1w", "min_quality": 2.0}, progress=False)
    ds = prepared.open_dataset(tmp_path / "p")
    assert set(ds.index["sequence"]) == {"T1w"}
    assert (ds.index["meta_image_quality_score"].astype(float) >= 2).all()
    reasons = ds.report.set_index("source")["reason"]
    assert reasons["OpenMind/ds000001/sub-03/anat/sub-03_FLAIR.nii.gz"] == "filtered: modality FLAIR not in T1w"
    assert reasons["OpenMind/ds000001/sub-01/anat/sub-01_T2w.nii.gz"].startswith("filtered: modality T2w")


def test_cli_and_fixture_cli(tmp_path, capsys):
    from lib.data.convert.__main__ import main
    from lib.data.fixtures.__main__ import main as fixture_main

    assert fixture_main(["openmind", "--out", str(tmp_path / "raw")]) == 0
    capsys.readouterr()
    assert main(["openmind", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "p"), "--quiet",
                 "--min-quality", "3.5", "--limit", "6"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 6 and summary["converted"] + summary["refused"] == 6
    assert prepared.open_dataset(tmp_path / "p").info["options"]["min_quality"] == 3.5
