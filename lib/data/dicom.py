"""A DICOM series (one file per slice, or an enhanced multi-frame file) to a :class:`~lib.data.io.Volume`.

Geometry (DICOM PS3.3 C.7.6.2.1.1). A slice's pixel at row ``r``, column ``c`` lies at::

    P(r, c) = ImagePositionPatient + c * PixelSpacing[1] * F_row + r * PixelSpacing[0] * F_col

in LPS patient coordinates, where ``ImageOrientationPatient = F_row (3) + F_col (3)``: the
direction along a row (increasing column) and down a column (increasing row). Slices are sorted by
their position along the normal ``F_row x F_col``. The volume's voxel ``(i, j, k)`` = (column,
row, slice), so its affine's columns are ``F_row * dc``, ``F_col * dr``, the step between
consecutive slice positions, and the first slice's position; LPS -> RAS flips x and y. The step is
measured from the positions, so a gantry tilt (positions not along the normal) gives the correct
sheared affine rather than a silently wrong one. The array is then reoriented to RAS like every
other :class:`Volume` (:func:`lib.data.io.as_ras`).

Intensities: the Modality LUT / Rescale Slope and Intercept are applied per slice (pydicom's
``apply_modality_lut``), so CT comes out in Hounsfield units.

Rejected, with the files, UIDs or positions at fault named: unreadable or truncated files, files
without pixel data or plane geometry, colour images, a mix of series (SeriesInstanceUID, frame of
reference), orientations, image sizes or pixel spacings, duplicate slice positions, uneven slice
spacing, missing slices, positions that do not lie on one line.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.data.io import Volume, as_ras, axcodes, save_volume

#: Slice gaps may differ from the median gap by this fraction (plus ABS_TOL_MM) and still count as even.
SPACING_TOLERANCE = 0.01
ABS_TOL_MM = 1e-3
_ORIENTATION_TOL = 1e-4
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


class DicomSeriesError(ValueError):
    """A set of DICOM files that cannot become one volume; the message names the files at fault."""


@dataclass
class _Frame:
    """One 2D image of the series: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None          # index into a multi-frame file's frames, None for a single-frame file
    position: np.ndarray       # ImagePositionPatient, LPS mm
    orientation: np.ndarray    # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    series_uid: str
    frame_of_reference: str
    instance: int | None
    rescale: tuple[float, float] | None  # (slope, intercept) from a functional group; None: the file's own tags
    thickness: float | None

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name}[frame {self.frame + 1}]"


# --------------------------------------------------------------------------- files

def _list_files(src: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(src, (str, os.PathLike)):
        src = Path(src)
        if src.is_dir():
            files = sorted(p for p in src.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")
            if not files:
                raise DicomSeriesError(f"{src}: folder holds no files")
            return files
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such file or folder")
        return [src]
    files = [Path(p) for p in src]
    if not files:
        raise DicomSeriesError("no DICOM files given (empty list)")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such file(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return files


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as e:
        raise DicomSeriesError(f"{path}: not a DICOM file ({e})") from e
    except Exception as e:  # truncated headers raise EOFError, struct.error, OSError...
        raise DicomSeriesError(f"{path}: unreadable DICOM file, damaged or truncated ({type(e).__name__}: {e})") from e


def _floats(path: Any, name: str, value: Any, n: int) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DicomSeriesError(f"{path}: {name} {value!r} is not {n} numbers") from e
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise DicomSeriesError(f"{path}: {name} {value!r} is not {n} finite numbers")
    return out


def _group(ds: Any, per_frame: Any, keyword: str) -> Any:
    """A functional-group macro (e.g. PlanePositionSequence) of a frame: per-frame, else shared."""
    for groups in (per_frame, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if groups is not None and keyword in groups and len(groups[keyword].value):
            return groups[keyword].value[0]
    return None


def _frames_of(path: Path, ds: Any) -> list[_Frame]:
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomSeriesError(f"{path}: colour image (SamplesPerPixel={ds.SamplesPerPixel}, "
                               f"{ds.get('PhotometricInterpretation')}); only greyscale series become volumes")
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomSeriesError(f"{path}: not an image (no Rows/Columns; SOP class {ds.get('SOPClassUID', '?')})")
    common = dict(rows=int(ds.Rows), columns=int(ds.Columns), series_uid=str(ds.get("SeriesInstanceUID", "")),
                  frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
                  instance=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n_frames > 1:
            raise DicomSeriesError(f"{path}: multi-frame file ({n_frames} frames) without per-frame plane "
                                   "positions (PerFrameFunctionalGroupsSequence): its frames cannot be placed in space")
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise DicomSeriesError(f"{path}: no plane geometry (missing {', '.join(missing)}); "
                                   "cannot place the slice in space")
        thick = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        return [_Frame(path, None, _floats(path, "ImagePositionPatient", ds.ImagePositionPatient, 3),
                       _floats(path, "ImageOrientationPatient", ds.ImageOrientationPatient, 6),
                       tuple(_floats(path, "PixelSpacing", ds.PixelSpacing, 2)), rescale=None,
                       thickness=float(thick) if thick not in (None, "") else None, **common)]
    frames = []
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != n_frames:
        raise DicomSeriesError(f"{path}: {len(per_frame)} per-frame functional groups for {n_frames} frames")
    for f, groups in enumerate(per_frame):
        where = f"{path}[frame {f + 1}]"
        pos, ori, meas = (_group(ds, groups, k) for k in
                          ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise DicomSeriesError(f"{where}: no plane geometry (Plane Position / Plane Orientation / "
                                   "Pixel Measures functional groups)")
        pvt = _group(ds, groups, "PixelValueTransformationSequence")
        rescale = ((float(pvt.get("RescaleSlope", 1) or 1), float(pvt.get("RescaleIntercept", 0) or 0))
                   if pvt is not None else (1.0, 0.0))
        thick = meas.get("SpacingBetweenSlices") or meas.get("SliceThickness")
        frames.append(_Frame(path, f, _floats(where, "ImagePositionPatient", pos.ImagePositionPatient, 3),
                             _floats(where, "ImageOrientationPatient", ori.ImageOrientationPatient, 6),
                             tuple(_floats(where, "PixelSpacing", meas.PixelSpacing, 2)), rescale=rescale,
                             thickness=float(thick) if thick not in (None, "") else None, **common))
    return frames


# --------------------------------------------------------------------------- checks

def _list_names(frames: list[_Frame], limit: int = 4) -> str:
    names = [fr.name for fr in frames]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _require_one(frames: list[_Frame], what: str, key, fmt=str) -> None:
    groups: dict[Any, list[_Frame]] = defaultdict(list)
    for fr in frames:
        groups[key(fr)].append(fr)
    if len(groups) > 1:
        parts = [f"{fmt(k)} ({len(v)} image(s): {_list_names(v)})" for k, v in groups.items()]
        raise DicomSeriesError(f"mixed series: {len(groups)} different {what}: " + "; ".join(parts))


def _check_consistent(frames: list[_Frame]) -> None:
    _require_one(frames, "SeriesInstanceUIDs", lambda f: f.series_uid, lambda k: k or "<none>")
    _require_one(frames, "FrameOfReferenceUIDs", lambda f: f.frame_of_reference, lambda k: k or "<none>")
    ref = frames[0].orientation
    _require_one(frames, "orientations (ImageOrientationPatient)",
                 lambda f: tuple(ref) if np.allclose(f.orientation, ref, atol=_ORIENTATION_TOL)
                 else tuple(np.round(f.orientation, 4)), lambda k: [round(float(v), 4) for v in k])
    _require_one(frames, "image sizes (Rows x Columns)", lambda f: (f.rows, f.columns), lambda k: f"{k[0]}x{k[1]}")
    ref_sp = np.array(frames[0].pixel_spacing)
    _require_one(frames, "pixel spacings", lambda f: tuple(ref_sp) if np.allclose(f.pixel_spacing, ref_sp, rtol=1e-4)
                 else tuple(f.pixel_spacing), lambda k: [round(float(v), 5) for v in k])
    row, col = ref[:3], ref[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3):
        raise DicomSeriesError(f"{frames[0].name}: ImageOrientationPatient {ref.tolist()} is not two orthogonal "
                               "unit vectors")


def _sorted_with_step(frames: list[_Frame], tolerance: float) -> tuple[list[_Frame], np.ndarray]:
    """Frames sorted along the slice normal and the (constant) step vector between them."""
    row, col = frames[0].orientation[:3], frames[0].orientation[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    if len(frames) == 1:
        fr = frames[0]
        if fr.thickness is None or not fr.thickness > 0:
            raise DicomSeriesError(f"{fr.name}: a single slice without SpacingBetweenSlices or SliceThickness "
                                   "has no extent along the normal")
        return frames, normal * fr.thickness
    d = np.array([fr.position @ normal for fr in frames])
    order = np.argsort(d, kind="stable")
    frames, d = [frames[i] for i in order], d[order]
    gaps = np.diff(d)

    dup = np.flatnonzero(gaps < 10 * ABS_TOL_MM)
    if dup.size:
        at = d[dup[0]]
        same = [fr for fr, x in zip(frames, d) if abs(x - at) < 10 * ABS_TOL_MM]
        raise DicomSeriesError(
            f"duplicate slice positions: {len(same)} images at {at:.3f} mm along the normal ({_list_names(same)})"
            + (f", and {dup.size - len(same) + 1} more duplicates elsewhere" if dup.size > len(same) - 1 else "")
            + "; several acquisitions, echoes or time points in one series? split them first")
    typical = float(np.median(gaps))
    tol = tolerance * typical + ABS_TOL_MM
    off = np.flatnonzero(np.abs(gaps - typical) > tol)
    if off.size:
        multiples = gaps[off] / typical
        whole = np.abs(multiples - np.round(multiples)) * typical <= tol
        details = "; ".join(
            f"{gaps[i]:.4g} mm between {frames[i].name} (at {d[i]:.4g} mm) "
            f"and {frames[i + 1].name} (at {d[i + 1]:.4g} mm)"
            for i in off[:4]) + (f"; and {off.size - 4} more" if off.size > 4 else "")
        if np.all(whole) and np.all(np.round(multiples) >= 2):
            n_missing = int(np.sum(np.round(multiples) - 1))
            raise DicomSeriesError(f"missing slices: about {n_missing} slice(s) missing from a series spaced "
                                   f"{typical:.4g} mm: gap of {details}")
        raise DicomSeriesError(f"uneven slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
                               f"(median {typical:.4g} mm, tolerance {tol:.3g} mm); irregular gap of {details}")
    positions = np.stack([fr.position for fr in frames])
    step = (positions[-1] - positions[0]) / (len(frames) - 1)
    residual = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(len(frames)), step)), axis=1)
    worst = int(np.argmax(residual))
    if residual[worst] > tol:
        raise DicomSeriesError(f"slice positions do not lie on one line: {frames[worst].name} is "
                               f"{residual[worst]:.3g} mm off the line through the first and last slice")
    return frames, step


# --------------------------------------------------------------------------- reading

def modality_lut(img: np.ndarray, ds: Any, rescale: tuple[float, float] | None) -> np.ndarray:
    """Stored pixels -> modality values (HU for CT): a frame's own (slope, intercept) from its functional
    group when given, else the file's Modality LUT / Rescale tags."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    if rescale is None:
        return apply_modality_lut(img, ds)
    tags = Dataset()
    tags.RescaleSlope, tags.RescaleIntercept = rescale
    return apply_modality_lut(img, tags)


def _pixels(frames: list[_Frame]) -> np.ndarray:
    """Rescaled pixel data, ``[n_slices, rows, columns]`` float32."""
    import pydicom

    out = np.empty((len(frames), frames[0].rows, frames[0].columns), dtype=np.float32)
    open_path, ds, arr = None, None, None  # one file decoded at a time (all frames of a multi-frame file)
    for k, fr in enumerate(frames):
        if fr.path != open_path:
            try:
                ds = pydicom.dcmread(fr.path)
            except Exception as e:
                raise DicomSeriesError(f"{fr.path}: unreadable DICOM file ({type(e).__name__}: {e})") from e
            if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise DicomSeriesError(f"{fr.path}: no pixel data")
            try:
                arr = ds.pixel_array
            except Exception as e:  # truncated pixel data, missing decoder, ...
                raise DicomSeriesError(f"{fr.path}: pixel data unreadable, damaged or truncated "
                                       f"({type(e).__name__}: {e})") from e
            open_path = fr.path
        img = arr[fr.frame] if fr.frame is not None else arr
        if img.shape != (fr.rows, fr.columns):
            raise DicomSeriesError(f"{fr.name}: pixel array of shape {img.shape}, expected {fr.rows}x{fr.columns}")
        out[k] = modality_lut(img, ds, fr.rescale)
    n_bad = int((~np.isfinite(out)).sum())
    if n_bad:
        raise DicomSeriesError(f"{n_bad} non-finite pixel values after rescaling, in {_list_names(frames)}")
    return out


def read_series(src: str | os.PathLike | Iterable[str | os.PathLike], *,
                spacing_tolerance: float = SPACING_TOLERANCE) -> Volume:
    """Read one DICOM series as a 1-channel RAS :class:`Volume` (CT in Hounsfield units).

    ``src``: a folder (every non-hidden file in it, DICOMDIR excepted), one file, or a list of
    files, in any order; single-frame slices or enhanced multi-frame files. A single slice becomes
    a one-slice volume whose thickness is SpacingBetweenSlices (else SliceThickness).
    ``spacing_tolerance``: relative deviation of a slice gap from the median gap still accepted.
    ``meta`` of the result holds the sorted file names, SeriesInstanceUID, Modality and the slice
    positions along the normal. Raises :class:`DicomSeriesError` (a ``ValueError``).
    """
    files = _list_files(src)
    frames: list[_Frame] = []
    modality = None
    for path in files:
        ds = _read_header(path)
        modality = modality or ds.get("Modality")
        frames.extend(_frames_of(path, ds))
    where = Path(src) if isinstance(src, (str, os.PathLike)) else files[0].parent
    try:
        _check_consistent(frames)
        frames, step = _sorted_with_step(frames, spacing_tolerance)
    except DicomSeriesError as e:  # series-level problems name the images; say which series too
        raise DicomSeriesError(f"{where} ({len(files)} file(s)): {e}") from None
    pixels = _pixels(frames)  # [k, r, c]

    fr0 = frames[0]
    row_cos, col_cos = fr0.orientation[:3], fr0.orientation[3:]
    d_row, d_col = fr0.pixel_spacing  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = row_cos * d_col   # i: along a row (column index)
    lps[:3, 1] = col_cos * d_row   # j: down a column (row index)
    lps[:3, 2] = step              # k: slice to slice
    lps[:3, 3] = fr0.position
    affine = LPS_TO_RAS @ lps
    array, ras_affine = as_ras(pixels.transpose(2, 1, 0)[None], affine)  # [1, c, r, k]
    normal = np.cross(row_cos, col_cos)
    return Volume(np.ascontiguousarray(array, dtype=np.float32), ras_affine, source_orientation=axcodes(affine),
                  path=where,
                  meta={"format": "dicom", "modality": modality, "series_uid": fr0.series_uid,
                        "files": [fr.name for fr in frames],
                        "slice_positions_mm": [float(fr.position @ normal) for fr in frames]})


def series_to_nifti(src: str | os.PathLike | Iterable[str | os.PathLike], out_path: str | os.PathLike,
                    **kwargs: Any) -> Path:
    """Read a series (:func:`read_series`) and write it as NIfTI (:func:`lib.data.io.save_volume`)."""
    return save_volume(read_series(src, **kwargs), out_path)
