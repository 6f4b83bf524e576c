"""RSNA 2025 Intracranial Aneurysm Detection (Kaggle competition) -> prepared dataset.

One item per series: every folder under ``series/`` and every ``train.csv`` row (a row without a folder is
refused). Subject = SeriesInstanceUID (one series per patient); split seeded by subject (the competition
defines none). A series folder is assembled leniently (:func:`lib.data.dicom_lenient.assemble`: majority
geometry, blank, damaged and duplicate images dropped, uneven gaps resampled, missing multi-frame
geometry assumed and flagged; every such step is in the report's reason, e.g. ``dropped 2 of 10 files:
1 scout (32x32, coronal; kept 24x24, axial), 1 blank``) and written as ``images/<uid>.nii.gz`` in RAS:
CT (``CTA``) in HU as int16 (rounded after any resampling), MR (``MRA``, ``MRI T2``, ``MRI T1post``) as
stored (int16 where integral, else float32; modality ``MRI``; ``sequence`` keeps train.csv's Modality).
Index extras: ``mask_path``, ``assumed_geometry`` (1: spacing/orientation assumed, 1 mm axial: treat
with care), ``dropped_images``. ``--modalities CTA,MRA`` refuses the other series as ``filtered`` (they
stay items, so every subject keeps its split whatever the filter).

- ``labels.csv``: the 13 locations then ``Aneurysm Present``, in the competition's order (:data:`LABELS`),
  then ``PatientAge``, ``PatientSex``.
- ``points.csv``: each localizer of ``train_localizers.csv`` (``{'x': column, 'y': row}`` on its SOP, plus
  ``'f'``, the 0-based frame of a multi-frame file), mapped through that image's own geometry to RAS mm and
  to the voxel of the written image (``inside``: 0 where that voxel is outside it, e.g. on a dropped end
  slice); a localizer whose SOP (or frame) is not in the series is left out (noted).
- ``mask_path``: the Circle of Willis labels (``segmentations/<uid>_cowseg.nii``, flat or in a
  ``<uid>/`` folder), reoriented and resampled (nearest neighbour, through both affines) onto the image.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import numpy as np
import pandas as pd

from lib.data.convert import Item, Output, Refused
from lib.data.prepared import write_image

NAME, VERSION, MARKER = "rsna2025_aneurysm", "2", "train.csv"
SPLIT_SEED, SPLIT_FRACTIONS = 0, (0.8, 0.1, 0.1)
LABELS = ["Left Infraclinoid Internal Carotid Artery", "Right Infraclinoid Internal Carotid Artery",
          "Left Supraclinoid Internal Carotid Artery", "Right Supraclinoid Internal Carotid Artery",
          "Left Middle Cerebral Artery", "Right Middle Cerebral Artery", "Anterior Communicating Artery",
          "Left Anterior Cerebral Artery", "Right Anterior Cerebral Artery", "Left Posterior Communicating Artery",
          "Right Posterior Communicating Artery", "Basilar Tip", "Other Posterior Circulation", "Aneurysm Present"]
COW_LABELS = {0: "background", 1: "Other Posterior Circulation", 2: "Basilar Tip", 3: "Right Posterior Communicating Artery",
              4: "Left Posterior Communicating Artery", 5: "Right Infraclinoid Internal Carotid Artery",
              6: "Left Infraclinoid Internal Carotid Artery", 7: "Right Supraclinoid Internal Carotid Artery",
              8: "Left Supraclinoid Internal Carotid Artery", 9: "Right Middle Cerebral Artery",
              10: "Left Middle Cerebral Artery", 11: "Right Anterior Cerebral Artery", 12: "Left Anterior Cerebral Artery",
              13: "Anterior Communicating Artery"}
MODALITIES = {"CTA": "CT", "MRA": "MRI", "MRI T2": "MRI", "MRI T1post": "MRI"}
INFO = {
    "source": "kaggle-competition:rsna-intracranial-aneurysm-detection",
    "licence": "Kaggle competition rules (accept them on kaggle.com; use beyond the competition: see its rules)",
    "description": "head CTA, MRA and MRI (T2, T1 post-contrast) series, one per patient, 13 artery locations",
    "channels": {"CT": ["brain", "subdural", "bone"], "MRI": ["intensity"]},
    "labels": {"labels.csv": LABELS, "mask_path": {str(k): v for k, v in COW_LABELS.items()},
               "points.csv": {"label": "train_localizers.csv location"}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modalities", default="", help="comma-separated train.csv Modality values to keep, "
                        "e.g. 'CTA,MRA' (default: all)")


def items(src: Path, options: dict) -> list[Item]:
    if not (src / "series").is_dir():
        raise FileNotFoundError(f"{src}: no series/ folder (the competition's DICOM series)")
    train = pd.read_csv(src / MARKER, dtype=str, keep_default_na=False)
    missing = [c for c in ["SeriesInstanceUID", "Modality", *LABELS] if c not in train.columns]
    if missing:
        raise ValueError(f"{src / MARKER}: missing column(s) {', '.join(missing)}")
    path = src / "train_localizers.csv"
    columns = ["SeriesInstanceUID", "SOPInstanceUID", "coordinates", "location"]
    loc = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame(columns=columns)
    if [c for c in columns if c not in loc.columns]:
        raise ValueError(f"{path}: missing column(s) {', '.join(c for c in columns if c not in loc.columns)}")
    rows = {r["SeriesInstanceUID"]: r for r in train.to_dict("records")}
    points = {uid: g.to_dict("records") for uid, g in loc.groupby("SeriesInstanceUID")}
    uids = sorted({p.name for p in (src / "series").iterdir() if p.is_dir()} | set(rows))
    return [Item(key=uid, subject=uid, source=f"series/{uid}",
                 payload={"row": rows.get(uid), "localizers": points.get(uid, [])}) for uid in uids]


def _segmentation(src: Path, uid: str) -> Path | None:
    for path in (src / "segmentations" / f"{uid}_cowseg.nii", src / "segmentations" / uid / f"{uid}_cowseg.nii",
                 src / "segmentations" / f"{uid}_cowseg.nii.gz", src / "segmentations" / uid / f"{uid}_cowseg.nii.gz"):
        if path.is_file():
            return path
    return None


def _resample_labels(path: Path, shape: tuple, affine: np.ndarray) -> np.ndarray:
    """Labels of ``path`` on the grid ``(shape, affine)``: nearest neighbour through both affines (0 outside)."""
    import nibabel as nib
    from scipy import ndimage

    seg = nib.as_closest_canonical(nib.load(path))
    labels = np.asarray(seg.dataobj).astype(np.uint8).reshape(seg.shape[:3])
    m = np.linalg.solve(seg.affine, affine)
    return ndimage.affine_transform(labels, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=0, cval=0)


def _frame_of(by_sop: dict, sop: str, frame: int | None) -> tuple[object, str]:
    """The annotated image (a single-frame file, or frame ``frame`` of a multi-frame one), or why there is none."""
    frames = by_sop.get(sop)
    if not frames:
        return None, f"SOP {sop} absent from the series"
    if None in frames:  # a single-frame file: an 'f' key, if any, has nothing to choose
        return frames[None], ""
    if frame is None:
        return None, f"SOP {sop} is a multi-frame file ({len(frames)} frames) but the localizer has no 'f'"
    if frame not in frames:
        return None, f"SOP {sop} has no frame {frame} (0-based; {len(frames)} frames)"
    return frames[frame], ""


def _points(series, localizers: list[dict], affine: np.ndarray, shape: tuple, uid: str) -> tuple[list[dict], list[str]]:
    """points.csv rows (``inside``: the voxel lies in the image) and notes on the localizers left out."""
    by_sop: dict[str, dict] = {}
    for f in series.frames:
        by_sop.setdefault(f.sop, {}).setdefault(f.frame, f)
    points, notes = [], []
    for loc in localizers:
        try:
            c = ast.literal_eval(loc["coordinates"])
            col, row, frame = float(c["x"]), float(c["y"]), (int(c["f"]) if "f" in c else None)
        except (ValueError, SyntaxError, KeyError, TypeError):
            notes.append(f"localizer {loc['SOPInstanceUID']}: unreadable coordinates {loc['coordinates']!r}: left out")
            continue
        f, why = _frame_of(by_sop, loc["SOPInstanceUID"], frame)
        if f is None:
            notes.append(f"localizer ({loc['location']}) on {why}: left out")
            continue
        lps = f.world(row, col)
        ras = np.array([-lps[0], -lps[1], lps[2]])
        ijk = np.round(np.linalg.solve(affine, [*ras, 1.0])[:3]).astype(int)
        points.append({"image_id": uid, "label": loc["location"], "x": round(float(ras[0]), 3),
                       "y": round(float(ras[1]), 3), "z": round(float(ras[2]), 3), "i": int(ijk[0]), "j": int(ijk[1]),
                       "k": int(ijk[2]), "sop": loc["SOPInstanceUID"], "frame": "" if frame is None else frame,
                       "inside": int(bool(np.all(ijk >= 0) and np.all(ijk < np.array(shape[:3]))))})
    return points, notes


def read_series(folder: Path, listed_modality: str | None = None):
    """One series folder as the converter reads it (and 09's submission, which must see what training saw):
    ``(series, sequence, modality)``: :func:`lib.data.dicom_lenient.assemble`'s series (RAS, CT in HU), the
    competition's Modality (``listed_modality`` from train.csv, else guessed from the DICOM: CT -> CTA, MR ->
    MRI) and the project's modality (``CT`` or ``MRI``). Raises ``DicomSeriesError`` for a series that
    cannot become one volume."""
    from lib.data.dicom_lenient import assemble

    series = assemble(Path(folder))
    sequence = listed_modality or {"CT": "CTA", "MR": "MRI"}.get(series.modality, series.modality)
    return series, sequence, MODALITIES.get(sequence, "CT" if series.modality == "CT" else "MRI")


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    from lib.data.dicom_lenient import DicomSeriesError

    uid, row = item.key, item.payload["row"]
    folder = src / "series" / uid
    if not folder.is_dir():
        raise Refused(f"listed in {MARKER} but the series folder series/{uid} is missing")
    wanted = [m.strip() for m in (options.get("modalities") or "").split(",") if m.strip()]
    if wanted and (row or {}).get("Modality") not in wanted:
        raise Refused(f"filtered: modality {(row or {}).get('Modality', '?')} not in {','.join(wanted)}")
    bad = [f"{c!r} is {row[c]!r}" for c in LABELS if row and row[c].strip() not in ("0", "1", "0.0", "1.0")]
    if bad:  # before anything is written
        raise Refused(f"{MARKER} row {uid}: {', '.join(bad)}, not 0 or 1")
    try:
        series, sequence, modality = read_series(folder, (row or {}).get("Modality"))
    except DicomSeriesError as e:
        raise Refused(str(e)) from None
    array = series.array[0]
    integral = bool(np.all(np.mod(array, 1) == 0)) and array.min() >= -32768 and array.max() <= 32767
    dtype = np.int16 if modality == "CT" or integral else np.float32  # CT: HU, rounded after any resampling
    fields = write_image(out, f"images/{uid}.nii.gz", array, series.affine, dtype=dtype, spacing=options.get("spacing"))
    import nibabel as nib

    written = nib.load(out / fields["path"])
    points, notes = _points(series, item.payload["localizers"], written.affine, written.shape, uid)
    image = {"image_id": uid, "modality": modality, "sequence": sequence, **fields, "mask_path": "",
             "assumed_geometry": int(series.assumed_geometry), "dropped_images": sum(series.dropped.values())}
    seg = _segmentation(src, uid)
    if seg is not None:
        labels = _resample_labels(seg, written.shape[:3], written.affine)
        image["mask_path"] = write_image(out, f"images/{uid}_cowseg.nii.gz", labels, written.affine, dtype=np.uint8)["path"]
    labels = []
    if row:
        labels = [{"image_id": uid, **{c: int(float(row[c])) for c in LABELS},
                   "PatientAge": row.get("PatientAge", ""), "PatientSex": row.get("PatientSex", "")}]
    else:
        notes.append(f"not in {MARKER}: no labels")
    notes = series.notes + notes
    return Output(images=[image], labels=labels, points=points,
                  note="; ".join(notes) or f"shape {fields['shape']}")
