"""lib.data.paired on converted real fixtures: DRRVolumes renders the angles a dataset did not store with the
dataset's own cone-beam geometry, SeriesPairs pairs the native series with the phase asked for."""

import numpy as np
import pytest
import torch

from lib.data import drr
from lib.data.io import load_volume
from lib.data.paired import DRRVolumes, SeriesPairs, geometry_of


@pytest.fixture(scope="module")
def lidc(convert_fixture):
    return convert_fixture("lidc_idri", options={"size": 48, "spacing": 8.0, "drr_size": 32})[3]


@pytest.fixture(scope="module")
def coltea(convert_fixture):
    return convert_fixture("coltea_lung_ct_100w")[3]


def test_stored_views_are_read_and_other_angles_rendered_with_the_datasets_geometry(lidc):
    geometry = geometry_of(lidc.info)
    assert isinstance(geometry, drr.Geometry) and geometry.source_axis_mm == 541.0 and geometry.source_detector_mm == 949.0
    data = DRRVolumes(lidc, "test", angles=(0.0, 45.0, 90.0), image_size=32, volume_size=16)
    assert set(data.subjects) == set(lidc.images(split="test", modality="CT")["subject"])
    item = data[0]
    assert item["views"].shape == (3, 1, 32, 32) and item["ct"].shape == (1, 16, 16, 16)
    subject = item["subject"]
    stored = np.load(data.drr_path(subject, "drr_000"))
    torch.testing.assert_close(item["views"][0, 0], torch.from_numpy(stored))
    ct = load_volume(data.ct_path(subject), channels=(1,))
    rendered = drr.radiograph(ct.array[0], ct.spacing, 45.0, size=32, geometry=geometry)
    torch.testing.assert_close(item["views"][1, 0], torch.from_numpy(rendered))
    parallel = drr.radiograph(ct.array[0], ct.spacing, 45.0, size=32)
    assert not np.allclose(rendered, parallel, atol=1e-3)  # the geometry is not ignored


def test_cone_beam_extent_is_the_volume_over_the_field_at_the_axis(lidc):
    data = DRRVolumes(lidc, "train", angles=(0.0, 90.0), image_size=32, volume_size=16)
    ct = load_volume(data.ct_path(data.subjects[0]), channels=(1,))
    half_field = drr.field_at_axis_mm(geometry_of(lidc.info)) / 2
    expected = [n * s / 2 / half_field for n, s in zip(ct.spatial_shape, ct.spacing)]
    assert data.volume_extent() == pytest.approx(expected)


def test_series_pairs_take_the_phase_asked_for_on_the_native_grid(coltea):
    for target in ("arterial", "venous"):
        data = SeriesPairs(coltea, "train", frames=None, size=16, target=target)
        rows = coltea.pairs[(coltea.pairs["split"] == "train") & (coltea.pairs["target"] == target)]
        assert data.items == [(r.subject, r.a, r.b) for r in rows.itertuples()]
        item = data[0]
        native = load_volume(coltea.file(data.items[0][1]), channels=(1,))
        assert item["baseline"].shape == item["target"].shape == (1, native.spatial_shape[2], 16, 16)
        assert not torch.equal(item["baseline"], item["target"])  # contrast differs
    with pytest.raises(ValueError, match="no pairs with target 'contrast'; pairs.csv has targets arterial, venous"):
        SeriesPairs(coltea, "train", frames=None, size=16)

