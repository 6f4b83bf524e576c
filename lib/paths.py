"""Where things live. Notebooks never build paths from their working directory: they ask here.

``ROOT`` is the folder that holds ``lib/`` (the repository). Two environment variables move the
writable roots elsewhere, e.g. for tests or a scratch disk:

- ``MEDIMG_RESULTS_DIR``: results root (default ``ROOT/results``)
- ``MEDIMG_DATA_DIR``: data root with ``raw/``, ``processed/``, ``cache/`` (default ``ROOT/data``)
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
MANIFEST = ROOT / "data_manifest.csv"


def _from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def results_dir() -> Path:
    """Root of all run folders, ``runs.csv`` and summaries."""
    return _from_env("MEDIMG_RESULTS_DIR", ROOT / "results")


def data_dir() -> Path:
    """Root of raw, processed and cached data (ignored by git)."""
    return _from_env("MEDIMG_DATA_DIR", ROOT / "data")
