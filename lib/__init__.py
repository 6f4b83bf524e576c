"""Importable core of the project: data code, models, losses, metrics and training utilities.

Ground floor: :mod:`lib.paths`, :mod:`lib.config`, :mod:`lib.device` and :mod:`lib.runs`.
Importing ``lib`` itself is cheap: nothing heavy (torch, MONAI) is imported here.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("medimg-lib")
except _metadata.PackageNotFoundError:  # lib used from a folder on sys.path (e.g. a Kaggle dataset)
    __version__ = "0+unknown"
