"""lib.data.radiograph: DICOM CR/DX -> square float image, bright = attenuating (the DRR convention).

Real material: pydicom-data's ``RG1_UNCR.dcm`` (a 1955 x 1841 MONOCHROME1 chest CR, PA). Synthetic
radiographs are that file's header with small pixel arrays of known content, so polarity, padding and
resizing can be checked against numbers computed here independently.
"""

import copy

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from lib.data.radiograph import RadiographError, read_radiograph, to_square

REAL = get_testdata_file("RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def real_header():
    return pydicom.dcmread(REAL)


@pytest.fixture(scope="module")
def real():
    return read_radiograph(REAL, 128)  # decoding 3.6 M pixels takes a second or two: once per module


def write(tmp_path, header, pixels, name="x.dcm", **attrs):
    """``header`` with ``pixels`` (uint16 2D) and any attributes replaced, saved as ``name``."""
    ds = copy.deepcopy(header)
    pixels = np.asarray(pixels, np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h=40, w=60):
    """Attenuation grows to the right, as a value 100..1100."""
    return np.tile(np.linspace(100, 1100, w), (h, 1)).round()


def test_real_chest_cr_bright_is_attenuating(real):
    r = real
    assert r.image.shape == (128, 128) and r.image.dtype == np.float32
    assert r.image.min() >= 0.0 and r.image.max() <= 1.0 and r.image.max() > 0.9
    assert (r.photometric, r.inverted, r.source_shape) == ("MONOCHROME1", True, (1955, 1841))
    assert r.meta == {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}
    assert r.spacing_mm is None  # the file says 0.000\0.000: unknown
    # The mediastinum and spine (centre columns) attenuate more than the lung fields beside them.
    centre, right_lung, left_lung = r.image[40:90, 60:68].mean(), r.image[40:90, 25:45].mean(), r.image[40:90, 85:105].mean()
    assert centre > right_lung + 0.15 and centre > left_lung + 0.15
    # 1955 rows x 1841 columns: the narrower side is padded with air (0) to a square, centred.
    pad = round((1955 - 1841) / 2 / 1955 * 128)
    assert pad >= 3 and np.all(r.image[:, : pad - 1] == 0) and np.all(r.image[:, -(pad - 1):] == 0)
    assert r.tensor().shape == (1, 1, 128, 128)


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path, real_header):
    att = ramp()
    m2 = read_radiograph(write(tmp_path, real_header, att, "m2.dcm", PhotometricInterpretation="MONOCHROME2"), 60)
    m1 = read_radiograph(write(tmp_path, real_header, 4095 - att, "m1.dcm", PhotometricInterpretation="MONOCHROME1"), 60)
    assert not m2.inverted and m1.inverted
    np.testing.assert_allclose(m1.image, m2.image, atol=1e-6)
    # bright = attenuating: the image grows left to right inside the field (rows 10..49 of 60 hold data)
    row = m2.image[30]
    assert np.all(np.diff(row) > 0)
    # INVERSE presentation flips the meaning once more
    inv = read_radiograph(write(tmp_path, real_header, att, "inv.dcm", PhotometricInterpretation="MONOCHROME2",
                                PresentationLUTShape="INVERSE"), 60)
    assert inv.inverted and np.all(np.diff(inv.image[30]) < 0)


def test_percentile_window_and_square_padding_match_an_independent_computation(tmp_path, real_header):
    att = ramp(40, 60)
    r = read_radiograph(write(tmp_path, real_header, att, PhotometricInterpretation="MONOCHROME2"), 60, low=0, high=100)
    expected = np.zeros((60, 60))
    expected[10:50] = (att - 100) / 1000  # min..max -> 0..1, 40 rows centred on 60
    np.testing.assert_allclose(r.image, expected, atol=1e-6)
    assert r.window == (100.0, 1100.0)


def test_rescale_slope_and_intercept_are_applied(tmp_path, real_header):
    path = write(tmp_path, real_header, ramp(), PhotometricInterpretation="MONOCHROME2", RescaleSlope="2",
                 RescaleIntercept="-50")
    assert read_radiograph(path, 60, low=0, high=100).window == (150.0, 2150.0)


def test_to_square_area_shrinking_is_the_block_mean():
    rng = np.random.default_rng(0)
    img = rng.random((64, 64)).astype(np.float32)
    block = img.reshape(16, 4, 16, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(to_square(img, 16), block, rtol=1e-5, atol=1e-6)
    # enlarging a constant stays constant; a wide image is padded above and below
    np.testing.assert_allclose(to_square(np.full((8, 8), 0.5), 32), 0.5, atol=1e-6)
    wide = to_square(np.ones((2, 8)), 8)
    assert wide[:3].sum() == 0 and wide[5:].sum() == 0 and np.all(wide[3:5] == 1)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "128"])
def test_bad_size_is_refused(size):
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        read_radiograph(REAL, size)


def test_bad_files_are_named(tmp_path, real_header):
    with pytest.raises(FileNotFoundError, match="nope.dcm"):
        read_radiograph(tmp_path / "nope.dcm", 64)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    with pytest.raises(RadiographError, match="junk.dcm: not a readable DICOM"):
        read_radiograph(junk, 64)
    rgb = get_testdata_file("SC_rgb.dcm")
    with pytest.raises(RadiographError, match="PhotometricInterpretation 'RGB'"):
        read_radiograph(rgb, 64)
    flat = write(tmp_path, real_header, np.full((20, 20), 7), "flat.dcm", PhotometricInterpretation="MONOCHROME2")
    with pytest.raises(RadiographError, match="flat.dcm: the image is constant"):
        read_radiograph(flat, 64)
    with pytest.raises(ValueError, match="percentiles"):
        read_radiograph(REAL, 64, low=60, high=40)


def test_the_real_radiograph_runs_through_a_change_model(real):
    from lib.models.cxr_change import ChangeModelConfig, LongitudinalMIMModelBig

    torch.manual_seed(0)
    model = LongitudinalMIMModelBig(ChangeModelConfig(
        image_size=64, channels=(8, 8, 16, 16, 32), blocks=(1, 1, 1, 1), expand_ratio=2, hidden_size=32,
        transformer_layers=1, num_heads=2, mlp_dim=64, patch_size=1, inter_channels=32, norm_groups=8,
        decoder_channels=(16, 16, 8, 8))).eval()
    x = torch.from_numpy(to_square(real.image, 64))[None, None]
    with torch.no_grad():
        y = model(x, x)
    assert y.shape == (1, 1, 64, 64) and torch.isfinite(y).all() and y.abs().max() <= 1
