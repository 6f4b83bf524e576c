"""The built-in cohort is a prepared dataset, and its readers find through the format exactly the files and
facts the directory layout gives (the layout logic is written out here as the independent reference)."""

from __future__ import annotations

import shutil

import nibabel as nib
import pandas as pd

from lib.data import datasets, demo, prepared
from lib.data.demo_format import FORMAT_FILES, IMAGES


def test_the_cohort_opens_and_indexes_every_file_once(smoke_cohort):
    ds = prepared.open_dataset(smoke_cohort)
    assert ds.info["name"] == "smoke" and ds.info["source"] == "builtin:smoke"
    referenced = list(ds.index["path"]) + [p for p in ds.index["mask_path"] if p] + list(ds.pairs["target_path"])
    on_disk = sorted(p.relative_to(smoke_cohort).as_posix() for p in smoke_cohort.rglob("*")
                     if p.suffix in (".gz", ".npy"))
    assert sorted(referenced) == on_disk  # every image, mask and change map exactly once
    assert ds.verify_checksums() == []
    assert set(ds.index["modality"]) == {"MRI", "CT", "XR"}
    assert (ds.report["status"] == "converted").all()


def test_readers_match_the_directory_layout(smoke_cohort):
    subjects = pd.read_csv(smoke_cohort / "subjects.csv", dtype=str, keep_default_na=False)
    for split in ("train", "val", "test"):
        rows = subjects[(subjects["split"] == split)]
        mri = [smoke_cohort / "brain_mri" / s / f"{n}.nii.gz" for s in rows[rows["dataset"] == "brain_mri"]["subject"]
               for n in ("t1", "t2", "mra")]
        ct = [smoke_cohort / "head_ct" / s / "ct.nii.gz" for s in rows[rows["dataset"] == "head_ct"]["subject"]]
        assert datasets.volume_files(smoke_cohort, "MRI", split) == mri
        assert datasets.volume_files(smoke_cohort, "CT", split) == ct
        for dataset in IMAGES:
            ours = datasets.subjects(smoke_cohort, dataset, split)
            ref = rows[rows["dataset"] == dataset].reset_index(drop=True)
            pd.testing.assert_frame_equal(ours[["dataset", "subject", "split"]], ref[["dataset", "subject", "split"]])
            if dataset != "chest_ct":
                assert list(ours["aneurysm"]) == list(ref["aneurysm"])
                assert list(ours["aneurysm_voxel"]) == list(ref["aneurysm_voxel"])
        pairs = pd.read_csv(smoke_cohort / "cxr_pairs" / "pairs.csv", dtype=str, keep_default_na=False)
        cxr = datasets.CXRPairs(smoke_cohort, split)
        assert list(cxr.pairs["pair"]) == list(pairs[pairs["split"] == split]["pair"])
    drr = datasets.DRRVolumes(smoke_cohort, "train")
    assert drr.ct_path("sub-000") == smoke_cohort / "chest_ct" / "sub-000" / "noncontrast.nii.gz"
    assert datasets.image_file(smoke_cohort, "drr", "sub-001", "lateral") == smoke_cohort / "drr" / "sub-001" / "lateral.npy"


def test_aneurysm_points_sit_in_their_masks(smoke_cohort):
    ds = prepared.open_dataset(smoke_cohort)
    head = ds.points[ds.points["image_id"].str.startswith("head_ct/")]
    assert len(head) == int((datasets.subjects(smoke_cohort, "head_ct")["aneurysm"] == "1").sum()) > 0
    for p in head.itertuples():
        mask = nib.load(ds.file(p.image_id, "mask_path"))
        assert mask.get_fdata()[int(p.i), int(p.j), int(p.k)] > 0
        assert abs((mask.affine @ [int(p.i), int(p.j), int(p.k), 1])[0] - float(p.x)) < 1e-3


def test_ensure_indexes_a_cohort_built_before_the_format(smoke_cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path))
    shutil.copytree(smoke_cohort, tmp_path / "smoke")
    for name in FORMAT_FILES:
        (tmp_path / "smoke" / name).unlink(missing_ok=True)
    out, report = demo.ensure("smoke", progress=False)
    assert out == tmp_path / "smoke" and not report["built"]  # verified, not rebuilt
    assert len(prepared.open_dataset(out).index) == len(prepared.open_dataset(smoke_cohort).index)
