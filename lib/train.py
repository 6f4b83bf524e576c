"""The one training loop of the project. Every training notebook (03–06) calls :func:`fit`.

The loop is generic: it is handed a model, a *step function*, loaders, an optimizer and the resolved
configuration, and never names a model or opens a data file::

    def step(model, batch):                       # batch already on the device, inside autocast
        pred = model(batch["image"])
        loss = F.l1_loss(pred, batch["target"])
        return loss, {"mse": F.mse_loss(pred, batch["target"])}   # or just: return loss

    optimizer = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = fit(model, step, train_loader, optimizer, out_dir=run.dir, config=run.config,
                 val_loader=val_loader, resume=True)

One optimizer step: ``grad_accum`` micro-batches under autocast (bf16 on CPU and Ampere+, fp16 with a
gradient scaler on older GPUs such as the T4; :mod:`lib.device` decides), gradient clipping, a
skip of any update whose loss or gradient is not finite, the optimizer and scheduler step (linear
warm-up then cosine by default), the EMA update. The run folder ``out_dir`` receives::

    steps.csv        every log_every optimizer steps: epoch, step, lr, loss, metrics, skipped, time_s
    epochs.csv       every epoch: the train means and, every val_every epochs, val_loss and val_<metric>
    loss_curve.png   redrawn every epoch (and every 30 s in between)
    checkpoints/     last.pt (every epoch and on a time-budget stop), best.pt (by best_metric),
                     epoch_NNNN.pt (every ckpt_every epochs); see lib.checkpoint

Resume (``resume=True`` or a checkpoint path) restores weights, optimizer, scheduler, scaler, EMA,
progress and every RNG (python, numpy, torch, CUDA and the loader's generator), and continues
exactly: in the middle of an epoch it recreates the loader's iterator from the RNG states of the
epoch's start and replays (loads, does not train on) the batches already seen, so the order and
the random augmentations match an uninterrupted run. Not exact with ``persistent_workers=True``
(the workers' RNG lives in the worker processes). A resume with another configuration (any key
but those in RESUME_MAY_DIFFER) or another number of processes is refused, naming what differs.

``time_budget_s``: before each optimizer step the loop checks that the step, a validation due at
the epoch's end and a checkpoint still fit before the deadline (from measured durations); if not, it
writes last.pt and returns with ``status="time_budget"``. Non-finite loss or gradient norm: the
update is skipped (the scheduler still ticks) and counted; ``max_nonfinite`` in a row raise
:class:`NonFiniteError`; a model or EMA holding NaN/Inf is never checkpointed (same error).

Several processes: start them with torchrun (and call :func:`init_distributed`) or with
:func:`launch`; ``fit`` then wraps the model in DDP (pass a model you wrapped yourself to choose
DDP's options, e.g. ``find_unused_parameters``), all ranks agree on skips and stops, and only rank 0
writes files and shows a progress bar. Give each rank its shard with a ``DistributedSampler``.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lib import checkpoint as ckpt
from lib.checkpoint import CheckpointError, ConfigMismatchError, CorruptCheckpointError, UnsafeCheckpointError  # noqa: F401
from lib.device import autocast, needs_grad_scaler, pick_device
from lib.runs import save_figure, write_csv

# Configuration keys that may change between an interrupted run and its resume.
RESUME_MAY_DIFFER = ("resume", "time_budget_s", "device", "log_every")
_RESERVED = {"epoch", "step", "lr", "loss", "skipped", "time_s"}
_clock = time.monotonic  # the loop's only clock (tests swap it to make time budgets deterministic)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, or a non-finite model that must not be checkpointed."""


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`fit` trains; :meth:`from_config` fills it from same-named configuration keys.

    epochs         passes over the training loader
    grad_accum     micro-batches per optimizer step; the loss is averaged over them
    clip_grad_norm clip the global gradient L2 norm to this; None = no clipping
    warmup_steps   optimizer steps of linear warm-up before the cosine decay of the built-in schedule
    warmup_epochs  the same in epochs (fractions allowed); at most one of the two is non-zero
    min_lr         floor of the cosine decay (an absolute learning rate)
    ema_decay      keep an exponential moving average of the weights; None = off. Validation and
                   best.pt then judge the EMA weights, the ones worth deploying.
    val_every      validate every N epochs, and after the last
    ckpt_every     also keep checkpoints/epoch_NNNN.pt every N epochs; 0 = only last.pt and best.pt
    best_metric    epoch metric that selects best.pt ("val_loss", "val_dice", "loss", ...); None = off
    best_mode      "min" or "max"
    time_budget_s  stop cleanly, checkpoint written, before this many seconds after fit() starts
    max_nonfinite  stop after this many skipped (non-finite) optimizer steps in a row
    amp            autocast in lib.device's dtype
    log_every      a steps.csv row every N optimizer steps (means over those N)
    """

    epochs: int = 1
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    ema_decay: float | None = None
    val_every: int = 1
    ckpt_every: int = 0
    best_metric: str | None = "val_loss"
    best_mode: str = "min"
    time_budget_s: float | None = None
    max_nonfinite: int = 20
    amp: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        checks = [
            ("epochs", is_int(self.epochs) and self.epochs >= 1, "an int >= 1"),
            ("grad_accum", is_int(self.grad_accum) and self.grad_accum >= 1, "an int >= 1"),
            ("clip_grad_norm", self.clip_grad_norm is None or (is_num(self.clip_grad_norm) and self.clip_grad_norm > 0),
             "None or a number > 0"),
            ("warmup_steps", is_int(self.warmup_steps) and self.warmup_steps >= 0, "an int >= 0"),
            ("warmup_epochs", is_num(self.warmup_epochs) and self.warmup_epochs >= 0, "a number >= 0"),
            ("min_lr", is_num(self.min_lr) and self.min_lr >= 0, "a number >= 0"),
            ("ema_decay", self.ema_decay is None or (is_num(self.ema_decay) and 0 < self.ema_decay < 1),
             "None or a number in (0, 1)"),
            ("val_every", is_int(self.val_every) and self.val_every >= 1, "an int >= 1"),
            ("ckpt_every", is_int(self.ckpt_every) and self.ckpt_every >= 0, "an int >= 0 (0 = off)"),
            ("best_metric", self.best_metric is None or (isinstance(self.best_metric, str) and self.best_metric),
             "None or a metric name such as 'val_loss'"),
            ("best_mode", self.best_mode in ("min", "max"), "'min' or 'max'"),
            ("time_budget_s", self.time_budget_s is None or (is_num(self.time_budget_s) and self.time_budget_s > 0),
             "None or a number of seconds > 0"),
            ("max_nonfinite", is_int(self.max_nonfinite) and self.max_nonfinite >= 1, "an int >= 1"),
            ("amp", isinstance(self.amp, bool), "True or False"),
            ("log_every", is_int(self.log_every) and self.log_every >= 1, "an int >= 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"training setting {name!r} must be {what}, got {getattr(self, name)!r}")
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError(f"training settings 'warmup_steps' ({self.warmup_steps}) and 'warmup_epochs' "
                             f"({self.warmup_epochs}) are both set; set one of them")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "TrainSettings":
        """Settings from the same-named keys of ``config``; other keys are not the loop's concern."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be the resolved configuration (a dict), got {type(config).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return cls(**{**{k: config[k] for k in names if k in config}, **overrides})


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


@dataclass
class FitResult:
    status: str                       # "completed" or "time_budget" (resume to continue)
    progress: Progress
    metrics: dict                     # the last epochs.csv row
    checkpoint: Path | None           # last.pt (None on ranks other than 0)
    best_checkpoint: Path | None
    ema: AveragedModel | None         # ema.module holds the averaged weights
    timings: dict                     # seconds: total, validation, checkpoint, plot


def fit(model: torch.nn.Module, step: Callable, train_loader: Any, optimizer: torch.optim.Optimizer, *,
        out_dir: str | os.PathLike, config: Mapping[str, Any], val_loader: Any = None, scheduler: Any = None,
        settings: TrainSettings | None = None, val_step: Callable | None = None,
        resume: bool | str | os.PathLike = False, device: torch.device | None = None) -> FitResult:
    """Train ``model`` in place; see the module docstring.

    ``step(model, batch)`` returns the loss or ``(loss, {name: value})``; ``val_step`` (default
    ``step``) the same for validation. ``scheduler``: None builds :func:`warmup_cosine`; any other
    LR scheduler is stepped after every optimizer step. ``settings``: default
    ``TrainSettings.from_config(config)``. ``resume``: True continues from
    ``out_dir/checkpoints/last.pt`` if there is one, a path from that checkpoint.
    """
    s = settings if settings is not None else TrainSettings.from_config(config)
    out_dir, val_step = Path(out_dir), val_step or step
    ckpt_dir = out_dir / "checkpoints"
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    main = rank == 0
    device = device or _default_device(config, world)
    n_batches = _length(train_loader, "train_loader")
    steps_per_epoch = math.ceil(n_batches / s.grad_accum)
    core = model.module if isinstance(model, DDP) else model
    core.to(device)
    params = [p for p in core.parameters() if p.requires_grad]
    scheduler = scheduler if scheduler is not None else warmup_cosine(optimizer, s, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp and needs_grad_scaler(device))
    ema = None if s.ema_decay is None else AveragedModel(
        core, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True)
    resolved = ckpt.plain({**config, **asdict(s)})
    generators = _loader_generators(train_loader)

    progress, pending_rng = Progress(), None
    resumed = _resume_from(resume, ckpt_dir, resolved, world, main)
    if resumed is not None:
        core.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if scaler.is_enabled() and resumed["scaler"]:
            scaler.load_state_dict(resumed["scaler"])
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        progress, pending_rng = Progress(**resumed["progress"]), resumed["rng"][rank]
        if not 0 < progress.batch < n_batches:  # at an epoch boundary: nothing to replay
            ckpt.set_rng(pending_rng["now"], generators)
            pending_rng = None
    elif any(ckpt_dir.glob("*.pt")):
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints of another run: pass resume=True to "
                              f"continue it, or train into a new out_dir")
    ddp = world > 1
    net = DDP(core, device_ids=[device.index] if device.type == "cuda" else None) if ddp and core is model else model

    steps_log = _CsvLog(out_dir / "steps.csv", main, keep=lambda r: r["step"] <= progress.step, resume=resumed is not None)
    epochs_log = _CsvLog(out_dir / "epochs.csv", main, keep=lambda r: r["epoch"] <= progress.epoch, resume=resumed is not None)
    t0 = _clock()
    deadline = t0 + s.time_budget_s if s.time_budget_s else math.inf
    estimate = {"step": 0.0, "val": 0.0, "ckpt": 0.5 + _nbytes(core, optimizer) / 200e6}  # seconds, for the budget
    timings = {"validation": 0.0, "checkpoint": 0.0, "plot": 0.0}
    last_plot, last_saved, status = t0, None, "completed"
    metrics = dict(epochs_log.rows[-1]) if epochs_log.rows else {}
    bar = tqdm(total=s.epochs * steps_per_epoch, initial=progress.step, unit="step", dynamic_ncols=True,
               **({} if main else {"disable": True}))  # no explicit disable on rank 0: TQDM_DISABLE=1 rules

    def lr() -> float:
        return optimizer.param_groups[0]["lr"]

    def save(improved: bool) -> None:
        # Every rank joins (the RNG gather is collective); rank 0 writes. A NaN model never reaches disk.
        nonlocal last_saved
        t = _clock()
        bad = ckpt.first_nonfinite(core) or (ckpt.first_nonfinite(ema) if ema is not None else None)
        if bad:
            raise NonFiniteError(f"not checkpointing: {bad!r} holds NaN or Inf at epoch {progress.epoch}, step "
                                 f"{progress.step}; {_last_good(last_saved, ckpt_dir)}")
        in_epoch = 0 < progress.batch < n_batches
        rng = _gather({"now": ckpt.get_rng(generators), "epoch_start": epoch_rng if in_epoch else None}, world)
        if main:
            ckpt.save(ckpt_dir / "last.pt", {
                "format": ckpt.FORMAT, "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "progress": asdict(progress),
                "rng": rng, "config": resolved, "world_size": world})
            if improved:
                ckpt.copy(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
            if s.ckpt_every and progress.batch == 0 and progress.epoch % s.ckpt_every == 0:
                ckpt.copy(ckpt_dir / "last.pt", ckpt_dir / f"epoch_{progress.epoch:04d}.pt")
        last_saved = (ckpt_dir / "last.pt", progress.epoch, progress.step)
        timings["checkpoint"] += _clock() - t
        estimate["ckpt"] = 2 * (_clock() - t)

    def plot(force: bool) -> None:
        nonlocal last_plot
        if main and (force or _clock() - last_plot > 30):
            t = last_plot = _clock()
            _plot_losses(out_dir / "loss_curve.png", steps_log.rows, epochs_log.rows)
            timings["plot"] += _clock() - t

    try:
        while progress.epoch < s.epochs:
            # The loader draws its order and worker seeds from the RNGs when its iterator is created:
            # keep those states, so that a checkpoint inside this epoch can replay the same batches.
            if pending_rng is not None:
                ckpt.set_rng(pending_rng["epoch_start"], generators)
            epoch_rng = ckpt.get_rng(generators)
            bar.set_description(f"epoch {progress.epoch + 1}/{s.epochs}", refresh=False)
            stop = False
            if progress.batch < n_batches:
                for sampler in {id(x): x for x in _samplers(train_loader)}.values():
                    sampler.set_epoch(progress.epoch)
                batches = iter(train_loader)
                for _ in range(progress.batch):
                    next(batches)
                if pending_rng is not None:
                    ckpt.set_rng(pending_rng["now"], generators)
                    pending_rng = None
                net.train()
            while progress.batch < n_batches and not stop:
                t_step = _clock()
                size = min(s.grad_accum, n_batches - progress.batch)
                sums: dict[str, torch.Tensor] = {}
                for j in range(size):
                    batch = _to_device(next(batches), device)
                    # DDP all-reduces gradients in backward; between accumulated micro-batches that is wasted.
                    with net.no_sync() if ddp and j < size - 1 else nullcontext():
                        with autocast(device, s.amp):
                            loss, values = _unpack(step(net, batch), "step")
                        scaler.scale(loss / size).backward()
                    for name, v in {"loss": loss, **values}.items():
                        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                        sums[name] = sums[name] + v.to(loss.device) if name in sums else v.to(loss.device)
                progress.batch += size
                scaler.unscale_(optimizer)
                if s.clip_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
                else:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                names = list(sums)
                numbers = torch.stack([norm.float().to(loss.device), *(sums[k] / size for k in names)]).tolist()
                means = dict(zip(names, numbers[1:]))
                nonfinite = not (math.isfinite(numbers[0]) and math.isfinite(means["loss"]))
                need = estimate["step"] + estimate["ckpt"]
                if progress.batch == n_batches and _validate_now(progress.epoch + 1, s, val_loader):
                    need += estimate["val"]
                # Ranks must agree: one skipping an update or stopping alone would hang the others.
                nonfinite, stop = _agree([nonfinite, _clock() + need > deadline], world, device)
                if nonfinite:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()  # backs off the fp16 loss scale when the gradients overflowed
                    progress.skipped += 1
                    progress.in_a_row += 1
                    if main:
                        bar.write(f"epoch {progress.epoch + 1} step {progress.step + 1}: non-finite loss or gradient "
                                  f"(loss {means['loss']:.4g}, grad norm {numbers[0]:.4g}); update skipped "
                                  f"({progress.in_a_row} in a row, {progress.skipped} in total)")
                    if progress.in_a_row >= s.max_nonfinite:
                        raise NonFiniteError(
                            f"{progress.in_a_row} optimizer steps in a row had a non-finite loss or gradient (epoch "
                            f"{progress.epoch + 1}, step {progress.step + 1}; {progress.skipped} skipped in total): "
                            f"stopping (max_nonfinite={s.max_nonfinite}). {_last_good(last_saved, ckpt_dir)}. Usual "
                            f"causes: NaN/Inf in the data, a learning rate too high, no gradient clipping.")
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update_parameters(core)
                    progress.in_a_row = 0
                    for meter in progress.meters.values():
                        meter["n"] = meter.get("n", 0) + 1
                        for k, v in means.items():
                            meter[k] = meter.get(k, 0.0) + v
                progress.lr = lr()
                # The schedule follows progress through the data, skipped steps included (torch warns
                # when that happens before the first optimizer step; here it is intended).
                with warnings.catch_warnings() if nonfinite else nullcontext():
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    scheduler.step()
                progress.step += 1
                bar.update(1)
                estimate["step"] = max(_clock() - t_step, 0.9 * estimate["step"])
                if progress.step % s.log_every == 0:
                    row = {"epoch": round(progress.epoch + progress.batch / n_batches, 4), "step": progress.step,
                           "lr": progress.lr, **_means(progress.meters, "window"), "skipped": progress.skipped,
                           "time_s": round(_clock() - t0, 3)}
                    steps_log.add(row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                    plot(force=False)
            if stop:
                save(improved=False)
                status = "time_budget"
                break

            # End of an epoch: validation, the epoch row, checkpoints, the curve.
            val = {}
            if _validate_now(progress.epoch + 1, s, val_loader):
                t = _clock()
                val = evaluate(ema.module if ema is not None else core, val_step, val_loader, device=device,
                               amp=s.amp)
                estimate["val"] = _clock() - t
                timings["validation"] += estimate["val"]
            progress.epoch += 1
            progress.batch = 0
            metrics = {"epoch": progress.epoch, "step": progress.step, "lr": progress.lr, **_means(progress.meters, "epoch"),
                       "skipped": progress.skipped, **{f"val_{k}": v for k, v in val.items()},
                       "time_s": round(_clock() - t0, 3)}
            improved = _improved(metrics, progress, s, val_loader is not None)
            epochs_log.add(metrics)
            save(improved)
            plot(force=True)
            if progress.epoch < s.epochs and _agree([False, _clock() + estimate["step"] + estimate["ckpt"] > deadline],
                                                   world, device)[1]:
                status = "time_budget"
                break
    finally:
        bar.close()
    timings["total"] = _clock() - t0
    if status == "time_budget" and main:
        print(f"time budget of {s.time_budget_s:g} s reached: stopped at epoch {progress.epoch}, step "
              f"{progress.step}; checkpoint {ckpt_dir / 'last.pt'} (resume=True continues)")
    if ddp:
        dist.barrier()
    best_path = ckpt_dir / "best.pt"
    return FitResult(status=status, progress=progress, metrics=metrics,
                     checkpoint=ckpt_dir / "last.pt" if main else None,
                     best_checkpoint=best_path if main and best_path.exists() else None, ema=ema, timings=timings)


@torch.no_grad()
def evaluate(model: torch.nn.Module, step: Callable, loader: Any, *, device: torch.device,
             amp: bool = True) -> dict[str, float]:
    """Mean loss and metrics of ``step`` over ``loader`` (batch means; over all ranks' batches in DDP)."""
    n = _length(loader, "val_loader")
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for batch in loader:
        with autocast(device, amp):
            loss, values = _unpack(step(model, _to_device(batch, device)), "val_step")
        for name, v in {"loss": loss, **values}.items():
            v = (v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))).to(device)
            sums[name] = sums[name] + v if name in sums else v
    model.train(was_training)
    totals = torch.stack([*sums.values(), torch.tensor(float(n), device=device)])
    if dist.is_available() and dist.is_initialized():
        totals = totals.to(_comm_device(device))
        dist.all_reduce(totals)
    totals = totals.tolist()
    return {name: totals[i] / totals[-1] for i, name in enumerate(sums)}


def adamw(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with torch's fused kernel (all parameters in one kernel instead of a Python
    loop over them), the default otherwise (a device or dtype torch has no fused kernel for).

    The update rule is the same, up to float rounding (tests/test_train.py). Measured on this CPU at the
    subset presets under bf16 autocast: 7-10 % off every family's training step (WaveFormer pretrainer
    88 -> 79 ms, SeriesDenoiser 1247 -> 1159 ms). ``params``: tensors or parameter groups, as for AdamW."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # torch refuses fused=True for parameters it has no fused kernel for
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, settings: TrainSettings, steps_per_epoch: int) -> Any:
    """Linear warm-up, then cosine decay to ``min_lr`` over all ``epochs``, one tick per optimizer step."""
    from monai.optimizers import WarmupCosineSchedule  # importing monai costs seconds: only when needed

    warmup = settings.warmup_steps or round(settings.warmup_epochs * steps_per_epoch)
    return WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=settings.epochs * steps_per_epoch,
                                end_lr=settings.min_lr)


def load_weights(model: torch.nn.Module, path: str | os.PathLike, ema: bool = True) -> torch.nn.Module:
    """Load a lib.train checkpoint's weights into ``model`` (its EMA weights if it has them and ``ema``)."""
    state = ckpt.load_train_checkpoint(path)
    if ema and state["ema"] is not None:
        weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    return model


# --------------------------------------------------------------------------- several processes

def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that torchrun or :func:`launch` describe in the environment.

    Returns ``(rank, world_size)``; ``(0, 1)`` in a single process. Backend: nccl with CUDA, else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def launch(fn: Callable, nprocs: int, args: tuple = (), backend: str | None = None,
           start_method: str | None = None) -> None:
    """Run ``fn(*args)`` in ``nprocs`` processes joined in a process group (Kaggle's T4 x2 from a notebook).

    ``fork`` (the default where it exists) also runs functions defined in a notebook; it needs a parent
    that has not touched CUDA yet. Results travel through files: rank 0 writes them.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    import torch.multiprocessing as mp

    start_method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    if start_method == "fork" and torch.cuda.is_initialized():
        raise RuntimeError("launch: CUDA is already initialised in this process, so it cannot fork workers; "
                           "restart the kernel and call launch() before anything touches the GPU")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_launched, args=(fn, args, nprocs, port, backend), nprocs=nprocs, start_method=start_method)


def _launched(rank: int, fn: Callable, args: tuple, world: int, port: int, backend: str | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(backend)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _agree(flags: list[bool], world: int, device: torch.device) -> list[bool]:
    """True where any rank says True."""
    if world == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.float32, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- helpers

def _default_device(config: Mapping[str, Any], world: int) -> torch.device:
    device = pick_device(config.get("device"))
    if world > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _resume_from(resume: Any, ckpt_dir: Path, resolved: dict, world: int, main: bool) -> dict | None:
    if resume is False or resume is None:
        return None
    path = ckpt_dir / "last.pt" if resume is True else Path(resume)
    if resume is True and not path.exists():
        if not any(ckpt_dir.glob("*.pt")):
            if main:
                print(f"resume: no checkpoint under {ckpt_dir}; starting from scratch")
            return None
    try:
        state = ckpt.load_train_checkpoint(path)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e}. {_offer(ckpt_dir, path)}", _fallback(ckpt_dir, path)) from None
    except FileNotFoundError:
        if resume is True:
            raise CorruptCheckpointError(f"{path} is missing. {_offer(ckpt_dir, path)}", _fallback(ckpt_dir, path)) from None
        raise
    diff = ckpt.config_diff(state["config"], resolved, ignore=RESUME_MAY_DIFFER)
    if diff:
        raise ConfigMismatchError(f"{path}: refusing to resume: this run's configuration differs from the "
                                  f"checkpoint's in {len(diff)} key(s):\n  " + "\n  ".join(diff) +
                                  "\nResume with the original values, or start a new run in a new out_dir.")
    if state["world_size"] != world:
        raise ConfigMismatchError(f"{path}: refusing to resume: written by {state['world_size']} process(es), this "
                                  f"run has {world}; the batches per step and RNG streams would differ")
    if main:
        p = state["progress"]
        print(f"resume: {path} (epoch {p['epoch']}, step {p['step']}, {p['batch']} batches into the next epoch)")
    return state


def _fallback(ckpt_dir: Path, bad: Path) -> Path | None:
    found = ckpt.newest_loadable(ckpt_dir, exclude=[bad])
    return found[0] if found else None


def _offer(ckpt_dir: Path, bad: Path) -> str:
    found = ckpt.newest_loadable(ckpt_dir, exclude=[bad])
    if found is None:
        return f"No other checkpoint under {ckpt_dir} loads: start again with resume=False in a new out_dir"
    path, p = found
    return (f"The previous good checkpoint is {path} (epoch {p['epoch']}, step {p['step']}): continue from it "
            f"with resume={str(path)!r}")


def _last_good(last_saved: tuple | None, ckpt_dir: Path) -> str:
    if last_saved is None:
        return f"no checkpoint was written by this session (see {ckpt_dir})"
    path, epoch, step = last_saved
    return f"the last good checkpoint is {path} (epoch {epoch}, step {step})"


def _validate_now(epoch: int, s: TrainSettings, val_loader: Any) -> bool:
    return val_loader is not None and (epoch % s.val_every == 0 or epoch == s.epochs)


def _improved(metrics: dict, progress: Progress, s: TrainSettings, has_val: bool) -> bool:
    name = s.best_metric
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
    better = progress.best is None or (value < progress.best if s.best_mode == "min" else value > progress.best)
    if better:
        progress.best, progress.best_epoch = value, progress.epoch
    return better


def _means(meters: dict, which: str) -> dict:
    meter = meters[which]
    n = meter.get("n", 0)
    out = {k: (v / n if n else math.nan) for k, v in meter.items() if k != "n"} or {"loss": math.nan}
    meters[which] = {}
    return out


def _unpack(out: Any, what: str) -> tuple[torch.Tensor, dict]:
    loss, values = (out, {}) if torch.is_tensor(out) else (out if isinstance(out, tuple) and len(out) == 2 else (None, None))
    if not torch.is_tensor(loss) or loss.numel() != 1 or not isinstance(values, Mapping):
        raise TypeError(f"the {what} function must return a scalar loss tensor or (loss, {{name: value}}), got "
                        f"{type(out).__name__}" + (f" with loss shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))
    clash = _RESERVED & set(values) | {k for k in values if not isinstance(k, str) or k.startswith("val_")}
    if clash:
        raise ValueError(f"the {what} function returned metric name(s) {sorted(map(str, clash))}, which the loop "
                         f"uses itself ({', '.join(sorted(_RESERVED))}, val_*); rename them")
    return loss.reshape(()), dict(values)


def _to_device(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _length(loader: Any, name: str) -> int:
    try:
        n = len(loader)
    except TypeError:
        raise ValueError(f"{name} must have a length (a DataLoader over a map-style dataset); "
                         f"got {type(loader).__name__} without len()") from None
    if n == 0:
        raise ValueError(f"{name} yields no batches (empty dataset, or drop_last with fewer samples than a batch)")
    return n


def _samplers(loader: Any) -> list:
    found = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    return [x for x in found if hasattr(x, "set_epoch")]


def _loader_generators(loader: Any) -> list[torch.Generator]:
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    unique = {id(g): g for g in found if isinstance(g, torch.Generator)}
    return list(unique.values())


def _nbytes(*objs: Any) -> int:
    total = sum(t.numel() * t.element_size() for o in objs if isinstance(o, torch.nn.Module) for t in o.state_dict().values())
    return 3 * total  # optimizer state: Adam keeps two more copies


class _CsvLog:
    """A CSV that grows a row at a time (a killed run keeps what it logged). The file is rewritten,
    atomically, only when columns appear or on resume, where rows past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, keep: Callable[[dict], bool], resume: bool):
        self.path, self.enabled = path, enabled
        self.rows = [r for r in _read_csv(path) if keep(r)] if resume and enabled else []
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


def _read_csv(path: Path) -> list[dict]:
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


def _plot_losses(path: Path, steps: list[dict], epochs: list[dict]) -> None:
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
