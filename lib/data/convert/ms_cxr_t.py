"""MS-CXR-T (temporal image classification) over MIMIC-CXR-JPG -> prepared radiograph pairs with progression labels.

    python -m lib.data.convert ms_cxr_t --src RAW [--images MIMIC_CXR_JPG_ROOT] [--image-size 512]

Raw layout (PhysioNet, credentialed: ``physionet.org/content/ms-cxr-t/1.0.0``): the table
``MS_CXR_T_temporal_image_classification_v1.0.0.csv`` (the marker), one row per pair of frontal radiographs
of one patient, 1,045 rows (about 1,326 labels): ``subject_id, study_id, dicom_id, previous_study_id,
previous_dicom_id``, then ``<finding>_progression`` (``improving`` / ``stable`` / ``worsening`` / empty when
not annotated) and ``<finding>_label_quality`` for the findings consolidation, edema, pleural_effusion,
pneumonia and pneumothorax. ``dicom_id`` and ``previous_dicom_id`` are written path-like
(``p10/p10002428/s55758034/<dicom_id>``), the image's place under MIMIC-CXR-JPG's ``files/``
(``files/pXX/pSSSSSSSS/sTTTTTTTT/<dicom_id>.jpg``, XX the first two digits of the subject). This reader also
accepts a bare dicom id (the path is then built from subject_id and (previous_)study_id), a leading
``files/``, a trailing ``.jpg`` and any capitalisation of the labels. The images come from MIMIC-CXR-JPG
(``--images``: its root, holding ``files/``, or ``files/`` itself; default: ``--src`` itself, then
``--src/mimic-cxr-jpg``, then the first ``files/`` folder holding ``pNN`` folders at most five levels under
``--src``).

Each row is one item: its prior and current JPEG become ``images/p<subject>/<pair>/prior.npy`` and
``current.npy`` (float32 in [0, 1], greyscale: RGB-mode JPEGs are converted by luminance, 16-bit ones scaled
by their maximum), letterboxed to a square (aspect kept, the long side fitted, the short one padded with 0
on both sides) of ``--image-size`` px. ``pairs.csv``: a = prior, b = current, ``target_path`` empty (no pixel
maps: labels only), the progression and label-quality columns as the source spells them, and the study and
dicom ids. A row whose JPEG is missing or unreadable is refused. Every pair is in split ``test`` (an
external evaluation set), subject = ``subject_id``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lib.data.convert import Item, Output, Refused
from lib.data.prepared import write_array

NAME, VERSION, MARKER = "ms_cxr_t", "1", "MS_CXR_T_temporal_image_classification_v1.0.0.csv"
SPLIT_SEED, SPLIT_FRACTIONS = 0, (0.0, 0.0, 1.0)
FINDINGS = ("consolidation", "edema", "pleural_effusion", "pneumonia", "pneumothorax")
PROGRESSION = ("improving", "stable", "worsening")
ID_COLUMNS = ("subject_id", "study_id", "dicom_id", "previous_study_id", "previous_dicom_id")
INFO = {
    "source": "url:https://physionet.org/content/ms-cxr-t/1.0.0/ (images: url:https://physionet.org/content/mimic-cxr-jpg/)",
    "licence": "PhysioNet Credentialed Health Data License 1.5.0 (MS-CXR-T 1.0.0 and MIMIC-CXR-JPG): credentialed "
               "access under a data use agreement; do not share the images or anything derived from them",
    "description": "MS-CXR-T temporal image classification: prior/current frontal radiographs of MIMIC-CXR-JPG "
                   "with progression labels of five findings (an external test set; no change maps)",
    "channels": {"XR": ["intensity"]},
    "labels": {"pairs.csv": {f"{f}_progression": list(PROGRESSION) for f in FINDINGS}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", default=None,
                        help="the MIMIC-CXR-JPG root holding files/ (default: --src, --src/mimic-cxr-jpg, or found under --src)")
    parser.add_argument("--image-size", type=int, default=512, help="square output size in px (default 512)")


# --------------------------------------------------------------------------- where the images are

def _is_files(folder: Path) -> bool:
    """A MIMIC-CXR-JPG ``files/`` folder: it holds ``pNN`` group folders."""
    return folder.is_dir() and any(re.fullmatch(r"p\d\d", c.name) for c in folder.iterdir() if c.is_dir())


def find_images(src: Path, images: str | os.PathLike | None = None) -> Path:
    """The ``files/`` folder of MIMIC-CXR-JPG (see the module docstring for where it is looked for)."""
    if images:
        root = Path(images).expanduser()
        for cand in (root / "files", root):
            if _is_files(cand):
                return cand
        raise FileNotFoundError(f"--images {root}: no MIMIC-CXR-JPG files/pNN/ folders there")
    for cand in (src / "files", src / "mimic-cxr-jpg" / "files"):
        if _is_files(cand):
            return cand
    for dirpath, dirnames, _ in os.walk(src):
        depth = len(Path(dirpath).relative_to(src).parts)
        if depth >= 5:
            dirnames[:] = []
        dirnames.sort()
        if Path(dirpath).name == "files" and _is_files(Path(dirpath)):
            return Path(dirpath)
    raise FileNotFoundError(f"{src}: no MIMIC-CXR-JPG files/pNN/ tree found (pass --images, the MIMIC-CXR-JPG root)")


def image_path(dicom: str, subject: str, study: str) -> str:
    """The JPEG of ``dicom`` relative to ``files/``: the path-like id as given, or built from the ids."""
    d = dicom.strip().removeprefix("files/").removesuffix(".jpg")
    if "/" in d:
        return f"{d}.jpg"
    s, t = subject.strip().lstrip("p"), study.strip().lstrip("s")
    if not (s and t):
        raise ValueError(f"dicom id {dicom!r} is not path-like and the row lacks subject_id or study_id")
    return f"p{s[:2]}/p{s}/s{t}/{d}.jpg"


def _subject_of(row: dict, rel: str) -> str:
    return str(row.get("subject_id", "")).strip().lstrip("p") or rel.split("/")[1].lstrip("p")


def items(src: Path, options: dict) -> list[Item]:
    table = pd.read_csv(src / MARKER, dtype=str, keep_default_na=False)
    missing = [c for c in ("dicom_id", "previous_dicom_id") if c not in table.columns]
    if missing:
        raise ValueError(f"{src / MARKER}: no column(s) {', '.join(missing)}; has {', '.join(table.columns)}")
    files = find_images(src, options.get("images"))
    out, seen = [], {}
    for row in table.to_dict("records"):
        cur = image_path(row["dicom_id"], row.get("subject_id", ""), row.get("study_id", ""))
        prev = image_path(row["previous_dicom_id"], row.get("subject_id", ""), row.get("previous_study_id", ""))
        pair = Path(cur).stem
        n = seen[pair] = seen.get(pair, 0) + 1
        pair = pair if n == 1 else f"{pair}-{n}"
        labels = {c: str(v).strip().lower() if c.endswith("_progression") else str(v).strip()
                  for c, v in row.items() if c.endswith(("_progression", "_label_quality"))}
        ids = {c: str(row.get(c, "")).strip() for c in ID_COLUMNS}
        out.append(Item(key=pair, subject=_subject_of(row, cur), source=f"files/{cur}" + ("" if n == 1 else f"#{n}"),
                        split="test", payload={"files": str(files), "current": cur, "prior": prev, "pair": pair,
                                               "labels": labels, "ids": {**ids, "dicom_id": Path(cur).stem,
                                                                         "previous_dicom_id": Path(prev).stem}}))
    return out


# --------------------------------------------------------------------------- reading and letterboxing

def read_jpeg(path: Path) -> tuple[np.ndarray, str]:
    """A radiograph as float32 in [0, 1] (greyscale) and the file's PIL mode."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("I;16", "I;16B", "I", "F"):
                array = np.asarray(img, np.float32)
                array = array / max(float(array.max()), 1.0)
            else:
                array = np.asarray(img.convert("L"), np.float32) / 255.0
    except Exception as e:
        raise Refused(f"{path.name}: unreadable JPEG ({type(e).__name__}: {e})") from e
    return array, mode


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` [H, W] fitted into ``size`` x ``size``: scaled by ``size / max(H, W)`` (antialiased bilinear),
    centred, the short side padded with 0 on both sides (the odd pixel after, i.e. bottom / right)."""
    from PIL import Image

    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(np.asarray(image, np.float32), mode="F").resize((nw, nh), Image.Resampling.BILINEAR))
    out = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return np.clip(out, 0.0, 1.0)


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    p = item.payload
    files, size = Path(p["files"]), int(options["image_size"])
    for role in ("prior", "current"):
        if not (files / p[role]).is_file():
            raise Refused(f"{role} image files/{p[role]} not found under {files.parent}")
    folder = f"images/p{item.subject}/{p['pair']}"
    images, notes = [], []
    for role, study in (("prior", "previous_study_id"), ("current", "study_id")):
        array, mode = read_jpeg(files / p[role])
        notes.append(f"{role} {array.shape[1]}x{array.shape[0]} {mode}")
        images.append({"image_id": f"{p['pair']}/{role}", "modality": "XR", "sequence": role,
                       **write_array(out, f"{folder}/{role}.npy", letterbox(array, size), decimals=5),
                       "study_id": p["ids"][study], "dicom_id": Path(p[role]).stem,
                       "original_shape": f"{array.shape[0]} {array.shape[1]}", "jpeg_mode": mode})
    pair = {"pair": p["pair"], "a": f"{p['pair']}/prior", "b": f"{p['pair']}/current", "target_path": "",
            **{f"{f}_progression": p["labels"].get(f"{f}_progression", "") for f in FINDINGS},
            **{c: v for c, v in p["labels"].items() if not c.endswith("_progression") or c[:-12] not in FINDINGS},
            **{c: p["ids"][c] for c in ID_COLUMNS if c != "subject_id"}}
    return Output(images=images, pairs=[pair], note="; ".join(notes) + f"; letterboxed to {size}x{size}")
