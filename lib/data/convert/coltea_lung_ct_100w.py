"""Coltea-Lung-CT-100W (triphasic chest CT, for non-contrast -> contrast translation) -> prepared dataset.

Raw layout (the authors' ``test.py``, github.com/ristea/cycle-transformer, and third-party loaders):
``train_data.csv`` and ``test_data.csv`` at the top, written by pandas with its index: an unnamed
first column, then the patient folder names (column ``train``; the authors read ``iloc[:, 1]``); the
series in ``Coltea-Lung-CT-100W/<patient>/{NATIVE,ARTERIAL,VENOUS}/DICOM/`` (files ``I0``, ``I1``, ...,
no extension). The reader is tolerant: the patients may sit directly under ``--src``; the patient
column is the one whose values match the most folders (else the second, else the only column); a
phase whose ``DICOM/`` sub-folder is missing is read from the phase folder itself.

One item per patient (every patient folder and every CSV row; a row without a folder is refused).
Subject = patient. Split: ``train_data.csv`` -> train, ``test_data.csv`` -> test (a patient in both:
test, noted); the format needs a validation split the release's CSVs do not give, so a seeded
``VAL_FRACTION`` of the train_data.csv patients (at least one of two or more; ``SPLIT_SEED``) become
val (an ``eval_data.csv`` or ``val_data.csv``, where present, is used instead); a folder in no CSV gets
a seeded split (``SPLIT_FRACTIONS``), noted.

Images. NATIVE is assembled leniently (:func:`lib.data.dicom_lenient.assemble`: damaged or stray files
dropped, noted) and written ``images/<patient>_native.nii.gz`` (int16 HU, RAS; ``--spacing`` resamples
it). The phases are not voxel-aligned with it (other z coverage and slice counts; the patient moves
between acquisitions), so each phase of ``--phases`` (default ``arterial,venous``) is registered
rigidly onto the *written* NATIVE (:func:`lib.data.registration.rigid`: Euler3D, Mattes mutual
information, 4/2/1 pyramid, seeded sampling, started from the scanner geometry) and resampled onto
exactly its grid (linear, -1024 HU where the phase has no data): ``images/<patient>_<phase>.nii.gz``,
sequence ``arterial`` / ``venous``, same shape and affine as the native. A missing phase is noted (the
patient keeps its other pair); a patient without NATIVE, or with no phase left to pair, is refused.
Index extras: ``phase``, ``registered_to`` (the native image_id), ``dropped_images``.

``pairs.csv``: one row per registered phase: ``pair`` = ``<patient>/<phase>``, ``a`` = the native image,
``b`` = the registered phase, then ``target`` (the phase), ``rotation_deg`` (``"rx ry rz"``, degrees
about R, A, S, ``R = Rz Ry Rx``), ``translation_mm`` (``"tx ty tz"``, RAS) and ``center_mm``: the
transform maps a native point p to the phase's original point ``R (p - c) + c + t``; ``metric`` (final
Mattes MI, negative: lower is better); ``mae_hu_before`` / ``mae_hu_after``: the mean |HU difference|
between native and phase over the voxels both cover where either is body (> -500 HU: soft tissue,
vessels, bone; not air or lung), with the scanner geometry as is and after registration (the
enhancement of blood in the phase stays in it); ``overlap``: the fraction of the native grid the phase
covers after registration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lib.data.convert import Item, Output, Refused
from lib.data.prepared import fmt_tuple, write_image

NAME, VERSION, MARKER = "coltea_lung_ct_100w", "1", "train_data.csv"
SPLIT_SEED, SPLIT_FRACTIONS, VAL_FRACTION = 0, (0.7, 0.15, 0.15), 0.1
ROOT = "Coltea-Lung-CT-100W"
PHASES = ("native", "arterial", "venous")
LISTS = (("train_data.csv", "train"), ("test_data.csv", "test"), ("eval_data.csv", "val"), ("val_data.csv", "val"))
REGISTRATION_SEED = 0
INFO = {
    "source": "url:https://github.com/ristea/cycle-transformer",
    "licence": "CC BY-SA 4.0 (unconfirmed: as given by a third-party list of datasets; check the authors' release)",
    "description": "triphasic chest CT (native, arterial, venous) of 100 female patients, Coltea Hospital; "
                   "the contrast phases registered rigidly onto the native series' grid",
    "channels": {"CT": ["lung", "mediastinum", "bone"]},
    "labels": {"pairs.csv": {"target": "the contrast phase of b (arterial, venous); a is the native series"}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phases", default="arterial,venous",
                        help="comma-separated contrast phases to register onto NATIVE and pair (arterial, venous)")


def _phases(options: dict) -> list[str]:
    wanted = [p.strip().lower() for p in (options.get("phases") or "").split(",") if p.strip()]
    bad = [p for p in wanted if p not in PHASES[1:]]
    if bad or not wanted:
        raise ValueError(f"--phases {options.get('phases')!r}: choose from arterial, venous")
    return wanted


def _patients_dir(src: Path) -> Path:
    return src / ROOT if (src / ROOT).is_dir() else src


def _names(df: pd.DataFrame, split: str, folders: set[str]) -> list[str]:
    """The patient folder names of one split list: the column matching the most folders, else the
    column named as the split, else the second (the authors' ``iloc[:, 1]``), else the only one."""
    if df.empty or not len(df.columns):
        return []
    columns = list(df.columns)
    scores = {c: df[c].astype(str).str.strip().isin(folders).sum() for c in columns}
    best = max(columns, key=lambda c: scores[c])
    if not scores[best]:
        best = split if split in columns else columns[1] if len(columns) > 1 else columns[0]
    return [v for v in df[best].astype(str).str.strip() if v]


def _listed(src: Path, folders: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Patient -> split and patient -> the list that gave it, from the release's CSVs (a patient in several
    lists: test if one of them, else the first)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name, kind in LISTS:
        path = src / name
        if path.is_file() and not (name == "val_data.csv" and (src / "eval_data.csv").is_file()):
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
            for patient in _names(df, kind, folders):
                found.setdefault(patient, []).append((name, kind))
    where = {p: " and ".join(dict.fromkeys(n for n, _ in lists)) for p, lists in found.items()}
    split = {p: "test" if any(k == "test" for _, k in lists) else lists[0][1] for p, lists in found.items()}
    if "val" not in split.values():
        train = sorted(p for p, s in split.items() if s == "train")
        n_val = max(1, round(VAL_FRACTION * len(train))) if len(train) >= 2 else 0
        for i in np.random.default_rng(SPLIT_SEED).permutation(len(train))[:n_val]:
            split[train[i]] = "val"
    return split, where


def items(src: Path, options: dict) -> list[Item]:
    _phases(options)
    root = _patients_dir(src)
    folders = {p.name for p in root.iterdir() if p.is_dir() and any((p / ph.upper()).is_dir() for ph in PHASES)}
    if not folders:
        raise FileNotFoundError(f"{src}: no patient folder with NATIVE, ARTERIAL or VENOUS inside (in {ROOT}/ or "
                                "directly): is this the Coltea-Lung-CT-100W download?")
    split, where = _listed(src, folders)
    rel = root.relative_to(src).as_posix()
    out = []
    for patient in sorted(folders | set(split)):
        source = f"{rel}/{patient}" if rel != "." else patient
        out.append(Item(key=patient, subject=patient, source=source, split=split.get(patient, ""),
                        payload={"folder": source, "listed": where.get(patient, ""), "split": split.get(patient, "")}))
    return out


def _series_dir(folder: Path, phase: str) -> Path | None:
    """``<patient>/<PHASE>/DICOM`` (or the phase folder itself where it holds the files)."""
    for d in (folder / phase.upper() / "DICOM", folder / phase.upper()):
        if d.is_dir() and any(p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR" for p in d.iterdir()):
            return d
    return None


def _assemble(directory: Path):
    from lib.data.dicom_lenient import DicomSeriesError, assemble

    try:
        return assemble(directory), ""
    except DicomSeriesError as e:
        return None, str(e)


def _register(out: Path, patient: str, phase: str, series, fixed: tuple, native_id: str) -> tuple[dict, dict, str]:
    """Register one phase onto the written native, write it on the native grid; (index row, pair row, note)."""
    from lib.data.registration import rigid

    r = rigid(fixed, (series.array[0], series.affine), seed=REGISTRATION_SEED)
    image_id = f"{patient}_{phase}"
    fields = write_image(out, f"images/{image_id}.nii.gz", r.resampled, fixed[1], dtype=np.int16)
    row = {"image_id": image_id, "modality": "CT", "sequence": phase, **fields, "phase": phase,
           "registered_to": native_id, "dropped_images": sum(series.dropped.values())}
    pair = {"pair": f"{patient}/{phase}", "a": native_id, "b": image_id, "target": phase,
            "rotation_deg": fmt_tuple(r.rotation_deg, 3), "translation_mm": fmt_tuple(r.translation_mm, 3),
            "center_mm": fmt_tuple(r.center_mm, 3), "metric": round(r.metric, 5),
            "mae_hu_before": round(r.mae_before, 2), "mae_hu_after": round(r.mae_after, 2),
            "overlap": round(r.overlap, 4), "registration_s": round(r.seconds, 3)}
    note = (f"{phase} registered: rotation {pair['rotation_deg']} deg, translation {pair['translation_mm']} mm, "
            f"MAE {r.mae_before:.0f} -> {r.mae_after:.0f} HU, overlap {r.overlap:.2f}")
    if not r.mae_after < r.mae_before:
        note += " (CHECK: the residual did not drop)"
    return row, pair, note


def _split_note(item: Item) -> str:
    listed, split = item.payload["listed"], item.payload["split"]
    if not listed:
        return "in no split list (train_data.csv, test_data.csv): split seeded"
    if " and " in listed:
        return f"listed in {listed}: {split}"
    if split == "val" and listed == MARKER:
        return f"val: one of the seeded {VAL_FRACTION:.0%} of the {MARKER} patients"
    return ""


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    import nibabel as nib

    patient, folder = item.key, src / item.payload["folder"]
    if not folder.is_dir():
        raise Refused(f"listed in {item.payload['listed']} but the patient folder {item.payload['folder']} is missing")
    dirs = {ph: _series_dir(folder, ph) for ph in ("native", *_phases(options))}
    if dirs["native"] is None:
        raise Refused("no NATIVE series (the non-contrast reference the contrast phases are registered onto)")
    if not any(dirs[ph] for ph in _phases(options)):
        raise Refused(f"no {' or '.join(p.upper() for p in _phases(options))} series to pair with NATIVE")
    native, why = _assemble(dirs["native"])
    if native is None:
        raise Refused(f"NATIVE: {why}")
    native_id = f"{patient}_native"
    fields = write_image(out, f"images/{native_id}.nii.gz", native.array[0], native.affine, dtype=np.int16,
                         spacing=options.get("spacing"))
    written = nib.load(out / fields["path"])
    fixed = (np.asarray(written.dataobj, np.float32), written.affine)
    images = [{"image_id": native_id, "modality": "CT", "sequence": "native", **fields, "phase": "native",
               "registered_to": "", "dropped_images": sum(native.dropped.values())}]
    notes, pairs = [f"native: {n}" for n in native.notes] + [n for n in [_split_note(item)] if n], []
    for phase in _phases(options):
        if dirs[phase] is None:
            notes.append(f"no {phase.upper()} series: no {phase} pair")
            continue
        series, why = _assemble(dirs[phase])
        if series is None:
            notes.append(f"{phase} left out: {why}")
            continue
        row, pair, note = _register(out, patient, phase, series, fixed, native_id)
        images.append(row)
        pairs.append(pair)
        notes += [f"{phase}: {n}" for n in series.notes] + [note]
    if not pairs:
        raise Refused("no contrast phase could be paired: " + "; ".join(notes))
    return Output(images=images, pairs=pairs, note="; ".join(notes))
