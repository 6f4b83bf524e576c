"""Findings inserted into a real chest CT (HU, RAS), for longitudinal radiograph pairs rendered from CT.

The approach of Longitudinal_MIM: take a chest CT, insert 3D findings, rotate it a little (a nuisance
pose), project a prior and a current radiograph, and keep the signed difference as the change map.
:mod:`lib.data.phantoms` does this for the built-in phantoms, whose lungs are known; here the lungs of a
real CT are found first (:func:`lung_mask`) and every finding is confined to them.

Arrays are ``[X, Y, Z]`` in RAS (axis 0 to the patient's Right, 1 Anterior, 2 Superior), in HU, with
``spacing`` the voxel size in mm per axis. Every function is a pure function of its arguments and a
``numpy.random.Generator``: the same generator state gives the same volume and the same record. An
insertion returns a new volume (the input is never modified) and an :class:`Inserted` record (kind,
centre in mm, size in mm, HU, side, changed voxels).

- ``nodule``: a textured soft-tissue ellipsoid of 5-15 mm diameter inside one lung.
- ``consolidation``: an irregular blob (a few overlapping ellipsoids modulated by smooth noise) of
  -100..+40 HU confined to the lung, with air bronchograms (thin air tubes through it) half the time.
- ``effusion``: fluid of 0..20 HU filling the dependent part of one lung, posterior and inferior (the patient
  lies supine), up to a level that takes 10-35 % of that lung's volume.
- ``pneumothorax``: air (-1000 HU) replacing a rim of the non-dependent (anterior, apical) part of one lung.
  Less attenuation: on a radiograph it *darkens*, so its change is negative where it appears.

Centres are world mm (RAS) when an ``affine`` is given, else index x spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lib.data.phantoms import ellipsoid_fraction, smooth_noise, tube_fraction

AIR_HU = -1024.0
LUNG_THRESHOLD_HU = -320.0
FINDINGS = ("nodule", "consolidation", "effusion", "pneumothorax")
SIDES = ("right", "left")


@dataclass(frozen=True)
class Inserted:
    """What an insertion did: ``kind`` (one of :data:`FINDINGS`), ``center_mm`` (RAS world mm with an
    affine, else index x spacing), ``size_mm`` (extent per axis), ``hu`` (the finding's mean HU), ``side``
    (``right`` / ``left`` lung) and ``voxels`` (how many voxels changed by more than 1 HU)."""

    kind: str
    center_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    hu: float
    side: str
    voxels: int


# --------------------------------------------------------------------------- the lungs

def _inplane() -> np.ndarray:
    """Connectivity within an axial slice only (8-neighbours in X-Y, none along Z)."""
    s = np.zeros((3, 3, 3), bool)
    s[:, :, 1] = True
    return s


def lung_mask(hu: np.ndarray, spacing, threshold: float = LUNG_THRESHOLD_HU, keep_fraction: float = 0.1,
              min_ml: float = 20.0, closing_mm: float = 3.0) -> np.ndarray:
    """Boolean lung mask of a chest CT by thresholding.

    Voxels under ``threshold`` HU that are not air connected to the in-plane border of their axial slice
    (the air around the body, which may also touch the first and last slices), grouped into 3D components;
    those of at least ``keep_fraction`` of the largest and ``min_ml`` mL are kept (the lungs and airways,
    not bowel gas), closed by about ``closing_mm``, and holes (vessels, nodules) filled slice by slice.
    """
    hu = np.asarray(hu)
    low = hu < threshold
    labels, _ = ndimage.label(low, structure=_inplane())
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()]))
    inside = low & ~np.isin(labels, border[border > 0])
    del labels
    comps, n = ndimage.label(inside)
    mask = np.zeros(hu.shape, bool)
    if not n:
        return mask
    sizes = np.bincount(comps.ravel())[1:]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    kept = np.flatnonzero((sizes >= keep_fraction * sizes.max()) & (sizes * voxel_ml >= min_ml)) + 1
    if not kept.size:
        return mask
    mask = np.isin(comps, kept)
    box = _bbox(mask, pad=3)
    radius = max(1, round(closing_mm / float(min(spacing))))
    closed = ndimage.binary_closing(np.pad(mask[box], radius), iterations=radius)
    closed = closed[tuple(slice(radius, -radius) for _ in range(3))]
    mask[box] = ndimage.binary_fill_holes(closed, structure=_inplane())
    return mask


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    out = []
    for axis in range(mask.ndim):
        any_ = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo, hi = (int(any_[0]), int(any_[-1]) + 1) if any_.size else (0, 0)
        out.append(slice(max(0, lo - pad), min(mask.shape[axis], hi + pad)))
    return tuple(out)


def midline(lung: np.ndarray) -> float:
    """Index along X between the two lungs: the mean X index of the lung voxels."""
    profile = lung.sum(axis=(1, 2)).astype(np.float64)
    return float((profile * np.arange(profile.size)).sum() / max(profile.sum(), 1.0))


def side_mask(lung: np.ndarray, side: str) -> np.ndarray:
    """The lung voxels of one side: ``right`` (X index above the midline: RAS X runs to the right) or ``left``."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    i = np.arange(lung.shape[0])[:, None, None]
    return lung & ((i > midline(lung)) if side == "right" else (i <= midline(lung)))


# --------------------------------------------------------------------------- helpers

def _mm(box: tuple[slice, ...], spacing) -> np.ndarray:
    """Coordinates (index x spacing, mm) of the voxel centres of ``box``, shape ``[3, ...]``."""
    axes = [np.arange(s.start, s.stop, dtype=np.float32) * float(sp) for s, sp in zip(box, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _box(center: np.ndarray, half_mm, spacing, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, int(np.floor(c - h / sp))), min(n, int(np.ceil(c + h / sp)) + 1))
                 for c, h, sp, n in zip(center, np.broadcast_to(half_mm, 3), spacing, shape))


def _pick(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random voxel (index) of a boolean region."""
    flat = np.flatnonzero(region)
    if not flat.size:
        raise ValueError("no lung voxels to place a finding in (is this a chest CT?)")
    return np.array(np.unravel_index(int(flat[rng.integers(flat.size)]), region.shape))


def _side_of(lung: np.ndarray, index) -> str:
    return "right" if index[0] > midline(lung) else "left"


def _blend(hu: np.ndarray, box: tuple[slice, ...], occ: np.ndarray, target: np.ndarray | float):
    """``hu`` with ``occ`` (in [0, 1], on ``box``) of it replaced by ``target``; returns (volume, changed voxels)."""
    out = np.array(hu, dtype=np.float32, copy=True)
    before = out[box].copy()
    after = before * (1 - occ) + np.asarray(target, np.float32) * occ
    out[box] = after
    return out, int((np.abs(after - before) > 1.0).sum())


def _record(kind: str, box, occ: np.ndarray, spacing, affine, hu: float, side: str, voxels: int) -> Inserted:
    p = _mm(box, spacing)
    w = occ / max(float(occ.sum()), 1e-6)
    center = (p * w).sum(axis=(1, 2, 3))
    where = occ > 0.5
    size = [float(np.ptp(p[a][where]) + spacing[a]) if where.any() else 0.0 for a in range(3)]
    if affine is not None:
        center = (np.asarray(affine, np.float64) @ [*(center / np.asarray(spacing, np.float64)), 1.0])[:3]
    return Inserted(kind, tuple(round(float(c), 2) for c in center), tuple(round(s, 2) for s in size),
                    round(float(hu), 1), side, voxels)


# --------------------------------------------------------------------------- the findings

def insert_nodule(hu: np.ndarray, spacing, lung: np.ndarray, rng: np.random.Generator,
                  diameter_mm: float | None = None, affine=None) -> tuple[np.ndarray, Inserted]:
    """A textured soft-tissue (10..60 HU) ellipsoid of ``diameter_mm`` (default 5-15 mm) inside the lung."""
    diameter = float(diameter_mm if diameter_mm is not None else rng.uniform(5, 15))
    semi = diameter / 2 * rng.uniform(0.8, 1.2, 3)
    base = float(rng.uniform(10, 60))
    for _ in range(50):  # a centre whose nodule lies (almost) wholly in the lung
        c = _pick(rng, lung)
        box = _box(c, semi + 2 * max(spacing), spacing, hu.shape)
        occ = ellipsoid_fraction(_mm(box, spacing), c * np.asarray(spacing), semi, soft=0.5)
        if (occ * lung[box]).sum() >= 0.9 * occ.sum():
            break
    occ = occ * lung[box]
    texture = base + 15.0 * smooth_noise(rng, occ.shape, coarse=3)
    out, n = _blend(hu, box, occ, texture)
    return out, _record("nodule", box, occ, spacing, affine, base, _side_of(lung, c), n)


def insert_consolidation(hu: np.ndarray, spacing, lung: np.ndarray, rng: np.random.Generator,
                         bronchograms: bool | None = None, affine=None) -> tuple[np.ndarray, Inserted]:
    """An irregular airspace opacity (-100..+40 HU) of 20-50 mm confined to the lung, with air bronchograms
    (2-4 air tubes of 1-2 mm radius through it) when ``bronchograms`` (default: half the time)."""
    extent = float(rng.uniform(20, 50))
    c = _pick(rng, lung)
    centre_mm = c * np.asarray(spacing)
    box = _box(c, extent, spacing, hu.shape)
    p = _mm(box, spacing)
    occ = np.zeros(p.shape[1:], np.float32)
    for _ in range(int(rng.integers(3, 7))):
        lobe = centre_mm + rng.normal(0, extent / 5, 3)
        occ = np.maximum(occ, ellipsoid_fraction(p, lobe, extent / 2 * rng.uniform(0.35, 0.6, 3), soft=2.0))
    occ = np.clip(occ * (1.0 + 0.5 * smooth_noise(rng, occ.shape, coarse=5)), 0, 1) * lung[box]
    base = float(rng.uniform(-100, 40))
    target = base + 20.0 * smooth_noise(rng, occ.shape, coarse=4)
    if bronchograms if bronchograms is not None else rng.random() < 0.5:
        for _ in range(int(rng.integers(2, 5))):
            direction = rng.normal(size=3)
            start = centre_mm - direction / np.linalg.norm(direction) * extent * 0.4
            end = centre_mm + direction / np.linalg.norm(direction) * extent * 0.4
            air = tube_fraction(p, np.stack([start, end]).astype(np.float32), float(rng.uniform(1, 2)), soft=0.5)
            target = target * (1 - air) - 900.0 * air
    out, n = _blend(hu, box, occ, target)
    return out, _record("consolidation", box, occ, spacing, affine, base, _side_of(lung, c), n)


def _height(p: np.ndarray, posterior: float, inferior: float) -> np.ndarray:
    """How far above the dependent (posterior, inferior) corner a point lies: small = dependent."""
    return posterior * p[1] + inferior * p[2]


def insert_effusion(hu: np.ndarray, spacing, lung: np.ndarray, rng: np.random.Generator, side: str | None = None,
                    fraction: float | None = None, affine=None) -> tuple[np.ndarray, Inserted]:
    """Fluid (0..20 HU) filling the dependent part of one lung (posterior and inferior: the lowest
    ``fraction``, default 10-35 %, of its voxels under a tilted fluid level)."""
    side = side or str(rng.choice(SIDES))
    region = side_mask(lung, side)
    if not region.any():
        raise ValueError(f"no {side} lung voxels for an effusion")
    box = _bbox(region, pad=2)
    p = _mm(box, spacing)
    h = _height(p, 1.0, float(rng.uniform(0.3, 0.8)))
    inside = region[box]
    level = float(np.quantile(h[inside], fraction if fraction is not None else rng.uniform(0.10, 0.35)))
    occ = (1.0 / (1.0 + np.exp(np.clip((h - level) / 2.0, -30, 30)))).astype(np.float32) * inside
    fluid = float(rng.uniform(0, 20))
    out, n = _blend(hu, box, occ, fluid + 3.0 * smooth_noise(rng, occ.shape, coarse=4))
    return out, _record("effusion", box, occ, spacing, affine, fluid, side, n)


def insert_pneumothorax(hu: np.ndarray, spacing, lung: np.ndarray, rng: np.random.Generator, side: str | None = None,
                        rim_mm: float | None = None, affine=None) -> tuple[np.ndarray, Inserted]:
    """Air (-1000 HU) replacing the pleural rim (``rim_mm``, default 5-15 mm) of the non-dependent part
    (anterior and apical, 30-60 % of the lung) of one lung."""
    side = side or str(rng.choice(SIDES))
    region = side_mask(lung, side)
    if not region.any():
        raise ValueError(f"no {side} lung voxels for a pneumothorax")
    box = _bbox(region, pad=2)
    inside = region[box]
    depth = ndimage.distance_transform_edt(inside, sampling=spacing)
    h = -_height(_mm(box, spacing), 1.0, float(rng.uniform(0.5, 1.5)))  # small = anterior and superior
    top = h <= np.quantile(h[inside], rng.uniform(0.3, 0.6))
    rim = max(float(rim_mm if rim_mm is not None else rng.uniform(5, 15)), 1.5 * float(max(spacing)))  # >= a voxel
    occ = (inside & top & (depth <= rim)).astype(np.float32)
    out, n = _blend(hu, box, occ, -1000.0)
    return out, _record("pneumothorax", box, occ, spacing, affine, -1000.0, side, n)


INSERT = {"nodule": insert_nodule, "consolidation": insert_consolidation, "effusion": insert_effusion,
          "pneumothorax": insert_pneumothorax}


def insert(kind: str, hu: np.ndarray, spacing, lung: np.ndarray, rng: np.random.Generator,
           affine=None) -> tuple[np.ndarray, Inserted]:
    """Insert one finding of ``kind`` (one of :data:`FINDINGS`) with its default random parameters."""
    if kind not in INSERT:
        raise ValueError(f"unknown finding {kind!r}; findings: {', '.join(FINDINGS)}")
    return INSERT[kind](hu, spacing, lung, rng, affine=affine)


# --------------------------------------------------------------------------- nuisance pose

def _axis_rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def rotate(hu: np.ndarray, spacing, about_s: float = 0.0, about_r: float = 0.0, order: int = 1,
           cval: float = AIR_HU) -> np.ndarray:
    """The volume turned ``about_s`` degrees about its Superior axis (right-handed: Right towards Anterior)
    then tilted ``about_r`` degrees about its Right axis (Anterior towards Superior), about its centre, in
    millimetres (anisotropic voxels are handled); corners are filled with air (``cval``)."""
    hu = np.asarray(hu, np.float32)
    if not about_s and not about_r:
        return hu.copy()
    r = _axis_rotation(2, about_s) @ _axis_rotation(0, about_r)
    s = np.diag(np.asarray(spacing, np.float64))
    s_inv = np.linalg.inv(s)
    c = s @ ((np.asarray(hu.shape) - 1) / 2.0)
    matrix = s_inv @ r.T @ s  # output voxel -> input voxel: the inverse rotation, in mm
    offset = s_inv @ (c - r.T @ c)
    return ndimage.affine_transform(hu, matrix, offset=offset, order=order, mode="constant", cval=cval)
