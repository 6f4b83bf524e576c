"""Where things live. Notebooks never build paths from their working directory: they ask here.

``ROOT`` is the folder that holds ``lib/`` (the repository, or the code dataset on Kaggle).
Environment variables move the roots elsewhere, e.g. for tests or a scratch disk:

- ``MEDIMG_RESULTS_DIR``: results root (default ``ROOT/results``; on Kaggle ``<working>/results``)
- ``MEDIMG_DATA_DIR``: data root with ``raw/``, ``processed/``, ``cache/`` (default ``ROOT/data``;
  on Kaggle ``<working>/data``)
- ``MEDIMG_CACHE_DIR``: the cache of preprocessed arrays, e.g. on a fast local scratch disk (default
  ``<data root>/cache``, following ``MEDIMG_DATA_DIR``)
- ``MEDIMG_KAGGLE_INPUT`` / ``MEDIMG_KAGGLE_WORKING``: Kaggle's read-only input root (attached
  datasets) and writable working root (default ``/kaggle/input`` and ``/kaggle/working``); code runs
  "on Kaggle" when ``KAGGLE_KERNEL_RUN_TYPE`` is set, as Kaggle does in every kernel.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
MANIFEST = ROOT / "data_manifest.csv"


def _from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def on_kaggle() -> bool:
    """Whether this process runs inside a Kaggle kernel."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def kaggle_input_root() -> Path:
    return _from_env("MEDIMG_KAGGLE_INPUT", Path("/kaggle/input"))


def kaggle_working_root() -> Path:
    return _from_env("MEDIMG_KAGGLE_WORKING", Path("/kaggle/working"))


def find_inputs(pattern: str) -> list[Path]:
    """Files or folders matching ``pattern`` anywhere under the Kaggle input root, sorted.

    Attached datasets mount at ``/kaggle/input/<slug>/`` or, lately, deeper
    (``/kaggle/input/datasets/<owner>/<slug>/``): glob, never assume the depth.
    """
    root = kaggle_input_root()
    return sorted(root.glob(f"**/{pattern}")) if root.is_dir() else []


def results_dir() -> Path:
    """Root of all run folders, ``runs.csv`` and summaries."""
    return _from_env("MEDIMG_RESULTS_DIR", kaggle_working_root() / "results" if on_kaggle() else ROOT / "results")


def data_dir() -> Path:
    """Root of raw, processed and cached data (ignored by git)."""
    return _from_env("MEDIMG_DATA_DIR", kaggle_working_root() / "data" if on_kaggle() else ROOT / "data")


def cache_dir() -> Path:
    """Root of the cache of preprocessed arrays (:class:`lib.data.cache.ArrayCache`); put it on fast scratch."""
    return _from_env("MEDIMG_CACHE_DIR", data_dir() / "cache")


def executable(name: str) -> str:
    """The path of the command ``name``: first beside the running interpreter (the project's environment,
    active or not), then on ``PATH``. Raises ``RuntimeError`` saying how to install it when neither has it."""
    here = Path(sys.executable).parent
    for candidate in (here / name, here / f"{name}.exe"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"the {name!r} command is neither beside this Python ({here}) nor on PATH; install it into the "
                       f"project's environment: {sys.executable} -m pip install {Path(name).name}")
