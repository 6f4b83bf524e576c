"""Small pieces that several families share (one place each)."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from lib.loaders import loader


def split_loaders(cfg: Mapping[str, Any], data: Mapping[str, Dataset]) -> dict[str, DataLoader]:
    """One loader per split (:func:`lib.loaders.loader`): the training one shuffled (seeded by ``cfg.seed``),
    full batches only; each sharded when this process is one of several."""
    return {s: loader(data[s], cfg, train=s == "train") for s in ("train", "val", "test")}


def resume_mode(cfg: Mapping[str, Any]) -> str | bool:
    """``fit``'s ``resume`` for a stage of a notebook run: with ``cfg.resume``, each stage continues from its
    checkpoint if it has one and starts otherwise (the interrupted run had not reached it); that the run as a
    whole holds a checkpoint is checked when the notebook starts (:func:`lib.runs.start_notebook`)."""
    return "auto" if cfg["resume"] else False


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def data_root(cfg: Mapping[str, Any]):
    """The data a family trains on: the prepared dataset named by ``cfg.real_data`` (one folder or name,
    :func:`lib.data.locate.require_prepared`: a missing one stops here, saying how to get it), else the
    built-in cohort ``cfg.cohort`` (built if missing)."""
    from lib.data import demo, locate, prepared

    if cfg.get("real_data"):
        roots = locate.require_prepared(cfg["real_data"])
        if len(roots) != 1:
            raise ValueError(f"real_data: name one prepared dataset, got {len(roots)} ({cfg['real_data']!r})")
        return prepared.open_dataset(roots[0])
    root, _ = demo.ensure(cfg["cohort"], progress=False)
    return root
