"""Digitally reconstructed radiographs: Beer–Lambert line integrals through a CT volume in HU.

Model (recorded in every cohort's ``cohort.json``): linear attenuation ``mu = MU_WATER * (1 + HU/1000)``
(clipped at 0, so air attenuates nothing), parallel rays, and the log-transformed transmission
``p = -ln(I/I0) = sum(mu * dl)``. A radiograph is ``p / P_REF`` with a fixed ``P_REF`` for the whole
cohort, so intensities are comparable between images and a finding changes them physically (a plain
mean of HU would not). Bones and fluid are bright, air is dark, as on a film.

Geometry: the volume is RAS (axes Right, Anterior, Superior). ``angle_deg`` rotates the source about
the Superior axis: 0 is a frontal view (rays along the anterior–posterior axis), 90 a lateral view.
Image rows run from superior (top) to inferior; in the frontal view the patient's right is on the
image's left, the usual way to hang a chest film.

Cone beam (``geometry=``:class:`Geometry`): a point source and a flat detector, as X2CT-GAN rendered its
DRRs (plastimatch, source-to-axis 541 mm, source-to-detector 949 mm). The rotation axis is the Superior
axis through the volume's centre; the source sits ``source_axis_mm`` before it, on the side the rays come
from (frontal: posterior, a PA film; lateral at 90: the patient's right, a left-lateral film), the detector
``source_detector_mm - source_axis_mm`` behind it, centred on the central ray, square, ``detector_mm`` wide
with ``size`` pixels (pixel centres at ``(i + 0.5 - size/2) * detector_mm / size``). Each pixel's ray is
sampled on planes perpendicular to the central ray, one smallest-voxel-size apart, with trilinear
interpolation (air outside the volume), and weighted by the ray's length per plane. Rows, columns, the
rotation sense, ``mu`` and ``P_REF`` are those of the parallel beam; ``geometry=None`` is the parallel beam,
unchanged. A point at depth ``d`` towards the detector (mm from the axis plane) is magnified by
``source_detector_mm / (source_axis_mm + d)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

MU_WATER = 0.02  # 1/mm, water at an effective energy of about 60 keV
P_REF = 8.0      # normalisation of the line integral (about 400 mm of water)


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm) from Hounsfield units."""
    return np.clip(MU_WATER * (1.0 + np.asarray(hu, np.float32) / 1000.0), 0.0, None)


def line_integrals(hu: np.ndarray, spacing: tuple[float, float, float], angle_deg: float = 0.0) -> np.ndarray:
    """``p = sum(mu dl)`` for parallel rays at ``angle_deg`` about the S axis; shape ``[Z, X']`` (rows S→I)."""
    hu = np.asarray(hu, np.float32)
    if hu.ndim != 3:
        raise ValueError(f"line_integrals: need a 3D volume, got shape {hu.shape}")
    if not np.isclose(spacing[0], spacing[1]):
        raise ValueError(f"line_integrals: in-plane spacing must be isotropic to rotate about S, got {spacing}")
    mu = hu_to_mu(hu)
    if angle_deg % 360:
        # rotate the body (not the source) by -angle in the R–A plane; air (mu 0) fills the corners
        mu = ndimage.rotate(mu, -angle_deg, axes=(0, 1), reshape=False, order=1, mode="constant", cval=0.0)
    p = mu.sum(axis=1) * spacing[1]   # [X, Z]
    return p[::-1, ::-1].T.copy()     # rows superior→inferior, columns patient right→left


def radiograph(hu: np.ndarray, spacing: tuple[float, float, float], angle_deg: float = 0.0,
               size: int | None = None, geometry: Geometry | None = None) -> np.ndarray:
    """A square DRR in [0, ~1] (``p / P_REF``), resampled to ``size``×``size`` px on a square field.

    Parallel beam (``geometry=None``): the field of view is the larger of the volume's horizontal and
    vertical extents; the shorter one is padded with air, so pixels are square in millimetres. Cone beam:
    :func:`cone_line_integrals` on the geometry's detector (``size`` pixels, default 320).
    """
    if geometry is not None:
        p = cone_line_integrals(hu, spacing, angle_deg, 320 if size is None else size, geometry)
        return (p / P_REF).astype(np.float32)
    p = line_integrals(hu, spacing, angle_deg)
    h_mm, w_mm = p.shape[0] * spacing[2], p.shape[1] * spacing[0]
    fov = max(h_mm, w_mm)
    pad_h = int(round((fov - h_mm) / spacing[2] / 2))
    pad_w = int(round((fov - w_mm) / spacing[0] / 2))
    p = np.pad(p, ((pad_h, pad_h), (pad_w, pad_w)))
    if size is not None:
        p = ndimage.zoom(p, (size / p.shape[0], size / p.shape[1]), order=1)
        p = p[:size, :size]
    return (p / P_REF).astype(np.float32)


def parameters(geometry: Geometry | None = None) -> dict:
    """The DRR model (cache keys, ``cohort.json``, ``dataset.json``); with ``geometry``: the cone beam's,
    ``"geometry"`` holding :class:`Geometry`'s fields (``Geometry(**d["geometry"])`` rebuilds it)."""
    if geometry is None:
        return {"model": "parallel-beam Beer-Lambert", "mu_water_per_mm": MU_WATER, "p_ref": P_REF,
                "mu": "mu_water * (1 + HU/1000), clipped at 0", "image": "line integral / p_ref"}
    return {"model": "cone-beam Beer-Lambert", "mu_water_per_mm": MU_WATER, "p_ref": P_REF,
            "mu": "mu_water * (1 + HU/1000), clipped at 0", "image": "line integral / p_ref",
            "geometry": asdict(geometry), "field_at_axis_mm": field_at_axis_mm(geometry),
            "sampling": "planes normal to the central ray, smallest voxel size apart, trilinear, air outside",
            "rotation": "source about the Superior axis through the volume centre; 0 PA (source posterior), "
                        "90 left lateral (source on the patient's right)"}


# --------------------------------------------------------------------------- cone beam

#: Default detector width: a 320 mm field at the rotation axis (the 320 mm cube X2CT-GAN crops to) times the
#: magnification there, 949/541 (about 561.3 mm). X2CT-GAN's own plastimatch call used a 500 mm imager (a
#: 285 mm field at the axis); parts of a 320 mm body nearer the source than the axis can still fall outside
#: (use about 800 mm to hold the whole cube: 320 * 949 / (541 - 160)).
DETECTOR_MM = 320.0 * 949.0 / 541.0


@dataclass(frozen=True)
class Geometry:
    """A point source and a flat square detector (mm); see the module docstring."""

    source_axis_mm: float = 541.0
    source_detector_mm: float = 949.0
    detector_mm: float = DETECTOR_MM

    def __post_init__(self) -> None:
        if not (0 < self.source_axis_mm < self.source_detector_mm):
            raise ValueError(f"Geometry: need 0 < source_axis_mm < source_detector_mm, got {self.source_axis_mm}, "
                             f"{self.source_detector_mm}")
        if not self.detector_mm > 0:
            raise ValueError(f"Geometry: detector_mm must be positive, got {self.detector_mm}")

    @property
    def magnification(self) -> float:
        """At the rotation axis."""
        return self.source_detector_mm / self.source_axis_mm


def field_at_axis_mm(geometry: Geometry) -> float:
    """The detector's width seen at the rotation axis (mm): ``detector_mm / magnification``."""
    return geometry.detector_mm / geometry.magnification


def _view_axes(angle_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors (RAS) of the ray, of the image columns and of the image rows at ``angle_deg``."""
    a = np.deg2rad(angle_deg)
    ray = np.array([-np.sin(a), np.cos(a), 0.0])    # 0: towards anterior; 90: towards the patient's left
    column = np.array([-np.cos(a), -np.sin(a), 0.0])  # S x ray: 0: towards the patient's left
    return ray, column, np.array([0.0, 0.0, -1.0])


def cone_line_integrals(hu: np.ndarray, spacing: tuple[float, float, float], angle_deg: float, size: int,
                        geometry: Geometry, chunk: int = 8) -> np.ndarray:
    """``p = sum(mu dl)`` along the rays from the source to each of ``size``×``size`` detector pixels;
    float32 ``[rows S→I, columns]``. ``chunk`` columns are sampled at a time (memory)."""
    hu = np.asarray(hu, np.float32)
    if hu.ndim != 3:
        raise ValueError(f"cone_line_integrals: need a 3D volume, got shape {hu.shape}")
    mu = hu_to_mu(hu)
    sp, n = np.asarray(spacing, np.float64), np.asarray(hu.shape)
    ray, col_dir, row_dir = _view_axes(angle_deg)
    step = float(sp.min())
    half = 0.5 * float(np.abs(ray[:2]) @ ((n[:2] + 1) * sp[:2]))  # the volume's depth along the ray, plus a voxel
    depth = (np.arange(2 * int(np.ceil(half / step)) + 1) - int(np.ceil(half / step))) * step
    sad, sdd = geometry.source_axis_mm, geometry.source_detector_mm
    scale = (sad + depth) / sdd                      # detector mm -> mm on each depth plane
    pos = (np.arange(size) + 0.5 - size / 2) * (geometry.detector_mm / size)
    centre = (n - 1) / 2.0
    out = np.empty((size, size), np.float32)
    for c0 in range(0, size, chunk):
        u = pos[c0:c0 + chunk]
        uu = u[:, None, None] * scale[None, :, None]     # [columns, depth, rows]
        vv = pos[None, None, :] * scale[None, :, None]
        dd = depth[None, :, None]
        coords = np.empty((3, len(u), len(depth), size))
        for ax in range(3):
            coords[ax] = centre[ax] + (dd * ray[ax] + uu * col_dir[ax] + vv * row_dir[ax]) / sp[ax]
        sums = ndimage.map_coordinates(mu, coords, order=1, mode="grid-constant", cval=0.0, prefilter=False).sum(1)
        length = step * np.sqrt(sdd ** 2 + u[:, None] ** 2 + pos[None, :] ** 2) / sdd  # ray length per plane
        out[:, c0:c0 + chunk] = (sums * length).T
    return out
