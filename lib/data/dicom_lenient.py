"""One DICOM series folder as it comes from a large collection (RSNA 2025), assembled leniently.

:func:`lib.data.dicom.read_series` refuses anything irregular; real collections need the opposite: make
the best volume that is honestly there and say what was done. :func:`assemble`:

- reads every file's header; unreadable files are dropped;
- single-frame slices and enhanced multi-frame files (per-frame positions, shared or per-frame
  orientation, spacing and rescale); a multi-frame file without PixelSpacing / ImageOrientationPatient
  gets 1 mm and axial, flagged ``assumed_geometry``;
- keeps the majority geometry (rows, columns, orientation, pixel spacing): scouts and localizers with
  another size or orientation are dropped; then blank (constant) images and images whose pixel data
  cannot be decoded (one file decoded at a time: memory stays at one file plus the volume);
- duplicate slice positions: the first image per position (lowest InstanceNumber) is kept;
- every image at one position: refused (:class:`DicomSeriesError`);
- uneven gaps: resampled along the normal onto the median gap (linear between neighbouring slices).

Everything dropped is summed up in one note, e.g. ``dropped 3 of 11 files: 1 scout (32x32, coronal;
kept 24x24, axial), 1 damaged (x.dcm: ...), 1 blank``; resampling and assumed geometry get their own.
Geometry as :mod:`lib.data.dicom` (its docstring); the result is RAS (:func:`lib.data.io.as_ras`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.data.dicom import LPS_TO_RAS, ABS_TOL_MM, SPACING_TOLERANCE, DicomSeriesError, _group, modality_lut
from lib.data.io import as_ras
ASSUMED_SPACING, ASSUMED_ORIENTATION = (1.0, 1.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class Frame:
    path: Path
    frame: int | None
    sop: str
    instance: int
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]       # between rows, between columns
    rows: int
    columns: int
    rescale: tuple[float, float] | None
    assumed: bool = False

    def world(self, row: float, col: float) -> np.ndarray:
        """LPS mm of pixel (row, column) of this image."""
        return (self.position + col * self.spacing[1] * self.orientation[:3]
                + row * self.spacing[0] * self.orientation[3:])


@dataclass
class Series:
    array: np.ndarray                  # [1, X, Y, Z] RAS
    affine: np.ndarray                 # voxel -> RAS mm
    frames: list[Frame]                # every readable image (kept or not), for annotations
    modality: str
    notes: list[str] = field(default_factory=list)
    assumed_geometry: bool = False
    dropped: Counter = field(default_factory=Counter)  # images dropped, by reason (scout, blank, ...)


def _floats(value, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _frames(path: Path, ds) -> list[Frame]:
    sop, instance = str(ds.get("SOPInstanceUID", path.stem)), int(ds.get("InstanceNumber", 0) or 0)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        pos, ori = _floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6)
        sp = _floats(ds.get("PixelSpacing"), 2)
        if pos is None or ori is None or sp is None:
            raise DicomSeriesError(f"{path.name}: no plane geometry")
        return [Frame(path, None, sop, instance, pos, ori, tuple(sp), rows, cols, None)]
    out = []
    for f, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos_g, ori_g, meas = (_group(ds, groups, k) for k in
                              ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
        pos = _floats(pos_g.ImagePositionPatient, 3) if pos_g is not None else None
        ori = _floats(ori_g.ImageOrientationPatient, 6) if ori_g is not None else None
        sp = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
        assumed = ori is None or sp is None
        if pos is None:  # no positions at all: frames stacked 1 mm apart along the (assumed) normal
            pos, assumed = np.array([0.0, 0.0, float(f)]), True
        pvt = _group(ds, groups, "PixelValueTransformationSequence")
        rescale = (float(pvt.get("RescaleSlope", 1) or 1), float(pvt.get("RescaleIntercept", 0) or 0)) if pvt else None
        out.append(Frame(path, f, sop, instance, pos, np.array(ASSUMED_ORIENTATION) if ori is None else ori,
                         ASSUMED_SPACING if sp is None else tuple(sp), rows, cols, rescale, assumed))
    return out


def _describe(f: Frame) -> str:
    normal = np.abs(np.cross(f.orientation[:3], f.orientation[3:]))
    return f"{f.rows}x{f.columns}, {('sagittal', 'coronal', 'axial')[int(np.argmax(normal))]}"


def _majority(frames: list[Frame], drops: list[tuple[str, int, str]]) -> list[Frame]:
    def key(f: Frame) -> tuple:
        return f.rows, f.columns, tuple(np.round(f.orientation, 3)), tuple(np.round(f.spacing, 3))

    best = Counter(key(f) for f in frames).most_common(1)[0][0]
    kept = [f for f in frames if key(f) == best]
    groups = Counter(_describe(f) + (f", {f.spacing[0]:.3g} mm" if _describe(f) == _describe(kept[0]) else "")
                     for f in frames if key(f) != best)
    for i, (what, n) in enumerate(groups.items()):
        last = i == len(groups) - 1
        drops.append(("scout", n, what + (f"; kept {_describe(kept[0])}" if last else "")))
    return kept


def _values(f: Frame, ds, arr: np.ndarray) -> np.ndarray:
    img = arr[f.frame] if f.frame is not None and arr.ndim == 3 else arr  # a 1-frame file decodes to 2D
    return np.asarray(modality_lut(img, ds, f.rescale), np.float32)


def _decode(frames: list[Frame], drops: list[tuple[str, int, str]]) -> tuple[list[Frame], np.ndarray]:
    """Pixels ``[k, r, c]`` of every frame that decodes and is not blank; one file open at a time (frames
    come grouped by file), written into one preallocated array."""
    import pydicom

    kept, bad, blank, first_error = [], [], 0, ""
    pixels = np.empty((len(frames), frames[0].rows, frames[0].columns), np.float32)
    open_path, ds, arr = None, None, None
    for f in frames:
        if f.path != open_path:
            open_path, ds, arr = f.path, None, None
            try:
                ds = pydicom.dcmread(f.path)
                arr = ds.pixel_array
            except Exception as e:  # noqa: BLE001 (truncated data, or a compressed transfer syntax without its decoder)
                first_error = first_error or f"{f.path.name}: {type(e).__name__}: {str(e)[:200]}"
        if arr is None:
            bad.append(f)
            continue
        values = _values(f, ds, arr)
        if values.shape != (f.rows, f.columns):
            first_error = first_error or f"{f.path.name}: pixel array {values.shape}, not {f.rows}x{f.columns}"
            bad.append(f)
            continue
        if values.max() == values.min():
            blank += 1
            continue
        pixels[len(kept)] = values
        kept.append(f)
    if bad:
        drops.append(("damaged", len(bad), f"pixel data not decodable; first: {first_error}"))
    if blank:
        drops.append(("blank", blank, ""))
    return kept, pixels[:len(kept)]


def _dedupe(frames: list[Frame], d: np.ndarray, drops: list[tuple[str, int, str]]) -> list[int]:
    """Indices of the frames kept, sorted along the normal: the lowest InstanceNumber per position."""
    order = sorted(range(len(frames)), key=lambda i: (round(d[i], 2), frames[i].instance))
    keep, seen = [], set()
    for i in order:
        if round(d[i], 2) not in seen:
            seen.add(round(d[i], 2))
            keep.append(i)
    if len(keep) < len(order):
        drops.append(("at a duplicate position", len(order) - len(keep), ""))
    if len(keep) < 2:
        raise DicomSeriesError(f"all {len(order)} image(s) lie at one slice position: not a volume")
    return keep


def _stack(frames: list[Frame], pixels: np.ndarray, notes: list[str],
           drops: list[tuple[str, int, str]]) -> tuple[np.ndarray, np.ndarray, Frame]:
    """``([k, r, c] pixels on an even grid, step vector, first frame)``; duplicates dropped, uneven gaps
    resampled."""
    row, col = frames[0].orientation[:3], frames[0].orientation[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    d = np.array([f.position @ normal for f in frames])
    keep = _dedupe(frames, d, drops)
    same = keep == list(range(len(frames)))  # already in order: no copy
    frames, stack, d = [frames[i] for i in keep], pixels if same else pixels[keep], d[keep]
    gaps = np.diff(d)
    typical = float(np.median(gaps))
    if np.all(np.abs(gaps - typical) <= SPACING_TOLERANCE * typical + ABS_TOL_MM):
        return stack, (frames[-1].position - frames[0].position) / (len(frames) - 1), frames[0]
    targets = d[0] + typical * np.arange(int(np.floor((d[-1] - d[0]) / typical + 1e-6)) + 1)
    upper = np.clip(np.searchsorted(d, targets, side="right"), 1, len(d) - 1)
    w = ((targets - d[upper - 1]) / (d[upper] - d[upper - 1]))[:, None, None]
    notes.append(f"resampled: uneven slice gaps from {gaps.min():.3g} to {gaps.max():.3g} mm, now {len(targets)} "
                 f"slices {typical:.3g} mm apart (linear)")
    return ((1 - w) * stack[upper - 1] + w * stack[upper]).astype(np.float32), normal * typical, frames[0]


def _summary(drops: list[tuple[str, int, str]], total: int, unit: str) -> str:
    """``dropped 3 of 11 files: 1 scout (32x32, coronal; kept 24x24, axial), 1 blank``."""
    if not drops:
        return ""
    parts = [f"{n} {what}" + (f" ({detail})" if detail else "") for what, n, detail in drops]
    return f"dropped {sum(n for _, n, _ in drops)} of {total} {unit}: " + ", ".join(parts)


def _read_headers(files: list[Path], drops: list[tuple[str, int, str]]) -> tuple[list[Frame], str]:
    import pydicom

    frames, unreadable, modality = [], [], ""
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            frames += _frames(path, ds)
            modality = modality or str(ds.get("Modality", ""))
        except Exception:  # noqa: BLE001 (not DICOM, truncated header, no Rows/Columns: dropped, counted)
            unreadable.append(path.name)
    if unreadable:
        drops.append(("unreadable", len(unreadable), ", ".join(unreadable[:3]) + (" ..." if len(unreadable) > 3 else "")))
    return frames, modality


def assemble(folder: Path, files: list[Path] | None = None) -> Series:
    """The series in ``folder`` (or of ``files``: e.g. only its ``.dcm`` files) as one RAS volume, with notes on
    everything dropped, resampled or assumed."""
    files = sorted(files) if files is not None else sorted(
        p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    drops: list[tuple[str, int, str]] = []
    frames, modality = _read_headers(files, drops)
    multi = len({f.path for f in frames}) != len(frames)
    total, unit = (len(frames) + sum(n for _, n, _ in drops), "images") if multi else (len(files), "files")
    if not frames:
        raise DicomSeriesError(f"no readable image in {len(files)} file(s)")
    kept, pixels = _decode(_majority(frames, drops), drops)
    if not kept:
        raise DicomSeriesError("no image left: " + _summary(drops, total, unit))
    notes: list[str] = []
    try:
        stack, step, f0 = _stack(kept, pixels, notes, drops)
    except DicomSeriesError as e:
        raise DicomSeriesError("; ".join([str(e), _summary(drops, total, unit)]).strip("; ")) from None
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = f0.orientation[:3] * f0.spacing[1], f0.orientation[3:] * f0.spacing[0]
    lps[:3, 2], lps[:3, 3] = step, f0.position
    assumed = any(f.assumed for f in kept)
    if assumed:
        notes.append("ASSUMED GEOMETRY: PixelSpacing and/or ImageOrientationPatient missing (1 mm, axial used)")
    notes = [s for s in [_summary(drops, total, unit)] if s] + notes
    array, affine = as_ras(stack.transpose(2, 1, 0)[None], LPS_TO_RAS @ lps)
    dropped = Counter()
    for what, n, _ in drops:
        dropped[what] += n
    return Series(np.ascontiguousarray(array), affine, frames, modality, notes, assumed, dropped)
