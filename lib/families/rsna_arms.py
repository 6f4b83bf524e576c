"""09_rsna_aneurysm's grid of arms, one training at a time or spread over several GPUs.

The trainings of :func:`lib.families.rsna_aneurysm.plan` are independent (each seeds itself), and the series
classifier is small, so several GPUs train different arms at once instead of sharing each one's batches (DDP
would only add communication): process ``r`` of ``n`` (spawned, so it works after the notebook touched CUDA)
trains the entries ``r, r + n, ...`` of the plan on GPU ``r``, each into its folder with ``row.json`` beside its
checkpoints. The parent reads the rows back in the plan's order and loads the kept model (finetune on every
label, seed 0), so the table is the one a single process builds, arm for arm.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
import torch.nn as nn

from lib import distributed
from lib.atomic import write_json
from lib.checkpoint import best_or_last
from lib.device import pick_device
from lib.families import rsna_aneurysm as rsna
from lib.train import load_weights

ROW = "row.json"
KEPT = ("finetune", 1.0, 0)


def folder(out_dir: str | Path, entry: tuple[str, float, int]) -> Path:
    arm, fraction, seed = entry
    return Path(out_dir) / f"{arm}-f{fraction:g}-seed{seed}"


def train_and_score(cfg: Mapping[str, Any], entry: tuple[str, float, int], pretrained: nn.Module, sets: Mapping,
                    out_dir: str | Path, device: torch.device) -> tuple[rsna.SeriesClassifier, dict]:
    """One entry of the plan: trained (:func:`~lib.families.rsna_aneurysm.train_arm`) and scored on the test split."""
    arm, fraction, seed = entry
    model = rsna.train_arm(cfg, arm, fraction, seed, pretrained, sets, folder(out_dir, entry), device)
    n_train = sum(len(v) for v in rsna.subset(sets["train"], fraction, seed).values())
    row = {"arm": arm, "label_fraction": fraction, "seed": seed, "n_train": n_train,
           **rsna.score(rsna.predict_split(model, sets["test"], device), sets["test"])}
    return model, row


def run_grid_parallel(cfg: Mapping[str, Any], pretrained: nn.Module, sets: Mapping, out_dir: str | Path,
                      device: torch.device, n: int) -> tuple[pd.DataFrame, rsna.SeriesClassifier | None]:
    """:func:`~lib.families.rsna_aneurysm.run_grid` in ``n`` processes (see the module docstring)."""
    import torch.multiprocessing as mp

    entries = rsna.plan(cfg)
    for entry in entries:
        (folder(out_dir, entry) / ROW).unlink(missing_ok=True)
    print(f"{len(entries)} trainings over {n} processes")
    mp.start_processes(_share, args=(dict(cfg), copy.deepcopy(pretrained).cpu(), sets, str(out_dir), n), nprocs=n,
                       start_method="spawn")
    missing = [str(folder(out_dir, e)) for e in entries if not (folder(out_dir, e) / ROW).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} training(s) left no {ROW}: {', '.join(missing)}")
    rows = [json.loads((folder(out_dir, e) / ROW).read_text()) for e in entries]
    kept = None
    if KEPT in entries:
        kept = rsna.make_model(KEPT[0], pretrained, KEPT[2])
        load_weights(kept, best_or_last(folder(out_dir, KEPT) / "checkpoints"))
        kept.to(device).eval()
    return pd.DataFrame(rows), kept


def _share(rank: int, cfg: dict, pretrained: nn.Module, sets: Mapping, out_dir: str, n: int) -> None:
    """Process ``rank``: its share of the plan, on its GPU (or its share of the CPU's cores)."""
    device = pick_device(cfg.get("device"))
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        distributed.share_cores(n)
    for i, entry in enumerate(rsna.plan(cfg)):
        if i % n == rank:
            _, row = train_and_score(cfg, entry, pretrained, sets, out_dir, device)
            write_json(folder(out_dir, entry) / ROW, row)
