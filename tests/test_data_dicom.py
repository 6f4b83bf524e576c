"""lib.data.dicom: DICOM series -> RAS volume in HU, checked against the DICOM geometry formula.

Real material: pydicom's ``CT_small.dcm``, ``MR_small*.dcm``, ``MR_truncated.dcm`` and pydicom-data's
``693_*`` CT, ``MR2_UNCR`` (oblique), ``eCT_Supplemental`` (enhanced multi-frame CT), ``emri_small``
(multi-frame without geometry), ``SC_rgb``. Series are assembled in ``tmp_path`` by copying one
file and editing ImagePositionPatient, InstanceNumber, the UIDs and the pixels (a per-slice offset,
so that a wrong sort shows).
"""

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from lib.data.dicom import DicomSeriesError, read_series, series_to_nifti
from lib.data.io import load_volume

MARK = 37  # raw-value offset added to slice k of an assembled series


def _read(name):
    return pydicom.dcmread(get_testdata_file(name))


def write_series(folder: Path, name="CT_small.dcm", offsets=(0, 2.5, 5, 7.5, 10, 12.5), *, orientation=None,
                 tilt=0.0, edit=None, seed=0) -> list[Path]:
    """Copies of one file placed ``offsets`` mm along the slice normal (plus ``tilt`` x offset along the
    row direction, a gantry tilt); file names in shuffled order. ``edit(k, ds)`` alters slice k."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _read(name)
    if orientation is not None:
        base.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    iop = np.array(base.ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    p0 = np.array(base.ImagePositionPatient, dtype=float)
    raw = base.pixel_array
    series_uid = generate_uid()
    names = np.random.default_rng(seed).permutation(len(offsets))
    paths = []
    for k, off in enumerate(offsets):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in p0 + off * normal + tilt * off * row]
        ds.PixelData = (raw + MARK * k).astype(raw.dtype).tobytes()
        if edit is not None:
            edit(k, ds)
        path = folder / f"IM{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def planes(files):
    """(IPP, F_row, F_col, (dr, dc), rescaled pixels) of each slice, straight from pydicom."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame: geometry in functional groups
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
            spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
            pvt = shared.PixelValueTransformationSequence[0]
            hu = ds.pixel_array * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
            for fr, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
                ipp = np.array(groups.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
                out.append((ipp, iop[:3], iop[3:], spacing, hu[fr]))
            continue
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        out.append((np.array(ds.ImagePositionPatient, dtype=float), iop[:3], iop[3:],
                    [float(v) for v in ds.PixelSpacing],
                    ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))))
    return out


def expected_at(vol, files, n=400, seed=0):
    """For random voxels of ``vol``: (its value, the value the DICOM files give at the same world point).

    Independent of the reader: world (RAS) -> LPS, then the slice whose plane contains the point, and
    the in-plane pixel from P = IPP + c*dc*F_row + r*dr*F_col (DICOM PS3.3 C.7.6.2.1.1).
    """
    rng = np.random.default_rng(seed)
    if n >= np.prod(vol.spatial_shape):
        ijk = np.argwhere(np.ones(vol.spatial_shape, bool))
    else:
        ijk = np.stack([rng.integers(0, s, n) for s in vol.spatial_shape], axis=1)
    lps = nib.affines.apply_affine(vol.affine, ijk) * np.array([-1, -1, 1])
    slices = planes(files)
    got, want = [], []
    for (i, j, k), p in zip(ijk, lps):
        dists = [abs((p - ipp) @ np.cross(row, col)) for ipp, row, col, _, _ in slices]
        ipp, row, col, (dr, dc), hu = slices[int(np.argmin(dists))]
        assert min(dists) < 1e-3, f"voxel {(i, j, k)} at LPS {p} lies on no slice"
        c, r = (p - ipp) @ row / dc, (p - ipp) @ col / dr
        assert abs(c - round(c)) < 1e-3 and abs(r - round(r)) < 1e-3, f"voxel {(i, j, k)} is off the pixel grid"
        got.append(vol.array[0, i, j, k])
        want.append(hu[int(round(r)), int(round(c))])
    return np.array(got), np.array(want)


# --------------------------------------------------------------------------- real files

@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_slice_values_and_geometry(name):
    path = get_testdata_file(name)
    vol = read_series(path)
    ds = _read(name)
    assert vol.array.shape == (1, ds.Columns, ds.Rows, 1) and vol.orientation == "RAS"
    assert vol.source_orientation == "LPS"  # F_row +x (patient left), F_col +y (posterior)
    thickness = float(ds.get("SpacingBetweenSlices") or ds.SliceThickness)
    np.testing.assert_allclose(vol.spacing, [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), thickness])
    got, want = expected_at(vol, [path], n=10**6)
    np.testing.assert_array_equal(got, want)
    assert vol.meta["modality"] == ds.Modality


def test_ct_comes_out_in_hounsfield_units():
    vol = read_series(get_testdata_file("CT_small.dcm"))
    raw = _read("CT_small.dcm").pixel_array
    assert float(_read("CT_small.dcm").RescaleIntercept) == -1024
    assert vol.array.min() == raw.min() - 1024 and vol.array.max() == raw.max() - 1024


@pytest.mark.parametrize("compressed, plain", [("693_J2KR.dcm", "693_UNCR.dcm"), ("MR_small_RLE.dcm", "MR_small.dcm")])
def test_compressed_files_decode_like_their_uncompressed_twins(compressed, plain):
    a, b = read_series(get_testdata_file(compressed)), read_series(get_testdata_file(plain))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_enhanced_multiframe_ct_uses_per_frame_positions_and_rescale():
    path = get_testdata_file("eCT_Supplemental.dcm")
    vol = read_series(path)
    assert vol.array.shape == (1, 512, 512, 2) and vol.source_orientation == "RPI"
    got, want = expected_at(vol, [path], n=3000)
    assert np.ptp(want) > 500  # the sample reaches tissue, not only air
    np.testing.assert_array_equal(got, want)
    assert vol.array.min() == int(pydicom.dcmread(path).pixel_array.min()) - 1024  # intercept of the functional group


# --------------------------------------------------------------------------- assembled series

def test_shuffled_series_is_sorted_and_placed(tmp_path):
    files = write_series(tmp_path / "s", seed=3)
    assert [f.name for f in sorted(files)] != [f.name for f in files]  # names do not follow slice order
    vol = read_series(tmp_path / "s")
    assert vol.array.shape == (1, 128, 128, 6) and vol.orientation == "RAS"
    np.testing.assert_allclose(vol.spacing, (0.661468, 0.661468, 2.5), atol=1e-6)
    assert vol.meta["files"] == [f.name for f in files]  # slice order = InstanceNumber order = position order
    # slice k carries +MARK*k: the sort is right
    diffs = vol.array[0] - vol.array[0, :, :, :1]
    np.testing.assert_array_equal(diffs, np.broadcast_to(MARK * np.arange(6), diffs.shape))
    got, want = expected_at(vol, files, n=600)
    np.testing.assert_array_equal(got, want)
    # a list in any order gives the same volume
    again = read_series(list(reversed(sorted(files))))
    np.testing.assert_array_equal(again.array, vol.array)
    np.testing.assert_allclose(again.affine, vol.affine)


@pytest.mark.parametrize("numbering", ["reversed", "shuffled"])
def test_slices_follow_position_not_instance_number(tmp_path, numbering):
    """Scanners number slices head-first or feet-first, and reconstructions renumber: the order of the
    volume must come from ImagePositionPatient along the normal, never from InstanceNumber."""
    n = 6
    numbers = list(range(n, 0, -1)) if numbering == "reversed" else [3, 6, 1, 5, 2, 4]

    def renumber(k, ds):
        ds.InstanceNumber = numbers[k]

    files = write_series(tmp_path / "s", edit=renumber, seed=5)
    vol = read_series(tmp_path / "s")
    # slice k (k-th along the normal) carries +MARK*k whatever its InstanceNumber says
    diffs = vol.array[0] - vol.array[0, :, :, :1]
    np.testing.assert_array_equal(diffs, np.broadcast_to(MARK * np.arange(n), diffs.shape))
    assert vol.meta["files"] == [f.name for f in files]
    by_number = [f.name for _, f in sorted(zip(numbers, files))]
    assert vol.meta["files"] != by_number  # the test would catch a sort by InstanceNumber
    got, want = expected_at(vol, files, n=300)
    np.testing.assert_array_equal(got, want)


def test_oblique_series_with_gantry_tilt(tmp_path):
    """MR_small slices with the oblique orientation of pydicom-data's MR2_UNCR, stepped along the normal
    and sideways (a tilt): the affine must be sheared, and every voxel land where DICOM puts it."""
    oblique = [float(v) for v in pydicom.dcmread(get_testdata_file("MR2_UNCR.dcm"), stop_before_pixels=True)
               .ImageOrientationPatient]
    def non_square(k, ds):  # 48 rows x 64 columns, 0.4 mm between rows, 0.7 mm between columns
        ds.PixelData = ds.pixel_array[:48].tobytes()
        ds.Rows, ds.PixelSpacing = 48, ["0.4", "0.7"]

    files = write_series(tmp_path / "s", "MR_small.dcm", offsets=(0, 3, 6, 9, 12), orientation=oblique, tilt=0.3,
                         edit=non_square, seed=5)
    vol = read_series(tmp_path / "s")
    assert vol.array.shape[0] == 1 and sorted(vol.array.shape[1:]) == [5, 48, 64]
    np.testing.assert_allclose(sorted(vol.spacing), [0.4, 0.7, np.hypot(3, 0.3 * 3)], atol=1e-4)  # tilted step
    got, want = expected_at(vol, files, n=800)
    np.testing.assert_array_equal(got, want)
    gram = vol.affine[:3, :3].T @ vol.affine[:3, :3]
    assert np.abs(gram - np.diag(np.diag(gram))).max() > 0.1  # axes not orthogonal: sheared by the tilt


def test_export_reloads_to_the_same_array_and_world(tmp_path):
    files = write_series(tmp_path / "s", offsets=(0, 1.25, 2.5, 3.75), seed=1)
    vol = read_series(files)
    out = series_to_nifti(tmp_path / "s", tmp_path / "ct.nii.gz")
    back = load_volume(out)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    got, want = expected_at(back, files, n=300)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- bad series

def _mixed_uid(tmp):
    files = write_series(tmp / "s", offsets=(0, 2.5, 5, 7.5))
    other = pydicom.dcmread(files[2])
    other.SeriesInstanceUID = uid = generate_uid()
    other.save_as(files[2])
    return tmp / "s", rf"mixed series: 2 different SeriesInstanceUIDs: .*{uid} \(1 image\(s\): {files[2].name}\)"


def _mixed_orientation(tmp):
    def edit(k, ds):
        if k == 1:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an axial series
    files = write_series(tmp / "s", offsets=(0, 2.5, 5), edit=edit)
    return tmp / "s", rf"mixed series: 2 different orientations .*{files[1].name}"


def _mixed_size(tmp):
    def edit(k, ds):
        if k == 3:
            ds.PixelData = ds.pixel_array[:64].tobytes()
            ds.Rows = 64
    files = write_series(tmp / "s", offsets=(0, 2.5, 5, 7.5), edit=edit)
    return tmp / "s", rf"different image sizes .*64x128 \(1 image\(s\): {files[3].name}\)"


def _mixed_pixel_spacing(tmp):
    def edit(k, ds):
        if k == 0:
            ds.PixelSpacing = [0.5, 0.5]
    files = write_series(tmp / "s", offsets=(0, 2.5, 5), edit=edit)
    return tmp / "s", rf"different pixel spacings: .*\[0.5, 0.5\] \(1 image\(s\): {files[0].name}\)"


def _uneven(tmp):
    files = write_series(tmp / "s", offsets=(0, 2.5, 5, 8.1, 10.6))
    return tmp / "s", rf"uneven slice spacing: gaps from 2.5 to 3.1 mm .*{files[2].name} .* and {files[3].name}"


def _missing(tmp):
    files = write_series(tmp / "s", offsets=(0, 2.5, 5, 10, 12.5))
    return (tmp / "s",
            rf"missing slices: about 1 slice\(s\) missing .*5 mm between {files[2].name} .* and {files[3].name}")


def _two_missing(tmp):
    write_series(tmp / "s", offsets=(0, 2.5, 5, 7.5, 15, 17.5, 20))
    return tmp / "s", r"missing slices: about 2 slice\(s\) missing from a series spaced 2.5 mm"


def _duplicate(tmp):
    files = write_series(tmp / "s", offsets=(0, 2.5, 2.5, 5))
    return tmp / "s", rf"duplicate slice positions: 2 images at .*({files[1].name}|{files[2].name})"


def _off_line(tmp):
    def edit(k, ds):
        if k == 2:
            ds.ImagePositionPatient = [float(v) + d for v, d in zip(ds.ImagePositionPatient, (3.0, 0, 0))]
    files = write_series(tmp / "s", offsets=(0, 2.5, 5, 7.5, 10), edit=edit)
    return tmp / "s", rf"do not lie on one line: {files[2].name} is"


def _truncated_real(tmp):
    return get_testdata_file("MR_truncated.dcm"), "MR_truncated.dcm: pixel data unreadable, damaged or truncated"


def _truncated_in_series(tmp):
    files = write_series(tmp / "s", offsets=(0, 2.5, 5))
    files[1].write_bytes(files[1].read_bytes()[:-5000])
    return tmp / "s", rf"{files[1].name}: .*(damaged or truncated|unreadable)"


def _garbage_in_folder(tmp):
    write_series(tmp / "s", offsets=(0, 2.5, 5))
    (tmp / "s" / "notes.txt").write_bytes(b"not an image\n" * 20)
    return tmp / "s", r"notes.txt: not a DICOM file"


def _no_geometry_multiframe(tmp):
    return get_testdata_file("emri_small.dcm"), "multi-frame file \\(10 frames\\) without per-frame plane positions"


def _no_position(tmp):
    ds = _read("CT_small.dcm")
    del ds.ImagePositionPatient
    ds.save_as(tmp / "nopos.dcm")
    return tmp / "nopos.dcm", r"nopos.dcm: no plane geometry \(missing ImagePositionPatient\)"


def _no_thickness(tmp):
    ds = _read("CT_small.dcm")
    del ds.SliceThickness, ds.SpacingBetweenSlices
    ds.save_as(tmp / "thin.dcm")
    return tmp / "thin.dcm", "thin.dcm: a single slice without SpacingBetweenSlices or SliceThickness"


def _colour(tmp):
    return get_testdata_file("SC_rgb.dcm"), r"SC_rgb.dcm: colour image \(SamplesPerPixel=3"


def _empty_folder(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty", "empty: folder holds no files"


def _empty_list(tmp):
    return [], r"no DICOM files given \(empty list\)"


BAD = [_mixed_uid, _mixed_orientation, _mixed_size, _mixed_pixel_spacing, _uneven, _missing, _two_missing,
       _duplicate, _off_line, _truncated_real, _truncated_in_series, _garbage_in_folder, _no_geometry_multiframe,
       _no_position, _no_thickness, _colour, _empty_folder, _empty_list]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_series_gets_a_clear_error(tmp_path, make):
    src, match = make(tmp_path)
    with pytest.raises(DicomSeriesError, match=match) as err:
        read_series(src)
    assert isinstance(err.value, ValueError)
    if isinstance(src, (str, Path)):  # the folder or file at fault is named
        assert str(err.value).startswith(str(src))


def test_spacing_tolerance_is_a_parameter(tmp_path):
    write_series(tmp_path / "s", offsets=(0, 2.5, 5, 7.55, 10.05))  # one gap 2% long
    with pytest.raises(DicomSeriesError, match="uneven"):
        read_series(tmp_path / "s")
    assert read_series(tmp_path / "s", spacing_tolerance=0.05).array.shape[-1] == 5


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_series(tmp_path / "nowhere")
