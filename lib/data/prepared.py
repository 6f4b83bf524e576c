"""The prepared-dataset format: what every converter writes and every notebook reads (``dataset_format.md``).

A prepared dataset is a folder::

    dataset.json     name, source, licence, format and converter version, channels, label names
    index.csv        one row per image (INDEX_COLUMNS, optional *mask_path columns and extras)
    labels.csv       optional: one row per image_id, one column per label
    points.csv       optional: point annotations (image_id, label, x, y, z in RAS mm, voxel i, j, k)
    pairs.csv        optional: pairs of images of one subject (pair, subject, split, a, b, target_path)
    report.csv       what the converter did with each raw item: source, status, reason
    images/...       NIfTI in RAS (2D radiographs: .npy, rows superior->inferior, patient right on the left)

:func:`open_dataset` checks all of it and raises :class:`DatasetFormatError` naming the file and the
problem; :func:`write_image` writes one image (RAS, atomic) and returns its index fields.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from lib.data.cache import sha256_of

FORMAT = "medimg-prepared/1"
INDEX_COLUMNS = ("image_id", "subject", "dataset", "modality", "sequence", "split", "path", "shape", "spacing_mm",
                 "sha256", "source")
REQUIRED_INFO = ("name", "format", "source", "licence", "converter", "converter_version", "channels", "labels")
MODALITIES = ("MRI", "CT", "XR")
SPLITS = ("train", "val", "test")
POINT_COLUMNS = ("image_id", "label", "x", "y", "z", "i", "j", "k")
PAIR_COLUMNS = ("pair", "subject", "split", "a", "b")
REPORT_COLUMNS = ("source", "status", "reason")
STATUSES = ("converted", "skipped", "refused")
TABLES = ("index.csv", "labels.csv", "points.csv", "pairs.csv", "report.csv")


class DatasetFormatError(ValueError):
    """A prepared dataset that breaks the format; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


# --------------------------------------------------------------------------- writing

def fmt_tuple(values: Iterable[float], digits: int = 4) -> str:
    """``(1.0, 0.5, 2)`` -> ``"1 0.5 2"``: how shapes and spacings are written in the index."""
    return " ".join(f"{round(float(v), digits):g}" for v in values)


def parse_tuple(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in str(text).split())


def write_image(root: str | os.PathLike, relpath: str, array: np.ndarray, affine: np.ndarray,
                dtype: Any = None, spacing: float | None = None, order: int = 1) -> dict[str, str]:
    """Write ``array`` (``[X, Y, Z]`` or ``[C, X, Y, Z]``, voxel -> RAS mm ``affine``) as NIfTI, reoriented
    to RAS, atomically, under ``root/relpath``; returns the index fields ``path, shape, spacing_mm, sha256``.
    ``dtype``: the on-disk type (default: int16 for integer-valued data in its range, else float32).
    ``spacing``: resample to cubic voxels of this many mm first (:func:`lib.data.transforms.resample_isotropic`,
    spline ``order``: 1 for images, 0 for masks and labels); integer input stays integer (rounded)."""
    import nibabel as nib

    from lib.atomic import atomic_path

    array = np.asarray(array)
    if array.dtype == np.int64 or array.dtype == np.bool_:
        array = array.astype(np.int32)
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)  # NIfTI keeps channels last
    if array.ndim not in (3, 4):
        raise ValueError(f"{relpath}: an image must be 3D (or 3D with channels), got shape {array.shape}")
    img = nib.as_closest_canonical(nib.Nifti1Image(array, np.asarray(affine, np.float64)))
    data = np.asanyarray(img.dataobj)
    if spacing is not None:
        from lib.data.io import Volume
        from lib.data.transforms import resample_isotropic

        channels = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
        volume = resample_isotropic(Volume(channels, img.affine), float(spacing), order)
        resampled = volume.array[0] if data.ndim == 3 else np.moveaxis(volume.array, 0, -1)
        data = np.round(resampled).astype(data.dtype) if np.issubdtype(data.dtype, np.integer) else resampled
        img = nib.Nifti1Image(data, volume.affine)
    if dtype is None:
        integral = np.issubdtype(data.dtype, np.integer) or bool(np.all(np.mod(data, 1) == 0))
        dtype = np.int16 if integral and data.min() >= -32768 and data.max() <= 32767 else np.float32
    if np.issubdtype(np.dtype(dtype), np.integer) and not np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.round(data), info.min, info.max)
    out = nib.Nifti1Image(data.astype(dtype), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    path = Path(root) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    data = out.to_bytes()
    if relpath.endswith(".gz"):
        data = gzip.compress(data, compresslevel=4, mtime=0)  # mtime 0: same voxels, same bytes, same sha256
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    zooms = out.header.get_zooms()[:3]
    return {"path": relpath, "shape": fmt_tuple(out.shape[:3], 0), "spacing_mm": fmt_tuple(zooms),
            "sha256": hashlib.sha256(data).hexdigest()}  # the bytes just written: no second read


def write_array(root: str | os.PathLike, relpath: str, array: np.ndarray, decimals: int | None = None) -> dict[str, str]:
    """Write a 2D radiograph (or DRR, change map) as a float32 ``.npy`` under ``root/relpath`` atomically (values
    rounded to ``decimals`` when given); returns its index fields, the sha256 of the bytes written."""
    import io

    from lib.atomic import atomic_path

    array = np.asarray(array, np.float32)
    buf = io.BytesIO()
    np.save(buf, array if decimals is None else np.round(array, decimals))
    data = buf.getvalue()
    path = Path(root) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return {"path": relpath, "shape": fmt_tuple(array.shape, 0), "spacing_mm": "", "sha256": hashlib.sha256(data).hexdigest()}


def image_fields(root: str | os.PathLike, relpath: str) -> dict[str, str]:
    """Index fields of an image file already written (NIfTI, or a 2D ``.npy``)."""
    path = Path(root) / relpath
    if path.suffix == ".npy":
        shape, spacing = np.load(path, mmap_mode="r").shape, ()
    else:
        import nibabel as nib

        header = nib.load(path).header
        shape, spacing = header.get_data_shape()[:3], header.get_zooms()[:3]
    return {"path": relpath, "shape": fmt_tuple(shape, 0), "spacing_mm": fmt_tuple(spacing), "sha256": sha256_of(path)}


def write_info(root: str | os.PathLike, info: dict[str, Any]) -> Path:
    from lib.atomic import write_json

    missing = [k for k in REQUIRED_INFO if k not in {**info, "format": FORMAT}]
    if missing:
        raise ValueError(f"dataset.json of {root}: missing {', '.join(missing)}")
    return write_json(Path(root) / "dataset.json", {"format": FORMAT, **info})


def write_table(root: str | os.PathLike, name: str, rows: Sequence[dict] | pd.DataFrame,
                columns: Sequence[str] = ()) -> Path:
    """One table of the format, atomically; ``columns`` come first, in this order, even with no rows."""
    from lib.atomic import atomic_path

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    for c in columns:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    df = df[list(columns) + [c for c in df.columns if c not in columns]]
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


# --------------------------------------------------------------------------- reading and checking

def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except Exception as e:
        raise DatasetFormatError(path, f"unreadable CSV ({type(e).__name__}: {e})") from e


def _require_columns(path: Path, df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetFormatError(path, f"missing column(s) {', '.join(missing)}; has {', '.join(df.columns) or 'none'}")


def _check_values(path: Path, df: pd.DataFrame, column: str, valid: Sequence[str]) -> None:
    bad = sorted(set(df[column]) - set(valid))
    if bad:
        rows = df.index[df[column].isin(bad)][:3].tolist()
        raise DatasetFormatError(path, f"column {column}: {', '.join(map(repr, bad[:5]))} not one of "
                                       f"{', '.join(valid)} (rows {', '.join(str(r + 2) for r in rows)})")


def _check_relative(path: Path, root: Path, df: pd.DataFrame, column: str, check_files: bool) -> None:
    for row, rel in zip(df.index, df[column]):
        if not rel:
            continue
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise DatasetFormatError(path, f"row {row + 2}: {column} {rel!r} must be relative to the dataset folder")
        if check_files and not (root / p).is_file():
            raise DatasetFormatError(path, f"row {row + 2}: {column} {rel!r} does not exist under {root}")


def _check_index(root: Path, index: pd.DataFrame, check_files: bool) -> None:
    path = root / "index.csv"
    _require_columns(path, index, INDEX_COLUMNS)
    dup = index["image_id"][index["image_id"].duplicated()]
    if len(dup):
        raise DatasetFormatError(path, f"image_id not unique: {', '.join(dup.unique()[:5])}")
    empty = [c for c in ("image_id", "subject", "dataset", "path", "shape", "sha256") if (index[c] == "").any()]
    if empty:
        raise DatasetFormatError(path, f"empty values in column(s) {', '.join(empty)}")
    _check_values(path, index, "modality", MODALITIES)
    _check_values(path, index, "split", SPLITS)
    for c in ("shape", "spacing_mm"):
        try:
            index[c].map(parse_tuple)
        except ValueError as e:
            raise DatasetFormatError(path, f"column {c}: not space-separated numbers ({e})") from None
    leaks = index.groupby(["dataset", "subject"])["split"].nunique()
    if (leaks > 1).any():
        raise DatasetFormatError(path, "a subject in more than one split (leakage): "
                                       + ", ".join(f"{d}/{s}" for d, s in leaks[leaks > 1].index[:5]))
    for c in [c for c in index.columns if c == "path" or c.endswith("mask_path")]:
        _check_relative(path, root, index, c, check_files)


def _check_refs(path: Path, df: pd.DataFrame, columns: Sequence[str], ids: set[str]) -> None:
    for c in columns:
        unknown = sorted(set(df[c]) - ids)
        if unknown:
            raise DatasetFormatError(path, f"column {c}: image_id(s) not in index.csv: {', '.join(unknown[:5])}")


@dataclass
class PreparedDataset:
    """A checked prepared dataset: its tables as DataFrames (strings) and typed accessors."""

    root: Path
    info: dict[str, Any]
    index: pd.DataFrame
    labels: pd.DataFrame = field(default_factory=pd.DataFrame)
    points: pd.DataFrame = field(default_factory=pd.DataFrame)
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    report: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def name(self) -> str:
        return str(self.info["name"])

    def images(self, modality: str | None = None, split: str | None = None, sequence: str | Sequence[str] | None = None,
               dataset: str | None = None) -> pd.DataFrame:
        """Index rows (optionally of one modality, split, sequence(s), dataset) with an absolute ``file`` column."""
        if modality is not None and modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        df = self.index
        if modality is not None:
            df = df[df["modality"] == modality]
        if split is not None:
            df = df[df["split"] == split]
        if sequence is not None:
            df = df[df["sequence"].isin([sequence] if isinstance(sequence, str) else list(sequence))]
        if dataset is not None:
            df = df[df["dataset"] == dataset]
        return df.assign(file=[str(self.root / p) for p in df["path"]]).reset_index(drop=True)

    def files(self, modality: str | None = None, split: str | None = None, **kw: Any) -> list[Path]:
        return [Path(f) for f in self.images(modality, split, **kw)["file"]]

    @functools.cached_property
    def _by_id(self) -> pd.DataFrame:
        return self.index.set_index("image_id", drop=False)

    @functools.cached_property
    def _by_name(self) -> dict[tuple[str, str, str], str]:
        return dict(zip(zip(self.index["dataset"], self.index["subject"], self.index["sequence"]), self.index["image_id"]))

    def image_id(self, dataset: str, subject: str, sequence: str) -> str:
        """The image of ``subject`` in ``dataset`` with ``sequence`` (e.g. ``"chest_ct", "sub-000", "contrast"``)."""
        try:
            return self._by_name[dataset, subject, sequence]
        except KeyError:
            raise KeyError(f"{self.root}: no {dataset} image {sequence!r} of {subject!r} in index.csv") from None

    def file(self, image_id: str, column: str = "path") -> Path:
        """Absolute path of an image (or of its ``column``, e.g. ``mask_path``)."""
        if image_id not in self._by_id.index:
            raise KeyError(f"{self.root}: no image {image_id!r} in index.csv")
        rel = self._by_id.at[image_id, column]
        if not rel:
            raise KeyError(f"{self.root}: image {image_id!r} has no {column}")
        return self.root / rel

    def label_table(self) -> pd.DataFrame:
        """``labels.csv`` joined to the index (subject, split, modality, sequence, file)."""
        if self.labels.empty:
            return pd.DataFrame()
        return self.images().merge(self.labels, on="image_id", how="inner")

    def counts(self) -> pd.DataFrame:
        """Images per dataset, modality and split (``total`` column), for the survey."""
        if self.index.empty:
            return pd.DataFrame()
        table = self.index.groupby(["dataset", "modality", "split"]).size().unstack(fill_value=0)
        table = table.reindex(columns=[s for s in SPLITS if s in table.columns])
        return table.assign(total=table.sum(axis=1))

    def refused(self) -> pd.DataFrame:
        if self.report.empty:
            return self.report
        return self.report[self.report["status"] == "refused"].reset_index(drop=True)

    def verify_checksums(self) -> list[str]:
        """Images whose file no longer matches the index's sha256."""
        return [f"{p}: sha256 differs from index.csv" for p, h in zip(self.index["path"], self.index["sha256"])
                if sha256_of(self.root / p) != h]


def open_dataset(root: str | os.PathLike, check_files: bool = True) -> PreparedDataset:
    """Open and check a prepared dataset (``check_files``: every path and mask path exists)."""
    root = Path(root).expanduser()
    info_path = root / "dataset.json"
    if not info_path.is_file():
        raise DatasetFormatError(root, "not a prepared dataset: no dataset.json (make one with "
                                       "python -m lib.data.convert DATASET --src RAW --out PREPARED)")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as e:
        raise DatasetFormatError(info_path, f"not JSON ({e})") from None
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise DatasetFormatError(info_path, f"missing key(s) {', '.join(missing)}")
    if info["format"] != FORMAT:
        raise DatasetFormatError(info_path, f"format {info['format']!r}; this code reads {FORMAT!r}")
    if not (root / "index.csv").is_file():
        raise DatasetFormatError(root, "no index.csv")
    index = _read_csv(root / "index.csv")
    if index.empty and not len(index.columns):
        index = pd.DataFrame(columns=list(INDEX_COLUMNS))
    _check_index(root, index, check_files)
    ids = set(index["image_id"])
    tables = {}
    for name, columns, refs in (("labels.csv", ("image_id",), ("image_id",)), ("points.csv", POINT_COLUMNS, ("image_id",)),
                                ("pairs.csv", PAIR_COLUMNS, ("a", "b")), ("report.csv", REPORT_COLUMNS, ())):
        path = root / name
        df = _read_csv(path) if path.is_file() else pd.DataFrame()
        if not df.empty:
            _require_columns(path, df, columns)
            _check_refs(path, df, refs, ids)
        tables[name.split(".")[0]] = df
    if not tables["labels"].empty and tables["labels"]["image_id"].duplicated().any():
        raise DatasetFormatError(root / "labels.csv", "more than one row for an image_id")
    if not tables["report"].empty:
        _check_values(root / "report.csv", tables["report"], "status", STATUSES)
    if not tables["points"].empty:
        try:
            tables["points"][["x", "y", "z", "i", "j", "k"]].astype(float)
        except ValueError as e:
            raise DatasetFormatError(root / "points.csv", f"coordinates not numbers ({e})") from None
    return PreparedDataset(root, info, index, tables["labels"], tables["points"], tables["pairs"], tables["report"])


def assign_splits(subjects: Iterable[str], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, str]:
    """Subject -> split, seeded: the sorted unique subjects are permuted, then cut by ``fractions``
    (train, val, test). Every split gets at least one subject when there are three or more."""
    subs = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(subs))
    n = len(subs)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
    out = {}
    for rank, i in enumerate(order):
        out[subs[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return out
