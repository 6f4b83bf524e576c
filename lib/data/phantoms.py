"""Procedural anatomy for the built-in demo cohort: brains from the real MNI152 template, chest phantoms.

Everything here is a pure function of its arguments and a ``numpy.random.Generator``; the cohort
builder (:mod:`lib.data.demo`) gives every subject its own generator, so a subject does not depend on
how many others are built or in which order.

Coordinates: arrays are RAS-canonical (axis 0 → patient Right, 1 → Anterior, 2 → Superior) and every
function that places anatomy works in millimetres of that world frame, so the affine of a generated
volume is ``diag(spacing) + origin`` and placement is independent of the grid size.

Brain (:func:`brain_tissues`): the MNI152 2009c template shipped inside nilearn gives real grey and
white matter; CSF is the rest of the (filled) brain mask; skull and scalp are shells around the brain
at subject-specific thickness. A smooth random deformation and a small random affine make every subject
different. The template is skull-stripped, so skull and scalp are synthetic.

Chest (:func:`chest_phantom`): body wall (fat, muscle), lungs, heart, aorta, pulmonary arteries,
spine and ribs as ellipsoids and tubes in HU, with per-subject sizes and positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------- grids

@dataclass(frozen=True)
class Grid:
    """A regular RAS grid: ``shape`` voxels of ``spacing`` mm, centred on world ``center`` (mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = np.asarray(self.center) - (np.asarray(self.shape) - 1) / 2 * np.asarray(self.spacing)
        return a

    def world(self) -> np.ndarray:
        """World coordinates (mm) of every voxel centre, shape ``[3, *shape]`` (float32)."""
        idx = np.indices(self.shape, dtype=np.float32)
        a = self.affine.astype(np.float32)
        return np.einsum("ij,j...->i...", a[:3, :3], idx) + a[:3, 3].reshape(3, 1, 1, 1)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 4) -> np.ndarray:
    """Smooth random field in [-1, 1]-ish on ``shape``: coarse Gaussian noise upsampled by linear interpolation
    (cubic looks no better at these amplitudes and costs five times more); a side the zoom rounds short
    (tiny shapes) is padded with its edge."""
    low = rng.standard_normal((coarse,) * len(shape)).astype(np.float32)
    zoomed = ndimage.zoom(low, [max(s, 1) / coarse for s in shape], order=1, mode="nearest")
    zoomed = np.pad(zoomed, [(0, max(0, s - z)) for s, z in zip(shape, zoomed.shape)], mode="edge")
    return zoomed[tuple(slice(0, s) for s in shape)]



def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------- tubes and blobs

def segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from ``points`` ``[3, ...]`` to the segment from ``a`` to ``b``."""
    ab = (b - a).astype(np.float32)
    ap = points - a.reshape(3, *([1] * (points.ndim - 1)))
    t = np.clip(np.einsum("i,i...->...", ab, ap) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    closest = ap - t[None] * ab.reshape(3, *([1] * (points.ndim - 1)))
    return np.sqrt((closest ** 2).sum(0))


def tube_fraction(points: np.ndarray, polyline: np.ndarray, radius: float, soft: float = 0.5) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] of a tube of ``radius`` mm around a polyline ``[N, 3]``."""
    d = np.full(points.shape[1:], np.inf, dtype=np.float32)
    for a, b in zip(polyline[:-1], polyline[1:]):
        d = np.minimum(d, segment_distance(points, a, b))
    return 1.0 / (1.0 + np.exp(np.clip((d - radius) / soft, -30, 30)))


def ellipsoid_fraction(points: np.ndarray, center, semi_axes, soft: float = 1.0) -> np.ndarray:
    """Occupancy in [0, 1] of an axis-aligned ellipsoid (``soft`` mm edge)."""
    c = np.asarray(center, np.float32).reshape(3, *([1] * (points.ndim - 1)))
    s = np.asarray(semi_axes, np.float32).reshape(3, *([1] * (points.ndim - 1)))
    r = np.sqrt((((points - c) / s) ** 2).sum(0))
    # signed distance approximated along the radius by the smallest semi-axis
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) * float(np.min(semi_axes)) / soft, -30, 30)))


# --------------------------------------------------------------------------- brain

def _mni_dir() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


@lru_cache(maxsize=1)
def mni_template() -> dict[str, np.ndarray]:
    """MNI152 2009c tissue maps at 1 mm (RAS): gm, wm, csf in [0, 1], and the distance (mm) outside the
    brain mask (0 inside). Loaded once per process."""
    import nibabel as nib

    maps = {}
    for name in ("t1", "gm", "wm"):
        img = nib.load(_mni_dir() / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
        maps[name] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        maps["affine"] = img.affine
    brain = ndimage.binary_fill_holes(maps.pop("t1") > 0.02)
    maps["csf"] = np.where(brain, np.clip(1.0 - maps["gm"] - maps["wm"], 0.0, 1.0), 0.0).astype(np.float32)
    maps["outside_mm"] = ndimage.distance_transform_edt(~brain).astype(np.float32)
    return maps


BRAIN_GRID = {"smoke": Grid((40, 48, 40), (5.0, 5.0, 5.0), (0.0, -18.0, 8.0)),
              "demo": Grid((64, 76, 64), (3.0, 3.0, 3.0), (0.0, -18.0, 8.0))}


def _deform(rng: np.random.Generator, grid: Grid, max_deg: float = 6.0, scale: float = 0.06,
            warp_mm: float = 4.0) -> np.ndarray:
    """Template coordinates (MNI mm) to sample for each voxel of ``grid``: random affine + smooth warp."""
    pts = grid.world().reshape(3, -1)
    rot = _rotation(rng, max_deg) * rng.uniform(1 - scale, 1 + scale, 3)
    shift = rng.uniform(-4, 4, 3)
    src = rot @ (pts - np.asarray(grid.center)[:, None]) + np.asarray(grid.center)[:, None] + shift[:, None]
    warp = np.stack([smooth_noise(rng, grid.shape) for _ in range(3)]).reshape(3, -1) * warp_mm
    return (src + warp).astype(np.float32)


def _sample(volume: np.ndarray, affine: np.ndarray, world: np.ndarray, shape, cval: float) -> np.ndarray:
    vox = np.linalg.inv(affine) @ np.vstack([world, np.ones((1, world.shape[1]), np.float32)])
    return ndimage.map_coordinates(volume, vox[:3], order=1, mode="constant", cval=cval).reshape(shape)


def brain_tissues(rng: np.random.Generator, grid: Grid) -> dict[str, np.ndarray]:
    """Per-voxel fractions of gm, wm, csf, skull, scalp on ``grid`` for one random subject, plus
    ``template_mm``: the template coordinates each voxel was sampled from (to place vessels)."""
    t = mni_template()
    src = _deform(rng, grid)
    out = {k: _sample(t[k], t["affine"], src, grid.shape, 0.0) for k in ("gm", "wm", "csf")}
    outside = _sample(t["outside_mm"], t["affine"], src, grid.shape, 100.0)
    gap, skull, scalp = rng.uniform(1.0, 3.0), rng.uniform(5.0, 8.0), rng.uniform(4.0, 7.0)
    edge = lambda lo, hi: np.clip(outside - lo, 0, 1) * np.clip(hi - outside, 0, 1)  # noqa: E731
    out["csf"] = out["csf"] + edge(0.0, gap)  # CSF between brain and skull
    out["skull"] = edge(gap, gap + skull)
    out["scalp"] = edge(gap + skull, gap + skull + scalp)
    out["template_mm"] = src.reshape(3, *grid.shape)
    return out


def vessel_tree(rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """A circle-of-Willis-like tree in MNI mm: (polyline ``[N, 3]``, radius mm) pairs, jittered."""
    j = lambda *p: np.asarray(p, np.float32) + rng.normal(0, 2.0, 3).astype(np.float32)  # noqa: E731
    ring = [j(0, 8, -14), j(14, 2, -16), j(16, -14, -16), j(6, -26, -16), j(-6, -26, -16),
            j(-16, -14, -16), j(-14, 2, -16), j(0, 8, -14)]
    tree = [(np.stack(ring), 1.6)]
    tree += [(np.stack([j(s * 16, 0, -40), j(s * 15, -2, -26), ring[1 if s > 0 else 6]]), 2.2) for s in (1, -1)]  # ICA
    tree += [(np.stack([j(0, -30, -45), j(0, -28, -30), j(0, -26, -18)]), 2.2)]  # basilar
    for s in (1, -1):
        tree.append((np.stack([ring[2 if s > 0 else 5], j(s * 32, -10, -10), j(s * 48, -14, 6), j(s * 56, -20, 20)]), 1.6))  # MCA
        tree.append((np.stack([ring[3 if s > 0 else 4], j(s * 14, -44, -8), j(s * 16, -70, 4)]), 1.3))  # PCA
        tree.append((np.stack([ring[0], j(s * 4, 28, -2), j(s * 4, 40, 20), j(s * 4, 20, 50)]), 1.3))  # ACA
    return tree


def vessel_fraction(points_mm: np.ndarray, tree: list[tuple[np.ndarray, float]], radius_scale: float = 1.0) -> np.ndarray:
    occ = np.zeros(points_mm.shape[1:], np.float32)
    for line, r in tree:
        occ = np.maximum(occ, tube_fraction(points_mm, line, r * radius_scale))
    return occ


def aneurysm_site(rng: np.random.Generator, tree: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, float]:
    """Centre (MNI mm) and radius (mm) of an aneurysm-like blob bulging from a random vessel vertex."""
    line, r = tree[rng.integers(len(tree))]
    k = int(rng.integers(1, len(line) - 1)) if len(line) > 2 else 0
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    radius = float(rng.uniform(4.0, 7.0))
    return (line[k] + direction * (r + 0.6 * radius)).astype(np.float32), radius


# --------------------------------------------------------------------------- chest

CHEST_GRID = {"smoke": Grid((48, 48, 32), (8.0, 8.0, 10.0)),
              "demo": Grid((96, 96, 64), (4.0, 4.0, 5.0))}


@dataclass
class ChestAnatomy:
    """Sampled sizes and positions of one chest phantom (mm); findings are added on top of it."""

    body: tuple[float, float]
    lungs: list[tuple[tuple[float, float, float], tuple[float, float, float]]]
    heart: tuple[tuple[float, float, float], tuple[float, float, float]]
    aorta: np.ndarray
    pulmonary: list[np.ndarray]
    spine_y: float  # distance (mm) of the vertebral bodies posterior of the centre
    enhancement: float  # HU of contrast-filled vessels
    heart_scale: float = 1.0
    extras: dict = field(default_factory=dict)


def sample_chest(rng: np.random.Generator) -> ChestAnatomy:
    u = rng.uniform
    body = (u(135, 165), u(90, 115))
    lungs = [((s * u(62, 75), u(-5, 10), u(0, 20)), (u(48, 60), u(65, 80), u(110, 135))) for s in (1, -1)]
    # RAS mm: +x patient right, +y anterior, +z superior. The heart sits left, anterior and low.
    heart = ((u(-30, -15), u(25, 40), u(-45, -30)), (u(50, 62), u(42, 52), u(45, 55)))
    hx, hy, hz = heart[0]
    aorta = np.array([[hx + 15, hy - 10, hz + 30],                 # root
                      [u(0, 10), u(10, 20), u(90, 105)],           # ascending, top
                      [u(-20, -10), u(-35, -25), u(100, 110)],     # arch, going posterior
                      [u(-25, -15), u(-50, -40), u(40, 60)],       # descending, left of the spine
                      [u(-22, -12), u(-55, -45), u(-150, -130)]], np.float32)
    trunk_top = np.array([u(-15, -5), u(15, 25), u(40, 55)], np.float32)
    trunk = np.stack([np.array([hx, hy, hz + 25], np.float32), trunk_top])
    pulmonary = [trunk] + [np.stack([trunk_top, trunk_top + np.array([s * u(45, 60), u(-20, -5), u(-5, 5)], np.float32)])
                           for s in (1, -1)]
    return ChestAnatomy(body=body, lungs=lungs, heart=heart, aorta=aorta, pulmonary=pulmonary,
                        spine_y=u(70, 85), enhancement=u(250, 400))


def chest_phantom(anat: ChestAnatomy, grid: Grid, contrast: bool, rng: np.random.Generator | None = None,
                  noise_hu: float = 12.0) -> dict[str, np.ndarray]:
    """HU volume of a chest phantom, plus the masks findings and metrics need.

    Returns ``hu`` (float32), ``lung`` and ``vessels`` occupancy maps. ``contrast`` raises blood in the
    heart, aorta and pulmonary arteries to ``anat.enhancement`` HU (the contrast-enhanced series).
    """
    p = grid.world()
    x, y, z = p
    ax, ay = anat.body
    r_body = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    body = 1.0 / (1.0 + np.exp(np.clip((r_body - 1.0) * ay / 1.5, -30, 30)))
    fat = np.clip((r_body - 0.86) / 0.04, 0, 1) * body
    hu = -1000.0 + body * 1040.0 - fat * 140.0  # air, muscle 40 HU, subcutaneous fat -100 HU
    lung = np.zeros(grid.shape, np.float32)
    for c, s in anat.lungs:
        lung = np.maximum(lung, ellipsoid_fraction(p, c, s, soft=3.0))
    hc, hs = anat.heart
    heart = ellipsoid_fraction(p, hc, tuple(v * anat.heart_scale for v in hs), soft=2.0)
    lung = lung * (1 - heart)
    blood_hu = anat.enhancement if contrast else 40.0
    vessels = np.maximum(tube_fraction(p, anat.aorta, 12.0, soft=1.5),
                         np.max([tube_fraction(p, line, 9.0, soft=1.5) for line in anat.pulmonary], axis=0))
    hu = hu * (1 - lung) + (-850.0) * lung
    hu = hu * (1 - heart) + blood_hu * heart
    hu = hu * (1 - vessels) + blood_hu * vessels
    spine = tube_fraction(p, np.array([[0, -anat.spine_y, -200], [0, -anat.spine_y, 200]], np.float32), 18.0, soft=1.5)
    disc = 0.5 + 0.5 * np.cos(2 * np.pi * z / 28.0)
    hu = hu * (1 - spine) + (300.0 + 400.0 * (disc > 0.25)) * spine
    rib_ring = np.exp(-(((r_body - 0.9) * ay) / 4.0) ** 2) * (np.cos(2 * np.pi * (z + 0.25 * y) / 26.0) > 0.6)
    rib_ring = rib_ring * (y < ay * 0.8)  # no ribs across the sternum (anterior)
    hu = np.maximum(hu, 600.0 * rib_ring * body + hu * (1 - rib_ring * body))
    if rng is not None and noise_hu > 0:
        hu = hu + rng.normal(0, noise_hu, grid.shape).astype(np.float32) * body
    return {"hu": hu.astype(np.float32), "lung": lung.astype(np.float32),
            "vessels": np.maximum(vessels, heart).astype(np.float32)}


def lung_texture(rng: np.random.Generator, grid: Grid, amplitude_hu: float = 40.0) -> np.ndarray:
    """Smooth HU texture for lung parenchyma (vessels and bronchi below the resolution)."""
    return (smooth_noise(rng, grid.shape, coarse=12) * amplitude_hu).astype(np.float32)


# --------------------------------------------------------------------------- chest findings

FINDINGS = ("nodule", "consolidation", "effusion", "pneumothorax", "cardiomegaly")


@dataclass(frozen=True)
class Finding:
    """One finding placed in a chest phantom (mm, RAS). ``kind`` is one of :data:`FINDINGS`."""

    kind: str
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    size: tuple[float, float, float] = (0.0, 0.0, 0.0)
    hu: float = 0.0


def sample_finding(rng: np.random.Generator, anat: ChestAnatomy, kind: str) -> Finding:
    """A random finding of ``kind`` placed inside the anatomy of ``anat``."""
    if kind not in FINDINGS:
        raise ValueError(f"unknown finding {kind!r}; valid findings: {', '.join(FINDINGS)}")
    (lc, ls) = anat.lungs[int(rng.integers(2))]
    inside = lambda frac: tuple(float(c + s * rng.uniform(-frac, frac)) for c, s in zip(lc, ls))  # noqa: E731
    if kind == "nodule":
        r = float(rng.uniform(7, 14))
        return Finding(kind, inside(0.5), (r, r, r), hu=float(rng.uniform(20, 60)))
    if kind == "consolidation":
        return Finding(kind, inside(0.45), tuple(float(rng.uniform(20, 35)) for _ in range(3)), hu=float(rng.uniform(-150, 0)))
    if kind == "effusion":  # fluid filling the lung base up to a level; center holds the lung and the level
        level = lc[2] - ls[2] * float(rng.uniform(0.35, 0.65))
        return Finding(kind, (lc[0], lc[1], level), ls, hu=float(rng.uniform(0, 20)))
    if kind == "pneumothorax":  # air replacing the lateral apex of one lung
        c = (lc[0] + np.sign(lc[0]) * ls[0] * 0.6, lc[1], lc[2] + ls[2] * 0.5)
        return Finding(kind, tuple(float(v) for v in c), (ls[0] * 0.5, ls[1] * 0.8, ls[2] * 0.5), hu=-1000.0)
    return Finding(kind, size=(float(rng.uniform(1.2, 1.35)),) * 3)  # cardiomegaly: heart scale


def apply_findings(anat: ChestAnatomy, grid: Grid, findings: list[Finding], contrast: bool = False,
                   texture: np.ndarray | None = None, cache: dict | None = None) -> np.ndarray:
    """HU volume of the phantom ``anat`` carrying ``findings`` (noise-free, so pairs differ only by them).

    ``cache``: a dict kept by the caller for one ``anat`` and ``grid``; the phantom without findings is
    rendered once per heart size and contrast instead of once per call.
    """
    scale = max([f.size[0] for f in findings if f.kind == "cardiomegaly"] or [1.0])
    key = (scale, contrast)
    if cache is None or key not in cache:
        rendered = chest_phantom(ChestAnatomy(**{**anat.__dict__, "heart_scale": scale}), grid, contrast, rng=None)
        if cache is None:
            cache = {}
        cache[key] = rendered
    ph = cache[key]
    hu, lung = ph["hu"], ph["lung"]
    if texture is not None:
        hu = hu + texture * lung
    p = grid.world()
    for f in findings:
        if f.kind in ("nodule", "consolidation", "pneumothorax"):
            occ = ellipsoid_fraction(p, f.center, f.size, soft=2.0)
            if f.kind != "nodule":
                occ = occ * lung  # confined to the lung
            hu = hu * (1 - occ) + f.hu * occ
        elif f.kind == "effusion":
            side = ellipsoid_fraction(p, f.center, (f.size[0] * 1.2, f.size[1] * 1.2, 1e4), soft=2.0)
            below = 1.0 / (1.0 + np.exp(np.clip((p[2] - f.center[2]) / 3.0, -30, 30)))
            occ = lung * side * below
            hu = hu * (1 - occ) + f.hu * occ
    return hu.astype(np.float32)
