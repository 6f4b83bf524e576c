"""Every notebook's parameters and presets, declared once: one module per notebook (or pair of notebooks),
each readable on one screen (nnU-Net's plans as the example). :mod:`lib.config` resolves them.

A module here declares ``NOTEBOOKS = {"NN_name": _spec(...)}`` and, when its notebook trains a model
family, ``FAMILY = Family(...)`` (the registry :mod:`lib.families` reads). Modules are found by listing
this package, so a new notebook or family needs no edit here.
"""

import importlib
import pkgutil

_MODULES = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
NOTEBOOKS = dict(sorted((name, spec) for m in _MODULES for name, spec in m.NOTEBOOKS.items()))
FAMILIES = sorted((m.FAMILY for m in _MODULES if hasattr(m, "FAMILY")), key=lambda f: f.notebook)
