"""NIH DeepLesion: key-slice neighbourhoods of CT series -> prepared sub-volumes.

Raw layout: ``DL_info.csv`` and ``Images_png/<patient6>_<study2>_<series2>/<NNN>.png`` (16-bit PNG,
HU = value - 32768), extracted or still inside the ``Images_png_NN.zip`` parts (read in place). Only key
slices and their neighbours are released, so, as the dataset's own ``DL_save_nifti.py`` does, a folder's
slice indices are split into runs of consecutive numbers and each run becomes one sub-volume (one item,
key ``<folder>/<first>-<last>``, written ``images/<folder>_<first>-<last>.nii.gz``). A run of a single
slice is refused by default (it is not a volume; the official script would write it as a one-slice NIfTI:
``--min-slices 1`` keeps it so); so is a run with an unreadable, 8-bit or differently sized slice, and every
run of a folder without a ``DL_info.csv`` row (its spacing is unknown; the official script fails there).

Geometry. DeepLesion ships no orientation; the geometry is the one its authors' ``DL_save_nifti.py`` writes
(the affine it calls "suitable for 3D slicer and ITK-SNAP"): the PNGs are axial slices in radiological
display, image columns running from the patient's right to left, rows from anterior to posterior, and the
slice index increasing from superior to inferior. Nothing in the PNGs can confirm it (no DICOM position is
released): a series acquired feet first would come out flipped head to foot, as it does with the official
script. Spacing from ``Spacing_mm_px_`` ("x, y, z" mm: x along columns, y along rows, z between slices;
the official script pairs the first value with rows, which is the same thing for DeepLesion's square
pixels). Written in RAS, int16 HU (PNG value - 32768), origin at the first voxel (no position is known).

Split: ``Train_Val_Test`` (1 train, 2 val, 3 test), the dataset's own; subject = ``Patient_index``, so a
patient's studies share a split. ``points.csv``: one point per lesion whose key slice lies in the run, at
the centre of its ``Bounding_boxes`` (x1, y1, x2, y2 in pixels of the key slice), in RAS mm and voxels
(label = ``Coarse_lesion_type``: 1 bone, 2 abdomen, 3 mediastinum, 4 liver, 5 lung, 6 kidney, 7 soft
tissue, 8 pelvis; -1, written ``unknown``, throughout the training split: only val and test lesions were
typed). ``labels.csv``: the number of lesions per sub-volume.
"""

from __future__ import annotations

import argparse
import io
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from lib.data.convert import Item, Output, Refused
from lib.data.prepared import write_image

NAME, VERSION, MARKER = "deeplesion", "1", "DL_info.csv"
SPLIT_SEED, SPLIT_FRACTIONS = 0, (0.7, 0.15, 0.15)
SPLITS = {"1": "train", "2": "val", "3": "test"}
LESION_TYPES = {"1": "bone", "2": "abdomen", "3": "mediastinum", "4": "liver", "5": "lung", "6": "kidney",
                "7": "soft tissue", "8": "pelvis", "-1": "unknown"}
INFO = {
    "source": "url:https://nihcc.app.box.com/v/DeepLesion",
    "licence": "NIH Clinical Center terms of the DeepLesion release (unconfirmed: read the dataset's page)",
    "description": "CT sub-volumes around 32,735 lesions of 4,427 patients (key slices and their neighbours)",
    "channels": {"CT": ["brain", "subdural", "bone"]},
    "labels": {"points.csv": {"label": LESION_TYPES}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-slices", type=int, default=2, help="refuse runs of fewer consecutive slices")


def _slices(src: Path) -> dict[str, dict[int, tuple[str, str]]]:
    """``{folder: {index: (zip or "", member or path)}}`` from the extracted folder or the zip parts."""
    out: dict[str, dict[int, tuple[str, str]]] = defaultdict(dict)
    folder = src / "Images_png"
    if folder.is_dir():
        entries = [("", p.relative_to(src).as_posix()) for p in sorted(folder.glob("*/*.png"))]
    else:
        entries = []
        for part in sorted(src.glob("Images_png_*.zip")):
            with zipfile.ZipFile(part) as z:
                entries += [(part.name, m) for m in z.namelist() if m.endswith(".png")]
    for archive, rel in entries:
        parts = rel.split("/")
        if len(parts) >= 2 and parts[-1][:-4].isdigit():
            out[parts[-2]][int(parts[-1][:-4])] = (archive, rel)
    return out


def items(src: Path, options: dict) -> list[Item]:
    info = pd.read_csv(src / MARKER, dtype=str, keep_default_na=False)
    missing = [c for c in ("File_name", "Patient_index", "Train_Val_Test", "Spacing_mm_px_") if c not in info.columns]
    if missing:
        raise ValueError(f"{src / MARKER}: missing column(s) {', '.join(missing)}")
    info["folder"] = info["File_name"].str.rsplit("_", n=1).str[0]
    by_folder = {f: g.to_dict("records") for f, g in info.groupby("folder")}
    slices = _slices(src)
    if not slices:
        raise FileNotFoundError(f"{src}: no Images_png/<folder>/<NNN>.png and no Images_png_*.zip parts")
    out = []
    for folder in sorted(slices):
        indices = sorted(slices[folder])
        rows = by_folder.get(folder, [])
        patient = rows[0]["Patient_index"] if rows else str(int(folder.split("_")[0]))
        for run in np.split(np.array(indices), np.flatnonzero(np.diff(indices) != 1) + 1):
            key = f"{folder}/{run[0]:03d}-{run[-1]:03d}"
            out.append(Item(key=key, subject=patient, source=f"Images_png/{key}",
                            split=SPLITS.get(rows[0]["Train_Val_Test"], "") if rows else "",
                            payload={"files": [slices[folder][int(k)] for k in run], "indices": [int(k) for k in run],
                                     "lesions": rows}))
    return out


def _read_slices(src: Path, files: list[tuple[str, str]]) -> list[np.ndarray]:
    """The run's slices in HU, each zip part opened once (a part holds thousands of members)."""
    archives = {a: zipfile.ZipFile(src / a) for a in sorted({a for a, _ in files} - {""})}
    try:
        return [_read_png(_bytes(src, archives, a, rel), rel) for a, rel in files]
    finally:
        for z in archives.values():
            z.close()


def _bytes(src: Path, archives: dict, archive: str, rel: str) -> bytes:
    try:
        return archives[archive].read(rel) if archive else (src / rel).read_bytes()
    except Exception as e:  # a damaged zip member (bad CRC, truncated part) or a vanished file
        raise Refused(f"{rel}: unreadable{f' in {archive}' if archive else ''} ({type(e).__name__}: {e})") from e


def _read_png(data: bytes, rel: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            mode = img.mode
            array = np.array(img)
    except Exception as e:
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(e))
        raise Refused(f"{rel}: unreadable PNG ({type(e).__name__}: {message})") from e
    if mode not in ("I;16", "I;16B", "I") or array.dtype.itemsize < 2:
        raise Refused(f"{rel}: {mode} PNG; DeepLesion slices are 16-bit (HU + 32768)")
    return array.astype(np.int32) - 32768


def _floats(text: str, n: int, what: str) -> list[float]:
    values = [float(v) for v in str(text).replace(",", " ").split()]
    if len(values) < n:
        raise Refused(f"{what} {text!r}: expected {n} numbers")
    return values


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    p = item.payload
    if not p["lesions"]:
        raise Refused(f"{item.key.split('/')[0]}: no row in {MARKER}, so its spacing is unknown")
    if len(p["indices"]) < options.get("min_slices", 2):
        raise Refused(f"a run of {len(p['indices'])} slice(s) ({item.key}): not a volume")
    slices = _read_slices(src, p["files"])
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise Refused(f"slices of different sizes in one run: {sorted(shapes)}")
    sx, sy, sz = _floats(p["lesions"][0]["Spacing_mm_px_"], 3, "Spacing_mm_px_")[:3]
    if not min(sx, sy, sz) > 0:
        raise Refused(f"{MARKER} Spacing_mm_px_ {p['lesions'][0]['Spacing_mm_px_']!r}: voxel sizes must be > 0 mm")
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # [column, row, slice]
    affine = np.diag([-sx, -sy, -sz, 1.0])  # column: R->L, row: A->P, slice: S->I (module docstring)
    rel = f"images/{item.key.replace('/', '_')}.nii.gz"
    fields = write_image(out, rel, volume.astype(np.int16), affine, dtype=np.int16, spacing=options.get("spacing"))
    import nibabel as nib

    ras = nib.load(out / rel).affine
    points = []
    for lesion in p["lesions"]:
        key = int(lesion["Key_slice_index"])
        if key not in p["indices"]:
            continue
        x1, y1, x2, y2 = _floats(lesion["Bounding_boxes"], 4, "Bounding_boxes")[:4]
        voxel = np.array([(x1 + x2) / 2, (y1 + y2) / 2, p["indices"].index(key), 1.0])
        world = affine @ voxel
        ijk = np.round(np.linalg.solve(ras, world))[:3].astype(int)
        points.append({"image_id": item.key, "label": LESION_TYPES.get(lesion["Coarse_lesion_type"], lesion["Coarse_lesion_type"]),
                       "x": round(float(world[0]), 3), "y": round(float(world[1]), 3), "z": round(float(world[2]), 3),
                       "i": int(ijk[0]), "j": int(ijk[1]), "k": int(ijk[2]), "key_slice": key,
                       "possibly_noisy": lesion.get("Possibly_noisy", "")})
    image = {"image_id": item.key, "modality": "CT", "sequence": "CT", **fields,
             "slice_range": f"{p['indices'][0]} {p['indices'][-1]}"}
    return Output(images=[image], points=points,
                  labels=[{"image_id": item.key, "lesions": len(points)}],
                  note=f"{len(slices)} slices, {len(points)} lesion(s)")
