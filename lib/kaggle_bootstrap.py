"""Make a Kaggle kernel able to ``import lib``: copied into the code dataset as ``medimg_bootstrap.py``.

Standard library only (it runs before anything of ours is importable). :func:`setup`:

1. installs the wheels shipped in the dataset's ``wheels/`` (``requirements-kaggle.txt``) offline,
   ``pip install --no-index --find-links``, into ``<working>/.medimg-site``, for the packages whose
   pinned version is not already installed (an internet-off kernel cannot reach PyPI);
2. puts that folder and the code dataset first on ``sys.path``, so the shipped ``lib`` is the one
   imported.

The cell that ``python -m lib.kaggle build`` puts at the top of the notebook finds this file by
globbing the input root and calls :func:`setup`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _missing(requirements: Path) -> list[str]:
    wanted = []
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        try:
            if metadata.version(name) == version:
                continue
        except metadata.PackageNotFoundError:
            pass
        wanted.append(line)
    return wanted


def setup(code_dir: str | os.PathLike | None = None) -> Path:
    """Install shipped wheels if needed and make the code dataset importable; returns the code folder."""
    code_dir = Path(code_dir or Path(__file__).resolve().parent)
    working = Path(os.environ.get("MEDIMG_KAGGLE_WORKING", "/kaggle/working"))
    site = working / ".medimg-site"
    requirements = code_dir / "requirements-kaggle.txt"
    if (code_dir / "wheels").is_dir() and requirements.is_file():
        todo = _missing(requirements)
        if todo:
            print(f"medimg bootstrap: installing {len(todo)} shipped wheel(s) offline: {', '.join(todo)}")
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--find-links", str(code_dir / "wheels"), "--target", str(site), *todo], check=True)
    for folder in (site, code_dir):
        if folder.is_dir() and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return code_dir
