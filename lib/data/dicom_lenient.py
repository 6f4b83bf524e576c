"""One DICOM series folder as it comes from a large collection (RSNA 2025), assembled leniently.

:func:`lib.data.dicom.read_series` refuses anything irregular; real collections need the opposite: make
the best volume that is honestly there and say what was done. :func:`assemble`:

- reads every file's header; unreadable files are dropped;
- single-frame slices and enhanced multi-frame files (per-frame positions, shared or per-frame
  orientation, spacing and rescale); a multi-frame file without PixelSpacing / ImageOrientationPatient
  gets 1 mm and axial, flagged ``assumed_geometry``;
- keeps the majority geometry (rows, columns, orientation, pixel spacing): scouts and localizers with
  another size or orientation are dropped; then blank (constant) images and images whose pixel data
  cannot be decoded;
- duplicate slice positions: the first image per position (lowest InstanceNumber) is kept;
- every image at one position: refused (:class:`DicomSeriesError`);
- uneven gaps: resampled along the normal onto the median gap (linear between neighbouring slices).

Geometry as :mod:`lib.data.dicom` (its docstring); the result is RAS (:func:`lib.data.io.as_ras`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.data.dicom import ABS_TOL_MM, SPACING_TOLERANCE, DicomSeriesError, _group
from lib.data.io import as_ras

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
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


def _describe(frames: list[Frame]) -> str:
    f = frames[0]
    normal = np.abs(np.cross(f.orientation[:3], f.orientation[3:]))
    plane = ("sagittal", "coronal", "axial")[int(np.argmax(normal))]
    return f"{f.rows}x{f.columns} {plane}"


def _majority(frames: list[Frame], notes: list[str]) -> list[Frame]:
    key = lambda f: (f.rows, f.columns, tuple(np.round(f.orientation, 3)), tuple(np.round(f.spacing, 3)))  # noqa: E731
    counts = Counter(key(f) for f in frames)
    best = counts.most_common(1)[0][0]
    dropped = [f for f in frames if key(f) != best]
    if dropped:
        groups = Counter(_describe([f]) for f in dropped)
        notes.append(f"dropped {len(dropped)} image(s) of another geometry (scout/localizer: "
                     + ", ".join(f"{n} {g}" for g, n in groups.items()) + f"; kept {_describe(frames)})")
    return [f for f in frames if key(f) == best]


def _decode(frames: list[Frame], notes: list[str]) -> tuple[list[Frame], list[np.ndarray]]:
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    kept, pixels, cache, bad, blank, first_error = [], [], {}, [], 0, ""
    for f in frames:
        if f.path not in cache:
            try:
                ds = pydicom.dcmread(f.path)
                cache[f.path] = (ds, ds.pixel_array)
            except Exception as e:  # truncated data, or a compressed transfer syntax without its decoder
                cache[f.path] = None
                first_error = first_error or f"{f.path.name}: {type(e).__name__}: {str(e)[:300]}"
        if cache[f.path] is None:
            bad.append(f.path.name)
            continue
        ds, arr = cache[f.path]
        img = arr[f.frame] if f.frame is not None else arr
        if f.rescale is not None:
            tags = Dataset()
            tags.RescaleSlope, tags.RescaleIntercept = f.rescale
            values = apply_modality_lut(img, tags)
        else:
            values = apply_modality_lut(img, ds)
        values = np.asarray(values, np.float32)
        if values.max() == values.min():
            blank += 1
            continue
        kept.append(f)
        pixels.append(values)
    if bad:
        notes.append(f"dropped {len(set(bad))} file(s) whose pixel data could not be decoded (first: {first_error})")
    if blank:
        notes.append(f"dropped {blank} blank image(s)")
    return kept, pixels


def _stack(frames: list[Frame], pixels: list[np.ndarray], notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``([k, r, c] pixels on an even grid, step vector)``; duplicates dropped, uneven gaps resampled."""
    row, col = frames[0].orientation[:3], frames[0].orientation[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    d = np.array([f.position @ normal for f in frames])
    order = sorted(range(len(frames)), key=lambda i: (round(d[i], 2), frames[i].instance))
    keep, seen = [], set()
    for i in order:
        if round(d[i], 2) not in seen:
            seen.add(round(d[i], 2))
            keep.append(i)
    if len(keep) < len(order):
        notes.append(f"dropped {len(order) - len(keep)} image(s) at duplicate slice positions")
    if len(keep) < 2:
        raise DicomSeriesError(f"all {len(order)} image(s) lie at one slice position: not a volume")
    frames, stack, d = [frames[i] for i in keep], np.stack([pixels[i] for i in keep]), d[keep]
    gaps = np.diff(d)
    typical = float(np.median(gaps))
    if np.all(np.abs(gaps - typical) <= SPACING_TOLERANCE * typical + ABS_TOL_MM):
        return stack, (frames[-1].position - frames[0].position) / (len(frames) - 1)
    targets = d[0] + typical * np.arange(int(np.floor((d[-1] - d[0]) / typical + 1e-6)) + 1)
    upper = np.clip(np.searchsorted(d, targets, side="right"), 1, len(d) - 1)
    w = ((targets - d[upper - 1]) / (d[upper] - d[upper - 1]))[:, None, None]
    notes.append(f"resampled: uneven slice gaps from {gaps.min():.3g} to {gaps.max():.3g} mm, now {len(targets)} "
                 f"slices {typical:.3g} mm apart (linear)")
    return ((1 - w) * stack[upper - 1] + w * stack[upper]).astype(np.float32), normal * typical


def assemble(folder: Path) -> Series:
    """The series in ``folder`` as one RAS volume, with notes on everything dropped, resampled or assumed."""
    import pydicom

    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    frames, notes, unreadable, modality = [], [], [], ""
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            modality = modality or str(ds.get("Modality", ""))
            frames += _frames(path, ds)
        except Exception:
            unreadable.append(path.name)
    if unreadable:
        notes.append(f"dropped {len(unreadable)} unreadable file(s) ({', '.join(unreadable[:3])})")
    if not frames:
        raise DicomSeriesError(f"no readable image in {len(files)} file(s)")
    kept, pixels = _decode(_majority(frames, notes), notes)
    if not kept:
        raise DicomSeriesError("no image left: " + "; ".join(notes))
    stack, step = _stack(kept, pixels, notes)
    f0 = min(kept, key=lambda f: f.position @ np.cross(f.orientation[:3], f.orientation[3:]))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = f0.orientation[:3] * f0.spacing[1], f0.orientation[3:] * f0.spacing[0]
    lps[:3, 2], lps[:3, 3] = step, f0.position
    assumed = any(f.assumed for f in kept)
    if assumed:
        notes.append("assumed geometry: PixelSpacing and/or ImageOrientationPatient missing (1 mm, axial used)")
    array, affine = as_ras(stack.transpose(2, 1, 0)[None], _LPS_TO_RAS @ lps)
    return Series(np.ascontiguousarray(array), affine, frames, modality, notes, assumed)
