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
warm-up then cosine by default), the EMA update. The model trains in :func:`train_mode`: a submodule
whose parameters are all frozen (a probed encoder) stays in eval mode. The run folder ``out_dir``
receives steps.csv, epochs.csv and loss_curve.png (:mod:`lib.train_log`) and ``checkpoints/``:
last.pt (every epoch and on a time-budget stop), best.pt (by best_metric), epoch_NNNN.pt (every
ckpt_every epochs); see :mod:`lib.checkpoint`.

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

Several processes (:mod:`lib.distributed`: torchrun and :func:`init_distributed`, or :func:`launch`):
``fit`` wraps the model in DDP (pass a model you wrapped yourself to choose DDP's options), all ranks
agree on skips and stops, and only rank 0 writes files and shows a progress bar. Give each rank its
shard with a ``DistributedSampler``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lib import checkpoint as ckpt
from lib import distributed
from lib.checkpoint import CheckpointError, ConfigMismatchError, CorruptCheckpointError, UnsafeCheckpointError  # noqa: F401
from lib.device import autocast, needs_grad_scaler, pick_device
from lib.distributed import init_distributed, launch  # noqa: F401  (lib.train's interface since before the split)
from lib.train_log import Progress, RunLog

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
    rank, world = distributed.rank_and_world()
    device = device or distributed.rank_device(pick_device(config.get("device")), world)
    n_batches = _length(train_loader, "train_loader")
    steps_per_epoch = math.ceil(n_batches / s.grad_accum)
    core = model.module if isinstance(model, DDP) else model
    core.to(device)
    if scheduler is None:
        scheduler = warmup_cosine(optimizer, s, steps_per_epoch)
    ema = None if s.ema_decay is None else AveragedModel(
        core, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True)
    run = _Run(s=s, net=model, core=core, step=step, optimizer=optimizer, scheduler=scheduler, ema=ema,
               device=device, rank=rank, world=world, n_batches=n_batches, out_dir=Path(out_dir),
               resolved=ckpt.plain({**config, **asdict(s)}), generators=_loader_generators(train_loader))
    resumed = _restore(run, resume)
    if world > 1 and core is model:
        run.net = distributed.wrap(core, device)
    run.log = RunLog(run.out_dir, run.main, run.progress, resumed, total_steps=s.epochs * steps_per_epoch)
    run.metrics = dict(run.log.epochs.rows[-1]) if run.log.epochs.rows else {}
    run.t0 = run.last_plot = _clock()
    run.deadline = run.t0 + s.time_budget_s if s.time_budget_s else math.inf

    status = "completed"
    try:
        while run.progress.epoch < s.epochs:
            batches, stop = _start_epoch(run, train_loader), False
            while run.progress.batch < n_batches and not stop:
                stop = _optimizer_step(run, batches, val_loader)
            if stop:
                _save(run, improved=False)
                status = "time_budget"
                break
            if _end_epoch(run, val_loader, val_step or step):
                status = "time_budget"
                break
    finally:
        run.log.bar.close()
    return _finish(run, status)


def train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """``model.train()``, except that every submodule whose parameters (at least one) are all frozen goes
    back to eval mode: a frozen encoder keeps dropout and stochastic depth off and its normalisation
    statistics still (lib.families.downstream's linear probe)."""
    model.train()
    for m in model.modules():
        trainable = [p.requires_grad for p in m.parameters()]
        if trainable and not any(trainable):
            m.eval()
    return model


# --------------------------------------------------------------------------- the phases of fit

@dataclass
class _Run:
    """What the phases of :func:`fit` share: the run's parts, fixed after set-up, and its moving state."""

    s: TrainSettings
    net: torch.nn.Module                # what the step function gets (in DDP with several processes)
    core: torch.nn.Module               # the model itself: checkpointed, and validated without EMA
    step: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: AveragedModel | None
    device: torch.device
    rank: int
    world: int
    n_batches: int                      # micro-batches per epoch
    out_dir: Path
    resolved: dict                      # the configuration saved in every checkpoint
    generators: list                    # the train loader's generators, part of the RNG state
    progress: Progress = field(default_factory=Progress)
    pending_rng: dict | None = None     # resumed inside an epoch: its RNG states, until replayed
    epoch_rng: Any = None               # the RNG states at the start of this epoch
    last_saved: tuple | None = None     # (path, epoch, step) of this session's latest checkpoint
    log: RunLog | None = None
    metrics: dict = field(default_factory=dict)  # the latest epochs.csv row
    t0: float = 0.0
    deadline: float = math.inf
    last_plot: float = 0.0
    timings: dict = field(default_factory=lambda: {"validation": 0.0, "checkpoint": 0.0, "plot": 0.0})

    def __post_init__(self) -> None:
        self.main, self.ckpt_dir = self.rank == 0, self.out_dir / "checkpoints"
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.s.amp and needs_grad_scaler(self.device))
        # Seconds a step, a validation and a checkpoint take (measured as they happen), for the time budget.
        self.estimate = {"step": 0.0, "val": 0.0, "ckpt": 0.5 + _nbytes(self.core) / 200e6}


def _restore(run: _Run, resume: Any) -> bool:
    """Weights, optimizer, scheduler, scaler, EMA, progress and RNGs from the checkpoint to resume from;
    False for a fresh start, which is refused over another run's checkpoints."""
    state = _resume_from(resume, run.ckpt_dir, run.resolved, run.world, run.main)
    if state is None:
        if any(run.ckpt_dir.glob("*.pt")):
            raise CheckpointError(f"{run.ckpt_dir} already holds checkpoints of another run: pass resume=True to "
                                  f"continue it, or train into a new out_dir")
        return False
    run.core.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler.is_enabled() and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.progress, run.pending_rng = Progress(**state["progress"]), state["rng"][run.rank]
    if not 0 < run.progress.batch < run.n_batches:  # at an epoch boundary: nothing to replay
        ckpt.set_rng(run.pending_rng["now"], run.generators)
        run.pending_rng = None
    return True


def _start_epoch(run: _Run, train_loader: Any) -> Iterator | None:
    """The epoch's batches, past those a resumed run already trained on; the model in :func:`train_mode`."""
    # The loader draws its order and worker seeds from the RNGs when its iterator is created:
    # keep those states, so that a checkpoint inside this epoch can replay the same batches.
    p = run.progress
    if run.pending_rng is not None:
        ckpt.set_rng(run.pending_rng["epoch_start"], run.generators)
    run.epoch_rng = ckpt.get_rng(run.generators)
    run.log.bar.set_description(f"epoch {p.epoch + 1}/{run.s.epochs}", refresh=False)
    if p.batch >= run.n_batches:  # stopped after the epoch's last step, before its validation
        return None
    for sampler in {id(x): x for x in _samplers(train_loader)}.values():
        sampler.set_epoch(p.epoch)
    batches = iter(train_loader)
    for _ in range(p.batch):
        next(batches)
    if run.pending_rng is not None:
        ckpt.set_rng(run.pending_rng["now"], run.generators)
        run.pending_rng = None
    train_mode(run.net)
    return batches


def _optimizer_step(run: _Run, batches: Iterator, val_loader: Any) -> bool:
    """One optimizer step, or its skip; True when the time budget leaves no room for the next one."""
    s, p, t = run.s, run.progress, _clock()
    size = min(s.grad_accum, run.n_batches - p.batch)
    means, norm = _accumulate(run, batches, size)
    p.batch += size
    nonfinite = not (math.isfinite(norm) and math.isfinite(means["loss"]))
    need = run.estimate["step"] + run.estimate["ckpt"]
    if p.batch == run.n_batches and _validate_now(p.epoch + 1, s, val_loader):
        need += run.estimate["val"]
    # Ranks must agree: one skipping an update or stopping alone would hang the others.
    nonfinite, stop = distributed.agree([nonfinite, _clock() + need > run.deadline], run.world, run.device)
    if nonfinite:
        _skip(run, means["loss"], norm)
    else:
        _update(run, means)
    p.lr = run.optimizer.param_groups[0]["lr"]
    # The schedule follows progress through the data, skipped steps included (torch warns when that
    # happens before the first optimizer step; here it is intended).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        run.scheduler.step()
    p.step += 1
    run.log.bar.update(1)
    run.estimate["step"] = max(_clock() - t, 0.9 * run.estimate["step"])
    if p.step % s.log_every == 0:
        run.log.step_row(p, run.n_batches, time_s=round(_clock() - run.t0, 3))
        _plot(run, force=False)
    return stop


def _accumulate(run: _Run, batches: Iterator, size: int) -> tuple[dict, float]:
    """Forward and backward of ``size`` micro-batches (the loss averaged over them), then the gradients
    unscaled and clipped; returns the mean loss and metrics, and the gradient norm before clipping."""
    sums: dict[str, torch.Tensor] = {}
    for j in range(size):
        batch = _to_device(next(batches), run.device)
        # DDP all-reduces gradients in backward; between accumulated micro-batches that is wasted.
        with run.net.no_sync() if run.world > 1 and j < size - 1 else nullcontext():
            with autocast(run.device, run.s.amp):
                loss, values = _unpack(run.step(run.net, batch), "step")
            run.scaler.scale(loss / size).backward()
        for name, v in {"loss": loss, **values}.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            sums[name] = sums[name] + v.to(loss.device) if name in sums else v.to(loss.device)
    run.scaler.unscale_(run.optimizer)
    if run.s.clip_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(run.params, run.s.clip_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    names = list(sums)
    numbers = torch.stack([norm.float().to(loss.device), *(sums[k] / size for k in names)]).tolist()
    return dict(zip(names, numbers[1:])), numbers[0]


def _skip(run: _Run, loss: float, norm: float) -> None:
    """Drop a non-finite step's gradients; ``max_nonfinite`` in a row raise :class:`NonFiniteError`."""
    p = run.progress
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.update()  # backs off the fp16 loss scale when the gradients overflowed
    p.skipped += 1
    p.in_a_row += 1
    run.log.note(f"epoch {p.epoch + 1} step {p.step + 1}: non-finite loss or gradient (loss {loss:.4g}, grad "
                 f"norm {norm:.4g}); update skipped ({p.in_a_row} in a row, {p.skipped} in total)")
    if p.in_a_row >= run.s.max_nonfinite:
        raise NonFiniteError(
            f"{p.in_a_row} optimizer steps in a row had a non-finite loss or gradient (epoch {p.epoch + 1}, step "
            f"{p.step + 1}; {p.skipped} skipped in total): stopping (max_nonfinite={run.s.max_nonfinite}). "
            f"{_last_good(run.last_saved, run.ckpt_dir)}. Usual causes: NaN/Inf in the data, a learning rate "
            f"too high, no gradient clipping.")


def _update(run: _Run, means: dict) -> None:
    """The optimizer step, the EMA update, the step's means into the logs' sums."""
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(run.core)
    run.progress.in_a_row = 0
    run.progress.count(means)


def _end_epoch(run: _Run, val_loader: Any, val_step: Callable) -> bool:
    """Validation, the epoch row, checkpoints, the curve; True when the time budget leaves no room for
    the next epoch's first step."""
    s, p, val = run.s, run.progress, {}
    if _validate_now(p.epoch + 1, s, val_loader):
        t = _clock()
        val = evaluate(run.ema.module if run.ema is not None else run.core, val_step, val_loader,
                       device=run.device, amp=s.amp)
        run.estimate["val"] = _clock() - t
        run.timings["validation"] += run.estimate["val"]
    p.epoch += 1
    p.batch = 0
    run.metrics = run.log.epoch_row(p, val, time_s=round(_clock() - run.t0, 3))
    improved = p.improved(run.metrics, s.best_metric, s.best_mode, has_val=val_loader is not None)
    run.log.epochs.add(run.metrics)
    _save(run, improved)
    _plot(run, force=True)
    late = _clock() + run.estimate["step"] + run.estimate["ckpt"] > run.deadline
    return p.epoch < s.epochs and distributed.agree([late], run.world, run.device)[0]


def _save(run: _Run, improved: bool) -> None:
    """last.pt, and best.pt and epoch_NNNN.pt when due. Every rank joins (the RNG gather is collective);
    rank 0 writes. A NaN model never reaches disk."""
    t, p, to = _clock(), run.progress, run.ckpt_dir
    bad = ckpt.first_nonfinite(run.core) or (ckpt.first_nonfinite(run.ema) if run.ema is not None else None)
    if bad:
        raise NonFiniteError(f"not checkpointing: {bad!r} holds NaN or Inf at epoch {p.epoch}, step {p.step}; "
                             f"{_last_good(run.last_saved, to)}")
    in_epoch = 0 < p.batch < run.n_batches
    rng = distributed.gather({"now": ckpt.get_rng(run.generators), "epoch_start": run.epoch_rng if in_epoch else None},
                             run.world)
    if run.main:
        ckpt.save(to / "last.pt", {
            "format": ckpt.FORMAT, "model": run.core.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None, "progress": asdict(p),
            "rng": rng, "config": run.resolved, "world_size": run.world})
        if improved:
            ckpt.copy(to / "last.pt", to / "best.pt")
        if run.s.ckpt_every and p.batch == 0 and p.epoch % run.s.ckpt_every == 0:
            ckpt.copy(to / "last.pt", to / f"epoch_{p.epoch:04d}.pt")
    run.last_saved = (to / "last.pt", p.epoch, p.step)
    run.timings["checkpoint"] += _clock() - t
    run.estimate["ckpt"] = 2 * (_clock() - t)


def _plot(run: _Run, force: bool) -> None:
    if run.main and (force or _clock() - run.last_plot > 30):
        t = run.last_plot = _clock()
        run.log.plot()
        run.timings["plot"] += _clock() - t


def _finish(run: _Run, status: str) -> FitResult:
    run.timings["total"] = _clock() - run.t0
    p, last, best = run.progress, run.ckpt_dir / "last.pt", run.ckpt_dir / "best.pt"
    if status == "time_budget" and run.main:
        print(f"time budget of {run.s.time_budget_s:g} s reached: stopped at epoch {p.epoch}, step {p.step}; "
              f"checkpoint {last} (resume=True continues)")
    distributed.barrier(run.world)
    return FitResult(status=status, progress=p, metrics=run.metrics, checkpoint=last if run.main else None,
                     best_checkpoint=best if run.main and best.exists() else None, ema=run.ema, timings=run.timings)


# --------------------------------------------------------------------------- also used outside fit

@torch.no_grad()
def evaluate(model: torch.nn.Module, step: Callable, loader: Any, *, device: torch.device,
             amp: bool = True) -> dict[str, float]:
    """Mean loss and metrics of ``step`` over ``loader`` (batch means; over all ranks' batches in DDP).
    Leaves every submodule in the mode it was in (a frozen encoder stays in eval mode)."""
    n = _length(loader, "val_loader")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for batch in loader:
        with autocast(device, amp):
            loss, values = _unpack(step(model, _to_device(batch, device)), "val_step")
        for name, v in {"loss": loss, **values}.items():
            v = (v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))).to(device)
            sums[name] = sums[name] + v if name in sums else v
    for m, mode in modes:  # parents come first: a child that differed from its parent is set after it
        if m.training != mode:
            m.train(mode)
    totals = torch.stack([*sums.values(), torch.tensor(float(n), device=device)])
    totals = distributed.sum_over_ranks(totals, device).tolist()
    return {name: totals[i] / totals[-1] for i, name in enumerate(sums)}


def adamw(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with torch's fused kernel (all parameters in one kernel instead of a Python
    loop over them), the default otherwise (a device or dtype torch has no fused kernel for).

    The update rule is the same, up to float rounding (tests/test_train.py). Measured on this CPU at the
    subset presets under bf16 autocast: 7-10 % off every family's training step (SSL pretrainer
    88 -> 79 ms, CT series denoiser 1247 -> 1159 ms). ``params``: tensors or parameter groups, as for AdamW."""
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


def _nbytes(module: torch.nn.Module) -> int:
    return 3 * sum(t.numel() * t.element_size() for t in module.state_dict().values())  # Adam: two more copies
