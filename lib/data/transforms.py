"""Intensity windows for CT, isotropic resampling and crop/pad to a preset size.

Windows (centre, width in HU; the displayed range is ``centre ± width / 2``):

============  ==========  ==========================================================================
name          (C, W)      why
============  ==========  ==========================================================================
brain         (40, 80)    the standard brain window: grey/white matter 20-45 HU, acute blood 50-70
subdural      (80, 200)   subdural/blood: wider and higher so a thin extra-axial bleed is not lost
                          against the bright skull; Radiopaedia gives W 130-300 / L 50-100 for it,
                          (80, 200) is the pair used by the RSNA 2019 intracranial-haemorrhage
                          solutions with the brain and bone windows below
bone          (600, 2800) the head-CT bone window (Radiopaedia's temporal-bone / skull window
                          W 2800 / L 600): cortical bone up to ~2000 HU without clipping
diffusion     (200, 1800) -700..1100 HU in one channel, as the issue fixes it for the CT latent
                          diffusion work: lung, fat, soft tissue, contrast-filled vessels and
                          most bone stay apart without clipping
soft_tissue   (50, 400)   body soft tissue (abdomen, neck)
mediastinum   (50, 350)   chest soft tissue, vessels
lung          (-600, 1500) lung parenchyma
============  ==========  ==========================================================================

:func:`window` maps linearly, ``lo = C - W/2 -> out_range[0]``, ``hi = C + W/2 -> out_range[1]``,
clipped: the form used in deep-learning pipelines (it equals DICOM's ``LINEAR_EXACT`` VOI function;
DICOM's default ``LINEAR`` shifts by half a unit, C - 0.5 and W - 1, irrelevant at these widths).

Resampling uses ``nibabel.processing.resample_from_to`` (``scipy.ndimage.affine_transform`` with
spline order ``order``), one channel at a time, onto a target grid that keeps the volume's axis
directions and first voxel centre and only changes the voxel size. nibabel rather than MONAI
``Spacing`` because it works on numpy arrays and affines directly (no torch/MetaTensor round trip,
float32 stays float32, any spline order 0-5), and rather than ``resample_to_output`` because that
one rotates the grid to the world axes, enlarging an oblique volume's bounding box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from lib.data.io import Volume

WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
    "diffusion": (200.0, 1800.0),
    "soft_tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
}
CT_WINDOWS = ("brain", "subdural", "bone")


# --------------------------------------------------------------------------- windows

def window(hu: np.ndarray, centre: float, width: float,
           out_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Clip ``hu`` to ``centre ± width/2`` and map it linearly onto ``out_range`` (float32)."""
    if not (np.isfinite(width) and width > 0):
        raise ValueError(f"window width must be a positive number, got {width!r}")
    if not np.isfinite(centre):
        raise ValueError(f"window centre must be finite, got {centre!r}")
    lo_out, hi_out = (float(v) for v in out_range)
    lo = centre - width / 2.0
    x = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    np.clip(x, 0.0, 1.0, out=x)
    return (x * np.float32(hi_out - lo_out) + np.float32(lo_out)).astype(np.float32, copy=False)


def ct_windows(hu: np.ndarray | Volume, names: Sequence[str] = CT_WINDOWS,
               out_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray | Volume:
    """Stack named windows of a CT in HU as channels: ``[len(names), *spatial]`` float32.

    ``hu``: a spatial array ``[D, H, W]`` (or 2D), a single-channel ``[1, D, H, W]`` array, or a
    1-channel :class:`Volume` (returned as a Volume with the same affine).
    """
    unknown = [n for n in names if n not in WINDOWS]
    if unknown or not names:
        raise ValueError(f"unknown window name(s) {unknown or list(names)}; known: {', '.join(WINDOWS)}")
    if isinstance(hu, Volume):
        if hu.n_channels != 1:
            raise ValueError(f"ct_windows needs a 1-channel CT volume in HU, got {hu.n_channels} channels")
        return replace(hu, array=ct_windows(hu.array[0], names, out_range), meta={**hu.meta, "windows": list(names)})
    hu = np.asarray(hu)
    if hu.ndim == 4:
        if hu.shape[0] != 1:
            raise ValueError(f"ct_windows needs one HU channel, got an array of shape {hu.shape}")
        hu = hu[0]
    return np.stack([window(hu, *WINDOWS[n], out_range=out_range) for n in names])


# --------------------------------------------------------------------------- resampling

def isotropic_grid(shape: Sequence[int], affine: np.ndarray, spacing: float) -> tuple[tuple[int, ...], np.ndarray]:
    """Target grid of :func:`resample_isotropic`: same axis directions and first voxel centre,
    voxel size ``spacing``, as many voxels as fit between the first and last input voxel centres."""
    affine = np.asarray(affine, dtype=np.float64)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    ratio = old / spacing
    shape_out = tuple(int(math.floor((n - 1) * r + 1e-6)) + 1 for n, r in zip(shape, ratio))
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] / ratio  # each column rescaled to length `spacing`
    return shape_out, out


def resample_isotropic(volume: Volume, spacing: float = 1.0, order: int = 1) -> Volume:
    """Resample every channel to cubic voxels of ``spacing`` mm (spline ``order``: 0 nearest, for
    labels; 1 linear; 3 cubic). World positions are preserved: voxel ``(i, j, k)`` of the result
    sits at ``result.affine @ (i, j, k, 1)`` and holds the input's value interpolated there.
    Samples never leave the input's voxel-centre box (no extrapolation)."""
    from nibabel import Nifti1Image
    from nibabel.processing import resample_from_to

    if not (np.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a positive number of mm, got {spacing!r}")
    if order not in range(6):
        raise ValueError(f"order must be a spline order 0-5, got {order!r}")
    shape, affine = isotropic_grid(volume.spatial_shape, volume.affine, spacing)
    channels = [
        resample_from_to(Nifti1Image(np.ascontiguousarray(ch), volume.affine), (shape, affine),
                         order=order, mode="nearest").get_fdata(dtype=np.float32)
        for ch in volume.array
    ]
    return replace(volume, array=np.stack(channels).astype(np.float32, copy=False), affine=affine,
                   meta={**volume.meta, "resampled_from_spacing": volume.spacing})


# --------------------------------------------------------------------------- crop / pad

def _crop_or_pad_offsets(spatial: Sequence[int], size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per axis: (start in the input, pad before, pad after). Centred as MONAI does it
    (``CenterSpatialCrop``: start = n//2 - s//2; ``SpatialPad`` symmetric: before = (s-n)//2)."""
    out = []
    for n, s in zip(spatial, size):
        if s <= n:
            out.append((n // 2 - s // 2, 0, 0))
        else:
            before = (s - n) // 2
            out.append((0, before, s - n - before))
    return out


def _apply(array: np.ndarray, size: Sequence[int], starts: Sequence[int], value: float | str) -> np.ndarray:
    spatial = array.shape[1:]
    sl = [slice(None)] + [slice(st, st + min(s, n)) for st, s, n in zip(starts, size, spatial)]
    cropped = array[tuple(sl)]
    pads = [(0, 0)] + [((s - n) // 2, s - n - (s - n) // 2) if s > n else (0, 0) for s, n in zip(size, spatial)]
    if not any(p != (0, 0) for p in pads):
        return np.ascontiguousarray(cropped)
    if value == "min":
        return np.stack([np.pad(c, pads[1:], constant_values=c.min()) for c in cropped])
    return np.pad(cropped, pads, constant_values=value)


def _check_size(shape: tuple[int, ...], size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(shape) != len(size) + 1:
        raise ValueError(f"size {size} has {len(size)} axes; a channel-first array [C, ...] of shape {shape} "
                         f"needs {len(shape) - 1}")
    if any(s < 1 for s in size):
        raise ValueError(f"size {size} must be positive")
    return size


def shift_affine(affine: np.ndarray, shift_vox: Sequence[int]) -> np.ndarray:
    """The affine of a grid whose first voxel is voxel ``shift_vox`` of ``affine``'s grid (a crop's start)."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ np.asarray(shift_vox, dtype=np.float64) + affine[:3, 3]
    return out


def crop_or_pad(array: np.ndarray | Volume, size: Sequence[int], value: float | str = 0.0) -> np.ndarray | Volume:
    """Centre-crop or pad a channel-first array ``[C, *spatial]`` to ``[C, *size]``.

    Each axis independently: a longer axis is cropped around its centre, a shorter one padded with
    ``value`` on both sides (the odd voxel after). ``value="min"``: each channel's minimum (air
    for HU, background for windowed CT). A :class:`Volume` comes back as a Volume whose affine
    is shifted so that every kept voxel keeps its world position.
    """
    if isinstance(array, Volume):
        size = _check_size(array.array.shape, size)
        offsets = _crop_or_pad_offsets(array.spatial_shape, size)
        out = _apply(array.array, size, [o[0] for o in offsets], value)
        return replace(array, array=out, affine=shift_affine(array.affine, [st - pb for st, pb, _ in offsets]),
                       meta=dict(array.meta))
    array = np.asarray(array)
    size = _check_size(array.shape, size)
    offsets = _crop_or_pad_offsets(array.shape[1:], size)
    return _apply(array, size, [o[0] for o in offsets], value)


def random_crop(array: np.ndarray | Volume, size: Sequence[int], rng: np.random.Generator | int,
                value: float | str = 0.0) -> np.ndarray | Volume:
    """A crop of ``size`` at a random position (uniform over the valid starts), seeded: the same
    ``rng`` seed gives the same crop. Axes shorter than ``size`` are padded centred, as in
    :func:`crop_or_pad`. ``rng``: a ``numpy.random.Generator`` or an int seed."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    is_volume = isinstance(array, Volume)
    arr = array.array if is_volume else np.asarray(array)
    size = _check_size(arr.shape, size)
    spatial = arr.shape[1:]
    starts = [int(rng.integers(0, n - s + 1)) if s <= n else 0 for n, s in zip(spatial, size)]
    out = _apply(arr, size, starts, value)
    if not is_volume:
        return out
    shift = [st - ((s - n) // 2 if s > n else 0) for st, s, n in zip(starts, size, spatial)]
    return replace(array, array=out, affine=shift_affine(array.affine, shift), meta=dict(array.meta))


def oriented_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D view of a RAS ``[X, Y, Z]`` volume in radiological display (patient right on the left):
    axis 2 axial (anterior up), 1 coronal and 0 sagittal (superior up)."""
    if axis == 2:
        return volume[::-1, ::-1, index].T
    if axis == 1:
        return volume[::-1, index, ::-1].T
    return volume[index, ::-1, ::-1].T
