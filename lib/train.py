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

One optimizer step: ``grad_accum`` micro-batches under autocast (:mod:`lib.device`: bf16 on CPU and
Ampere+, fp16 with loss scaling on a T4), clipping, a skip of any non-finite update, the optimizer,
the scheduler (warm-up then cosine by default), the EMA. The model trains in :func:`train_mode`: a submodule
whose parameters are all frozen (a probed encoder) stays in eval mode. The run folder ``out_dir``
receives steps.csv, epochs.csv and loss_curve.png (:mod:`lib.train_log`) and ``checkpoints/``:
last.pt (every epoch and on a time-budget stop), best.pt (by best_metric), epoch_NNNN.pt (every
ckpt_every epochs); see :mod:`lib.checkpoint`.

Resume (``resume=True`` or a checkpoint path) restores weights, optimizer, scheduler, scaler, EMA,
progress and every RNG, and continues exactly: mid-epoch it recreates the loader's iterator from the
epoch's starting RNG states and replays (loads, does not train on) the batches already seen (not
exact with ``persistent_workers=True``). A resume with another configuration (any key
but those in RESUME_MAY_DIFFER) or another number of processes is refused, naming what differs.

``time_budget_s``: before each step the loop checks that the step, a validation due at the epoch's end
and a checkpoint still fit before the deadline (measured); if not, it writes last.pt and returns with
``status="time_budget"``. A non-finite loss or gradient norm skips the update (the scheduler still ticks);
``max_nonfinite`` in a row raise :class:`NonFiniteError`; a model or EMA with NaN/Inf is never checkpointed.

Several processes (:mod:`lib.distributed`: torchrun + :func:`init_distributed`, or :func:`launch`): ``fit``
wraps the model in DDP (or takes one you wrapped), ranks agree on skips and stops, only rank 0 writes
and shows a progress bar; give each rank its shard with a ``DistributedSampler``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lib import checkpoint as ckpt
from lib import distributed
from lib.checkpoint import (CheckpointError, ConfigMismatchError, CorruptCheckpointError,  # noqa: F401  (re-exported)
                            UnsafeCheckpointError, load_weights)
from lib.device import autocast, needs_grad_scaler, to_device
from lib.distributed import init_distributed, launch  # noqa: F401  (lib.train's interface since before the split)
from lib.train_log import Progress, RunLog
from lib.loaders import length as _length, loader_generators as _loader_generators, samplers as _samplers
from lib.train_settings import TrainSettings, adamw, warmup_cosine  # noqa: F401  (lib.train's interface)

RESUME_MAY_DIFFER = ("resume", "time_budget_s", "device", "log_every", "gpus")  # may change between a run and its resume
_RESERVED = {"epoch", "step", "lr", "loss", "skipped", "time_s"}
_clock = time.monotonic  # the loop's only clock (tests swap it to make time budgets deterministic)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, or a non-finite model that must not be checkpointed."""


@dataclass
class FitResult:
    status: str                       # "completed" or "time_budget" (resume to continue)
    progress: Progress
    metrics: dict                     # the last epochs.csv row
    checkpoint: Path | None           # last.pt
    best_checkpoint: Path | None
    ema: AveragedModel | None         # ema.module holds the averaged weights
    timings: dict                     # seconds: total, validation, checkpoint, plot


def fit(model: torch.nn.Module, step: Callable, train_loader: Any, optimizer: torch.optim.Optimizer, *,
        out_dir: str | os.PathLike, config: Mapping[str, Any], val_loader: Any = None, scheduler: Any = None,
        settings: TrainSettings | None = None, val_step: Callable | None = None,
        resume: bool | str | os.PathLike = False, device: torch.device | None = None,
        ddp: Mapping[str, Any] | None = None) -> FitResult:
    """Train ``model`` in place; see the module docstring.

    ``step(model, batch)`` returns the loss or ``(loss, {name: value})``; ``val_step`` (default
    ``step``) the same for validation. ``scheduler``: None builds :func:`warmup_cosine`; any other
    LR scheduler is stepped after every optimizer step. ``settings``: default
    ``TrainSettings.from_config(config)``. ``resume``: True continues from
    ``out_dir/checkpoints/last.pt`` (none there is an error), ``"auto"`` continues from it if there is one and
    starts afresh otherwise (a stage a resumed run had not reached), a path from that checkpoint. ``ddp``: options of
    ``DistributedDataParallel`` for this model in several processes (:func:`lib.distributed.wrap`).
    """
    s = settings if settings is not None else TrainSettings.from_config(config)
    rank, world = distributed.rank_and_world()
    device = device or distributed.process_device(config.get("device"))
    n_batches = _length(train_loader, "train_loader")
    steps_per_epoch = math.ceil(n_batches / s.grad_accum)
    core = model.module if isinstance(model, DDP) else model
    core.to(device)
    net = model
    if world > 1 and core is model:  # DDP gives every rank rank 0's weights and buffers: before the EMA copies them
        net = distributed.wrap(core, device, **(ddp or {}))
    if scheduler is None:
        scheduler = warmup_cosine(optimizer, s, steps_per_epoch)
    ema = None if s.ema_decay is None else AveragedModel(
        core, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True)
    run = _Run(s=s, net=net, core=core, step=step, optimizer=optimizer, scheduler=scheduler, ema=ema,
               device=device, rank=rank, world=world, n_batches=n_batches, out_dir=Path(out_dir),
               resolved=ckpt.plain({**config, **asdict(s)}), generators=_loader_generators(train_loader))
    resumed = _restore(run, resume)
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
    state = ckpt.resume_state(resume, run.ckpt_dir, run.resolved, run.world, run.main, RESUME_MAY_DIFFER)
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
    run.progress = Progress(**state["progress"])
    if state["world_size"] != run.world:  # a finished run (ckpt.resume_state refuses others): no RNG to restore
        return True
    run.pending_rng = state["rng"][run.rank]
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
        batch = to_device(next(batches), run.device)
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
    distributed.sync_buffers(run.core, run.world)
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
    # Every rank gets the paths (rank 0 wrote the files before the barrier): a family that loads the best
    # weights after fit does so on every rank (the run folder must be on a file system all ranks share).
    return FitResult(status=status, progress=p, metrics=run.metrics, checkpoint=last,
                     best_checkpoint=best if best.exists() else None, ema=run.ema, timings=run.timings)


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
            loss, values = _unpack(step(model, to_device(batch, device)), "val_step")
        for name, v in {"loss": loss, **values}.items():
            v = (v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))).to(device)
            sums[name] = sums[name] + v if name in sums else v
    for m, mode in modes:  # parents come first: a child that differed from its parent is set after it
        if m.training != mode:
            m.train(mode)
    totals = torch.stack([*sums.values(), torch.tensor(float(n), device=device)])
    totals = distributed.sum_over_ranks(totals, device).tolist()
    return {name: totals[i] / totals[-1] for i, name in enumerate(sums)}


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


def _nbytes(module: torch.nn.Module) -> int:
    return 3 * sum(t.numel() * t.element_size() for t in module.state_dict().values())  # Adam: two more copies
