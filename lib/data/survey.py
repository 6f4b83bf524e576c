"""A quick survey of the image files under a folder, from their headers (no full decode)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm",)
NPY_SUFFIXES = (".npy",)
IMAGE_SUFFIXES = NIFTI_SUFFIXES + DICOM_SUFFIXES + NPY_SUFFIXES


def image_files(root: str | os.PathLike, limit: int | None = None, exclude: tuple[str, ...] = ("cache",)) -> list[Path]:
    """NIfTI, DICOM and npy files under ``root`` (not in the top-level folders ``exclude``), sorted,
    at most ``limit`` of them."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
                   and p.relative_to(root).parts[0] not in exclude)
    return found[:limit] if limit is not None else found


def _gzip_intact(path: Path, expected: int) -> None:
    """Raise ``EOFError``/``zlib.error`` if a gzip file is cut short or damaged. Cheap when it is whole: its
    trailer holds the uncompressed size (mod 2**32), and only a file whose trailer disagrees with the size its
    header promises is decompressed (to the end) to tell a damaged file from, say, a multi-member one."""
    import gzip

    with open(path, "rb") as f:
        f.seek(max(path.stat().st_size - 4, 0))
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return
    with gzip.open(path, "rb") as g:
        while g.read(1 << 24):
            pass


def _read_failed(path: Path, e: BaseException) -> ValueError:
    from lib.data.io import _gzip_problem, gzip_start_problem

    return ValueError(f"{path}: unreadable: {gzip_start_problem(path) or _gzip_problem(path, e)}")


def header_info(path: str | os.PathLike) -> dict:
    """Shape, voxel spacing, orientation and dtype of one file, read from its header."""
    path = Path(path)
    info: dict = {"file": path.name, "format": None, "shape": None, "spacing": None,
                  "orientation": None, "dtype": None, "modality": None, "error": None}
    try:
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            from lib.data.io import gzip_start_problem, voxel_size_problem

            try:
                img = nib.load(path)
            except Exception:
                broken = gzip_start_problem(path)
                if broken:
                    raise ValueError(f"{path}: unreadable: {broken}") from None
                raise
            info.update(format="nifti", shape=tuple(int(s) for s in img.shape),
                        spacing=tuple(round(float(z), 3) for z in img.header.get_zooms()),
                        orientation="".join(nib.aff2axcodes(img.affine)), dtype=str(img.get_data_dtype()))
            problem = voxel_size_problem(path, img)
            if problem:
                raise ValueError(problem)
            if path.name.lower().endswith(".gz"):
                nbytes = int(np.prod(img.shape)) * np.dtype(img.get_data_dtype()).itemsize
                try:
                    _gzip_intact(path, int(img.header.get_data_offset()) + nbytes)
                except Exception as e:
                    raise _read_failed(path, e) from None
        elif path.name.lower().endswith(NPY_SUFFIXES):
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            info.update(format="npy", shape=tuple(int(s) for s in array.shape), dtype=str(array.dtype))
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


def load_array(path: str | os.PathLike) -> np.ndarray:
    """The decoded intensities of one file: a RAS volume (first channel/time point), a 2D npy image,
    or a rescaled DICOM frame stack."""
    path = Path(path)
    try:
        if path.name.lower().endswith(NPY_SUFFIXES):
            return np.asarray(np.load(path, allow_pickle=False), np.float32)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            from lib.data.io import voxel_size_problem

            img = nib.load(path)
            problem = voxel_size_problem(path, img)
            if problem:
                raise ValueError(f"{path}: {problem}")
            data = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
            while data.ndim > 3:
                data = data[..., 0]
            return data
        import pydicom

        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except MemoryError:
        raise
    except ValueError as e:
        if str(e).startswith(f"{path}: "):
            raise
        raise _read_failed(path, e) from None
    except Exception as e:  # EOFError, zlib.error, OSError... name the file and what is wrong with it
        raise _read_failed(path, e) from None
    return pixels.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def middle_slice(path: str | os.PathLike) -> np.ndarray:
    """A 2D image to look at: the middle axial slice of a volume (RAS), a 2D image, or a DICOM frame."""
    path = Path(path)
    if path.name.lower().endswith(NPY_SUFFIXES):
        data = load_array(path)
        return data if data.ndim == 2 else data[data.shape[0] // 2]
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        data = load_array(path)
        if data.ndim == 3:
            data = data[:, :, data.shape[2] // 2]
        return np.rot90(data)  # RAS x→right, y→up on screen
    arr = load_array(path)  # rescaled frames
    return arr[arr.shape[0] // 2] if arr.ndim == 3 else arr


def attach_manifest(files: pd.DataFrame, manifest: pd.DataFrame, root_prefix: str = "") -> pd.DataFrame:
    """Add the manifest's ``dataset`` and ``modality`` to surveyed files (``unlisted`` when absent)."""
    listed = manifest.set_index("path")[["dataset", "modality"]]
    keys = [root_prefix + p for p in files["path"]]
    out = files.copy()
    out["dataset"] = [listed["dataset"].get(k, "unlisted") for k in keys]
    out["modality"] = [m if isinstance(m, str) and m else listed["modality"].get(k, "") for k, m in zip(keys, files["modality"])]
    return out


def group_summary(files: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and modality: file count, and the distinct shapes, spacings and orientations."""
    def distinct(values, limit=3):
        vals = sorted({str(v) for v in values if v is not None and v == v})
        return "; ".join(vals[:limit]) + (f"; ... ({len(vals)} distinct)" if len(vals) > limit else "")

    rows = []
    for (dataset, modality), g in files.groupby(["dataset", "modality"], sort=True):
        rows.append({"dataset": dataset, "modality": modality, "files": len(g), "shapes": distinct(g["shape"]),
                     "spacings": distinct(g["spacing"]), "orientations": distinct(g["orientation"]),
                     "unreadable": int(g["error"].notna().sum())})
    return pd.DataFrame(rows, columns=["dataset", "modality", "files", "shapes", "spacings", "orientations", "unreadable"])


def intensity_samples(root: str | os.PathLike, files: pd.DataFrame, per_group: int = 3,
                      max_values: int = 200_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Intensities of up to ``per_group`` readable files per dataset and modality (subsampled)."""
    rng = np.random.default_rng(seed)
    samples = {}
    readable = files[files["error"].isna()]
    for (dataset, modality), g in readable.groupby(["dataset", "modality"], sort=True):
        arrays = []
        for p in g["path"].head(per_group):
            try:
                arrays.append(load_array(Path(root) / p).ravel())
            except ValueError as e:  # one bad file is reported, and the survey goes on
                warnings.warn(f"skipped: {e}", stacklevel=2)
        if not arrays:
            continue
        values = np.concatenate(arrays)
        if values.size > max_values:
            values = rng.choice(values, max_values, replace=False)
        samples[f"{dataset} {modality}"] = values
    return samples


# --------------------------------------------------------------------------- prepared datasets

def prepared_tables(root: str | os.PathLike, refused_rows: int = 20) -> dict[str, pd.DataFrame]:
    """A prepared dataset surveyed from its tables (no image is opened): ``counts`` (images per dataset,
    modality and split), ``geometry`` (per dataset, modality and sequence: images, median spacing, smallest
    and largest shape), ``report`` (items per status) and ``refused`` (the first ``refused_rows``, with reasons).
    Opening checks the format (:func:`lib.data.prepared.open_dataset`)."""
    from lib.data.prepared import open_dataset, parse_tuple

    ds = open_dataset(root)
    index = ds.index
    geometry = pd.DataFrame()
    if len(index):
        spacing = np.array([parse_tuple(s) + (np.nan,) * (3 - len(parse_tuple(s))) for s in index["spacing_mm"]])
        shape = np.array([parse_tuple(s)[:3] + (1.0,) * (3 - len(parse_tuple(s))) for s in index["shape"]])
        frame = index[["dataset", "modality", "sequence"]].assign(
            **{f"spacing_{a}": spacing[:, n] for n, a in enumerate("xyz")}, voxels=shape.prod(axis=1),
            shape=index["shape"])
        groups = frame.groupby(["dataset", "modality", "sequence"])
        geometry = groups.agg(images=("voxels", "size"), **{f"median spacing {a} (mm)": (f"spacing_{a}", "median") for a in "xyz"})
        geometry["smallest shape"] = groups.apply(lambda g: g.loc[g["voxels"].idxmin(), "shape"], include_groups=False)
        geometry["largest shape"] = groups.apply(lambda g: g.loc[g["voxels"].idxmax(), "shape"], include_groups=False)
    report = ds.report.groupby("status").size().rename("items").to_frame() if len(ds.report) else pd.DataFrame()
    refused = ds.refused()[["source", "reason"]].head(refused_rows) if len(ds.report) else pd.DataFrame()
    return {"counts": ds.counts(), "geometry": geometry.round(3), "report": report, "refused": refused}
