"""Rigid registration of one 3D image onto another (SimpleITK), in this repository's conventions.

Our arrays are RAS-ordered numpy volumes ``[i, j, k]`` with a 4x4 voxel -> RAS-millimetre affine;
SimpleITK images are indexed ``(x, y, z)`` in LPS millimetres. :func:`to_sitk` and :func:`from_sitk` are
the only places that convert (``LPS = diag(-1, -1, 1) @ RAS``), and every matrix this module returns is
in RAS.

The transform convention is ITK's: a transform maps a point of the *fixed* image to the point of the
*moving* image that shows the same anatomy, ``p_moving = R (p_fixed - c) + c + t``. So when the
patient lies 5 mm further to the patient's right in the moving image than in the fixed one, the
result's ``translation_mm`` is ``(+5, 0, 0)``. Rotations are about the R, A and S axes, composed
``R = Rz @ Ry @ Rx`` (:func:`rotation_matrix`), angles in degrees, right-handed in RAS.

:func:`rigid` runs a multi-resolution (shrink 4/2/1) Euler3D registration: Mattes mutual information
(works across contrast phases), regular-step gradient descent with scales from physical shifts, a
seeded random sample of a fixed number of voxels per level (the same inputs and seed give the same
result, to ~1e-5 mm from the order of threaded sums; the cost hardly grows with the image size),
started from the identity about the fixed image's centre (the scanner frame is shared between series
of one examination, so the DICOM geometry is the best first guess; ``init="geometry"`` aligns the two
images' centres instead). It returns the transform, the final metric, the moving image resampled onto
the fixed grid (linear, ``-1024`` outside) and the mean absolute HU difference over body voxels before
(scanner geometry as is) and after.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lib.data.dicom import LPS_TO_RAS

LPS = LPS_TO_RAS  # RAS <-> LPS (its own inverse)
OUTSIDE = -1024.0
BODY_HU = -500.0
GRADIENT_FILTER_MAX_VOXELS = 16_000_000  # above: gradients at the samples only (see rigid)


# --------------------------------------------------------------------------- conventions

def _place(image: Any, affine: np.ndarray) -> Any:
    """Give the SimpleITK ``image`` the geometry of the voxel -> RAS ``affine`` (spacing, direction, origin in LPS)."""
    lps = LPS @ np.asarray(affine, np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    return image


def to_sitk(array: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK image (float32) of ``array`` ``[i, j, k]`` on the voxel -> RAS ``affine``."""
    import SimpleITK as sitk

    return _place(sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0))),
                  affine)


def from_sitk(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(array [i, j, k], voxel -> RAS affine)`` of a SimpleITK image."""
    import SimpleITK as sitk

    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), LPS @ lps


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for rotations of ``(rx, ry, rz)`` degrees about the R, A and S axes."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, np.float64))
    cx, cy, cz, sx, sy, sz = np.cos(ax), np.cos(ay), np.cos(az), np.sin(ax), np.sin(ay), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_angles(matrix: np.ndarray) -> tuple[float, float, float]:
    """The ``(rx, ry, rz)`` degrees of :func:`rotation_matrix` that give the rotation ``matrix``."""
    m = np.asarray(matrix, np.float64)[:3, :3]
    ry = np.arcsin(np.clip(-m[2, 0], -1.0, 1.0))
    rx, rz = np.arctan2(m[2, 1], m[2, 2]), np.arctan2(m[1, 0], m[0, 0])
    return tuple(float(v) for v in np.rad2deg([rx, ry, rz]))


def rigid_matrix(rotation_deg: Sequence[float], translation_mm: Sequence[float],
                 center_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The 4x4 RAS map ``p -> R (p - c) + c + t`` (fixed point -> moving point)."""
    r, c = rotation_matrix(rotation_deg), np.asarray(center_mm, np.float64)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = r, c + np.asarray(translation_mm, np.float64) - r @ c
    return out


def _sitk_affine(matrix: np.ndarray) -> Any:
    """The RAS point map ``matrix`` as an ITK (LPS) transform."""
    import SimpleITK as sitk

    lps = LPS @ np.asarray(matrix, np.float64) @ LPS
    return sitk.AffineTransform(tuple(float(v) for v in lps[:3, :3].ravel()), tuple(float(v) for v in lps[:3, 3]))


def _ras_matrix(transform: Any) -> np.ndarray:
    """The RAS 4x4 point map of an ITK matrix-offset transform (Euler3D, Affine, ...)."""
    a = np.array(transform.GetMatrix()).reshape(3, 3)
    t, c = np.array(transform.GetTranslation()), np.array(transform.GetCenter())
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = a, c + t - a @ c
    return LPS @ lps @ LPS


# --------------------------------------------------------------------------- resampling and residuals

def resample(moving: tuple[np.ndarray, np.ndarray], fixed: tuple[Sequence[int], np.ndarray],
             matrix: np.ndarray | None = None, order: int = 1, cval: float = OUTSIDE) -> tuple[np.ndarray, np.ndarray]:
    """``moving`` (array, affine) on the grid ``fixed`` (shape, affine) through the RAS point map ``matrix``
    (fixed point -> moving point; identity: the scanner geometry as is). ``order`` 1 linear, 0 nearest.
    Returns ``(float32 array, inside)``: ``inside`` marks the fixed voxels that map into the moving image."""
    import SimpleITK as sitk

    shape, affine = tuple(int(n) for n in fixed[0]), np.asarray(fixed[1], np.float64)
    reference = _place(sitk.Image(list(shape), sitk.sitkUInt8), affine)  # a grid: no voxels copied
    transform = _sitk_affine(np.eye(4) if matrix is None else matrix)
    interp = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    out = sitk.Resample(to_sitk(moving[0], moving[1]), reference, transform, interp, float(cval), sitk.sitkFloat32)
    ones = _place(sitk.Image(list(np.asarray(moving[0]).shape), sitk.sitkUInt8) + 1, moving[1])
    inside = sitk.Resample(ones, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return from_sitk(out)[0], from_sitk(inside)[0].astype(bool)


def residual(fixed: np.ndarray, moving: np.ndarray, inside: np.ndarray, body_hu: float = BODY_HU) -> float:
    """Mean |HU difference| over the voxels inside both images where either is body (> ``body_hu``: soft
    tissue, vessels, bone; not air or lung), or NaN where there are none."""
    mask = inside & ((fixed > body_hu) | (moving > body_hu))
    return float(np.mean(np.abs(moving[mask] - np.asarray(fixed, np.float32)[mask]))) if mask.any() else float("nan")


# --------------------------------------------------------------------------- registration

@dataclass
class Rigid:
    """A rigid registration of a moving image onto a fixed one (RAS; see the module docstring)."""

    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    matrix: np.ndarray                 # 4x4 RAS: fixed point -> moving point
    metric: float                      # final Mattes MI metric (negative mutual information: lower is better)
    stop: str                          # the optimiser's stop condition at the last level
    seconds: float                     # registration and both resamplings
    resampled: np.ndarray = field(repr=False)   # moving on the fixed grid, float32, OUTSIDE where it has no data
    inside: np.ndarray = field(repr=False)      # fixed voxels covered by the moving image
    mae_before: float = float("nan")            # residual() with the scanner geometry as is
    mae_after: float = float("nan")             # residual() after registration

    @property
    def overlap(self) -> float:
        """Fraction of the fixed grid covered by the registered moving image."""
        return float(self.inside.mean())


def _sampling(shape: Sequence[int], shrink: Sequence[int], samples: int) -> list[float]:
    """Per level, the fraction of the fixed voxels that makes about ``samples`` metric samples."""
    return [min(1.0, samples / float(np.prod([-(-n // s) for n in shape]))) for s in shrink]


def _method(shape: Sequence[int], shrink: Sequence[int], smoothing: Sequence[float], bins: int, samples: int,
            iterations: int, seed: int, threads: int | None, gradient_filter: bool) -> Any:
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # ITK reads seed 0 as "the wall clock" (sitkWallClock): seed s is passed as s + 1, always reproducible
    method.SetMetricSamplingPercentagePerLevel(_sampling(shape, shrink, samples), int(seed) + 1)
    if not gradient_filter:  # gradients at the samples only: no whole gradient images (5x faster at 512x512x150)
        method.MetricUseFixedImageGradientFilterOff()
        method.MetricUseMovingImageGradientFilterOff()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(smoothing))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if threads:
        method.SetNumberOfThreads(int(threads))
    return method


def rigid(fixed: tuple[np.ndarray, np.ndarray], moving: tuple[np.ndarray, np.ndarray], *,
          shrink: Sequence[int] = (4, 2, 1), smoothing: Sequence[float] = (2.0, 1.0, 0.0), bins: int = 32,
          samples: int = 30000, iterations: int = 200, seed: int = 0, init: str = "identity",
          clip_hu: tuple[float, float] = (-1024.0, 2000.0), threads: int | None = None,
          gradient_filter: bool | None = None, resample_order: int = 1) -> Rigid:
    """Register ``moving`` (array, affine) rigidly onto ``fixed`` (array, affine); see the module docstring.

    ``samples``: metric samples per level (seeded by ``seed``); ``init``: ``"identity"`` (scanner geometry,
    rotation about the fixed image's centre) or ``"geometry"`` (the images' centres aligned first);
    ``clip_hu``: intensities are clipped to this range for the metric (not for the resampled output);
    ``gradient_filter``: the metric's gradients from whole smoothed gradient images (more accurate on
    coarse grids, slow on large ones) or at the samples only; default: on up to
    ``GRADIENT_FILTER_MAX_VOXELS`` fixed voxels."""
    import SimpleITK as sitk

    if init not in ("identity", "geometry"):
        raise ValueError(f"init must be 'identity' or 'geometry', got {init!r}")
    t0 = time.perf_counter()
    f_img = to_sitk(np.clip(fixed[0], *clip_hu), fixed[1])
    m_img = to_sitk(np.clip(moving[0], *clip_hu), moving[1])
    if init == "geometry":
        start = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.GEOMETRY)
    else:
        start = sitk.Euler3DTransform()
        shape = np.asarray(f_img.GetSize(), np.float64)
        start.SetCenter(f_img.TransformContinuousIndexToPhysicalPoint(tuple((shape - 1) / 2)))
    start = sitk.Euler3DTransform(start)
    start.SetComputeZYX(True)
    shape = np.asarray(fixed[0]).shape
    if gradient_filter is None:
        gradient_filter = int(np.prod(shape)) <= GRADIENT_FILTER_MAX_VOXELS
    method = _method(shape, shrink, smoothing, bins, samples, iterations, seed, threads, gradient_filter)
    method.SetInitialTransform(start, inPlace=False)
    found = method.Execute(f_img, m_img)
    if isinstance(found, sitk.CompositeTransform):
        found = found.GetNthTransform(found.GetNumberOfTransforms() - 1)
    euler = sitk.Euler3DTransform(found)
    matrix = _ras_matrix(euler)
    center = (LPS[:3, :3] @ np.array(euler.GetCenter()))
    translation = matrix[:3, 3] - center + matrix[:3, :3] @ center
    grid = (np.asarray(fixed[0]).shape, fixed[1])
    before, inside0 = resample(moving, grid)
    after, inside = resample(moving, grid, matrix, order=resample_order)
    return Rigid(rotation_deg=euler_angles(matrix), translation_mm=tuple(float(v) for v in translation),
                 center_mm=tuple(float(v) for v in center), matrix=matrix, metric=float(method.GetMetricValue()),
                 stop=method.GetOptimizerStopConditionDescription(), seconds=round(time.perf_counter() - t0, 3),
                 resampled=after, inside=inside, mae_before=residual(fixed[0], before, inside0),
                 mae_after=residual(fixed[0], after, inside))
