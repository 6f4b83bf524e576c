"""lib.data.transforms: CT windows, isotropic resampling, crop/pad; each checked against an
independent implementation (pydicom's DICOM VOI LUT, MONAI's intensity scaling, ``Spacing`` and
``ResizeWithPadOrCrop``, nibabel's ``resample_to_output``) or an exact analytic answer."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, ScaleIntensityRange, Spacing

from lib.data.io import Volume, load_volume
from lib.data.transforms import (WINDOWS, crop_or_pad, ct_windows, random_crop, resample_isotropic, window)

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
HU = np.linspace(-1500, 3500, 5001, dtype=np.float32)  # 1 HU steps over everything a CT holds


def _oblique_affine(zooms=(0.8, 1.3, 2.5), angles=(10.0, -7.0, 20.0), origin=(1.0, 2.0, 3.0)):
    from scipy.spatial.transform import Rotation

    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


# --------------------------------------------------------------------------- windows

def test_named_windows():
    assert WINDOWS["brain"] == (40, 80) and WINDOWS["subdural"] == (80, 200)
    assert WINDOWS["bone"] == (600, 2800) and WINDOWS["diffusion"] == (200, 1800)


@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_window_equals_dicom_linear_exact_voi_lut(name):
    """DICOM PS3.3 C.11.2.1.3.2 (LINEAR_EXACT), as pydicom implements it, scaled to 16 bits."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    centre, width = WINDOWS[name]
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 16, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = centre, width, "LINEAR_EXACT"
    ref = apply_windowing(HU.astype(np.float64), ds) / 65535.0
    out = window(HU, centre, width)
    assert out.dtype == np.float32 and out.shape == HU.shape
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("out_range", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)])
def test_window_equals_monai_scale_intensity_range(out_range):
    centre, width = WINDOWS["subdural"]
    ref = ScaleIntensityRange(a_min=centre - width / 2, a_max=centre + width / 2, b_min=out_range[0],
                              b_max=out_range[1], clip=True)(HU)
    np.testing.assert_allclose(window(HU, centre, width, out_range), np.asarray(ref), rtol=1e-6, atol=1e-4)


def test_ct_windows_stack_brain_subdural_bone_as_channels():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100, 3000, size=(6, 7, 8)).astype(np.float32)
    out = ct_windows(hu)
    assert out.shape == (3, 6, 7, 8) and out.dtype == np.float32
    for c, name in enumerate(("brain", "subdural", "bone")):
        np.testing.assert_array_equal(out[c], window(hu, *WINDOWS[name]))
    np.testing.assert_array_equal(ct_windows(hu[None]), out)  # a 1-channel [1, D, H, W] input
    # acute blood (~60 HU): light grey in the brain window, darker in subdural, dark in bone
    b = ct_windows(np.array([60.0], np.float32))[:, 0]
    np.testing.assert_allclose(b, [(60 - 0) / 80, (60 - (-20)) / 200, (60 - (-800)) / 2800], rtol=1e-6)


def test_ct_windows_of_a_volume_keeps_its_geometry():
    vol = Volume(np.full((1, 3, 4, 5), 40.0, np.float32), _oblique_affine())
    out = ct_windows(vol, names=("brain", "diffusion"))
    assert isinstance(out, Volume) and out.array.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(out.affine, vol.affine)
    np.testing.assert_allclose(out.array[:, 0, 0, 0], [0.5, (40 - (200 - 900)) / 1800])


@pytest.mark.parametrize("call, match", [
    (lambda: window(HU, 40, 0), "width must be a positive"),
    (lambda: window(HU, np.nan, 80), "centre must be finite"),
    (lambda: ct_windows(HU, names=("brain", "liverish")), r"unknown window name\(s\) \['liverish'\]"),
    (lambda: ct_windows(np.zeros((3, 4, 4, 4))), "needs one HU channel"),
    (lambda: ct_windows(Volume(np.zeros((3, 2, 2, 2)), np.eye(4))), "1-channel CT volume"),
])
def test_window_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- resampling

def _linear_field(affine, shape, coef=(0.7, -1.3, 2.1), const=5.0):
    """f(world) = coef . world + const sampled on a grid: trilinear interpolation reproduces it exactly."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (nib.affines.apply_affine(affine, ijk) @ np.array(coef) + const).astype(np.float32)


@pytest.mark.parametrize("affine", [np.diag([0.8, 1.3, 2.5, 1.0]), _oblique_affine()], ids=["aligned", "oblique"])
def test_resampling_preserves_world_coordinates(affine):
    shape = (20, 15, 9)
    vol = Volume(np.stack([_linear_field(affine, shape), -_linear_field(affine, shape)]), affine)
    out = resample_isotropic(vol)  # 1 mm
    np.testing.assert_allclose(out.spacing, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(out.affine[:, 3], affine[:, 3])  # first voxel centre stays put
    for a, b in zip(np.linalg.qr(out.affine[:3, :3])[0].T, np.linalg.qr(affine[:3, :3])[0].T):
        assert abs(abs(a @ b) - 1) < 1e-9  # same axis directions
    # the extent: as many 1 mm steps as fit between the first and last input voxel centres
    assert out.spatial_shape == tuple(int(np.floor((n - 1) * z + 1e-6)) + 1
                                      for n, z in zip(shape, nib.affines.voxel_sizes(affine)))
    expected = _linear_field(out.affine, out.spatial_shape)
    np.testing.assert_allclose(out.array[0], expected, atol=2e-4)
    np.testing.assert_allclose(out.array[1], -expected, atol=2e-4)


@pytest.mark.parametrize("affine", [np.diag([0.8, 1.3, 2.5, 1.0]), _oblique_affine()], ids=["aligned", "oblique"])
def test_resampling_matches_monai_spacing(affine):
    rng = np.random.default_rng(0)
    arr = rng.random((2, 10, 12, 7)).astype(np.float32)
    out = resample_isotropic(Volume(arr, affine), spacing=1.0, order=1)
    ref = Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear", padding_mode="border", align_corners=True)(
        MetaTensor(torch.from_numpy(arr), affine=torch.from_numpy(affine)))
    np.testing.assert_allclose(out.affine, ref.affine.numpy(), atol=1e-9)
    assert out.array.shape == tuple(ref.shape)
    np.testing.assert_allclose(out.array, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("name, spacing", [("anatomical.nii", 1.5), ("functional.nii", 1.0)])
def test_resampling_matches_nibabel_resample_to_output_on_real_data(name, spacing):
    """Axis-aligned volumes (LAS on disk: 2 mm; 4 x 4 x 8 mm with 20 frames as channels)."""
    import nibabel.processing

    vol = load_volume(NIB_DATA / name, channels=None)
    out = resample_isotropic(vol, spacing=spacing, order=1)
    for c in range(vol.n_channels):
        ref = nibabel.processing.resample_to_output(nib.Nifti1Image(vol.array[c], vol.affine),
                                                    voxel_sizes=spacing, order=1)
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-9)
        # resample_to_output may add one voxel past the last input voxel centre (filled with 0); we stop there
        assert all(0 <= b - a <= 1 for a, b in zip(out.spatial_shape, ref.shape))
        common = tuple(slice(0, n) for n in out.spatial_shape)
        np.testing.assert_allclose(out.array[c], ref.get_fdata()[common], rtol=1e-5, atol=1e-3)


def test_nearest_resampling_keeps_labels():
    labels = np.random.default_rng(2).integers(0, 4, size=(1, 9, 9, 5)).astype(np.float32)
    out = resample_isotropic(Volume(labels, np.diag([1.0, 1.0, 3.0, 1.0])), order=0)
    assert set(np.unique(out.array)) <= set(np.unique(labels))
    np.testing.assert_array_equal(out.array[:, :, :, ::3], labels)  # every third 1 mm slice is an original one


@pytest.mark.parametrize("kwargs, match", [(dict(spacing=0), "spacing must be a positive"),
                                           (dict(order=7), "spline order 0-5")])
def test_resampling_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resample_isotropic(Volume(np.zeros((1, 3, 3, 3)), np.eye(4)), **kwargs)


# --------------------------------------------------------------------------- crop / pad

@pytest.mark.parametrize("size", [(4, 6, 5), (7, 7, 7), (3, 9, 2), (10, 4, 8), (5, 6, 7), (4, 5, 6), (2, 3, 3)])
def test_crop_or_pad_matches_monai(size):
    arr = np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32)
    out = crop_or_pad(arr, size, value=-3.0)
    ref = ResizeWithPadOrCrop(size, method="symmetric", mode="constant", value=-3.0)(arr)
    assert out.shape == (2, *size)
    np.testing.assert_array_equal(out, np.asarray(ref))


def test_crop_or_pad_volume_keeps_world_positions_and_min_padding():
    rng = np.random.default_rng(1)
    vol = Volume(rng.normal(size=(1, 6, 9, 4)).astype(np.float32) - 1000, _oblique_affine())
    out = crop_or_pad(vol, (8, 5, 4), value="min")
    assert out.array.shape == (1, 8, 5, 4)
    lo = vol.array.min()
    assert np.all(out.array[:, 0] == lo) and np.all(out.array[:, -1] == lo)  # padded first axis (6 -> 8)
    ijk = np.argwhere(np.ones((6, 5, 4), bool)) + [1, 0, 0]  # every kept voxel
    src = np.rint(nib.affines.apply_affine(np.linalg.inv(vol.affine), nib.affines.apply_affine(out.affine, ijk)))
    assert src.min() >= 0 and np.all(src.max(0) < vol.spatial_shape)
    np.testing.assert_array_equal(out.array[0][tuple(ijk.T)], vol.array[0][tuple(src.astype(int).T)])


def test_random_crop_is_seeded_and_in_place():
    arr = np.arange(1 * 10 * 12 * 8, dtype=np.float32).reshape(1, 10, 12, 8)
    a, b = random_crop(arr, (4, 5, 6), rng=7), random_crop(arr, (4, 5, 6), rng=7)
    np.testing.assert_array_equal(a, b)
    crops = {random_crop(arr, (4, 5, 6), rng=s)[0, 0, 0, 0] for s in range(20)}
    assert len(crops) > 5  # different seeds, different positions
    i, j, k = np.unravel_index(int(a[0, 0, 0, 0]), arr.shape[1:])
    np.testing.assert_array_equal(a, arr[:, i:i + 4, j:j + 5, k:k + 6])
    vol = Volume(arr, _oblique_affine())
    vc = random_crop(vol, (4, 5, 6), rng=np.random.default_rng(7))
    np.testing.assert_array_equal(vc.array, a)
    np.testing.assert_allclose(vc.affine[:3, 3], nib.affines.apply_affine(vol.affine, [i, j, k]))
    # an axis shorter than the crop is padded, centred, and every kept voxel keeps its world position
    padded = random_crop(vol, (12, 5, 6), rng=0, value=-1.0)
    assert padded.array.shape == (1, 12, 5, 6)
    assert np.all(padded.array[:, [0, -1]] == -1.0) and np.all(padded.array[:, 1:-1] >= 0)
    ijk = np.argwhere(padded.array[0] >= 0)
    src = np.rint(nib.affines.apply_affine(np.linalg.inv(vol.affine), nib.affines.apply_affine(padded.affine, ijk)))
    np.testing.assert_array_equal(padded.array[0][tuple(ijk.T)], arr[0][tuple(src.astype(int).T)])


def test_crop_or_pad_errors():
    with pytest.raises(ValueError, match="needs 3"):
        crop_or_pad(np.zeros((1, 4, 4, 4)), (4, 4))
    with pytest.raises(ValueError, match="must be positive"):
        crop_or_pad(np.zeros((1, 4, 4, 4)), (4, 0, 4))
