"""lib.data.findings: the threshold lung mask of a chest CT and findings inserted into it."""

from __future__ import annotations

import numpy as np
import pytest

from lib.data import findings as fd
from lib.data.fixtures.ct_to_cxr_pairs import GRID, chest_ct

SPACING = GRID.spacing


@pytest.fixture(scope="module")
def chest():
    ct = chest_ct(3)
    return ct["hu"], fd.lung_mask(ct["hu"], SPACING), ct["lung"] >= 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lung_mask_agrees_with_the_phantoms_lungs(seed):
    ct = chest_ct(seed)
    mask, ref = fd.lung_mask(ct["hu"], SPACING), ct["lung"] >= 0.5
    dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
    assert dice > 0.93, dice  # 0.955-0.966 on these phantoms at 7 mm
    assert not mask[0].any() and not mask[:, 0].any()  # the air around the body is not lung


def test_no_lungs_in_a_water_body():
    x, y, _ = GRID.world()
    hu = np.where((x / 140) ** 2 + (y / 100) ** 2 < 1, 30.0, -1000.0)
    assert not fd.lung_mask(hu, SPACING).any()


@pytest.mark.parametrize("kind", ["nodule", "consolidation"])
def test_lung_findings_change_only_the_lung(chest, kind):
    hu, lung, _ = chest
    for seed in range(4):
        out, rec = fd.insert(kind, hu, SPACING, lung, np.random.default_rng(seed), affine=GRID.affine)
        changed = np.abs(out - hu) > 1e-3
        assert changed.any() and not (changed & ~lung).any()
        assert rec.kind == kind and rec.voxels > 0 and rec.side in fd.SIDES
        assert out.dtype == np.float32 and np.array_equal(hu, chest[0])  # the input is untouched
        if kind == "nodule":
            assert max(rec.size_mm) <= 15 + 2 * SPACING[0]
            assert (out - hu).max() > 500  # soft tissue replacing air (its centre voxel; 7 mm voxels: partial volume)


def test_effusion_fills_the_dependent_part_of_one_lung(chest):
    hu, lung, _ = chest
    for seed, side in ((0, "right"), (1, "left")):
        out, rec = fd.insert_effusion(hu, SPACING, lung, np.random.default_rng(seed), side=side)
        changed = np.abs(out - hu) > 1.0
        region = fd.side_mask(lung, side)
        assert changed.any() and not (changed & ~region).any() and rec.side == side
        _i, j, k = np.nonzero(changed)
        _ri, rj, rk = np.nonzero(region)
        assert j.mean() < rj.mean() and k.mean() < rk.mean()  # posterior and inferior of the lung's centre
        full = out - hu > 500  # voxels mostly filled
        assert full.any() and -20 <= np.median(out[full]) <= 25  # fluid (0..20 HU, partly filled voxels)


def test_pneumothorax_removes_attenuation_inside_one_lung(chest):
    hu, lung, _ = chest
    out, _rec = fd.insert_pneumothorax(hu, SPACING, lung, np.random.default_rng(0), side="left")
    changed = np.abs(out - hu) > 1.0
    assert changed.any() and not (changed & ~fd.side_mask(lung, "left")).any()
    assert (out[changed] <= hu[changed]).all()


def test_insertions_are_deterministic(chest):
    hu, lung, _ = chest
    for kind in fd.FINDINGS:
        a, ra = fd.insert(kind, hu, SPACING, lung, np.random.default_rng(7))
        b, rb = fd.insert(kind, hu, SPACING, lung, np.random.default_rng(7))
        assert np.array_equal(a, b) and ra == rb
    with pytest.raises(ValueError, match="unknown finding"):
        fd.insert("fracture", hu, SPACING, lung, np.random.default_rng(0))


def test_rotate_keeps_the_volume_and_fills_with_air(chest):
    hu = chest[0]
    assert np.array_equal(fd.rotate(hu, SPACING), hu)
    turned = fd.rotate(hu, SPACING, about_s=5.0, about_r=-3.0)
    assert turned.shape == hu.shape and turned.min() >= fd.AIR_HU
    assert abs(turned.mean() - hu.mean()) < 0.05 * abs(hu.mean())
    back = fd.rotate(fd.rotate(hu, SPACING, about_s=10.0), SPACING, about_s=-10.0)
    core = (slice(12, 36),) * 3
    assert np.abs(back[core] - hu[core]).mean() < 40  # two interpolations, same anatomy
    # anisotropic voxels: turning a sphere about R keeps a sphere
    g = np.indices((40, 40, 20)).astype(np.float32)
    ball = np.where(((g[0] - 19.5) * 1) ** 2 + ((g[1] - 19.5) * 1) ** 2 + ((g[2] - 9.5) * 2) ** 2 < 144, 100.0, fd.AIR_HU)
    tilted = fd.rotate(ball, (1.0, 1.0, 2.0), about_r=30.0)
    mid = (100.0 + fd.AIR_HU) / 2
    assert abs((tilted > mid).sum() - (ball > mid).sum()) < 0.05 * (ball > mid).sum()
