"""Run records: one folder per notebook run, provenance, atomic writes, seeding.

Layout::

    results/
      runs.csv                         index of all runs (one row per run, updated in place)
      <notebook>/<run-id>/run.json     provenance and status of one run
      <notebook>/<run-id>/...          its metrics (CSV/JSON), figures (PNG), checkpoints, executed notebook

``run.json`` holds: run id, notebook, preset, the parameters as given and the resolved
configuration, seed, git commit and dirty flag, library versions, device and autocast dtype, start
and end time, wall time, status (``running`` → ``completed`` | ``failed`` | ``incomplete``) and any
errors. Every file here is written to a temporary file in the same folder and renamed into place, so
a crash never leaves a half-written record, metric, figure or checkpoint behind.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import platform
import random
import secrets
import subprocess
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lib import config as _config
from lib import paths
from lib.atomic import _json_default, atomic_path, save_figure, write_csv, write_json, write_text  # noqa: F401  (re-exported)
from lib.atomic import process_alive, process_start_ticks

RUN_ID_ENV = "MEDIMG_RUN_ID"
INDEX_COLUMNS = ["run_id", "notebook", "preset", "status", "seed", "device", "git_commit", "git_dirty",
                 "start_time", "end_time", "wall_time_s", "path"]
_VERSIONED = ["torch", "monai", "numpy", "nibabel", "pydicom", "papermill", "medimg-lib"]


# --------------------------------------------------------------------------- seeding

# CUDA kernels without a deterministic implementation that the families' models use (torch 2.13): with
# ``deterministic=True`` they run as they are and torch warns; everything else takes its deterministic kernel.
# On a CPU every kernel is deterministic.
NONDETERMINISTIC_ON_CUDA = (
    "grid_sampler_2d_backward_cuda (06: the views sampled along the rays)",
    "upsample_bilinear2d_backward_out_cuda and adaptive_avg_pool2d_backward_cuda (06's 2D resizes; 05: MONAI "
    "MBConv's squeeze-and-excitation)",
    "upsample_trilinear3d_backward_out_cuda and replication_pad3d_backward_cuda (03/09 WaveFormer3D, only where "
    "a grid does not divide evenly)",
)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every GPU); optionally demand deterministic kernels.

    Data-loader workers: pass :func:`loader_seeding` to ``DataLoader`` so that each worker's
    python and numpy generators derive from the loader's seeded torch generator.
    """
    import torch

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses; this process's hash seed is fixed at start
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: deterministic kernels wherever torch has one; the few CUDA backward kernels that have none
    # (NONDETERMINISTIC_ON_CUDA) warn instead of stopping the run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: torch already seeded this worker from the loader's generator; follow it."""
    import torch

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def loader_seeding(seed: int) -> dict[str, Any]:
    """``DataLoader(..., **loader_seeding(seed))``: same seed, same batches and augmentations."""
    import torch

    return {"generator": torch.Generator().manual_seed(seed), "worker_init_fn": seed_worker}


# --------------------------------------------------------------------------- provenance

def git_info(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the repository at ``root``; ``None`` values outside a git checkout."""
    root = Path(root or paths.ROOT)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str | None]:
    """Python, platform and the versions of the libraries that shape the numbers (no imports)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def new_run_id(preset: str) -> str:
    return f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{preset}-{secrets.token_hex(2)}"


# --------------------------------------------------------------------------- the index

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            import fcntl
        except ImportError:  # Windows: no lock, the rename is still atomic
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_index(results_root: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Rows of ``results/runs.csv`` (empty if there is none yet)."""
    index = Path(results_root or paths.results_dir()) / "runs.csv"
    if not index.exists():
        return []
    with open(index, newline="") as f:
        return list(csv.DictReader(f))


def _update_index(results_root: Path, record: dict[str, Any]) -> None:
    index = results_root / "runs.csv"
    row = {
        "run_id": record["run_id"], "notebook": record["notebook"], "preset": record["preset"],
        "status": record["status"], "seed": record.get("seed"), "device": record.get("device", {}).get("device"),
        "git_commit": record.get("git", {}).get("commit"), "git_dirty": record.get("git", {}).get("dirty"),
        "start_time": record.get("start_time"), "end_time": record.get("end_time"),
        "wall_time_s": record.get("wall_time_s"), "path": record["path"],
    }
    with _locked(index):
        rows = [r for r in read_index(results_root) if r["run_id"] != row["run_id"]]
        rows.append({k: ("" if row[k] is None else row[k]) for k in INDEX_COLUMNS})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(index, buf.getvalue())


# --------------------------------------------------------------------------- liveness

_ATTEMPT_KEYS = ("status", "params", "config", "process", "start_time", "end_time", "wall_time_s", "errors")


def _this_process() -> dict[str, Any]:
    return {"host": platform.node(), "pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid())}


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _dead(entry: dict[str, Any]) -> bool:
    """A ``running`` record or attempt whose process (on this host) is gone."""
    proc = entry.get("process")
    if entry.get("status") != "running" or not isinstance(proc, dict) or proc.get("host") != platform.node():
        return False
    pid = proc.get("pid")
    return isinstance(pid, int) and not process_alive(pid, proc.get("start_ticks"))


def mark_dead_runs(results_root: str | os.PathLike | None = None) -> list[str]:
    """Mark ``incomplete`` every ``running`` run (or resume attempt) of this host whose process is gone
    (killed by SIGKILL or the OOM killer: no exit hook ran). Returns the paths of the records changed."""
    results_root = Path(results_root or paths.results_dir())
    changed = []
    for path in sorted(results_root.glob("*/*/run.json")):
        record = _read_record(path)
        entries = [record, *(a for a in record.get("attempts", []) if isinstance(a, dict))]
        dead = [e for e in entries if _dead(e)]
        if not dead:
            continue
        for entry in dead:
            entry.update(status="incomplete", end_time=entry.get("end_time") or _now())
            entry.setdefault("errors", []).append({
                "time": _now(), "traceback": None, "error": f"process {entry['process']['pid']} on "
                f"{entry['process']['host']} is gone (killed?) without closing the run: marked incomplete"})
        try:
            write_json(path, record)
            if all(k in record for k in ("run_id", "notebook", "preset", "path")):
                _update_index(results_root, record)
        except OSError as e:  # someone else's read-only record: leave it, never stop a run from starting
            print(f"mark_dead_runs: cannot update {path}: {e}")
            continue
        changed.append(str(path.parent.relative_to(results_root)))
    return changed


# --------------------------------------------------------------------------- runs

class Run:
    """One run of one notebook: its folder, configuration, device and record.

    Use as a context manager in scripts (an exception marks it failed), or through
    :func:`start_notebook` in notebooks (a cell that raises marks it failed).
    """

    def __init__(self, notebook: str, cfg: _config.Config, *, params: dict[str, Any] | None = None,
                 run_id: str | None = None, results_root: str | os.PathLike | None = None):
        from lib import device as _device

        self.notebook, self.config = notebook, cfg
        self.results_root = Path(results_root or paths.results_dir())
        self.run_id = run_id or os.environ.get(RUN_ID_ENV) or new_run_id(cfg["preset"])
        self.dir = self.results_root / notebook / self.run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        mark_dead_runs(self.results_root)
        self.seed = cfg.get("seed", 0)
        seed_everything(self.seed, deterministic=bool(cfg.get("deterministic", False)))
        self.device = _device.pick_device(cfg.get("device"))
        self.amp_dtype = _device.autocast_dtype(self.device)
        self._t0 = time.monotonic()
        fresh: dict[str, Any] = {
            "run_id": self.run_id, "notebook": notebook, "preset": cfg["preset"],
            "status": "running", "params": params or {}, "config": dict(cfg), "seed": self.seed,
            "git": git_info(), "versions": versions(), "device": _device.describe(self.device),
            "start_time": _now(), "end_time": None, "wall_time_s": None, "errors": [],
            "process": _this_process(), "path": str(self.dir.relative_to(self.results_root)),
        }
        prior = _read_record(self.dir / "run.json")
        if prior.get("status") == "completed":
            # A completed record stays what readers see; this session is an attempt until it completes.
            self._fresh, self.record = fresh, prior
            self._session: dict[str, Any] = {k: fresh[k] for k in _ATTEMPT_KEYS}
            prior.setdefault("attempts", []).append(self._session)
        else:
            self._fresh, self.record = None, fresh
            self._session = fresh
        self._save()

    @property
    def status(self) -> str:
        """This session's status (``running`` until it finishes, fails or is left incomplete)."""
        return self._session["status"]

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (parent folders created)."""
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path(name), obj)

    def save_csv(self, name: str, rows: Any) -> Path:
        return write_csv(self.path(name), rows)

    def save_figure(self, name: str, fig: Any, dpi: int = 120) -> Path:
        return save_figure(self.path(name), fig, dpi=dpi)

    def _save(self) -> None:
        write_json(self.dir / "run.json", self.record)
        _update_index(self.results_root, self.record)

    def _close(self, status: str) -> None:
        self._session.update(status=status, end_time=_now(), wall_time_s=round(time.monotonic() - self._t0, 3))
        if self._fresh is not None and status == "completed":  # this session's completion replaces the record
            extra = {k: v for k, v in self.record.items() if k not in self._fresh and k not in ("summary", "attempts")}
            self.record = {**self._fresh, **extra, **self._session, "attempts": self.record["attempts"]}
            self._fresh, self._session = None, self.record
        self._save()

    def finish(self, **summary: Any) -> "Run":
        """Mark the run completed; ``summary`` (small, JSON-able) is stored in ``run.json``."""
        if self._fresh is not None:
            self._session["summary"] = dict(summary)
        elif summary:
            self.record.setdefault("summary", {}).update(summary)
        self._close("completed")
        print(f"run {self.run_id} completed in {self.record['wall_time_s']:.1f} s -> {self.dir}")
        return self

    def fail(self, error: BaseException | str) -> None:
        """Mark the run failed, keeping the error (type, message, traceback) in the record."""
        if isinstance(error, BaseException):
            text = "".join(traceback.format_exception_only(type(error), error)).strip()
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        else:
            text, tb = str(error), None
        self._session["errors"].append({"time": _now(), "error": text, "traceback": tb})
        self._close("failed")

    def _mark_incomplete(self) -> None:
        if self.status == "running":
            self._close("incomplete")

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.fail(exc)
        elif self.status == "running":
            self.finish()
        return False

    def __repr__(self) -> str:
        return f"Run({self.notebook!r}, {self.run_id!r}, status={self.status!r}, device={self.device})"


def start_run(notebook: str, preset: str, **overrides: Any) -> Run:
    """Resolve the configuration (see :func:`lib.config.resolve`), seed, pick the device, record."""
    cfg = _config.resolve(notebook, preset, **overrides)
    check_resumable(notebook, cfg, os.environ.get(RUN_ID_ENV))
    return Run(notebook, cfg, params={"preset": preset, **{k: v for k, v in overrides.items() if v is not None}})


def check_resumable(notebook: str, cfg: _config.Config, run_id: str | None) -> None:
    """With ``resume``, the run to continue must exist and hold a checkpoint; else stop before anything is written."""
    if not cfg.get("resume"):
        return
    folder = paths.results_dir() / notebook / (run_id or "")
    if not run_id or not any(folder.rglob("checkpoints/*.pt")):
        raise ValueError(f"{notebook}: parameter 'resume' is True but " + (
            f"${RUN_ID_ENV} does not name the run to continue" if not run_id else
            f"run {run_id!r} ({folder}) holds no checkpoint to continue") + "; without resume the run starts afresh")


def start_notebook(notebook: str, namespace: dict[str, Any]) -> Run:
    """The second cell of every notebook: ``run = start_notebook("03_pretrain", globals())``.

    Takes the parameters the notebook defined (its ``parameters`` cell and papermill's injected
    cell), resolves and validates them, seeds, picks the device and opens the run record. In a
    Jupyter kernel, a later cell that raises marks the run failed, and a kernel that exits before
    ``run.finish()`` leaves it ``incomplete``, never looking complete.
    """
    import atexit

    params = _config.params_from_namespace(namespace)
    if "preset" not in params:
        raise ValueError(f"{notebook}: the parameters cell must define 'preset' "
                         f"(one of {', '.join(_config.PRESETS)})")
    preset = params.pop("preset")
    run = start_run(notebook, preset, **params)
    atexit.register(run._mark_incomplete)
    try:
        ip = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        ip = None
    if ip is not None:
        def _on_cell(result: Any) -> None:
            err = getattr(result, "error_in_exec", None) or getattr(result, "error_before_exec", None)
            if err is not None and run.status == "running":
                run.fail(err)
        ip.events.register("post_run_cell", _on_cell)
    print(f"{notebook} · preset {preset} · run {run.run_id} · device {run.device} "
          f"(autocast {str(run.amp_dtype).replace('torch.', '')}) · seed {run.seed}\n-> {run.dir}")
    return run


def mark_failed(run_dir: str | os.PathLike, notebook: str, preset: str, error: str,
                results_root: str | os.PathLike | None = None) -> None:
    """Record a failure for a run folder from outside the run (e.g. the notebook runner).

    Works whether or not the notebook got as far as writing ``run.json``.
    """
    run_dir = Path(run_dir)
    results_root = Path(results_root or paths.results_dir())
    record_path = run_dir / "run.json"
    failure = {"time": _now(), "error": error, "traceback": None}
    record = _read_record(record_path)
    if record.get("status") == "completed":  # a completed record is never downgraded: the attempt failed
        attempts = record.setdefault("attempts", [])
        if attempts and attempts[-1].get("status") == "failed":  # the notebook already recorded its error
            return
        if not attempts or attempts[-1].get("status") not in ("running", "incomplete"):
            attempts.append({"status": "running", "params": {"preset": preset}, "start_time": None, "errors": []})
        attempts[-1].setdefault("errors", []).append(failure)
        attempts[-1].update(status="failed", end_time=_now())
    else:
        if record.get("status") == "failed":  # the notebook already recorded its own error
            return
        if not record:
            record = {"run_id": run_dir.name, "notebook": notebook, "preset": preset, "params": {"preset": preset},
                      "git": git_info(), "versions": versions(), "start_time": None, "errors": [],
                      "path": str(run_dir.relative_to(results_root))}
        record.setdefault("errors", []).append(failure)
        record.update(status="failed", end_time=_now())
    write_json(record_path, record)
    _update_index(results_root, record)


def main(argv: list[str] | None = None) -> int:
    """``python -m lib.runs [RESULTS_DIR]``: mark the runs whose process is gone ``incomplete``; print them."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lib.runs", description=main.__doc__)
    parser.add_argument("results_root", nargs="?", default=None, help="default: the project's results folder")
    args = parser.parse_args(argv)
    changed = mark_dead_runs(args.results_root)
    for rel in changed:
        print(f"incomplete (process gone): {rel}")
    print(f"{len(changed)} run record(s) marked incomplete")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
