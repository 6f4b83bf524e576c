"""lib.data.io: loading to channel-first RAS, saving NIfTI, and a clear error for every bad file.

Real material: nibabel's own test data (``nibabel/tests/data``). Bad variants are written into
``tmp_path`` from those files (truncated, garbage, patched headers), nothing binary is committed.
"""

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.data.io import MAX_VOXELS, Volume, VolumeError, as_ras, load_volume, save_volume

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"

# Every 3D-or-more spatial image of nibabel's test data that nibabel itself can read here
# (MINC2 needs h5py, which is not installed; the PAR files without their REC are headers only).
NIB_VOLUMES = ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii",
               "reoriented_anat_moved.nii", "standard.nii.gz", "test.mgz", "tiny.mnc", "minc1_1_scale.mnc",
               "minc1-no-att.mnc", "example4d+orig.HEAD", "scaled+tlrc.HEAD", "phantom_EPI_asc_CLEAR_2_1.PAR"]


def _oblique_affine(zooms=(0.9, 1.1, 2.5), angles=(12.0, -8.0, 25.0), origin=(-40.0, 12.5, 7.0)):
    from scipy.spatial.transform import Rotation

    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def _world(affine, ijk):
    return nib.affines.apply_affine(affine, np.asarray(ijk, dtype=float))


# --------------------------------------------------------------------------- real files

@pytest.mark.parametrize("name", NIB_VOLUMES)
def test_nibabel_test_volumes_load_as_nibabel_canonical(name):
    path = NIB_DATA / name
    img = nib.load(path)
    vol = load_volume(path, channels=None)
    canon = nib.as_closest_canonical(img)
    ref = np.asarray(canon.get_fdata(), dtype=np.float32)
    ref = np.moveaxis(ref.reshape(ref.shape[:3] + (-1,)), -1, 0)

    assert vol.array.dtype == np.float32 and vol.array.ndim == 4
    np.testing.assert_array_equal(vol.array, ref)
    np.testing.assert_allclose(vol.affine, canon.affine, atol=1e-9)
    assert vol.orientation == "".join(nib.aff2axcodes(canon.affine)) == "RAS"
    assert vol.source_orientation == "".join(nib.aff2axcodes(img.affine))
    np.testing.assert_allclose(vol.spacing, nib.affines.voxel_sizes(canon.affine))


@pytest.mark.parametrize("name", ["anatomical.nii", "test.mgz", "example4d+orig.HEAD"])  # LAS, SAR, LPS on disk
def test_every_voxel_keeps_its_world_position(name):
    """Independent of nibabel's canonical form: map each loaded voxel back through the original affine."""
    img = nib.load(NIB_DATA / name)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    data = data.reshape(data.shape[:3] + (-1,))
    vol = load_volume(NIB_DATA / name, channels=None)
    assert vol.source_orientation != "RAS"
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in vol.spatial_shape], indexing="ij"), -1).reshape(-1, 3)
    src = np.rint(_world(np.linalg.inv(img.affine), _world(vol.affine, ijk))).astype(int)
    np.testing.assert_allclose(_world(img.affine, src), _world(vol.affine, ijk), atol=1e-6)
    for c in range(vol.n_channels):
        np.testing.assert_array_equal(vol.array[c][tuple(ijk.T)], data[..., c][tuple(src.T)])


@pytest.mark.parametrize("layout", ["DHW3", "DHW13"])
def test_three_channel_ct_layouts_become_channel_first(tmp_path, layout):
    rng = np.random.default_rng(1)
    chans = rng.normal(size=(3, 6, 7, 5)).astype(np.float32)  # [C, X, Y, Z], distinct per channel
    data = np.moveaxis(chans, 0, -1)
    if layout == "DHW13":
        data = data[:, :, :, None, :]
    las = np.diag([-2.0, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, las), tmp_path / "ct.nii.gz")
    vol = load_volume(tmp_path / "ct.nii.gz")
    assert vol.array.shape == (3, 6, 7, 5) and vol.source_orientation == "LAS" and vol.orientation == "RAS"
    np.testing.assert_array_equal(vol.array, chans[:, ::-1])  # L->R flips the first axis; channel order kept
    np.testing.assert_allclose(vol.spacing, (2.0, 1.5, 3.0))


def test_as_ras_only_permutes_and_flips():
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    aff = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, -1.0, 0, 7], [0, 0, 0, 1]])  # axes A, I, L
    out, out_aff = as_ras(arr, aff)
    assert "".join(nib.aff2axcodes(aff)) == "AIL" and "".join(nib.aff2axcodes(out_aff)) == "RAS"
    assert out.shape == (2, 5, 3, 4)
    ijk = np.argwhere(np.ones(out.shape[1:], bool))
    src = np.rint(_world(np.linalg.inv(aff), _world(out_aff, ijk))).astype(int)
    np.testing.assert_array_equal(out[1][tuple(ijk.T)], arr[1][tuple(src.T)])


# --------------------------------------------------------------------------- saving

@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("n_channels", [1, 3])
def test_save_load_round_trip_keeps_array_and_world(tmp_path, suffix, n_channels):
    rng = np.random.default_rng(n_channels)
    vol = Volume(rng.normal(size=(n_channels, 9, 8, 7)).astype(np.float32), _oblique_affine())
    out = save_volume(vol, tmp_path / f"v{suffix}")
    assert out == tmp_path / f"v{suffix}" and sorted(os.listdir(tmp_path)) == [f"v{suffix}"]  # no temp left

    img = nib.load(out)
    hdr = img.header
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-6)
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    if n_channels == 1:
        assert img.shape == (9, 8, 7)
    else:
        assert img.shape == (9, 8, 7, 1, 3) and hdr.get_intent()[0] == "vector"
    back = load_volume(out)
    np.testing.assert_array_equal(back.array, as_ras(vol.array, vol.affine)[0])
    ijk = np.array([[0, 0, 0], [8, 7, 6], [3, 2, 5]])
    # the value at a world point is the same before and after the round trip
    for c in range(n_channels):
        back_ijk = np.rint(_world(np.linalg.inv(back.affine), _world(vol.affine, ijk))).astype(int)
        np.testing.assert_array_equal(back.array[c][tuple(back_ijk.T)], vol.array[c][tuple(ijk.T)])


def test_saving_is_deterministic_and_keeps_label_dtype(tmp_path):
    labels = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3).astype(np.uint8)
    a = save_volume(labels, tmp_path / "a.nii.gz")
    b = save_volume(labels, tmp_path / "b.nii.gz")
    assert a.read_bytes() == b.read_bytes()  # no gzip timestamp
    img = nib.load(a)
    assert img.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(img.dataobj), labels)
    np.testing.assert_array_equal(img.affine, np.eye(4))
    argmax = save_volume(labels.astype(np.int64), tmp_path / "c.nii")  # int64 (argmax output) -> int32
    assert nib.load(argmax).get_data_dtype() == np.int32 and np.array_equal(nib.load(argmax).dataobj, labels)
    assert gzip.decompress(a.read_bytes())[344:348] == b"n+1\x00"  # a single-file NIfTI-1


@pytest.mark.parametrize("bad, match", [
    (dict(name="v.nrrd"), "must end in .nii or .nii.gz"),
    (dict(array=np.full((1, 3, 3, 3), np.nan, np.float32)), "27 non-finite"),
    (dict(array=np.zeros((1, 0, 3, 3), np.float32)), "empty array"),
    (dict(array=np.zeros((1, 1, 3, 3, 3), np.float32)), r"expected an array \[C, D, H, W\]"),
    (dict(affine=np.diag([1.0, 0.0, 1.0, 1.0])), "degenerate affine"),
])
def test_save_rejects_bad_input(tmp_path, bad, match):
    array = bad.get("array", np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match=match) as err:
        save_volume(array, tmp_path / bad.get("name", "v.nii"), affine=bad.get("affine"))
    assert bad.get("name", "v.nii") in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


# --------------------------------------------------------------------------- the bad-input corpus

def _patched_header(src: Path, dst: Path, **fields) -> Path:
    """Copy ``src`` (an uncompressed NIfTI-1) with header fields replaced; voxel data untouched."""
    raw = bytearray(src.read_bytes())
    with open(src, "rb") as f:
        hdr = nib.Nifti1Header.from_fileobj(f)
    for key, value in fields.items():
        hdr[key] = value
    raw[:348] = hdr.binaryblock
    dst.write_bytes(bytes(raw))
    return dst


def _truncated_gz(tmp):
    src = (NIB_DATA / "example4d.nii.gz").read_bytes()
    (tmp / "trunc.nii.gz").write_bytes(src[: len(src) // 2])
    return tmp / "trunc.nii.gz", dict(channels=None), "voxel data unreadable: truncated or damaged"


def _truncated_gz_header(tmp):
    (tmp / "stub.nii.gz").write_bytes((NIB_DATA / "example4d.nii.gz").read_bytes()[:100])
    return tmp / "stub.nii.gz", {}, "unreadable: truncated or damaged gzip: the compressed stream ends early"


def _truncated_nii(tmp):
    src = (NIB_DATA / "anatomical.nii").read_bytes()
    (tmp / "trunc.nii").write_bytes(src[: len(src) // 2])
    return tmp / "trunc.nii", {}, r"truncated: the header needs 67,650 bytes .* the file has 34,001"


def _garbage_nii(tmp):
    (tmp / "garbage.nii").write_bytes(np.random.default_rng(0).bytes(4000))
    return tmp / "garbage.nii", {}, "unreadable: not an image nibabel can open"


def _garbage_gz(tmp):
    (tmp / "garbage.nii.gz").write_bytes(np.random.default_rng(1).bytes(4000))
    return tmp / "garbage.nii.gz", {}, "unreadable: .*not a gzip file"


def _zero_bytes(tmp):
    (tmp / "zero.nii").write_bytes(b"")
    return tmp / "zero.nii", {}, r"empty file \(0 bytes\)"


def _nan_real(tmp):  # nibabel ships a resampled image with NaN outside the field of view
    data = nib.load(NIB_DATA / "resampled_anat_moved.nii").get_fdata()
    n = int(np.isnan(data).sum())
    assert n > 0
    return NIB_DATA / "resampled_anat_moved.nii", {}, rf"{n:,} of {data.size:,} voxels are not finite \({n:,} NaN, 0"


def _inf_and_nan(tmp):
    data = nib.load(NIB_DATA / "anatomical.nii").get_fdata().astype(np.float32)
    data[0, 0, :5] = np.inf
    data[1, 2, :3] = -np.inf
    data[4, 4, 4] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp / "inf.nii.gz")
    return tmp / "inf.nii.gz", {}, rf"9 of {data.size:,} voxels are not finite \(1 NaN, 8 \+/-Inf\)"


def _two_channels(tmp):
    return NIB_DATA / "example4d.nii.gz", {}, r"2 channels \(shape \(128, 96, 24, 2\)\); allowed channel counts: 1, 3"


def _four_channels(tmp):
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 1, 4), np.float32), np.eye(4)), tmp / "c4.nii")
    return tmp / "c4.nii", dict(channels=(3,)), r"4 channels .*allowed channel counts: 3"


def _two_extra_axes(tmp):
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 2, 3), np.float32), np.eye(4)), tmp / "tc.nii")
    return tmp / "tc.nii", dict(channels=None), r"several non-spatial axes longer than 1 \(\[2, 3\]\)"


def _two_d(tmp):
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), tmp / "slice.nii")
    return tmp / "slice.nii", {}, r"2D image \(shape \(32, 32\)\) where a 3D volume is needed"


def _single_slice(tmp):
    data = nib.load(NIB_DATA / "anatomical.nii").get_fdata()[:, :, 12:13].astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp / "one_slice.nii.gz")
    return tmp / "one_slice.nii.gz", {}, r"2D image \(shape \(33, 41, 1\)\)"


def _absurd_dims(tmp):
    path = _patched_header(NIB_DATA / "anatomical.nii", tmp / "huge.nii", dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    return path, {}, r"header claims shape \(30000, 30000, 30000\) = 27,000,000,000,000 voxels .*max_voxels"


def _just_over_max_voxels(tmp):  # the ceiling is a parameter, checked before decoding
    return NIB_DATA / "anatomical.nii", dict(max_voxels=33 * 41 * 25 - 1), "more than max_voxels=33,824"


def _zero_dim(tmp):
    path = _patched_header(NIB_DATA / "anatomical.nii", tmp / "empty.nii", dim=[3, 33, 0, 25, 1, 1, 1, 1])
    return path, {}, r"empty image: shape \(33, 0, 25\) has a zero-length axis"


def _negative_dim(tmp):
    path = _patched_header(NIB_DATA / "anatomical.nii", tmp / "neg.nii", dim=[3, -33, 41, 25, 1, 1, 1, 1])
    return path, {}, r"invalid header: negative dimension in shape \(-33, 41, 25\)"


def _degenerate_affine(tmp):
    path = _patched_header(NIB_DATA / "anatomical.nii", tmp / "flat.nii", srow_y=[0.0, 0.0, 0.0, -20.0])
    return path, {}, "degenerate affine"


def _rgb(tmp):
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp / "rgb.nii")
    return tmp / "rgb.nii", {}, r"voxel type .* is not supported"


def _cifti(tmp):
    return NIB_DATA / "row_major.dconn.nii", {}, "Cifti2Image is not a spatial image"


def _minc_time_first(tmp):
    return NIB_DATA / "minc1_4d.mnc", dict(channels=None), "nibabel cannot tell which axes are spatial"


def _folder(tmp):
    (tmp / "series").mkdir()
    return tmp / "series", {}, "is a folder, not an image file"


def _dicom(tmp):
    import pydicom.data

    return (Path(pydicom.data.get_testdata_file("CT_small.dcm")), {},
            "unreadable: not an image nibabel can open.*it is a DICOM file: use lib.data.dicom.read_series")


BAD = [_truncated_gz, _truncated_gz_header, _truncated_nii, _garbage_nii, _garbage_gz, _zero_bytes, _nan_real,
       _inf_and_nan, _two_channels, _four_channels, _two_extra_axes, _two_d, _single_slice, _absurd_dims,
       _just_over_max_voxels, _zero_dim, _negative_dim, _degenerate_affine, _rgb, _cifti, _minc_time_first,
       _folder, _dicom]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_gets_a_clear_error_naming_the_file(tmp_path, make):
    path, kwargs, match = make(tmp_path)
    with pytest.raises(VolumeError, match=match) as err:
        load_volume(path, **kwargs)
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(str(path)) and err.value.path == path


def test_header_checks_come_before_decoding(tmp_path, monkeypatch):
    """An absurd header must fail without touching voxel data (which would try to allocate it)."""
    path, kwargs, match = _absurd_dims(tmp_path)

    def boom(*a, **k):
        raise AssertionError("voxel data was decoded")

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", boom)
    with pytest.raises(VolumeError, match=match):
        load_volume(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_volume(tmp_path / "nope.nii.gz")


def test_allow_2d_loads_a_single_slice_as_a_one_slice_volume(tmp_path):
    path, _, _ = _single_slice(tmp_path)
    vol = load_volume(path, allow_2d=True)
    assert vol.array.shape == (1, 33, 41, 1)
    path2, _, _ = _two_d(tmp_path)
    assert load_volume(path2, allow_2d=True).array.shape == (1, 32, 32, 1)


def test_default_ceiling_is_two_gib_of_float32():
    assert MAX_VOXELS * 4 == 2**31


def test_volume_validates_its_fields():
    with pytest.raises(ValueError, match=r"\[C, D, H, W\]"):
        Volume(np.zeros((3, 3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        Volume(np.zeros((1, 3, 3, 3)), np.eye(3))
    vol = Volume(np.zeros((1, 2, 2, 2), np.float64), np.diag([-1.0, 2.0, 3.0, 1.0]))
    assert vol.array.dtype == np.float32 and vol.orientation == "LAS" and vol.spacing == (1.0, 2.0, 3.0)
