"""A quick survey of the image files under a folder, from their headers (no full decode)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm",)


def image_files(root: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """NIfTI and DICOM files under ``root``, sorted, at most ``limit`` of them."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES + DICOM_SUFFIXES))
    return found[:limit] if limit is not None else found


def header_info(path: str | os.PathLike) -> dict:
    """Shape, voxel spacing, orientation and dtype of one file, read from its header."""
    path = Path(path)
    info: dict = {"file": path.name, "format": None, "shape": None, "spacing": None,
                  "orientation": None, "dtype": None, "modality": None, "error": None}
    try:
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(path)
            info.update(format="nifti", shape=tuple(int(s) for s in img.shape),
                        spacing=tuple(round(float(z), 3) for z in img.header.get_zooms()),
                        orientation="".join(nib.aff2axcodes(img.affine)), dtype=str(img.get_data_dtype()))
        else:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            shape = (int(ds.Rows), int(ds.Columns)) if frames == 1 else (frames, int(ds.Rows), int(ds.Columns))
            spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
            info.update(format="dicom", shape=shape, modality=getattr(ds, "Modality", None),
                        spacing=tuple(round(float(s), 3) for s in spacing) if spacing else None,
                        dtype=f"uint{ds.BitsAllocated}" if getattr(ds, "PixelRepresentation", 0) == 0
                        else f"int{ds.BitsAllocated}")
    except Exception as e:  # a survey reports unreadable files instead of stopping at them
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def survey(root: str | os.PathLike, limit: int | None = None) -> pd.DataFrame:
    """One row per image file under ``root`` (header fields, or the error that stopped reading it)."""
    root = Path(root)
    rows = []
    for p in image_files(root, limit):
        rows.append({"path": str(p.relative_to(root)), **header_info(p)})
    return pd.DataFrame(rows, columns=["path", "file", "format", "shape", "spacing", "orientation",
                                       "dtype", "modality", "error"])


def middle_slice(path: str | os.PathLike) -> np.ndarray:
    """A 2D image to look at: the middle axial slice of a volume (RAS), or a DICOM frame."""
    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        while data.ndim > 3:
            data = data[..., 0]
        if data.ndim == 3:
            data = data[:, :, data.shape[2] // 2]
        return np.rot90(data)  # RAS x→right, y→up on screen
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3:
        arr = arr[arr.shape[0] // 2]
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
