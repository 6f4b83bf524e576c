"""A corpus of bad input, one parametrized test per entry point: every case is a file made here (a truncated
``.nii.gz``, a truncated ``.npy``, a ``subjects.csv`` without ``split``, a header with a negative voxel size, a
missing CLI, a converter's damaged image or table, a damaged ``model.pt``) and the error (or a conversion's report
row, the conversion going on) must name it and say what is wrong, leaving the input folder and any prepared
dataset as they were."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib import paths
from lib.data import survey
from lib.data.io import load_volume


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what "nothing was written or corrupted" compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- NIfTI files

def _nifti_bytes(pixdim1: float = 2.0) -> bytes:
    """An uncompressed NIfTI-1 of random voxels (so that gzip cannot shrink it to nothing), pixdim[1] set raw
    (nibabel would make a negative one positive when writing)."""
    import nibabel as nib

    data = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    raw = bytearray(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())
    raw[80:84] = struct.pack("<f", pixdim1)  # pixdim is 8 float32 at byte 76; pixdim[1] at 80
    return bytes(raw)


def _write(folder: Path, case: str) -> tuple[Path, str]:
    """The bad file of ``case`` under ``folder`` and the text its error must contain."""
    gz = gzip.compress(_nifti_bytes())
    made = {
        "truncated_gz_data": ("vol.nii.gz", gz[: len(gz) // 2], "truncated or damaged gzip"),
        "truncated_gz_header": ("vol.nii.gz", gz[:40], "truncated or damaged gzip"),
        "not_gzip": ("vol.nii.gz", b"this is not a gzip stream at all" * 20, "truncated or damaged gzip"),
        "negative_pixdim": ("vol.nii", _nifti_bytes(-2.0), "pixdim[1]=-2"),
        "zero_pixdim_gz": ("vol.nii.gz", gzip.compress(_nifti_bytes(0.0)), "pixdim[1]=0"),
    }
    name, content, expected = made[case]
    path = folder / name
    path.write_bytes(content)
    return path, expected


NIFTI_CASES = ["truncated_gz_data", "truncated_gz_header", "not_gzip", "negative_pixdim", "zero_pixdim_gz"]


@pytest.mark.parametrize("case", NIFTI_CASES)
def test_load_volume_names_the_file_and_the_fault(tmp_path, case):
    path, expected = _write(tmp_path, case)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="voxel size|gzip") as e:
        load_volume(path)
    assert str(path) in str(e.value) and expected in str(e.value)
    assert snapshot(tmp_path) == before


SURVEY_CASES = ["truncated_gz_data", "truncated_gz_header", "not_gzip", "negative_pixdim"]


@pytest.mark.parametrize("case", SURVEY_CASES)
def test_survey_reports_the_bad_file_and_goes_on(tmp_path, case):
    """01_explore_data's path: the survey lists the bad file with its reason, the good ones still read, and
    decoding the bad one (load_array, middle_slice) raises naming it instead of a bare EOFError."""
    (tmp_path / "a_bad").mkdir()
    bad, expected = _write(tmp_path / "a_bad", case)
    good = tmp_path / "b_good.nii.gz"
    good.write_bytes(gzip.compress(_nifti_bytes()))
    before = snapshot(tmp_path)
    table = survey.survey(tmp_path).set_index("path")
    bad_key = bad.relative_to(tmp_path).as_posix()
    assert expected in table.loc[bad_key, "error"]
    assert pd.isna(table.loc["b_good.nii.gz", "error"]) and table.loc["b_good.nii.gz", "shape"] == (16, 16, 16)
    for read in (survey.load_array, survey.middle_slice):
        with pytest.raises(ValueError) as e:
            read(bad)
        assert str(bad) in str(e.value) and expected in str(e.value)
    files = table.reset_index().assign(dataset="d", modality="CT", error=None)  # as if the header had passed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = survey.intensity_samples(tmp_path, files, per_group=2)
    assert samples["d CT"].size == 16**3  # the good file's voxels
    assert any(str(bad) in str(w.message) and expected in str(w.message) for w in caught)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- .npy files

def _truncate_npy(path: Path, case: str) -> str:
    raw = path.read_bytes()
    cut = {"empty": 0, "header": 20, "data": len(raw) - 7}[case]
    path.write_bytes(raw[:cut])
    return "truncated"


NPY_CASES = ["empty", "header", "data"]


@pytest.mark.parametrize("case", NPY_CASES)
def test_open_npy_names_the_file(tmp_path, case):
    from lib.data.cache import open_npy

    path = tmp_path / "x.npy"
    np.save(path, np.ones((8, 8), np.float32))
    expected = _truncate_npy(path, case)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=expected) as e:
        open_npy(path)
    assert str(path) in str(e.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", NPY_CASES)
def test_cxr_pairs_name_a_truncated_radiograph(smoke_cohort, tmp_path, case):
    from lib.data.paired import CXRPairs

    root = tmp_path / "smoke"
    shutil.copytree(smoke_cohort, root)
    data = CXRPairs(root, "train")
    path = data.cohort.file(data.pairs.iloc[0]["a"])
    expected = _truncate_npy(path, case)
    before = snapshot(root)
    with pytest.raises(ValueError, match=expected) as e:
        data[0]
    assert str(path) in str(e.value)
    assert snapshot(root) == before


# --------------------------------------------------------------------------- subjects.csv

SUBJECT_CASES = {"no_split": ("split",), "no_split_no_dataset": ("dataset", "split")}


@pytest.mark.parametrize("case", sorted(SUBJECT_CASES))
def test_subjects_csv_without_a_column_is_named(smoke_cohort, tmp_path, case):
    from lib.data import demo_format

    root = tmp_path / "smoke"
    shutil.copytree(smoke_cohort, root)
    subjects = root / "subjects.csv"
    table = pd.read_csv(subjects, dtype=str, keep_default_na=False).drop(columns=list(SUBJECT_CASES[case]))
    table.to_csv(subjects, index=False)
    before = snapshot(root)
    with pytest.raises(ValueError) as e:
        demo_format.write_format(root, "smoke")
    message = str(e.value)
    assert str(subjects) in message and f"missing column(s) {', '.join(SUBJECT_CASES[case])}" in message
    assert "found: subject" in message or "found: dataset, subject" in message
    assert snapshot(root) == before


# --------------------------------------------------------------------------- the kaggle CLI

def _fake_exe(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return exe


CLI_CASES = ["beside_interpreter", "on_path", "missing_helper", "missing_kaggle_module", "missing_manifest_fetch"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX executables")
@pytest.mark.parametrize("case", CLI_CASES)
def test_kaggle_cli_is_found_beside_the_interpreter_or_explained(tmp_path, monkeypatch, case):
    venv_bin, path_bin = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(path_bin))
    venv_bin.mkdir(parents=True)
    path_bin.mkdir()
    if case == "beside_interpreter":
        exe = _fake_exe(venv_bin, "kaggle")
        _fake_exe(path_bin, "kaggle")
        assert paths.executable("kaggle") == str(exe)
        return
    if case == "on_path":
        assert paths.executable(str(_fake_exe(path_bin, "kaggle").name)) == str(path_bin / "kaggle")
        return
    data_root = tmp_path / "data"
    data_root.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match=r"pip install kaggle") as e:
        if case == "missing_helper":
            paths.executable("kaggle")
        elif case == "missing_kaggle_module":
            from lib import kaggle

            kaggle._kaggle("kernels", "status", "x/y")
        else:
            from lib.data import manifest

            monkeypatch.setenv("KAGGLE_USERNAME", "u")
            monkeypatch.setenv("KAGGLE_KEY", "k")
            manifest.fetch("rsna2025_aneurysm", data_root=data_root)
    assert "neither beside this Python" in str(e.value) and "project's environment" in str(e.value)
    assert snapshot(tmp_path) == before and not any(data_root.iterdir())


# --------------------------------------------------------------------------- the converters

def _table(path: Path, change) -> None:
    change(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def _truncate(path: Path, keep: int) -> str:
    path.write_bytes(path.read_bytes()[:keep])
    return path.name


def _first(raw: Path, pattern: str) -> Path:
    return sorted(raw.rglob(pattern))[0]


def _rsna_label(raw: Path) -> str:
    _table(raw / "train.csv", lambda t: t.assign(**{"Basilar Tip": ["yes", *t["Basilar Tip"][1:]]}))
    return f"train.csv row {pd.read_csv(raw / 'train.csv', dtype=str)['SeriesInstanceUID'][0]}: 'Basilar Tip' is 'yes'"


def _spacing(raw: Path) -> str:
    _table(raw / "DL_info.csv", lambda t: t.assign(Spacing_mm_px_=["-0.7, -0.7, 5", *t["Spacing_mm_px_"][1:]]))
    return "Spacing_mm_px_ '-0.7, -0.7, 5': voxel sizes must be > 0 mm"


# a bad item: (dataset, make it bad -> the text its report row must hold); the conversion goes on past it
ITEM_CASES = {
    "rsna_truncated_dicom": ("rsna2025_aneurysm", lambda raw: _truncate(_first(raw / "series", "*.dcm"), 200)),
    "rsna_label_not_0_or_1": ("rsna2025_aneurysm", _rsna_label),
    "openmind_truncated_nifti": ("openmind", lambda raw: _truncate(_first(raw / "OpenMind", "*.nii.gz"), 100)),
    "deeplesion_truncated_png": ("deeplesion", lambda raw: _truncate(_first(raw / "Images_png", "*.png"), 60)),
    "deeplesion_negative_spacing": ("deeplesion", _spacing),
    "coltea_truncated_dicom": ("coltea_lung_ct_100w", lambda raw: "unreadable (" + _truncate(
        _first(raw / "Coltea-Lung-CT-100W", "I0"), 200) + ")"),
    "ms_cxr_t_truncated_jpeg": ("ms_cxr_t", lambda raw: _truncate(_first(raw, "*.jpg"), 100)),
}


@pytest.mark.parametrize("case", sorted(ITEM_CASES))
def test_a_converter_reports_a_bad_item_by_name_and_goes_on(tmp_path, case):
    from lib.data import convert, fixtures

    name, damage = ITEM_CASES[case]
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    fixtures.write(name, raw)
    clean = convert.run(name, raw, tmp_path / "clean", progress=False)
    expected = damage(raw)
    before = snapshot(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = convert.run(name, raw, out, progress=False)
    report = pd.read_csv(out / "report.csv", dtype=str, keep_default_na=False)
    assert report["reason"].str.contains(expected, regex=False).any(), report["reason"].tolist()
    assert summary["items"] == clean["items"] and summary["converted"] > 0  # the others still converted
    assert summary["converted"] + summary["refused"] == clean["converted"] + clean["refused"]
    assert snapshot(raw) == before


# a bad table: (dataset, its file, the change) -> ValueError naming the file and the column; nothing written
TABLE_CASES = {
    "rsna_train_csv_no_modality": ("rsna2025_aneurysm", "train.csv", "Modality"),
    "rsna_localizers_no_series_uid": ("rsna2025_aneurysm", "train_localizers.csv", "SeriesInstanceUID"),
    "openmind_metadata_no_image_path": ("openmind", "openneuro_metadata.csv", "image_path"),
    "deeplesion_info_no_file_name": ("deeplesion", "DL_info.csv", "File_name"),
    "deeplesion_info_no_patient": ("deeplesion", "DL_info.csv", "Patient_index"),
    "ms_cxr_t_no_previous_dicom_id": ("ms_cxr_t", "MS_CXR_T_temporal_image_classification_v1.0.0.csv",
                                      "previous_dicom_id"),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_a_converter_names_a_table_without_a_column_and_leaves_the_dataset(tmp_path, case):
    from lib.data import convert, fixtures

    name, table, column = TABLE_CASES[case]
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    fixtures.write(name, raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert.run(name, raw, out, progress=False)  # a prepared dataset the bad re-run must not touch
    _table(raw / table, lambda t: t.drop(columns=[column]))
    before_raw, before_out = snapshot(raw), snapshot(out)
    with pytest.raises(ValueError) as e:
        convert.run(name, raw, out, progress=False)
    assert str(raw / table) in str(e.value) and column in str(e.value)
    assert snapshot(raw) == before_raw and snapshot(out) == before_out


# --------------------------------------------------------------------------- the RSNA submission

def _classifier(folder: Path) -> Path:
    from lib.families import rsna_aneurysm_submit as sub
    from lib.families.rsna_aneurysm import LABELS, SeriesClassifier
    from lib.models.waveformer import WaveFormer3D

    encoder = WaveFormer3D(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2)
    folder.mkdir(parents=True, exist_ok=True)
    return sub.save_classifier(folder / "model.pt", SeriesClassifier(encoder, encoder.embed_dim), (120.0, 120.0, 90.0),
                               95.0, np.full(len(LABELS), 0.1))


def _resave(path: Path, change) -> None:
    import torch

    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)


SUBMIT_CASES = {  # the run folder's damage -> (the file the error names, what it says)
    "truncated_model_pt": (lambda run: _truncate(run / "model.pt", 300), "model.pt", "damaged or truncated"),
    "no_model_pt": (lambda run: (run / "model.pt").unlink(), "model.pt", "does not exist"),
    "not_a_classifier": (lambda run: _resave(run / "model.pt", lambda o: o.update(format="other")), "model.pt",
                         "not a 09_rsna_aneurysm classifier"),
    "no_prevalence": (lambda run: _resave(run / "model.pt", lambda o: o.pop("prevalence")), "model.pt",
                      "without prevalence"),
    "weights_off_config": (lambda run: _resave(run / "model.pt", lambda o: o["encoder_config"].update(embed_dim=32)),
                           "model.pt", "do not fit its encoder_config"),
}


@pytest.mark.parametrize("case", sorted(SUBMIT_CASES))
def test_load_classifier_names_a_bad_model_pt(tmp_path, case):
    from lib.checkpoint import CheckpointError
    from lib.families.rsna_aneurysm_submit import load_classifier

    run = tmp_path / "run"
    _classifier(run)
    damage, name, expected = SUBMIT_CASES[case]
    damage(run)
    before = snapshot(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError, CheckpointError)) as e:
        load_classifier(run)
    assert str(run / name) in str(e.value) and expected in str(e.value)
    assert snapshot(tmp_path) == before


RESOLVE_CASES = ["no_model_pt", "two_model_pt", "missing_folder"]


@pytest.mark.parametrize("case", RESOLVE_CASES)
def test_resolve_weights_names_the_folder_without_one_model_pt(tmp_path, monkeypatch, case):
    from lib.families.rsna_submission import resolve_weights

    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "no-kaggle-input"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "notes.txt").write_text("no weights here")
    if case == "two_model_pt":
        _classifier(run / "a")
        _classifier(run / "b")
    weights = run / "gone" if case == "missing_folder" else run
    before = snapshot(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        resolve_weights(weights)
    assert str(weights) in str(e.value)
    assert ("no such file or folder" if case == "missing_folder" else "need exactly one model.pt") in str(e.value)
    assert snapshot(tmp_path) == before
