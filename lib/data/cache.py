"""A cache of preprocessed arrays: uncompressed ``.npy`` files opened memory-mapped.

Decoding ``.nii.gz`` is CPU-bound (gzip), and preprocessing (windows, resampling, crop/pad) costs more;
both are done once per (source file, parameters). An entry's key is the SHA-256 of the source file's
bytes, the preprocessing parameters and :data:`CACHE_VERSION`, so a changed source or parameter
misses the cache instead of returning stale arrays (nnU-Net and MONAI's PersistentDataset do the same).

The cache lives under :func:`lib.paths.cache_dir` (``data/cache``; ``$MEDIMG_CACHE_DIR`` moves it, e.g.
to a fast scratch disk). An entry is ``<root>/<key[:2]>/<key>.npy`` plus ``<key>.json`` (source,
parameters, shape, dtype, CRC-32 of the bytes), each written to a temporary file and renamed; the JSON goes
last and is checked against the array on read (the CRC once per entry and cache object), so an entry
interrupted half-way, or damaged since, is never served: it is rebuilt.

Source digests are computed once, not per read:

- the digest index, ``<root>/digests/<h[:2]>/<h>.digest`` (JSON) with ``h`` the SHA-256 of the source's resolved
  path, records the file's size, ``mtime_ns`` and SHA-256. A file is hashed once until its size or
  modification time changes, across runs and processes. Each record is written atomically (temporary
  file, rename), one per source, so concurrent writers never corrupt one another; a record that is
  damaged or describes another file, size or time is ignored (and replaced), never trusted.
- :meth:`ArrayCache.digests` fills the cache object's own memo; a dataset calls it on its files when it
  is built, so DataLoader workers receive the digests with the pickled dataset and never hash: a read
  costs a ``stat`` (which still catches a source changed since) and the entry's two files.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from lib import paths
from lib.atomic import atomic_path, write_json

CACHE_VERSION = 1
INDEX_VERSION = 1


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read now (what a verification wants)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _crc32(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order): what a cache entry's record keeps to find a damaged entry."""
    import zlib

    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` file as a read-only array over a memory map of it: ``np.load(path, mmap_mode="r")``
    without ``np.memmap``'s Python overhead (half of a cache hit's time on a small volume)."""
    with open(path, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
        except ValueError as e:  # short or damaged header
            raise ValueError(f"{path}: a truncated or damaged .npy file ({e})") from None
        if dtype.hasobject:
            raise ValueError(f"{path}: object arrays are not cached")
        offset = f.tell()
        count = math.prod(shape)
        size = os.fstat(f.fileno()).st_size
        if offset + count * dtype.itemsize > size:
            raise ValueError(f"{path}: a truncated .npy file: its header needs {offset + count * dtype.itemsize:,} "
                             f"bytes ({shape} x {dtype}), the file has {size:,}")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if count else b""
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset if count else 0)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class ArrayCache:
    """``cache.get(source, params, compute)`` returns the cached array or computes, stores and returns it.

    Picklable: a copy in a DataLoader worker carries the digests this object has seen (:meth:`digests`).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or paths.cache_dir())
        self.hits = self.misses = 0
        self._memo: dict[tuple[str, int, int], str] = {}  # (abspath, size, mtime_ns) -> SHA-256
        self._verified: set[str] = set()  # entries whose bytes matched their record's CRC-32 in this object
        self._unrecorded: dict[tuple[str, int, int], str] = {}  # hashed here, not yet in the index

    # ----------------------------------------------------------------- source digests

    def _index_path(self, real: str) -> Path:
        h = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()
        return self.root / "digests" / h[:2] / f"{h}.digest"

    def _indexed(self, real: str, st: os.stat_result) -> str | None:
        """The digest the index holds for ``real`` at this size and mtime; None if none can be trusted."""
        path = self._index_path(real)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            warnings.warn(f"digest index record {path} is unreadable ({e}); hashing the source again")
            return None
        if not (isinstance(record, dict) and record.get("path") == real and _is_sha256(record.get("sha256"))):
            warnings.warn(f"digest index record {path} is not a record of {real}; hashing the source again")
            return None
        if record.get("version") != INDEX_VERSION:
            return None  # written by another version of this module: replaced
        if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
            return None  # the source changed since: hash it again (the record is replaced)
        return record["sha256"]

    def _record(self, token: tuple[str, int, int]) -> None:
        """Write the index record of a source hashed by this object (atomically; last writer wins)."""
        digest = self._unrecorded.pop(token, None)
        if digest is None:
            return
        source, size, mtime_ns = token
        real = os.path.realpath(source)
        write_json(self._index_path(real), {"path": real, "size": size, "mtime_ns": mtime_ns,
                                            "sha256": digest, "version": INDEX_VERSION})

    def _digest(self, source: str | os.PathLike) -> tuple[str, tuple[str, int, int]]:
        st = os.stat(source)  # its error names the file
        token = (os.path.abspath(source), st.st_size, st.st_mtime_ns)  # abspath: no syscall per path part
        digest = self._memo.get(token)
        if digest is None:
            digest = self._indexed(os.path.realpath(source), st)
            if digest is None:
                digest = sha256_of(source)
                after = os.stat(source)
                if (after.st_size, after.st_mtime_ns) == token[1:]:  # unchanged while read: may be recorded
                    self._unrecorded[token] = digest
            self._memo[token] = digest
        return digest, token

    def digest(self, source: str | os.PathLike) -> str:
        """SHA-256 of ``source``'s bytes: from this object's memo, else the digest index, else hashed now
        (and recorded in the index)."""
        digest, token = self._digest(source)
        self._record(token)
        return digest

    def digests(self, sources: Iterable[str | os.PathLike]) -> list[str]:
        """:meth:`digest` of each source, remembered by this object: call it where a dataset is built, so
        that its DataLoader workers (which receive this object pickled) never hash a file."""
        return [self.digest(s) for s in sources]

    # ----------------------------------------------------------------- entries

    def key(self, source: str | os.PathLike, params: dict[str, Any]) -> str:
        return self._key(self._digest(source)[0], params)

    @staticmethod
    def _key(digest: str, params: dict[str, Any]) -> str:
        try:
            blob = json.dumps({"source": digest, "params": params, "version": CACHE_VERSION}, sort_keys=True)
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
        if key not in self._verified and "crc32" in meta:  # once per entry and cache object (entries before: shape only)
            if _crc32(array) != meta["crc32"]:
                warnings.warn(f"cache entry {array_path} is damaged (its bytes do not match the CRC-32 of its record); "
                              f"rebuilding it")
                return None
            self._verified.add(key)
        return array

    def get(self, source: str | os.PathLike, params: dict[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The preprocessed array of ``source`` under ``params`` (read-only memory map)."""
        digest, token = self._digest(source)
        key = self._key(digest, params)
        array = self._read(key)
        if array is not None:
            self.hits += 1
            self._record(token)
            return array
        self.misses += 1
        result = np.ascontiguousarray(compute())
        array_path, meta_path = self._paths(key)
        meta_path.unlink(missing_ok=True)  # a record must never describe an array being replaced
        with atomic_path(array_path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result, allow_pickle=False)
        write_json(meta_path, {"key": key, "source": str(source), "source_sha256": digest,
                               "params": params, "shape": list(result.shape), "dtype": str(result.dtype),
                               "crc32": _crc32(result), "version": CACHE_VERSION})
        self._verified.add(key)
        self._record(token)  # after the entry: a failed computation leaves nothing under the root
        return open_npy(array_path)
