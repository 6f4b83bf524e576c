import json
import mmap

import numpy as np
import pytest

from lib.data.cache import ArrayCache, open_npy


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "vol.bin"
    p.write_bytes(b"source-bytes-1")
    return p


def test_hit_miss_and_memory_map(tmp_path, source):
    cache, calls = ArrayCache(tmp_path / "cache"), []

    def compute():
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(3, 4)

    a = cache.get(source, {"size": 4}, compute)
    b = cache.get(source, {"size": 4}, compute)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    owner = b
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner.obj, mmap.mmap) and np.array_equal(a, b)  # a read-only memory map of the entry
    assert not b.flags.writeable


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.int16).reshape(2, 3, 4),
                                   np.asfortranarray(np.random.default_rng(0).random((5, 7))),
                                   np.zeros((0, 3), np.float32), np.float64(2.5)])
def test_open_npy_reads_what_numpy_reads(tmp_path, array):
    path = tmp_path / "a.npy"
    np.save(path, array)
    reference, opened = np.load(path, mmap_mode="r") if array.size else np.load(path), open_npy(path)
    assert opened.dtype == reference.dtype and opened.shape == reference.shape
    np.testing.assert_array_equal(opened, reference)
    assert opened.flags.f_contiguous == reference.flags.f_contiguous


def test_open_npy_refuses_what_is_not_a_whole_npy(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(100.0))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError):
        open_npy(path)
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(ValueError):
        open_npy(path)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        open_npy(path)


def test_changed_parameter_or_source_invalidates(tmp_path, source):
    cache = ArrayCache(tmp_path / "cache")
    cache.get(source, {"size": 4}, lambda: np.zeros(2))
    assert cache.get(source, {"size": 5}, lambda: np.ones(2)).tolist() == [1, 1]
    source.write_bytes(b"source-bytes-2, a different length")
    assert cache.get(source, {"size": 4}, lambda: np.full(2, 7.0)).tolist() == [7, 7]
    assert cache.misses == 3


def test_an_interrupted_write_leaves_no_entry(tmp_path, source, monkeypatch):
    cache = ArrayCache(tmp_path / "cache")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.get(source, {"k": 1}, lambda: np.zeros(3))
    monkeypatch.undo()
    files = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files == []  # neither a half-written array nor a record
    assert cache.get(source, {"k": 1}, lambda: np.ones(3)).tolist() == [1, 1, 1]


def test_a_damaged_entry_is_rebuilt_not_read(tmp_path, source):
    cache = ArrayCache(tmp_path / "cache")
    cache.get(source, {"k": 1}, lambda: np.arange(1000, dtype=np.float64))
    (npy,) = (tmp_path / "cache").rglob("*.npy")
    npy.write_bytes(npy.read_bytes()[:200])  # truncated, e.g. by a crash of an older writer
    with pytest.warns(UserWarning, match="rebuilding"):
        again = cache.get(source, {"k": 1}, lambda: np.arange(1000, dtype=np.float64))
    assert again[-1] == 999
    (meta,) = (tmp_path / "cache").rglob("*.json")
    record = json.loads(meta.read_text())
    record["shape"] = [5]
    meta.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="does not match"):
        cache.get(source, {"k": 1}, lambda: np.arange(1000, dtype=np.float64))


def test_parameters_must_be_json(tmp_path, source):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ArrayCache(tmp_path).get(source, {"f": object()}, lambda: np.zeros(1))


def test_a_damaged_entry_of_the_same_size_is_found_by_its_crc_and_rebuilt(tmp_path):
    import warnings

    src = tmp_path / "source.bin"
    src.write_bytes(b"volume")
    calls = []

    def compute():
        calls.append(1)
        return np.arange(1000, dtype=np.float32).reshape(10, 10, 10)

    first = np.array(ArrayCache(tmp_path / "cache").get(src, {"p": 1}, compute))  # a copy: the entry is a memory map
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    raw = bytearray(entry.read_bytes())
    raw[-8] ^= 0xFF  # a flipped byte in the data: same size, same header
    entry.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = ArrayCache(tmp_path / "cache").get(src, {"p": 1}, compute)
    assert len(calls) == 2 and np.array_equal(again, first)
    assert any("is damaged" in str(w.message) and entry.name in str(w.message) for w in caught)
    assert np.array_equal(ArrayCache(tmp_path / "cache").get(src, {"p": 1}, compute), first) and len(calls) == 2
