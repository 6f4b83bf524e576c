"""OpenMind (Hugging Face ``AnonRes/OpenMind``; nnssl, arXiv 2412.17041): 3D head MRI -> prepared dataset.

Raw layout (as nnssl's ``Dataset001_OpenMind.py`` reads it): ``openneuro_metadata.csv`` beside the folder
``OpenMind/``, one row per image; ``image_path``, ``anon_mask_path`` and ``anat_mask_path`` are relative to
``OpenMind/`` (``<dsXXXXXX>/sub-<id>/[ses-<id>/]anat/<name>.nii.gz``; masks and derived images live in the
``<name>__Data/`` folder beside an image, a derived image naming its source in ``derived_from``).

One item per row (key: its ``image_path``). The subject is ``<dsXXXXXX>/sub-<id>``, so every session,
contrast and derived image of a person lands in one split (seeded). The image is written in RAS
(``images/<image_path>``, voxels those of nibabel's ``as_closest_canonical``: permuted and flipped, never
resampled, unless ``--spacing``); its anatomy (foreground) mask becomes ``mask_path`` and its anonymisation
(defacing) mask ``deface_mask_path``, each checked to be on the image's grid (a mask that is not is dropped,
with a note in report.csv). Modality ``MRI``; ``sequence`` is the metadata's ``modality`` (T1w, T2w, FLAIR,
...); ``session`` the ``ses-`` folder if any; a few metadata columns are kept as ``meta_*``.

Filters: ``--modalities`` (comma list of metadata modalities) and ``--min-quality`` (keep
``image_quality_score >= Q``; nnssl reads this score as one value per dataset, modality and ``derived_from``,
so the filter drops whole groups). A row they leave out is refused with the reason ``filtered: ...`` (the
format has no status for it; see ``report.csv``). A 4D image is refused, not cut to its first volume:
OpenMind's images are 3D, so a 4D file is a series that does not belong in it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lib.data.convert import Item, Output, Refused
from lib.data.prepared import write_image

NAME, VERSION, MARKER = "openmind", "2", "openneuro_metadata.csv"
SPLIT_SEED, SPLIT_FRACTIONS = 0, (0.8, 0.1, 0.1)
INFO = {
    "source": "hf:AnonRes/OpenMind",
    "licence": "CC-BY-4.0 (the dataset card; each OpenNeuro source dataset keeps its own terms)",
    "description": "3D head and neck MRI from about 800 OpenNeuro datasets, 23 MRI types",
    "channels": {"MRI": ["intensity (z-scored or percentile-scaled at training time)"]},
    "labels": {"mask_path": {"0": "background", "1": "anatomy (foreground)"},
               "deface_mask_path": {"0": "kept", "1": "anonymised (defaced) region"}},
}
KEEP = ["modality", "image_quality_score", "age", "sex", "health_status", "manufacturer", "model_name",
        "magnetic_field_strength", "repetition_time", "echo_time", "derived_from", "is_brain_extract"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modalities", default="", help="comma-separated metadata modalities to keep (default: all)")
    parser.add_argument("--min-quality", type=float, default=None, help="keep images with image_quality_score >= this")


def _root(src: Path) -> Path:
    """The folder ``image_path`` is relative to: ``src/OpenMind`` (the download), else ``src``."""
    return src / "OpenMind" if (src / "OpenMind").is_dir() else src


def items(src: Path, options: dict) -> list[Item]:
    table = pd.read_csv(src / MARKER, dtype=str, keep_default_na=False)
    missing = [c for c in ("image_path", "modality", "image_quality_score") if c not in table.columns]
    if missing:
        raise ValueError(f"{src / MARKER}: missing column(s) {', '.join(missing)}")
    out = []
    table = table[table["image_path"] != ""].drop_duplicates("image_path")  # one item (and image_id) per file
    for row in table.to_dict("records"):
        parts = Path(row["image_path"]).parts
        subject = "/".join(parts[:2]) if len(parts) > 2 else row["image_path"]
        out.append(Item(key=row["image_path"], subject=subject, source=f"OpenMind/{row['image_path']}", payload=row))
    return out


def _filtered(row: dict, options: dict) -> str | None:
    wanted = [m.strip() for m in (options.get("modalities") or "").split(",") if m.strip()]
    if wanted and row["modality"] not in wanted:
        return f"filtered: modality {row['modality']} not in {','.join(wanted)}"
    threshold = options.get("min_quality")
    if threshold is not None:
        try:
            score = float(row["image_quality_score"])
        except ValueError:
            return f"filtered: no image_quality_score ({row['image_quality_score']!r}) with --min-quality {threshold}"
        if score < threshold:
            return f"filtered: image_quality_score {score:g} < {threshold:g}"
    return None


def _load(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise Refused(f"{path.name}: listed in {MARKER} but not in the download")
    try:
        img = nib.load(path)
    except Exception as e:  # not NIfTI, or a damaged header
        raise Refused(f"{path.name}: unreadable header ({type(e).__name__}: {e})") from e
    if len(img.shape) == 4 and img.shape[3] > 1:
        raise Refused(f"{path.name}: 4D image ({img.shape[3]} volumes); OpenMind images are 3D")
    if len(img.shape) != 3 and not (len(img.shape) > 3 and all(s == 1 for s in img.shape[3:])):
        raise Refused(f"{path.name}: shape {img.shape} is not a 3D volume")
    try:
        data = img.get_fdata(dtype=np.float32).reshape(img.shape[:3])
    except Exception as e:  # truncated or damaged gzip/voxel data
        raise Refused(f"{path.name}: voxel data unreadable ({type(e).__name__}: {e})") from e
    if not np.isfinite(data).all():
        raise Refused(f"{path.name}: {int((~np.isfinite(data)).sum())} non-finite voxels")
    return data, img.affine


def _mask(root: Path, rel: str, shape: tuple, affine: np.ndarray, out: Path, target: str,
          spacing: float | None) -> tuple[dict, str]:
    """``({column: path}, note)`` for one mask of the row (written beside the image on its grid)."""
    if not rel:
        return {}, ""
    try:
        data, mask_affine = _load(root / rel)
    except Refused as e:
        return {}, f"mask dropped: {e}"
    if data.shape != shape or not np.allclose(mask_affine, affine, atol=1e-3):
        return {}, f"mask {Path(rel).name} dropped: not on the image's grid ({data.shape} vs {shape})"
    mask = (data > 0.5).astype(np.uint8)
    return {"path": write_image(out, target, mask, mask_affine, dtype=np.uint8, spacing=spacing, order=0)["path"]}, ""


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    row = item.payload
    reason = _filtered(row, options)
    if reason:
        raise Refused(reason)
    root = _root(src)
    data, affine = _load(root / row["image_path"])
    stem = row["image_path"].removesuffix(".gz").removesuffix(".nii")
    fields = write_image(out, f"images/{stem}.nii.gz", data, affine, spacing=options.get("spacing"))
    session = next((p for p in Path(row["image_path"]).parts[2:3] if p.startswith("ses-")), "")
    image = {"image_id": row["image_path"], "modality": "MRI", "sequence": row["modality"], "session": session, **fields}
    notes = []
    for column, key, suffix in (("mask_path", "anat_mask_path", "anat_mask"), ("deface_mask_path", "anon_mask_path", "deface_mask")):
        written, note = _mask(root, row.get(key, ""), data.shape, affine, out, f"images/{stem}__{suffix}.nii.gz",
                              options.get("spacing"))
        image[column] = written.get("path", "")
        notes += [note] if note else []
    image.update({f"meta_{k}": row.get(k, "") for k in KEEP})
    return Output(images=[image], note="; ".join(notes) or "converted")
