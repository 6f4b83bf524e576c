"""The built-in demo cohort: deterministic, split by subject, physically sensible, verified by the manifest."""

import numpy as np
import pandas as pd
import pytest

from lib.data import demo, drr, manifest, phantoms as ph


@pytest.fixture
def smoke(smoke_cohort):
    return smoke_cohort


def test_a_fresh_build_matches_the_committed_manifest_checksums(smoke):
    # the manifest rows were written by another build: same seed, same arrays
    assert manifest.verify_cohort(smoke, "smoke") == []


def test_subjects_depend_on_seed_and_index_only():
    grid = ph.BRAIN_GRID["smoke"]
    a, fa = demo.head_ct_subject(0, 1, grid)
    b, fb = demo.head_ct_subject(0, 1, grid)
    c, _ = demo.head_ct_subject(1, 1, grid)
    assert np.array_equal(a["ct"], b["ct"]) and fa == fb
    assert not np.allclose(a["ct"], c["ct"])


def test_every_subject_is_in_exactly_one_split(smoke):
    subjects = pd.read_csv(smoke / "subjects.csv")
    assert not subjects.duplicated(["dataset", "subject"]).any()
    for _, group in subjects.groupby("dataset"):
        assert set(group["split"]) == {"train", "val", "test"}
    pairs = pd.read_csv(smoke / "cxr_pairs" / "pairs.csv")
    chest = subjects[subjects["dataset"] == "chest_ct"].set_index("subject")["split"]
    assert (pairs["split"] == pairs["subject"].map(chest)).all()
    assert demo.assign_splits(40).count("train") == 28 and demo.assign_splits(40).count("test") == 6


def test_chest_pairs_differ_where_contrast_goes(smoke):
    import nibabel as nib

    nc = nib.load(smoke / "chest_ct/sub-000/noncontrast.nii.gz").get_fdata()
    c = nib.load(smoke / "chest_ct/sub-000/contrast.nii.gz").get_fdata()
    diff = c - nc
    enhanced = diff > 150
    assert 0.002 < enhanced.mean() < 0.2           # vessels and heart only
    assert np.abs(diff[~enhanced]).mean() < 25     # elsewhere only noise (two noise draws of 12 HU)
    lung = (nc < -700) & (nc > -950)
    assert lung.mean() > 0.05 and abs(np.median(nc[lung]) + 850) < 60


def test_aneurysm_masks_agree_with_labels(smoke):
    import nibabel as nib

    subjects = pd.read_csv(smoke / "subjects.csv")
    head = subjects[subjects["dataset"] == "head_ct"]
    for _, s in head.iterrows():
        mask = nib.load(smoke / "head_ct" / s["subject"] / "aneurysm.nii.gz").get_fdata()
        assert (mask.sum() > 0) == bool(s["aneurysm"])
        if s["aneurysm"]:
            ct = nib.load(smoke / "head_ct" / s["subject"] / "ct.nii.gz").get_fdata()
            assert ct[mask > 0].mean() > 200   # contrast-filled blob


def test_change_maps_are_signed_and_nuisance_pairs_are_blank(smoke):
    pairs = pd.read_csv(smoke / "cxr_pairs" / "pairs.csv", keep_default_na=False)
    for _, p in pairs.iterrows():
        change = np.load(smoke / "cxr_pairs" / p["pair"] / "change.npy")
        assert int((change != 0).sum()) == p["changed_px"]
        if p["nuisance_only"]:
            assert not change.any()
        elif p["appeared"] and not p["resolved"] and "pneumothorax" not in p["appeared"]:
            assert change.sum() > 0   # more attenuation appeared
    assert pairs["nuisance_only"].sum() < len(pairs)


def test_clean_change_floor_and_small_components():
    change = np.zeros((20, 20), np.float32)
    change[2:6, 2:6] = 0.05     # 16 px: kept
    change[10, 10] = 0.5        # 1 px: dropped
    change[15:18, 15:18] = 0.001  # below the floor: dropped
    cleaned = demo.clean_change(change)
    assert cleaned[2:6, 2:6].min() == pytest.approx(0.05) and cleaned.sum() == pytest.approx(16 * 0.05)


def test_drr_beer_lambert_matches_the_line_integral_of_a_water_slab():
    hu = np.full((20, 30, 10), -1000.0, np.float32)   # air
    hu[5:15, 5:25, 2:8] = 0.0                          # water: 20 voxels of 2 mm along A–P = 40 mm
    p = drr.line_integrals(hu, (2.0, 2.0, 3.0), 0.0)
    assert p.shape == (10, 20)                          # rows S→I, columns R→L
    assert p.max() == pytest.approx(drr.MU_WATER * 40.0, rel=1e-6) and p.min() == 0.0
    lateral = drr.line_integrals(hu, (2.0, 2.0, 3.0), 90.0)
    assert lateral.max() == pytest.approx(drr.MU_WATER * 20.0, rel=0.05)  # 10 voxels along R–L


def test_drr_orientation_patient_right_on_image_left_superior_on_top():
    hu = np.full((10, 10, 10), -1000.0, np.float32)
    hu[8:, :, 8:] = 1000.0   # block at patient right (+x), superior (+z)
    p = drr.line_integrals(hu, (1.0, 1.0, 1.0))
    assert p[:2, :2].min() > 0 and p[2:, :].max() == 0 and p[:, 2:].max() == 0


def test_drr_rejects_bad_input():
    with pytest.raises(ValueError, match="3D"):
        drr.line_integrals(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="isotropic"):
        drr.line_integrals(np.zeros((4, 4, 4)), (1, 2, 1))


def test_unknown_size_and_finding_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid sizes: smoke, demo"):
        demo.build(tmp_path, "huge")
    with pytest.raises(ValueError, match="valid findings"):
        ph.sample_finding(np.random.default_rng(0), ph.sample_chest(np.random.default_rng(0)), "fracture")
