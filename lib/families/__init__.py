"""One home per model family: the registry.

A family is one research question answered by one training notebook. Its module,
``lib.families.<module>``, owns everything that is specific to it, composed from the layers below
(``lib.data``, ``lib.models``, ``lib.losses``, ``lib.metrics``, ``lib.train``):

- ``build(cfg)`` (and, for a family with several networks, ``build_<network>(cfg)``): the network(s)
  from a resolved configuration (:func:`lib.config.resolve`);
- ``train_step(model, batch, ...)`` / ``val_step(...)``: module-level step functions for
  :func:`lib.train.fit`, bound to their settings with ``functools.partial`` (picklable: a spawned GPU
  process can import them; no closure over notebook state);
- ``predict(...)``: the inference loop;
- ``evaluate(...) -> rows``: the held-out scores beside the family's baseline, written as
  ``heldout_metrics.json`` in the run folder (:mod:`lib.families.results`), the one file that
  :mod:`lib.summary`, 07_evaluate and 08_visualize read.

A family is declared by ``FAMILY = Family(...)`` in its notebook's presets module (:mod:`lib.presets`).
This module is cheap to import (no torch): :data:`FAMILIES` says which families exist, in report
order; :func:`load` imports a family's module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lib import presets
from lib.config import Family

FAMILIES: dict[str, Family] = {f.name: f for f in presets.FAMILIES}  # in notebook order


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def load(name: str) -> ModuleType:
    """The module of family ``name`` (imported on first use: it pulls in torch and MONAI)."""
    return importlib.import_module(f"lib.families.{get(name).module}")


def by_notebook(notebook: str) -> Family:
    for family in FAMILIES.values():
        if family.notebook == notebook:
            return family
    raise ValueError(f"no family is trained by {notebook!r}; families: "
                     f"{', '.join(f'{f.name} ({f.notebook})' for f in FAMILIES.values())}")
