"""lib.data.registration: the RAS <-> SimpleITK conventions, written once and checked here, and the rigid
registration of the Coltea fixture's phases (known motion) recovered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lib.data import fixtures
from lib.data import registration as reg
from lib.data.phantoms import Grid, chest_phantom, sample_chest

ANGLE_TOL_DEG, SHIFT_TOL_MM = 0.5, 1.0


def _oblique_affine() -> np.ndarray:
    """A voxel -> RAS affine with flipped, permuted, anisotropic and slightly rotated axes."""
    a = np.zeros((4, 4))
    a[:3, :3] = reg.rotation_matrix((4.0, -3.0, 10.0)) @ np.array([[0, 0, -2.5], [-1.5, 0, 0], [0, 3.0, 0]])
    a[:3, 3], a[3, 3] = (30.0, -12.0, 7.5), 1.0
    return a


def test_sitk_round_trip_and_physical_points_follow_the_affine():
    rng = np.random.default_rng(0)
    array, affine = rng.normal(size=(5, 6, 7)).astype(np.float32), _oblique_affine()
    image = reg.to_sitk(array, affine)
    assert image.GetSize() == (5, 6, 7)  # (x, y, z) = (i, j, k)
    back, back_affine = reg.from_sitk(image)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine, atol=1e-9)
    for ijk in [(0, 0, 0), (4, 1, 3), (2, 5, 6)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = (affine @ [*ijk, 1.0])[:3]
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
        assert image.GetPixel(*ijk) == pytest.approx(float(array[ijk]))


def test_rotation_matrix_and_euler_angles_invert_each_other():
    for angles in [(0.0, 0.0, 0.0), (2.5, -1.0, 3.0), (-20.0, 35.0, 80.0)]:
        m = reg.rotation_matrix(angles)
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(reg.euler_angles(m), angles, atol=1e-9)
    # right-handed about S: +90 degrees takes R onto A
    np.testing.assert_allclose(reg.rotation_matrix((0, 0, 90)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    m = reg.rigid_matrix((0, 0, 90), (1.0, 2.0, 3.0), center_mm=(10.0, 0.0, 0.0))
    np.testing.assert_allclose(m @ [10.0, 0, 0, 1], [11.0, 2.0, 3.0, 1], atol=1e-12)  # the centre only moves by t


def test_resample_agrees_with_scipy_through_the_ras_matrix():
    """The ITK path (RAS matrix -> LPS transform) against plain numpy in RAS: u = A_m^-1 T A_f v."""
    rng = np.random.default_rng(1)
    moving = ndimage.gaussian_filter(rng.normal(size=(24, 20, 16)), 2).astype(np.float32) * 100
    m_affine, f_affine = _oblique_affine(), np.diag([2.0, 2.0, 3.0, 1.0])
    centre = (m_affine @ [11.5, 9.5, 7.5, 1.0])[:3]  # the fixed grid around the moving image's centre
    f_affine[:3, 3] = centre - np.array([21, 19, 11]) / 2 * [2.0, 2.0, 3.0]
    matrix = reg.rigid_matrix((3.0, -2.0, 5.0), (1.5, -2.0, 0.7), center_mm=(0.0, 0.0, 5.0))
    ours, inside = reg.resample((moving, m_affine), ((22, 20, 12), f_affine), matrix, cval=-1024)
    m = np.linalg.inv(m_affine) @ matrix @ f_affine
    theirs = ndimage.affine_transform(moving, m[:3, :3], m[:3, 3], output_shape=(22, 20, 12), order=1, cval=-1024)
    assert inside.mean() > 0.3
    core = ndimage.binary_erosion(inside, iterations=1)
    np.testing.assert_allclose(ours[core], theirs[core], atol=1e-2)
    assert np.all(ours[~inside] == -1024)


def _phantom(shift_r_mm: float = 0.0) -> np.ndarray:
    """A noise-free chest phantom whose anatomy is moved ``shift_r_mm`` towards the patient's right."""
    anat = sample_chest(np.random.default_rng(3))
    return chest_phantom(anat, Grid((48, 40, 30), (7.0, 7.0, 7.0), (-shift_r_mm, 0.0, 0.0)), contrast=False)["hu"]


def test_a_shift_towards_the_right_comes_out_as_plus_r():
    affine = Grid((48, 40, 30), (7.0, 7.0, 7.0)).affine
    fixed, moving = _phantom(), _phantom(shift_r_mm=6.0)
    result = reg.rigid((fixed, affine), (moving, affine))
    np.testing.assert_allclose(result.translation_mm, (6.0, 0.0, 0.0), atol=0.5)
    np.testing.assert_allclose(result.rotation_deg, (0.0, 0.0, 0.0), atol=0.3)
    # the same moving image stored with its first two axes reversed (as an LPS-ordered array would be)
    flipped = affine @ np.array([[-1, 0, 0, 47], [0, -1, 0, 39], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    again = reg.rigid((fixed, affine), (moving[::-1, ::-1].copy(), flipped))
    np.testing.assert_allclose(again.translation_mm, result.translation_mm, atol=0.2)
    assert result.mae_after < 0.5 * result.mae_before


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("coltea_raw")
    return out, fixtures.write("coltea_lung_ct_100w", out)


def _true_at(facts_phase: dict, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's true motion as (angles, translation about ``center``)."""
    true = np.asarray(facts_phase["matrix"])
    return np.asarray(reg.euler_angles(true)), true[:3, :3] @ center + true[:3, 3] - center


def test_the_fixtures_known_motion_is_recovered_and_the_residual_drops(raw):
    from lib.data.dicom_lenient import assemble

    out, facts = raw
    patient = "AB01022021"
    folder = Path(out) / facts["root"] / patient
    native = assemble(folder / "NATIVE" / "DICOM")
    for phase in ("arterial", "venous"):
        series = assemble(folder / phase.upper() / "DICOM")
        assert series.array.shape[-1] != native.array.shape[-1] or phase == "venous"  # other slice counts
        result = reg.rigid((native.array[0], native.affine), (series.array[0], series.affine))
        angles, shift = _true_at(facts["patients"][patient]["phases"][phase], np.asarray(result.center_mm))
        assert np.abs(np.asarray(result.rotation_deg) - angles).max() < ANGLE_TOL_DEG, (phase, result, angles)
        assert np.abs(np.asarray(result.translation_mm) - shift).max() < SHIFT_TOL_MM, (phase, result, shift)
        assert result.mae_after < 0.5 * result.mae_before
        assert result.resampled.shape == native.array.shape[1:] and 0.8 < result.overlap <= 1.0
        assert result.metric < 0 and result.seconds < 10
        twice = reg.rigid((native.array[0], native.affine), (series.array[0], series.affine))
        np.testing.assert_allclose(twice.rotation_deg, result.rotation_deg, atol=1e-4)  # seeded: threads' sums aside,
        np.testing.assert_allclose(twice.translation_mm, result.translation_mm, atol=1e-4)  # the same result


def test_rigid_refuses_an_unknown_initialiser():
    with pytest.raises(ValueError, match="init"):
        reg.rigid((np.zeros((4, 4, 4)), np.eye(4)), (np.zeros((4, 4, 4)), np.eye(4)), init="moments")
