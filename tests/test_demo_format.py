"""The built-in cohort is a prepared dataset, and its readers find through the format exactly the files and
facts the directory layout gives (the layout logic is written out here as the independent reference)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from lib.data import datasets, demo, demo_format, prepared
from lib.data.demo_format import FORMAT_FILES, IMAGES
from lib.data.io import load_volume
from lib.data.transforms import ct_windows
from lib.families import downstream


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
    subjects = pd.read_csv(smoke_cohort / "subjects.csv", dtype=str, keep_default_na=False)
    pairs = pd.read_csv(smoke_cohort / "cxr_pairs" / "pairs.csv", dtype=str, keep_default_na=False)
    items = ([f"{d}/{s}" for d, s in zip(subjects["dataset"], subjects["subject"])]
             + [f"drr/{s}" for s in subjects[subjects["dataset"] == "chest_ct"]["subject"]]
             + [f"cxr_pairs/{p}" for p in pairs["pair"]])
    assert sorted(ds.report["source"]) == sorted(items)  # every generated item, once
    assert set(ds.index["dataset"]) == {"brain_mri", "head_ct", "chest_ct", "drr", "cxr_pairs"}
    assert dict(zip(ds.index["dataset"], ds.index["modality"])) == {
        "brain_mri": "MRI", "head_ct": "CT", "chest_ct": "CT", "drr": "XR", "cxr_pairs": "XR"}


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
        for i in range(len(cxr)):
            item, p = cxr[i], cxr.pairs.iloc[i]["pair"]
            for name in ("baseline", "followup", "change"):
                assert torch.equal(item[name][0], torch.from_numpy(np.load(smoke_cohort / "cxr_pairs" / p / f"{name}.npy")))
        chest = list(rows[rows["dataset"] == "chest_ct"]["subject"])
        drr, series = datasets.DRRVolumes(smoke_cohort, split), datasets.SeriesPairs(smoke_cohort, split, 4, 16)
        assert drr.subjects == series.subjects == chest
        for s in chest:
            assert drr.ct_path(s) == smoke_cohort / "chest_ct" / s / "noncontrast.nii.gz"
            assert [drr.drr_path(s, v) for v in ("frontal", "lateral")] == [
                smoke_cohort / "drr" / s / f"{v}.npy" for v in ("frontal", "lateral")]
            assert [datasets.image_file(smoke_cohort, "chest_ct", s, n) for n in series.names] == [
                smoke_cohort / "chest_ct" / s / f"{n}.nii.gz" for n in ("noncontrast", "contrast")]


def _blob_patches_from_the_layout(root, split, size, per_subject=4, seed=downstream.DATA_SEED, margin=4.0):
    """blob_patches as it read the cohort before the format: subjects.csv and the directory layout."""
    subjects = pd.read_csv(root / "subjects.csv", dtype={"subject": str, "split": str}, keep_default_na=False)
    out = {}
    for modality, dataset, name in (("CT", "head_ct", "ct.nii.gz"), ("MRI", "brain_mri", "mra.nii.gz")):
        xs = []
        for _, s in subjects[(subjects["dataset"] == dataset) & (subjects["split"] == split)].iterrows():
            rng = np.random.default_rng([seed, 1 if dataset == "head_ct" else 2, int(s["subject"].split("-")[1])])
            v = load_volume(root / dataset / s["subject"] / name)
            if modality == "CT":
                array, vessels = ct_windows(v.array), v.array[0] > 150
            else:
                array = datasets.normalise_mri(v.array)
                vessels = array[0] > 0.6
            blob = np.array([int(t) for t in str(s["aneurysm_voxel"]).split()]) if int(s["aneurysm"]) else None
            pos, neg = downstream._centres(rng, vessels, blob, per_subject, size // 2, size / 2 + margin, 2)
            xs += [downstream._patch(array, c, size) for c in pos + neg]
        out[modality] = np.stack(xs)
    return out


def test_blob_patches_match_the_directory_layout_and_take_a_dataset(smoke_cohort):
    ds = prepared.open_dataset(smoke_cohort)
    for split in ("train", "test"):
        ours, ref = downstream.blob_patches(ds, split, 16, per_subject=2), _blob_patches_from_the_layout(smoke_cohort, split, 16, 2)
        for modality in ("CT", "MRI"):
            assert np.array_equal(ours[modality][0].numpy(), ref[modality].astype(np.float32))


def test_readers_take_a_prepared_dataset(smoke_cohort):
    ds = prepared.open_dataset(smoke_cohort)
    for modality in datasets.MODALITIES:
        assert datasets.volume_files(ds, modality, "train") == datasets.volume_files(smoke_cohort, modality, "train")
    pd.testing.assert_frame_equal(datasets.subjects(ds, "head_ct"), datasets.subjects(smoke_cohort, "head_ct"))
    a, b = datasets.CXRPairs(ds, "val", size=32), datasets.CXRPairs(smoke_cohort, "val", size=32)
    assert torch.equal(a[0]["change"], b[0]["change"]) and a[0]["pair"] == b[0]["pair"]
    assert datasets.DRRVolumes(ds, "test").subjects == datasets.DRRVolumes(smoke_cohort, "test").subjects
    pd.testing.assert_frame_equal(demo.summary(ds), demo.summary(smoke_cohort))
    assert set(demo.examples(ds)) == set(demo.examples(smoke_cohort))


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
    assert sorted(prepared.open_dataset(out).report["source"]) == sorted(prepared.open_dataset(smoke_cohort).report["source"])


def test_ensure_leaves_a_current_index_alone_and_reindexes_an_older_one(smoke_cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path))
    shutil.copytree(smoke_cohort, tmp_path / "smoke")
    index = tmp_path / "smoke" / "index.csv"
    stamp = index.stat().st_mtime_ns
    demo.ensure("smoke", progress=False)
    assert index.stat().st_mtime_ns == stamp  # current: not rewritten
    info = json.loads((tmp_path / "smoke" / "dataset.json").read_text())
    (tmp_path / "smoke" / "dataset.json").write_text(json.dumps({**info, "converter_version": "lib.data.demo v0"}))
    demo.ensure("smoke", progress=False)
    assert prepared.open_dataset(tmp_path / "smoke").info["converter_version"] == demo_format.VERSION


def test_ensure_indexes_a_copy_of_a_read_only_cohort(smoke_cohort, tmp_path, monkeypatch):
    attached = tmp_path / "input" / "smoke"
    shutil.copytree(smoke_cohort, attached)
    for name in FORMAT_FILES:
        (attached / name).unlink()
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(demo, "cohort_dir", lambda size: attached)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == attached else real_access(p, mode))
    out, report = demo.ensure("smoke", progress=False)
    assert out == tmp_path / "data" / "smoke" and not report["built"]
    assert not (attached / "index.csv").exists()
    assert datasets.volume_files(out, "CT") == [out / p.relative_to(smoke_cohort) for p in datasets.volume_files(smoke_cohort, "CT")]
