import json

import numpy as np
import pytest

from lib.data.cache import ArrayCache


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
    assert isinstance(b, np.memmap) and np.array_equal(a, b)
    assert not b.flags.writeable


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
