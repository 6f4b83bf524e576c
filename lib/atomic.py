"""Atomic file writing, the bottom layer: every result, cache entry, checkpoint and figure of the project
is written to a temporary file beside its destination and renamed into place, so that a crash or a kill
never leaves a half-written file that a later reader could take for a good one.

It imports nothing of ``lib`` (``lib.data``, ``lib.checkpoint`` and ``lib.viz`` use it without pulling in
run provenance); :mod:`lib.runs` re-exports these names.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)

# A temporary file is named ``.<name>.<host>-<pid>.<random>.tmp`` (host: 8 hex digits of the host name's
# hash), so that a later writer can tell a dead writer's leftover (removable) from a live one's.
_HOST = hashlib.sha1(platform.node().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


def _proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); OSError/ValueError if unreadable."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def process_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if unknown."""
    try:
        return int(_proc_stat(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not; with ``start_ticks``: the same process,
    not a later one that reuses its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    except (OverflowError, ValueError):
        return False
    try:
        if _proc_stat(pid)[0] in ("Z", "X"):
            return False
    except (OSError, ValueError, IndexError):
        return True  # no /proc (or it just exited): trust os.kill
    now = process_start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` in ``folder`` whose writer (a process of this host)
    is dead, e.g. killed mid-save; a live writer's are kept. Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TEMP.match(entry.name)
            if m and m["host"] == _HOST and not process_alive(int(m["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; a result file gets the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` (a folder) only if the block succeeds."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield stage
        if path.exists():
            shutil.rmtree(path)
        stage.rename(path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    # Serialise first: an unserialisable object must fail before anything touches the disk.
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_csv(path: str | os.PathLike, rows: Any) -> Path:
    """``rows``: a pandas DataFrame or a list of dicts (columns in first-seen order)."""
    if hasattr(rows, "to_csv"):
        return write_text(path, rows.to_csv(index=False))
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def save_figure(path: str | os.PathLike, fig: Any, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch"):
        return str(obj)  # torch.device, torch.dtype
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} to JSON")
