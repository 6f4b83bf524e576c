"""Small pieces that several families share (one place each)."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from lib.runs import loader_seeding


def split_loaders(cfg: Mapping[str, Any], data: Mapping[str, Dataset]) -> dict[str, DataLoader]:
    """One loader per split: the training one shuffled (seeded by ``cfg.seed``), full batches only."""
    out = {"train": DataLoader(data["train"], batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                               num_workers=cfg["num_workers"], **loader_seeding(cfg["seed"]))}
    out.update({s: DataLoader(data[s], batch_size=cfg["batch_size"], num_workers=cfg["num_workers"])
                for s in ("val", "test")})
    return out


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
