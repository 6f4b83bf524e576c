"""Volumes in and out: NIfTI (and every 3D format nibabel reads) to a channel-first RAS array.

A :class:`Volume` is what every loader in :mod:`lib.data` returns:

- ``array``: float32 ``[C, D, H, W]``; the three spatial axes are those of the RAS-canonical array
  (axis ``i`` points to the patient's Right, ``j`` Anterior, ``k`` Superior, as closely as the
  voxel grid allows; an oblique acquisition keeps its small rotation in the affine);
- ``affine``: 4x4 float64, voxel ``(i, j, k)`` of ``array`` -> RAS+ world millimetres;
- ``source_orientation``: the axis codes of the file as stored (e.g. ``"LAS"``), for provenance.

Layouts on disk. A scalar volume is ``[X, Y, Z]``. Channels live in the fourth or fifth dimension:
``[X, Y, Z, C]`` (how most tools write several channels, and how a 4D series is stored) or
``[X, Y, Z, 1, C]`` (the NIfTI "vector" layout, what :func:`save_volume` writes). A 3-channel CT
saved as ``[D, H, W, 3]`` or ``[D, H, W, 1, 3]`` loads as ``[3, D, H, W]``.

Reorientation is nibabel's: ``io_orientation`` + ``apply_orientation`` + ``inv_ornt_aff``, the same
three steps as ``nibabel.as_closest_canonical`` (done on the decoded array so that the channel
layout can be normalised first). Every check that can be made from the header (shape, size, voxel
type, affine, channel count) is made before a byte of voxel data is decoded.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Default ceiling on the voxels (all channels) a header may claim: 2**29 = 537M voxels, 2 GiB as
#: float32. A 512x512x1000 CT (262M voxels) fits; a 3-channel copy of it does not, so raise
#: ``max_voxels`` for such data knowingly. A corrupt header (dims in the tens of thousands) is
#: caught before any allocation.
MAX_VOXELS = 2**29

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A file that cannot become a :class:`Volume`; the message starts with the file's path."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


@dataclass
class Volume:
    """A channel-first image volume and its voxel-to-world (RAS+, mm) affine."""

    array: np.ndarray
    affine: np.ndarray
    source_orientation: str = "RAS"
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: series UID, files, original shape...

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 4:
            raise ValueError(f"Volume.array must be [C, D, H, W] (4 axes), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got shape {self.affine.shape}")
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (lengths of the affine's columns)."""
        import nibabel as nib

        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes of ``array`` (``"RAS"`` after loading)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        return int(self.array.shape[0])

    def __repr__(self) -> str:
        sp = "x".join(f"{s:.3g}" for s in self.spacing)
        return (f"Volume(shape={tuple(self.array.shape)}, spacing={sp} mm, orientation={self.orientation}, "
                f"source_orientation={self.source_orientation}, path={self.path})")


# --------------------------------------------------------------------------- orientation

def as_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the spatial axes of a channel-first ``[C, X, Y, Z]`` array to RAS.

    Returns the reoriented array (a view where possible) and its affine. The voxel grid is only
    permuted and flipped, never resampled, so every voxel keeps its world position.
    """
    from nibabel import orientations as ornts

    affine = np.asarray(affine, dtype=np.float64)
    ornt = ornts.io_orientation(affine)
    spatial = array.shape[1:4]
    moved = ornts.apply_orientation(np.moveaxis(array, 0, -1), ornt)  # acts on the first 3 axes
    new_affine = affine @ ornts.inv_ornt_aff(ornt, spatial)
    return np.moveaxis(moved, -1, 0), new_affine


def axcodes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine))


def _check_affine(path: Any, affine: np.ndarray) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise VolumeError(path, f"affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise VolumeError(path, f"affine has non-finite entries:\n{affine}")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(zooms <= 1e-9) or abs(np.linalg.det(affine[:3, :3])) <= 1e-12 * max(float(np.prod(zooms)), 1e-300):
        raise VolumeError(path, f"degenerate affine (a zero voxel size or collinear axes; voxel sizes "
                                f"{np.round(zooms, 6).tolist()}): the voxels have no defined position in space")


def voxel_size_problem(path: Path, img: Any) -> str | None:
    """What is wrong with the voxel sizes (pixdim) stored in a NIfTI header, or ``None``. nibabel turns a
    negative pixdim positive (with a log line) on reading, so the header is read again unchecked. A left-right
    flip is the sign of ``pixdim[0]`` (qfac) or of the affine, never of a voxel size: a negative or zero size on
    an axis the image has is a damaged header."""
    header = getattr(img, "header", None)
    if header is None or "pixdim" not in getattr(header, "keys", lambda: ())():
        return None
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(path) as f:
            raw = type(header).from_fileobj(f, check=False)
    except Exception:  # nibabel read it a moment ago; a failure here is reported when the data is read
        return None
    ndim = int(raw["dim"][0])
    sizes = [float(v) for v in raw["pixdim"][1:1 + min(max(ndim, 0), 3)]]
    bad = [f"pixdim[{n + 1}]={v:g}" for n, v in enumerate(sizes) if not v > 0]
    if not bad:
        return None
    return (f"invalid header: voxel size {', '.join(bad)} (voxel sizes must be > 0 mm; an orientation flip "
            f"belongs in the affine or qfac, not in a voxel size)")


def _gzip_problem(path: Path, e: BaseException) -> str:
    """Say what a read failure means: a damaged gzip stream for a ``.gz`` file, else a damaged file."""
    import zlib

    if path.name.lower().endswith(".gz") and isinstance(e, gzip.BadGzipFile):
        return f"truncated or damaged gzip: not a gzip file ({e})"
    if path.name.lower().endswith(".gz") and isinstance(e, (EOFError, zlib.error, OSError)):
        return f"truncated or damaged gzip: the compressed stream ends early or is corrupt ({type(e).__name__}: {e})"
    return f"truncated or damaged file ({type(e).__name__}: {e})"


def gzip_start_problem(path: Path) -> str | None:
    """For a ``.gz`` file nibabel could not open (it hides a broken stream behind "cannot work out file type"):
    what is wrong with the start of its gzip stream, or ``None``."""
    if not path.name.lower().endswith(".gz"):
        return None
    try:
        with gzip.open(path, "rb") as f:
            f.read(1 << 16)
    except Exception as e:
        return _gzip_problem(path, e)
    return None


# --------------------------------------------------------------------------- loading

def _load_image(path: Path):
    import nibabel as nib
    from nibabel.imageclasses import spatial_axes_first
    from nibabel.spatialimages import SpatialImage

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise VolumeError(path, "is a folder, not an image file (for a DICOM series use "
                                "lib.data.dicom.read_series)")
    size = path.stat().st_size
    if size == 0:
        raise VolumeError(path, "empty file (0 bytes)")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error, struct.error...
        hint = ""
        with open(path, "rb") as f:
            if f.read(132)[128:] == b"DICM" or path.suffix.lower() == ".dcm":
                hint = "; it is a DICOM file: use lib.data.dicom.read_series"
        broken = None if hint else gzip_start_problem(path)
        if broken:
            raise VolumeError(path, f"unreadable: {broken}") from e
        raise VolumeError(path, f"unreadable: not an image nibabel can open, or a damaged/truncated file "
                                f"({type(e).__name__}: {e}){hint}") from e
    if not isinstance(img, SpatialImage) or len(getattr(img, "shape", ())) == 0:
        raise VolumeError(path, f"{type(img).__name__} is not a spatial image (no voxel grid with an affine)")
    if not spatial_axes_first(img):
        raise VolumeError(path, f"{type(img).__name__} of shape {img.shape}: nibabel cannot tell which axes are "
                                "spatial (e.g. a 4D MINC file with time first)")
    return img


def _channels_of(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, int, int], int]:
    """Spatial shape and channel count of a header shape ``[X, Y, Z, ...]``."""
    spatial = tuple(shape[:3]) + (1,) * max(0, 3 - len(shape))
    extra = [s for s in shape[3:] if s != 1]
    if len(extra) > 1:
        raise VolumeError(path, f"shape {shape} has several non-spatial axes longer than 1 ({extra}); expected "
                                f"[X, Y, Z], [X, Y, Z, C] or [X, Y, Z, 1, C]")
    return spatial, (extra[0] if extra else 1)  # type: ignore[return-value]


def _check_header(path: Path, img: Any, channels: tuple[int, ...] | None, max_voxels: int,
                  allow_2d: bool) -> tuple[tuple[int, int, int], int]:
    shape = tuple(int(s) for s in img.shape)
    if any(s < 0 for s in shape):
        raise VolumeError(path, f"invalid header: negative dimension in shape {shape}")
    n_voxels = math.prod(shape)
    if n_voxels == 0:
        raise VolumeError(path, f"empty image: shape {shape} has a zero-length axis (no voxels)")
    if n_voxels > max_voxels:
        itemsize = np.dtype(img.get_data_dtype()).itemsize if hasattr(img, "get_data_dtype") else 4
        raise VolumeError(path, f"header claims shape {shape} = {n_voxels:,} voxels "
                                f"({n_voxels * itemsize / 2**30:,.1f} GiB on disk, "
                                f"{n_voxels * 4 / 2**30:,.1f} GiB as float32), more than "
                                f"max_voxels={max_voxels:,}; a corrupt header, or raise max_voxels knowingly")
    dtype = np.dtype(img.get_data_dtype()) if hasattr(img, "get_data_dtype") else np.dtype(np.float32)
    if dtype.kind not in "biuf":
        raise VolumeError(path, f"voxel type {dtype} is not supported (need real scalar values; "
                                "RGB and complex images are not volumes of intensities)")
    spatial, n_channels = _channels_of(path, shape)
    if sum(s > 1 for s in spatial) < 3 and not allow_2d:
        raise VolumeError(path, f"2D image (shape {shape}) where a 3D volume is needed; "
                                "pass allow_2d=True to load it as a one-slice volume")
    if channels is not None and n_channels not in channels:
        raise VolumeError(path, f"{n_channels} channels (shape {shape}); allowed channel counts: "
                                f"{', '.join(map(str, channels))}")
    problem = voxel_size_problem(path, img)
    if problem:
        raise VolumeError(path, problem)
    _check_affine(path, img.affine)
    # Uncompressed NIfTI: the header says how many bytes of voxel data follow vox_offset. A short
    # file is truncated; say so before decoding (nibabel would fail later, less clearly).
    if path.name.lower().endswith(".nii") and hasattr(img.header, "get_data_offset"):
        needed = int(img.header.get_data_offset()) + n_voxels * dtype.itemsize
        have = path.stat().st_size
        if have < needed:
            raise VolumeError(path, f"truncated: the header needs {needed:,} bytes ({shape} x {dtype}), "
                                    f"the file has {have:,}")
    return spatial, n_channels


def load_volume(path: str | os.PathLike, *, channels: tuple[int, ...] | None = (1, 3),
                max_voxels: int = MAX_VOXELS, allow_2d: bool = False) -> Volume:
    """Load an image file (NIfTI-1/2 ``.nii``/``.nii.gz``, or MGH, MINC1, Analyze, PAR/REC, AFNI via
    nibabel) as a float32 channel-first :class:`Volume` in RAS orientation.

    ``channels``: allowed channel counts (``None``: any). ``max_voxels``: ceiling on the voxel count
    the header may claim, checked before anything is decoded (default :data:`MAX_VOXELS`, 2 GiB of
    float32). ``allow_2d``: accept a single slice (or a 2D image) as a volume with one-voxel axes.
    Intensity scaling in the header (``scl_slope``/``scl_inter``) is applied.

    Raises :class:`VolumeError` (a ``ValueError``) naming the file for: unreadable, damaged or
    truncated files, empty images, absurd header dimensions, unsupported voxel types, a degenerate
    affine, 2D images, disallowed channel counts, NaN/Inf voxels (with their count).
    """
    path = Path(path)
    img = _load_image(path)
    spatial, n_channels = _check_header(path, img, channels, max_voxels, allow_2d)
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except MemoryError:
        raise
    except Exception as e:  # EOFError, zlib.error, OSError ("Expected n bytes"), ValueError...
        raise VolumeError(path, f"voxel data unreadable: {_gzip_problem(path, e)}") from e
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        n_nan = int(np.isnan(data).sum())
        raise VolumeError(path, f"{n_bad:,} of {data.size:,} voxels are not finite ({n_nan:,} NaN, "
                                f"{n_bad - n_nan:,} +/-Inf)")
    del bad
    data = data.reshape(spatial + (n_channels,))
    array, affine = as_ras(np.moveaxis(data, -1, 0), img.affine)
    return Volume(np.ascontiguousarray(array, dtype=np.float32), affine,
                  source_orientation=axcodes(img.affine), path=path,
                  meta={"format": type(img).__name__, "shape_on_disk": tuple(int(s) for s in img.shape),
                        "dtype_on_disk": str(img.get_data_dtype())})


# --------------------------------------------------------------------------- saving

_NIFTI_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32,
                                       np.float32, np.float64)}


def save_volume(volume_or_array: Volume | np.ndarray, path: str | os.PathLike,
                affine: np.ndarray | None = None) -> Path:
    """Write a volume as NIfTI-1 (``.nii``, or gzipped ``.nii.gz``), atomically; return the path.

    ``volume_or_array``: a :class:`Volume`, or an array ``[C, D, H, W]`` (or ``[D, H, W]`` for one
    channel). ``affine``: voxel -> RAS+ mm; for a Volume it overrides ``volume.affine``; for a bare
    array, ``None`` means the identity (1 mm voxels, RAS, origin at voxel 0).
    C == 1 is written as a 3D image, C > 1 as ``[D, H, W, 1, C]`` with the NIfTI vector intent.
    A Volume is written as float32; a bare integer or float array keeps its type (bool -> uint8,
    int64 -> int32, float16 -> float32), so label maps stay small. Both qform and sform hold the
    affine (code 1, scanner), units mm.
    The gzip stream has no timestamp, so the same volume always gives the same bytes.
    """
    import nibabel as nib

    from lib.atomic import atomic_path

    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    if isinstance(volume_or_array, Volume):
        arr = volume_or_array.array
        affine = volume_or_array.affine if affine is None else affine
    else:
        arr = np.asarray(volume_or_array)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:  # e.g. argmax labels; 64-bit ints travel badly
            info = np.iinfo(np.int32)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"{path}: {arr.dtype} values outside the int32 range cannot be written")
            arr = arr.astype(np.int32)
        elif arr.dtype not in _NIFTI_DTYPES:
            arr = arr.astype(np.float32)
        affine = np.eye(4) if affine is None else affine
    if arr.ndim != 4:
        raise ValueError(f"{path}: expected an array [C, D, H, W] (or [D, H, W]), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{path}: refusing to write an empty array of shape {arr.shape}")
    if arr.dtype.kind == "f":
        n_bad = int((~np.isfinite(arr)).sum())
        if n_bad:
            raise ValueError(f"{path}: refusing to write {n_bad:,} non-finite voxels (of {arr.size:,})")
    affine = np.asarray(affine, dtype=np.float64)
    _check_affine(path, affine)

    n_channels = arr.shape[0]
    data = arr[0] if n_channels == 1 else np.moveaxis(arr, 0, -1)[:, :, :, None, :]
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if n_channels > 1:
        img.header.set_intent("vector", (), name="channels")
    blob = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        blob = gzip.compress(blob, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return path
