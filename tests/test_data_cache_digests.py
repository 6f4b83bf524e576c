"""Source digests are taken once per dataset (never in DataLoader workers) and kept in a persistent index."""

import json
import os
import pickle
import threading

import numpy as np
import pytest
from torch.utils.data import DataLoader

from lib import paths
from lib.data import cache as cache_mod
from lib.data import datasets as ds
from lib.data.cache import ArrayCache


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "vol.bin"
    p.write_bytes(b"source-bytes-1")
    return p


@pytest.fixture
def hashed(monkeypatch, tmp_path):
    """Every call of the hashing function, as ``(pid, path)`` lines of a file (workers are processes)."""
    log, real = tmp_path / "hashed.log", cache_mod.sha256_of

    def counting(path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        return real(path)

    monkeypatch.setattr(cache_mod, "sha256_of", counting)
    return lambda: [line.split(" ", 1) for line in log.read_text().splitlines()] if log.exists() else []


def _no_hashing(monkeypatch):
    def refuse(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(cache_mod, "sha256_of", refuse)


def test_dataloader_workers_never_hash(smoke_cohort, tmp_path, hashed):
    files = ds.volume_files(smoke_cohort, "MRI", "train")[:4]
    data = ds.VolumeDataset(files, "MRI", 8, prep_size=(16, 16, 16), cache=ArrayCache(tmp_path / "cache"))
    for _ in range(2):  # two epochs, workers re-created for each (fork: they inherit the counting)
        list(DataLoader(data, batch_size=2, num_workers=2, multiprocessing_context="fork"))
    assert {pid for pid, _ in hashed()} == {str(os.getpid())}  # not one hash in a worker
    assert sorted(p for _, p in hashed()) == sorted(str(f) for f in files)  # once each, when the dataset was built


@pytest.mark.parametrize("make", ["volumes", "series", "drr"])
def test_a_pickled_dataset_reads_without_hashing(smoke_cohort, tmp_path, monkeypatch, make):
    cache = ArrayCache(tmp_path / "cache")
    data = {"volumes": lambda: ds.VolumeDataset(ds.volume_files(smoke_cohort, "CT", "train")[:1], "CT", 8,
                                                prep_size=(16, 16, 16), cache=cache),
            "series": lambda: ds.SeriesPairs(smoke_cohort, "train", frames=4, size=16, cache=cache),
            "drr": lambda: ds.DRRVolumes(smoke_cohort, "train", angles=(0, 90), image_size=16, volume_size=8,
                                         cache=cache)}[make]()
    copy = pickle.loads(pickle.dumps(data))  # what a spawned worker receives
    _no_hashing(monkeypatch)
    copy[0]
    assert copy.cache.misses >= 1


def test_the_index_outlives_the_cache_object(tmp_path, source, hashed):
    root = tmp_path / "cache"
    ArrayCache(root).get(source, {"k": 1}, lambda: np.zeros(2))
    again = ArrayCache(root)  # another run, or another process
    assert again.get(source, {"k": 1}, lambda: np.ones(2)).tolist() == [0, 0] and again.hits == 1
    assert ArrayCache(root).digests([source, str(source)]) == [cache_mod.sha256_of(source)] * 2
    assert len(hashed()) == 2  # the first object's, and the direct call of the line above


def test_a_changed_source_is_hashed_again(tmp_path, source, hashed):
    root = tmp_path / "cache"
    built = ArrayCache(root)
    built.digests([source])  # a dataset built before the file changed
    built.get(source, {"k": 1}, lambda: np.zeros(2))
    source.write_bytes(b"source-bytes-2")  # same size, new mtime
    st = os.stat(source)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert built.get(source, {"k": 1}, lambda: np.ones(2)).tolist() == [1, 1] and built.misses == 2
    source.write_bytes(b"longer source bytes")  # new size
    fresh = ArrayCache(root)
    assert fresh.get(source, {"k": 1}, lambda: np.full(2, 7.0)).tolist() == [7, 7] and fresh.misses == 1
    assert len(hashed()) == 3
    assert ArrayCache(root).digest(source) == cache_mod.sha256_of(source)  # the index now holds the new one
    assert len(hashed()) == 4


@pytest.mark.parametrize("damage", ["garbage", "other path", "bad digest", "not a dict"])
def test_a_damaged_index_record_is_ignored_and_rebuilt(tmp_path, source, hashed, damage):
    root = tmp_path / "cache"
    ArrayCache(root).digest(source)
    (record,) = (root / "digests").rglob("*.digest")
    good = json.loads(record.read_text())
    bad = {"garbage": "{not json", "other path": json.dumps({**good, "path": "/elsewhere"}),
           "bad digest": json.dumps({**good, "sha256": "0" * 10}), "not a dict": "[1, 2]"}[damage]
    record.write_text(bad)
    with pytest.warns(UserWarning, match=str(record)):
        assert ArrayCache(root).digest(source) == good["sha256"]
    assert json.loads(record.read_text()) == good and len(hashed()) == 2
    ArrayCache(root).digest(source)
    assert len(hashed()) == 2


def test_concurrent_writers_leave_a_valid_index(tmp_path, source):
    root = tmp_path / "cache"
    threads = [threading.Thread(target=lambda: ArrayCache(root).digest(source)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (record,) = [p for p in (root / "digests").rglob("*") if p.is_file()]
    assert json.loads(record.read_text())["sha256"] == cache_mod.sha256_of(source)  # no temporary file left


def test_the_cache_root_moves_with_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MEDIMG_CACHE_DIR", raising=False)
    assert paths.cache_dir() == (tmp_path / "data").resolve() / "cache" == ArrayCache().root
    monkeypatch.setenv("MEDIMG_CACHE_DIR", str(tmp_path / "scratch"))
    assert paths.cache_dir() == (tmp_path / "scratch").resolve() == ArrayCache().root
    assert ArrayCache(tmp_path / "given").root == tmp_path / "given"
