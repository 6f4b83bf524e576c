"""A tiny, deterministic training problem for tests/test_train.py, and the entry point of its subprocesses.

    python tests/train_worker.py fit  '<json options>'   one process; "pause_at": N blocks at the N-th
                                                         training micro-batch (the test then kills it)
    python tests/train_worker.py ddp  '<json options>'   lib.train.launch with "world" gloo processes

The options are those of :func:`build` plus "config" (the resolved configuration given to fit) and
"out_dir".
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib import runs, train  # noqa: E402

DIM = 6


class Regression(Dataset):
    """y = x·w + noise; ``augment`` jitters x with torch, numpy and python RNGs (all three must resume)."""

    def __init__(self, n: int, seed: int, augment: bool = False, nan_at: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = self.x @ torch.randn(DIM, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
        if nan_at is not None:
            self.x[nan_at, 0] = float("nan")
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        if self.augment:
            x = x + 0.05 * torch.randn(DIM) + 0.02 * float(np.random.randn()) + 0.02 * random.random()
        return {"x": x, "y": self.y[i]}


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(16, 1))


def step(model, batch):
    pred = model(batch["x"])
    return F.mse_loss(pred.float(), batch["y"]), {"mae": (pred.float() - batch["y"]).abs().mean()}


def build(seed: int = 0, n_train: int = 40, n_val: int = 12, batch: int = 4, dropout: float = 0.0,
          augment: bool = False, workers: int = 0, lr: float = 0.05, nan_at: int | None = None,
          distributed: tuple[int, int] | None = None, **_: object):
    """(model, train_loader, val_loader, optimizer), identical for identical arguments.

    ``distributed=(rank, world)``: DistributedSampler shards (also for world 1, the reference run).
    """
    runs.seed_everything(seed, deterministic=True)
    train_ds = Regression(n_train, seed, augment=augment, nan_at=nan_at)
    val_ds = Regression(n_val, seed + 1)
    if distributed is None:
        train_loader = DataLoader(train_ds, batch_size=batch, shuffle=True, num_workers=workers,
                                  **runs.loader_seeding(seed))
        val_loader = DataLoader(val_ds, batch_size=batch)
    else:
        rank, world = distributed
        train_loader = DataLoader(train_ds, batch_size=batch, num_workers=workers,
                                  sampler=DistributedSampler(train_ds, world, rank, shuffle=True, seed=seed))
        val_loader = DataLoader(val_ds, batch_size=batch,
                                sampler=DistributedSampler(val_ds, world, rank, shuffle=False))
    model = make_model(dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, train_loader, val_loader, optimizer


def run_fit(opts: dict, step_fn=step, **fit_kwargs):
    model, train_loader, val_loader, optimizer = build(**opts)
    if opts.get("scheduler") == "constant":
        fit_kwargs["scheduler"] = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    result = train.fit(model, step_fn, train_loader, optimizer, out_dir=opts["out_dir"], config=opts["config"],
                       val_loader=val_loader, **fit_kwargs)
    return model, result


def _pausing_step(pause_at: int, marker: Path):
    calls = 0

    def fn(model, batch):
        nonlocal calls
        if model.training:
            calls += 1
            if calls == pause_at:
                marker.write_text("paused")
                time.sleep(600)  # the test kills us here, in the middle of an epoch
        return step(model, batch)
    return fn


def _ddp_rank(opts: dict) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    opts = {**opts, "distributed": (rank, world), "out_dir": str(Path(opts["out_dir"]) / f"rank{rank}")}
    model, result = run_fit(opts, resume=False)
    assert result.status == "completed"
    # Rank 0 writes nothing for the other ranks: every rank reports its weights here, the test compares.
    torch.save({"model": model.state_dict(), "ema": result.ema.module.state_dict() if result.ema else None},
               Path(opts["out_dir"]).parent / f"weights_rank{rank}.pt")


if __name__ == "__main__":
    mode, options = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(options.get("threads", 1))
    if mode == "fit":
        fn = step
        if options.get("pause_at"):
            fn = _pausing_step(options["pause_at"], Path(options["out_dir"]) / "paused")
        run_fit(options, step_fn=fn, resume=options.get("resume", False))
    elif mode == "ddp":
        train.launch(_ddp_rank, nprocs=options["world"], args=(options,), backend="gloo")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
