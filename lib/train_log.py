"""The bookkeeping of :func:`lib.train.fit`: where a run stands (:class:`Progress`, saved in every
checkpoint), which epoch is best, and what the run writes besides checkpoints (:class:`RunLog`)::

    steps.csv        every log_every optimizer steps: epoch, step, lr, loss, metrics, skipped, time_s
    epochs.csv       every epoch: the train means and, every val_every epochs, val_loss and val_<metric>
    loss_curve.png   redrawn every epoch (and every 30 s in between)

The CSVs grow a row at a time, so a killed run keeps what it logged; on resume they are cut back to
the checkpoint's progress. Only rank 0 writes them and shows the progress bar.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from lib.atomic import save_figure, write_csv


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0            # completed epochs
    batch: int = 0            # micro-batches consumed in the current epoch
    step: int = 0             # optimizer steps taken, skipped ones included (the schedule's clock)
    skipped: int = 0          # optimizer steps skipped for a non-finite loss or gradient
    in_a_row: int = 0
    lr: float | None = None   # the learning rate of the last step
    best: float | None = None
    best_epoch: int | None = None
    meters: dict = field(default_factory=lambda: {"window": {}, "epoch": {}})  # sums behind the CSV means

    def count(self, means: dict) -> None:
        """Add an optimizer step's means to the sums behind the next steps.csv and epochs.csv rows."""
        for meter in self.meters.values():
            meter["n"] = meter.get("n", 0) + 1
            for k, v in means.items():
                meter[k] = meter.get(k, 0.0) + v

    def take_means(self, which: str) -> dict:
        """The means behind a ``which`` ("window" or "epoch") row; its sums then restart."""
        meter = self.meters[which]
        n = meter.get("n", 0)
        out = {k: (v / n if n else math.nan) for k, v in meter.items() if k != "n"} or {"loss": math.nan}
        self.meters[which] = {}
        return out

    def improved(self, metrics: dict, name: str | None, mode: str, has_val: bool) -> bool:
        """Whether the epoch row ``metrics`` beats the best ``name`` so far (``mode`` "min" or "max");
        if so it becomes the best. False without the metric this epoch (no validation due)."""
        if name is None or (name.startswith("val_") and not has_val):
            return False
        if name not in metrics:
            if not any(k.startswith("val_") for k in metrics) and name.startswith("val_"):
                return False  # no validation this epoch
            raise ValueError(f"best_metric {name!r} is not an epoch metric; available: "
                             f"{', '.join(k for k in metrics if k not in ('epoch', 'step', 'time_s'))}")
        value = metrics[name]
        if value is None or not math.isfinite(value):
            return False
        better = self.best is None or (value < self.best if mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch = value, self.epoch
        return better


class RunLog:
    """steps.csv, epochs.csv, loss_curve.png and the progress bar of a run (files and bar on rank 0 only)."""

    def __init__(self, out_dir: Path, main: bool, progress: Progress, resume: bool, total_steps: int):
        self.curve, self.main = out_dir / "loss_curve.png", main
        self.steps = CsvLog(out_dir / "steps.csv", main, keep=lambda r: r["step"] <= progress.step, resume=resume)
        self.epochs = CsvLog(out_dir / "epochs.csv", main, keep=lambda r: r["epoch"] <= progress.epoch, resume=resume)
        self.bar = tqdm(total=total_steps, initial=progress.step, unit="step", dynamic_ncols=True,
                        **({} if main else {"disable": True}))  # no explicit disable on rank 0: TQDM_DISABLE=1 rules

    def step_row(self, p: Progress, n_batches: int, time_s: float) -> None:
        """A steps.csv row: the means over the optimizer steps since the previous row."""
        row = {"epoch": round(p.epoch + p.batch / n_batches, 4), "step": p.step, "lr": p.lr,
               **p.take_means("window"), "skipped": p.skipped, "time_s": time_s}
        self.steps.add(row)
        self.bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)

    @staticmethod
    def epoch_row(p: Progress, val: dict, time_s: float) -> dict:
        """The epochs.csv row of the epoch ``p`` has just completed: the train means and ``val_<name>``."""
        return {"epoch": p.epoch, "step": p.step, "lr": p.lr, **p.take_means("epoch"), "skipped": p.skipped,
                **{f"val_{k}": v for k, v in val.items()}, "time_s": time_s}

    def note(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def plot(self) -> None:
        plot_losses(self.curve, self.steps.rows, self.epochs.rows)


class CsvLog:
    """A CSV that grows a row at a time (a killed run keeps what it logged). The file is rewritten,
    atomically, only when columns appear or on resume, where rows past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, keep: Callable[[dict], bool], resume: bool):
        self.path, self.enabled = path, enabled
        self.rows = [r for r in read_csv(path) if keep(r)] if resume and enabled else []
        self.columns = list(dict.fromkeys(k for r in self.rows for k in r))
        if enabled and self.rows:
            write_csv(path, self.rows)
        elif enabled:
            path.unlink(missing_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        if not self.path.exists() or any(k not in self.columns for k in row):
            self.columns = list(dict.fromkeys([*self.columns, *row]))
            write_csv(self.path, self.rows)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)


def read_csv(path: Path) -> list[dict]:
    """The rows of a log as numbers (None for an empty cell); a line cut short by a kill is dropped."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        try:
            out.append({k: None if v in ("", None) else _number(v) for k, v in r.items()})
        except ValueError:  # a line cut short by a kill
            continue
    return out


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def plot_losses(path: Path, steps: list[dict], epochs: list[dict]) -> None:
    """The logged training loss and the validation loss against the optimizer step."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display in notebooks

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([r["step"] for r in steps], [r.get("loss") for r in steps], lw=1, label="train loss")
    val = [r for r in epochs if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(path, fig)
