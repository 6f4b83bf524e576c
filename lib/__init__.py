"""Importable core of the project: data code, models, losses, metrics and training utilities.

Ground floor: :mod:`lib.paths`, :mod:`lib.config`, :mod:`lib.device` and :mod:`lib.runs`.
Importing ``lib`` itself is cheap: nothing heavy (torch, MONAI) is imported here.
"""

import os as _os
from importlib import metadata as _metadata

# OpenMP threads that spin while waiting steal the CPU from each other on a shared or small machine
# (a demo step ran 5x slower with two busy cores); must be set before torch loads its OpenMP runtime.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = _metadata.version("medimg-lib")
except _metadata.PackageNotFoundError:  # lib used from a folder on sys.path (e.g. a Kaggle dataset)
    __version__ = "0+unknown"
