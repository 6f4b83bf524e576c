"""The machinery of :mod:`lib.gpu_check`, standard library only: the time budget, stages with their own
timeouts, child processes killed with everything they started, results read from a child's output, and
the atomic JSON write.

A stage is a function ``fn(timeout_s) -> dict`` run by :func:`run_stage`: it gets the seconds it may take
(its own limit, cut to what the budget has left); it may raise :class:`Skipped` (a reason, and nothing
ran) or :class:`Timeout` (from :func:`run_child`), or return its numbers, with ``status`` and ``reason``
in them to mark itself failed while keeping what it measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MARK = "@gpu-check "   # a child's result line: MARK + one JSON object
TAIL_CHARS = 3000       # how much of a failing child's output a result keeps


class Skipped(Exception):
    """The stage does not apply here (the reason says why); nothing ran."""


class Timeout(Exception):
    """A child ran past its timeout and was killed; ``tail`` is the end of what it printed."""

    def __init__(self, message: str, tail: str = "", results: list | None = None):
        super().__init__(message)
        self.tail, self.results = tail, results or []


class ChildFailed(Exception):
    def __init__(self, message: str, tail: str = "", results: list | None = None):
        super().__init__(message)
        self.tail, self.results = tail, results or []


@dataclass
class Budget:
    """Seconds for the whole check, read off ``clock`` (a fake one in the tests)."""

    total_s: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_stage(name: str, fn: Callable[[float], dict], budget: Budget, limit_s: float, min_s: float = 0.0,
              reserve_s: float = 0.0) -> dict:
    """Run one stage within ``limit_s`` and what ``budget`` has left (less ``reserve_s`` kept for the stages
    after it); a stage that would get less than ``min_s`` is skipped. Never raises: the result says
    ``ok``, ``failed`` or ``skipped``, why, how long it took, its numbers and the tail of any error."""
    left = budget.remaining() - reserve_s
    result: dict[str, Any] = {"name": name, "status": "ok", "reason": None, "limit_s": round(limit_s, 1)}
    if left < max(min_s, 1.0):
        return {**result, "status": "skipped", "seconds": 0.0,
                "reason": f"out of time budget: {max(left, 0):.0f} s left for it, it needs at least {min_s:.0f} s"}
    timeout = min(limit_s, left)
    result["timeout_s"] = round(timeout, 1)
    t0 = budget.clock()
    try:
        data = fn(timeout) or {}
        result["status"] = data.pop("status", "ok")
        result["reason"] = data.pop("reason", None)
        result["data"] = data
    except Skipped as e:
        result.update(status="skipped", reason=str(e))
    except (Timeout, ChildFailed) as e:
        result.update(status="failed", reason=str(e), error_tail=e.tail)
        if e.results:
            result["data"] = {"partial": e.results}
    except Exception as e:  # a stage's own bug must not stop the others
        result.update(status="failed", reason=f"{type(e).__name__}: {e}", error_tail=tail(traceback.format_exc()))
    result["seconds"] = round(budget.clock() - t0, 1)
    return result


def run_parallel(stages: list[tuple], budget: Budget) -> list[dict]:
    """:func:`run_stage` for each ``(name, fn, limit_s, min_s)`` at once, in threads; results in order."""
    results: list[dict | None] = [None] * len(stages)

    def one(i: int, spec: tuple) -> None:
        results[i] = run_stage(*spec[:2], budget, *spec[2:])

    threads = [threading.Thread(target=one, args=(i, s), daemon=True) for i, s in enumerate(stages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def parse_results(output: str) -> list[dict]:
    """The JSON objects a child printed on its result lines (:data:`MARK`)."""
    found = []
    for line in output.splitlines():
        if line.startswith(MARK):
            try:
                found.append(json.loads(line[len(MARK):]))
            except ValueError:
                pass
    return found


def emit(obj: dict) -> None:
    """Print one result line (in a child), flushed at once so that a later timeout keeps it."""
    print(MARK + json.dumps(obj, default=str), flush=True)


def run_child(cmd: list[str], timeout: float, env: dict | None = None, cwd: str | os.PathLike | None = None,
              check: bool = True) -> tuple[int, str, list[dict]]:
    """Run ``cmd`` in its own process group, stdout and stderr together; returns ``(returncode, output,
    result lines)``. Past ``timeout`` the whole group (papermill's kernel, torchrun's ranks) is killed and
    :class:`Timeout` raised; with ``check`` a non-zero exit raises :class:`ChildFailed`."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, text=True)
        try:
            proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.seek(0)
            out = log.read()
            raise Timeout(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])}", tail(out), parse_results(out)) from None
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        log.seek(0)
        out = log.read()
    if check and proc.returncode != 0:
        raise ChildFailed(f"exit status {proc.returncode}: {' '.join(cmd[:6])}", tail(out), parse_results(out))
    return proc.returncode, out, parse_results(out)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; none where there is no /proc): a kernel or a rank may have
    started a process group of its own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    below = _descendants(proc.pid)  # before the kill: orphans are adopted by another parent
    for kill, target in [(os.killpg, proc.pid), *((os.kill, p) for p in below)]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to a temporary file beside ``path`` and rename it into place: a reader never sees a
    half-written file, and an object that cannot be serialised leaves nothing behind."""
    path = Path(path)
    text = json.dumps(obj, indent=2, default=str) + "\n"  # serialise before anything touches the disk
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
