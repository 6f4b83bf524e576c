"""lib.data.drr's cone beam: it converges to the parallel beam as the source recedes, magnifies a point
where the pinhole formula says, and leaves the parallel beam (the demo cohort's) exactly as it was."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from lib.data import drr


def _volume(n=40, seed=0):
    """A smooth random body (air around it), RAS, cubic so that a 90 degree parallel view crops nothing."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.uniform(-1000, 1500, (n, n, n)), 2).astype(np.float32)
    ijk = np.indices(v.shape) - (n - 1) / 2
    v[np.sqrt((ijk ** 2).sum(0)) > n * 0.45] = -1000.0  # inside the inscribed ball: any angle keeps it whole
    return v


@pytest.mark.parametrize("angle", [0.0, 90.0, 30.0])
def test_cone_beam_converges_to_the_parallel_beam(angle):
    """Source and detector 1e6 mm away (rays diverge by < 1e-4 rad over the volume): at 0 and 90 degrees the
    cone-beam image matches the parallel one to 1e-4 of its maximum (measured: 3e-6). At 30 degrees the
    parallel beam rotates the volume first (a second linear interpolation, which blurs), so there: mean
    difference < 5e-3 and largest < 5e-2 of the maximum (measured: 3e-3 and 2.9e-2, at sharp edges)."""
    v, s, size = _volume(), 2.0, 32
    parallel = drr.radiograph(v, (s, s, s), angle, size=size)
    field = size * (v.shape[0] - 1) * s / (size - 1)  # the parallel image's pixels: first/last on voxel centres
    far = drr.Geometry(source_axis_mm=1e6, source_detector_mm=1e6 + 500.0, detector_mm=field * (1e6 + 500.0) / 1e6)
    cone = drr.radiograph(v, (s, s, s), angle, size=size, geometry=far)
    assert cone.dtype == np.float32 and cone.shape == (size, size)
    diff = np.abs(cone - parallel) / parallel.max()
    if angle % 90 == 0:
        assert diff.max() < 1e-4
    else:
        assert diff.mean() < 5e-3 and diff.max() < 5e-2


def _sphere_volume(center_mm, n=64, s=2.0, radius=4.0):
    v = np.full((n, n, n), -1000.0, np.float32)
    world = (np.indices(v.shape).astype(np.float64) - (n - 1) / 2) * s  # RAS mm from the volume centre
    v[np.sqrt(((world - np.reshape(center_mm, (3, 1, 1, 1))) ** 2).sum(0)) <= radius] = 3000.0
    return v, s


def _centroid(image):
    w = image / image.sum()
    rows, cols = np.indices(image.shape)
    return float((w * rows).sum()), float((w * cols).sum())


@pytest.mark.parametrize("angle", [0.0, 90.0])
def test_an_off_centre_sphere_lands_where_the_magnification_puts_it(angle):
    """Pinhole: a point at (column, row) offsets (c, r) mm and depth d mm towards the detector appears at
    ``(c, r) * SDD / (SAD + d)`` mm from the detector centre. Frontal: column -x, row -z, depth +y (the
    source is posterior); lateral: column -y, row -z, depth -x (the source on the patient's right).
    Tolerance 0.25 mm on the detector (0.125 px)."""
    x, y, z = 30.0, 20.0, 16.0
    v, s = _sphere_volume((x, y, z))
    g = drr.Geometry(detector_mm=300.0)
    size = 150
    image = drr.radiograph(v, (s, s, s), angle, size=size, geometry=g)
    col_mm, row_mm, depth = (-x, -z, y) if angle == 0 else (-y, -z, -x)
    m = g.source_detector_mm / (g.source_axis_mm + depth)
    pitch = g.detector_mm / size
    row, col = _centroid(image)
    assert abs((row + 0.5 - size / 2) * pitch - row_mm * m) < 0.25
    assert abs((col + 0.5 - size / 2) * pitch - col_mm * m) < 0.25
    # and not the parallel position, nor the axis magnification: the test can tell them apart
    assert abs((col + 0.5 - size / 2) * pitch - col_mm * g.magnification) > 1.0


def test_the_parallel_beam_is_unchanged():
    """The parallel path against an independent numpy sum, and against checksums of its output computed with
    the code as it was before the cone beam was added (``drr.radiograph(v, (2.0, 2.0, 3.0), angle,
    size=32)`` for the volume below, sha256 of the float32 bytes; this machine's numpy/scipy)."""
    v = np.random.default_rng(0).uniform(-1000, 1500, (20, 24, 18)).astype(np.float32)
    mu = np.clip(0.02 * (1.0 + v / 1000.0), 0.0, None)
    p = (mu.sum(axis=1) * 2.0)[::-1, ::-1].T  # rows S->I, columns patient right -> left
    fov = max(p.shape[0] * 3.0, p.shape[1] * 2.0)
    pad_h, pad_w = int(round((fov - p.shape[0] * 3.0) / 3.0 / 2)), int(round((fov - p.shape[1] * 2.0) / 2.0 / 2))
    expected = (np.pad(p, ((pad_h, pad_h), (pad_w, pad_w))) / drr.P_REF).astype(np.float32)
    np.testing.assert_allclose(drr.radiograph(v, (2.0, 2.0, 3.0), 0.0), expected, rtol=1e-6)
    np.testing.assert_array_equal(drr.radiograph(v, (2.0, 2.0, 3.0), 0.0, geometry=None), drr.radiograph(v, (2.0, 2.0, 3.0)))
    before = {0.0: "97b76d83ac0594dc41fc67503c813a55108d7276e150de53eee407484b8aab3b",
              90.0: "681769ab347c5326a7d460001f7ded96a3094e70d288b9b5205a31844791ff44",
              30.0: "d3b84be386fa8c41d743c794ad6863c8a5963cc6a291d62f584664e1260b3fbc"}
    for angle, digest in before.items():
        assert hashlib.sha256(drr.radiograph(v, (2.0, 2.0, 3.0), angle, size=32).tobytes()).hexdigest() == digest
    assert drr.parameters() == {"model": "parallel-beam Beer-Lambert", "mu_water_per_mm": 0.02, "p_ref": 8.0,
                                "mu": "mu_water * (1 + HU/1000), clipped at 0", "image": "line integral / p_ref"}


def test_geometry_parameters_round_trip_and_bad_geometry():
    g = drr.Geometry(source_axis_mm=500.0, source_detector_mm=1000.0, detector_mm=400.0)
    params = json.loads(json.dumps(drr.parameters(g)))
    assert drr.Geometry(**params["geometry"]) == g and params["model"].startswith("cone-beam")
    assert params["field_at_axis_mm"] == pytest.approx(200.0) == drr.field_at_axis_mm(g)
    assert drr.parameters(g) != drr.parameters(drr.Geometry())  # distinct cache keys
    assert drr.field_at_axis_mm(drr.Geometry()) == pytest.approx(320.0)  # the default covers 320 mm at the axis
    with pytest.raises(ValueError, match="source_axis_mm"):
        drr.Geometry(source_axis_mm=1000.0, source_detector_mm=900.0)
    with pytest.raises(ValueError, match="detector_mm"):
        drr.Geometry(detector_mm=0.0)
    image = drr.radiograph(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0), 0.0, geometry=g)
    assert image.shape == (320, 320) and image.dtype == np.float32  # default detector pixels
