import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lib import runs
from lib.data import datasets as ds, drr
from lib.data.cache import ArrayCache
from lib.data.io import load_volume


@pytest.fixture
def cache(tmp_path):
    return ArrayCache(tmp_path / "cache")


def test_volume_datasets_shapes_ranges_and_cache(smoke_cohort, cache):
    mri = ds.VolumeDataset(ds.volume_files(smoke_cohort, "MRI", "train"), "MRI", 24, prep_size=(40, 40, 40), cache=cache)
    ct = ds.VolumeDataset(ds.volume_files(smoke_cohort, "CT", "train"), "CT", 24, prep_size=(40, 40, 40), cache=cache)
    assert len(mri) == 3 * len(ds.subjects(smoke_cohort, "brain_mri", "train"))
    x, y = mri[0], ct[0]
    assert x.shape == (1, 24, 24, 24) and y.shape == (3, 24, 24, 24)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    misses = cache.misses
    assert torch.equal(mri[0], x) and cache.misses == misses and cache.hits >= 1
    # the cached array is what preparing the file gives
    ref = ds.prepare_volume(mri.files[0], "MRI", None, (40, 40, 40))
    np.testing.assert_array_equal(mri.array(0), ref)
    # what the model takes is cached as its own entry: the prepared array resized, as without a cache
    np.testing.assert_array_equal(mri.model_array(0), ds.resize(torch.from_numpy(ref), (24, 24, 24)).numpy())
    assert torch.equal(ds.VolumeDataset(mri.files, "MRI", 24, prep_size=(40, 40, 40))[0], x)
    entries = len(list(cache.root.rglob("*.npy")))
    assert entries == 4  # prepared grid and model input, of the first MRI and the first CT


def test_flips_and_rotations_commute_with_the_resize():
    # the dataset augments after resizing (what it caches); for a cube that is what augmenting first gives
    x = torch.rand(2, 16, 16, 16)
    for seed in range(6):
        torch.manual_seed(seed)
        first = ds.resize(ds.augment_volume(x, noise_std=0.0), (8, 8, 8))
        torch.manual_seed(seed)
        after = ds.augment_volume(ds.resize(x, (8, 8, 8)), noise_std=0.0)
        torch.testing.assert_close(after, first, rtol=0, atol=1e-6)


def test_ct_windows_come_from_hu(smoke_cohort):
    path = ds.volume_files(smoke_cohort, "CT", "train")[0]
    hu = load_volume(path).array[0]
    prepared = ds.prepare_volume(path, "CT", None, hu.shape)
    # channel 0 is the brain window (40 / 80): 0 HU -> 0, 80 HU -> 1; channel 2 (bone) keeps the skull below 1
    np.testing.assert_allclose(prepared[0], np.clip((hu - 0.0) / 80.0, 0, 1), atol=1e-6)
    assert prepared[2][hu > 1000].max() < 1.0


def test_augmentation_permutes_voxels_and_adds_noise_of_the_given_std():
    torch.manual_seed(0)
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    moved = ds.augment_volume(x, noise_std=0.0)
    assert torch.equal(moved.flatten().sort().values, x.flatten().sort().values)
    noise = ds.augment_volume(torch.zeros(1, 16, 16, 16), noise_std=0.01)
    assert float(noise.std()) == pytest.approx(0.01, rel=0.1)


def test_seeded_loaders_repeat_with_workers(smoke_cohort, cache):
    data = ds.VolumeDataset(ds.volume_files(smoke_cohort, "MRI", "train"), "MRI", 16, prep_size=(32, 32, 32),
                            augment=True, cache=cache)
    [data[i] for i in range(len(data))]  # fill the cache before the workers start

    def epoch(seed):
        return torch.cat(list(DataLoader(data, batch_size=2, shuffle=True, num_workers=2, **runs.loader_seeding(seed))))

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_alternating_loader_interleaves_and_finishes_both():
    mri = DataLoader(torch.zeros(5, 1), batch_size=1)
    ct = DataLoader(torch.ones(2, 3), batch_size=1)
    order = [name for name, _ in ds.AlternatingLoader({"MRI": mri, "CT": ct})]
    assert order == ["MRI", "CT", "MRI", "CT", "MRI", "MRI", "MRI"]
    assert len(ds.AlternatingLoader({"MRI": mri, "CT": ct})) == 7
    assert [name for name, _ in ds.AlternatingLoader({"MRI": mri})] == ["MRI"] * 5  # one modality only
    with pytest.raises(ValueError, match="at least one named loader"):
        ds.AlternatingLoader({})


def test_axial_frames_orientation():
    vol = np.zeros((4, 5, 6), np.float32)
    vol[3, 4, 5] = 1.0  # patient right, anterior, superior corner
    frames = ds.axial_frames(vol)
    assert frames.shape == (6, 5, 4)
    assert frames[0, 0, 0] == 1.0  # first frame (superior), top row (anterior), left column (patient right)


def test_series_pairs(smoke_cohort, cache):
    pairs = ds.SeriesPairs(smoke_cohort, "train", frames=8, size=32, cache=cache)
    item = pairs[0]
    assert item["baseline"].shape == item["target"].shape == (1, 8, 32, 32)
    assert -1.0 <= float(item["baseline"].min()) and float(item["target"].max()) <= 1.0
    assert float((item["target"] - item["baseline"]).max()) > 0.1   # contrast brightens vessels
    assert item["start"] == (32 - 8) // 2                           # central run when evaluating
    with pytest.raises(ValueError, match="frames asked"):
        ds.SeriesPairs(smoke_cohort, "train", frames=999, size=32)[0]


def test_cxr_pairs(smoke_cohort):
    pairs = ds.CXRPairs(smoke_cohort, "train", size=32)
    item = pairs[0]
    assert item["baseline"].shape == item["followup"].shape == item["change"].shape == (1, 32, 32)
    flags = [pairs[i]["nuisance_only"] for i in range(len(pairs))]
    assert all(not pairs[i]["change"].any() for i, f in enumerate(flags) if f)
    with pytest.raises(ValueError, match="split must be"):
        ds.CXRPairs(smoke_cohort, "training")


def test_drr_views_match_the_cohort_model(smoke_cohort, cache):
    data = ds.DRRVolumes(smoke_cohort, "train", angles=(0, 90, 45), image_size=64, volume_size=16, cache=cache)
    item = data[0]
    assert item["views"].shape == (3, 1, 64, 64) and item["ct"].shape == (1, 16, 16, 16)
    assert 0.0 <= float(item["ct"].min()) and float(item["ct"].max()) <= 1.0
    ct = load_volume(data.ct_path(item["subject"]))
    frontal = drr.radiograph(ct.array[0], ct.spacing, 0.0, size=64)
    # stored DRRs were rendered before the CT was quantised to int16 HU
    np.testing.assert_allclose(item["views"][0, 0].numpy(), frontal, atol=2e-3)
    oblique = drr.radiograph(ct.array[0], ct.spacing, 45.0, size=64)
    np.testing.assert_allclose(item["views"][2, 0].numpy(), oblique, atol=1e-5)
