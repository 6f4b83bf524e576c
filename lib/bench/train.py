"""The ``train_loop`` extra of :mod:`lib.bench`: overhead of :func:`lib.train.fit` against a bare PyTorch loop,
side by side on the same tiny model.

    python -m lib.bench --only train_loop [--loop-epochs 3] [--loop-steps 100] [--loop-repeats 5] [--loop-threads 1]

Two pairs, each doing the same arithmetic in both loops (fp32, same data, same schedule):

- ``plain``:    forward, backward, optimizer step, scheduler step;
- ``clip+ema``: the same plus gradient clipping and an EMA of the weights (both loops use torch's
  ``clip_grad_norm_`` and ``AveragedModel``).

The runs alternate (bare, fit, bare, fit, ...) after an untimed warm-up of each, and the medians
are reported: time per optimizer step over the whole run (fit's epoch-end work included: a
checkpoint, a CSV row and a loss-curve PNG per epoch) and fit's time per step without that
epoch-end work. The numbers go to stdout and to ``train_loop_overhead.json`` in the output folder
(``results/benchmarks/``; ``--quick``: 1 epoch of 10 steps, 1 repeat). The model is deliberately tiny
(compute per step well under a millisecond), so the overhead per step in microseconds is the number
that carries over to real models; the relative overhead here is a worst case.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lib import device as _device
from lib import runs, train

OUT = "train_loop_overhead.json"
BATCH, DIM, HIDDEN, CLASSES = 32, 64, 256, 10


def _problem(steps: int, seed: int = 0):
    runs.seed_everything(seed)
    x = torch.randn(steps * BATCH, DIM)
    y = torch.randint(0, CLASSES, (steps * BATCH,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                                         **runs.loader_seeding(seed))
    model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.GELU(), torch.nn.Linear(HIDDEN, CLASSES))
    return model, loader, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _settings(epochs: int, features: bool) -> train.TrainSettings:
    return train.TrainSettings(epochs=epochs, amp=False, best_metric=None, warmup_steps=10,
                               clip_grad_norm=1.0 if features else None, ema_decay=0.99 if features else None)


def bare(epochs: int, steps: int, features: bool) -> float:
    """Seconds per optimizer step of the loop everybody writes by hand."""
    model, loader, opt = _problem(steps)
    sched = train.warmup_cosine(opt, _settings(epochs, features), len(loader))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True) if features else None
    t = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            loss = _step(model, batch)
            loss.backward()
            if features:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
    return (time.perf_counter() - t) / (epochs * steps)


def looped(epochs: int, steps: int, features: bool) -> tuple[float, float, dict]:
    """Seconds per optimizer step of lib.train.fit: overall, without its epoch-end work, and fit's timings."""
    model, loader, opt = _problem(steps)
    settings = _settings(epochs, features)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        result = train.fit(model, _step, loader, opt, out_dir=out, config={}, settings=settings,
                           device=torch.device("cpu"))
        total = time.perf_counter() - t
    epoch_end = result.timings["checkpoint"] + result.timings["plot"]
    return total / (epochs * steps), (total - epoch_end) / (epochs * steps), result.timings


def pair(features: bool, epochs: int, steps: int, repeats: int) -> dict:
    """One pair (``features``: clip + EMA), alternating bare and fit runs after a warm-up of each."""
    bare(1, 10, features), looped(1, 10, features)  # warm-up: imports, allocator, first plot
    b, f, f_in, ckpt_s, plot_s = [], [], [], [], []
    for _ in range(repeats):
        b.append(bare(epochs, steps, features))
        total, inner, timings = looped(epochs, steps, features)
        f.append(total)
        f_in.append(inner)
        ckpt_s.append(timings["checkpoint"] / epochs)
        plot_s.append(timings["plot"] / epochs)
    mb, mf, mi = (statistics.median(v) * 1e3 for v in (b, f, f_in))
    return {
        "bare_ms_per_step": round(mb, 4), "fit_ms_per_step": round(mf, 4),
        "fit_ms_per_step_without_epoch_end": round(mi, 4),
        "overhead_us_per_step": round((mf - mb) * 1e3, 1), "overhead_pct": round(100 * (mf / mb - 1), 1),
        "overhead_without_epoch_end_us_per_step": round((mi - mb) * 1e3, 1),
        "overhead_without_epoch_end_pct": round(100 * (mi / mb - 1), 1),
        "epoch_end_ms_per_epoch": {"checkpoint": round(statistics.median(ckpt_s) * 1e3, 1),
                                   "loss_curve_png": round(statistics.median(plot_s) * 1e3, 1)},
        "min_ms_per_step": {"bare": round(min(b) * 1e3, 4), "fit": round(min(f) * 1e3, 4),
                            "fit_without_epoch_end": round(min(f_in) * 1e3, 4)},
        "runs_ms_per_step": {"bare": [round(x * 1e3, 4) for x in b], "fit": [round(x * 1e3, 4) for x in f],
                             "fit_without_epoch_end": [round(x * 1e3, 4) for x in f_in]},
    }


def loop_overhead(quick: bool, out: Path, epochs: int = 3, steps: int = 100, repeats: int = 5,
                  threads: int = 1) -> Path:
    """The ``train_loop`` extra: both pairs with ``threads`` torch intra-op threads (1: steadier on a shared
    machine; restored afterwards); writes ``out / OUT``."""
    if quick:
        epochs, steps, repeats = 1, 10, 1
    if min(epochs, steps, repeats) < 1:
        raise ValueError(f"epochs, steps and repeats must be >= 1, got {epochs}, {steps}, {repeats}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    report = {"what": "time per optimizer step, lib.train.fit vs a bare PyTorch loop, same model and data",
              "model": f"MLP {DIM}-{HIDDEN}-{HIDDEN}-{CLASSES}, batch {BATCH}, AdamW, fp32",
              "epochs": epochs, "steps_per_epoch": steps, "repeats": repeats,
              "torch_threads": threads, "statistic": "median over repeats (min alongside)",
              "device": _device.describe(torch.device("cpu")), "versions": runs.versions(),
              "date": _dt.datetime.now().isoformat(timespec="seconds"), "pairs": {}}
    try:
        for name, features in [("plain", False), ("clip+ema", True)]:
            r = report["pairs"][name] = pair(features, epochs, steps, repeats)
            print(f"{name:9s} bare {r['bare_ms_per_step']:.3f} ms/step | fit {r['fit_ms_per_step']:.3f} ms/step "
                  f"({r['overhead_pct']:+.1f} %, {r['overhead_us_per_step']:+.0f} us) | fit without epoch-end work "
                  f"{r['fit_ms_per_step_without_epoch_end']:.3f} ms/step ({r['overhead_without_epoch_end_pct']:+.1f} %, "
                  f"{r['overhead_without_epoch_end_us_per_step']:+.0f} us) | per epoch: checkpoint "
                  f"{r['epoch_end_ms_per_epoch']['checkpoint']:.0f} ms, "
                  f"png {r['epoch_end_ms_per_epoch']['loss_curve_png']:.0f} ms")
    finally:
        torch.set_num_threads(before)
    return runs.write_json(Path(out) / OUT, report)
