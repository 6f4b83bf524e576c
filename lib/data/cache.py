"""A cache of preprocessed arrays: uncompressed ``.npy`` files opened memory-mapped.

Decoding ``.nii.gz`` is CPU-bound (gzip), and preprocessing (windows, resampling, crop/pad) costs more;
both are done once per (source file, parameters). An entry's key is the SHA-256 of the source file's
bytes, the preprocessing parameters and :data:`CACHE_VERSION`, so a changed source or parameter
misses the cache instead of returning stale arrays (nnU-Net and MONAI's PersistentDataset do the same).

An entry is ``<root>/<key[:2]>/<key>.npy`` plus ``<key>.json`` (source, parameters, shape, dtype),
each written to a temporary file and renamed; the JSON goes last and is checked against the array on
read, so an entry interrupted half-way is never read: it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lib import paths
from lib.atomic import atomic_path, write_json

CACHE_VERSION = 1


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read now (what a verification wants)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, _memo: dict = {}) -> str:  # noqa: B006 (memo by design)
    """:func:`sha256_of`, remembered per (path, size, mtime) within the process (cache keys)."""
    st = os.stat(path)
    token = (os.path.abspath(path), st.st_size, st.st_mtime_ns)  # abspath: no syscall (resolve() costs one per part)
    if token not in _memo:
        _memo[token] = sha256_of(path)
    return _memo[token]


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` file as a read-only array over a memory map of it: ``np.load(path, mmap_mode="r")``
    without ``np.memmap``'s Python overhead (half of a cache hit's time on a small volume)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError(f"{path}: object arrays are not cached")
        offset = f.tell()
        count = math.prod(shape)
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if count else b""
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset if count else 0)
    return array.reshape(shape, order="F" if fortran_order else "C")


class ArrayCache:
    """``cache.get(source, params, compute)`` returns the cached array or computes, stores and returns it."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or paths.data_dir() / "cache")
        self.hits = self.misses = 0

    def key(self, source: str | os.PathLike, params: dict[str, Any]) -> str:
        try:
            blob = json.dumps({"source": file_sha256(source), "params": params, "version": CACHE_VERSION},
                              sort_keys=True)
        except TypeError as e:
            raise ValueError(f"cache parameters must be JSON-serialisable, got {params!r}: {e}") from e
        return hashlib.sha256(blob.encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def _read(self, key: str) -> np.ndarray | None:
        array_path, meta_path = self._paths(key)
        if not (array_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            array = open_npy(array_path)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            warnings.warn(f"cache entry {array_path} is unreadable ({e}); rebuilding it")
            return None
        if meta.get("key") != key or list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
            warnings.warn(f"cache entry {array_path} does not match its record; rebuilding it")
            return None
        return array

    def get(self, source: str | os.PathLike, params: dict[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The preprocessed array of ``source`` under ``params`` (read-only memory map)."""
        key = self.key(source, params)
        array = self._read(key)
        if array is not None:
            self.hits += 1
            return array
        self.misses += 1
        result = np.ascontiguousarray(compute())
        array_path, meta_path = self._paths(key)
        meta_path.unlink(missing_ok=True)  # a record must never describe an array being replaced
        with atomic_path(array_path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result, allow_pickle=False)
        write_json(meta_path, {"key": key, "source": str(source), "source_sha256": file_sha256(source),
                               "params": params, "shape": list(result.shape), "dtype": str(result.dtype),
                               "version": CACHE_VERSION})
        return open_npy(array_path)
