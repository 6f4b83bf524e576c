"""How :func:`lib.train.fit` trains (:class:`TrainSettings`), its optimizer and its learning-rate schedule.

Re-exported by :mod:`lib.train`; a module of its own so that the loop reads on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

import torch


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
