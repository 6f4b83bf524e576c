"""A projection radiograph (DICOM CR / DX) to the 2D float image the change models take.

The convention is that of the cohort's DRRs (:mod:`lib.data.drr`): a square image whose brightness
grows with attenuation (bone and fluid bright, air dark), rows superior -> inferior, the patient's
right on the image's left, values in about [0, 1], air padding as 0. Steps of :func:`read_radiograph`:

1. Pixel data through the Modality LUT / Rescale Slope and Intercept (pydicom's ``apply_modality_lut``).
   No VOI LUT or window: those are display choices, not data.
2. Polarity: ``MONOCHROME1`` stores attenuating regions as *low* values (displayed white when low), so
   it is inverted; ``MONOCHROME2`` already stores them high. A ``PresentationLUTShape`` of ``INVERSE``
   flips that once more. Anything else (colour, palette) is rejected.
3. Intensities mapped linearly so that the ``low``/``high`` percentiles (0.5 / 99.5) land on 0 and 1,
   then clipped to [0, 1] (robust to collimator edges, burnt-in labels and hot pixels).
4. Padded with 0 (air, as the DRR's field) to a square, centred, then resized to ``size`` x ``size``:
   area averaging when shrinking (anti-aliased), bilinear when enlarging.

The pixel spacing (ImagerPixelSpacing, else PixelSpacing) is reported, not used: a radiograph has no
common physical scale with the DRRs (no magnification correction here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

POLARITIES = ("MONOCHROME1", "MONOCHROME2")


class RadiographError(ValueError):
    """A file that cannot become a radiograph image; the message names the file and what is wrong."""


@dataclass
class Radiograph:
    image: np.ndarray                      # [size, size] float32 in [0, 1], bright = attenuating
    photometric: str                       # the file's PhotometricInterpretation
    inverted: bool                         # True if the stored values were flipped to make attenuation bright
    source_shape: tuple[int, int]          # rows, columns in the file
    spacing_mm: tuple[float, float] | None  # (row, column) spacing in the file, if it says
    window: tuple[float, float]            # the stored values mapped to 0 and 1 (after any inversion)
    meta: dict = field(default_factory=dict)  # Modality, BodyPartExamined, ViewPosition

    def tensor(self) -> torch.Tensor:
        """``[1, 1, size, size]`` float32, ready for a change model."""
        return torch.from_numpy(self.image)[None, None]


def to_square(image: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
    """Centre ``image`` ([H, W]) on a square of ``fill`` (the longer side), then resize to ``size`` x ``size``
    (area averaging when shrinking, bilinear when enlarging)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    image = np.asarray(image, np.float32)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"need a 2D image, got shape {image.shape}")
    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.full((side, side), fill, np.float32)
    square[top:top + h, left:left + w] = image
    x = torch.from_numpy(square)[None, None]
    mode = "area" if size < side else "bilinear"
    x = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return x[0, 0].numpy()


def read_radiograph(path: str | os.PathLike, size: int, low: float = 0.5, high: float = 99.5) -> Radiograph:
    """A DICOM projection radiograph as a ``size`` x ``size`` float32 image in the DRR convention (see the
    module docstring). Raises :class:`RadiographError` naming the file for anything it cannot use."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises several types for a file that is not DICOM
        raise RadiographError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise RadiographError(f"{path}: has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in POLARITIES:
        raise RadiographError(f"{path}: PhotometricInterpretation {photometric or 'missing'!r} is not a greyscale "
                              f"radiograph; expected one of {', '.join(POLARITIES)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise RadiographError(f"{path}: has {frames} frames; a radiograph has one")
    try:
        pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    except Exception as e:
        raise RadiographError(f"{path}: pixel data cannot be decoded ({type(e).__name__}: {e})") from None
    if pixels.ndim != 2:
        raise RadiographError(f"{path}: pixel array has shape {pixels.shape}; need one 2D greyscale image")
    inverted = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        inverted = not inverted
    if inverted:
        pixels = -pixels
    lo, hi = np.percentile(pixels, [low, high])
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        raise RadiographError(f"{path}: the image is constant between the {low} and {high} percentiles ({lo}); "
                              f"nothing to show")
    image = np.clip((pixels - lo) / (hi - lo), 0.0, 1.0)
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    spacing_mm = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
    if spacing_mm is not None and min(spacing_mm) <= 0:  # RG1_UNCR says 0.000\0.000: unknown, not zero
        spacing_mm = None
    meta = {k: str(ds.get(k, "")) for k in ("Modality", "BodyPartExamined", "ViewPosition")}
    return Radiograph(image=to_square(image, size), photometric=photometric, inverted=inverted,
                      source_shape=tuple(int(s) for s in pixels.shape), spacing_mm=spacing_mm,
                      window=(float(-lo if inverted else lo), float(-hi if inverted else hi)), meta=meta)
