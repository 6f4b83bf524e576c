"""Schedules and the DDIM sampling loop of the CT series diffusion family (see :mod:`lib.families.ct_diffusion`).

MONAI's schedulers: a 1000-step cosine schedule (Nichol & Dhariwal) trained with v-prediction, because the
cosine schedule ends at ᾱ ≈ 2e-9 (SNR ≈ 0), where epsilon-prediction is ill-conditioned; sampled with DDIM
(50 steps by default), clipping of the predicted x0 **off** (MONAI and diffusers clip to [-1, 1] by
default, which on unit-variance latents cuts about a third of the values), deterministic for ``eta=0``
and a given seed. The preset chooses them (``num_train_timesteps``, ``noise_schedule``,
``prediction_type``; :func:`schedule_of`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler


def schedule_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The noise schedule of a resolved preset, as keyword arguments of the functions below."""
    return {"num_train_timesteps": cfg["num_train_timesteps"], "schedule": cfg["noise_schedule"],
            "prediction_type": cfg["prediction_type"]}


def noise_scheduler(num_train_timesteps: int = 1000, schedule: str = "cosine",
                    prediction_type: str = "v_prediction") -> DDPMScheduler:
    """The training scheduler (MONAI ``DDPMScheduler``): ``add_noise`` and ``get_velocity``."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule, clip_sample=False,
                         prediction_type=prediction_type)


def ddim_scheduler(num_train_timesteps: int = 1000, schedule: str = "cosine", prediction_type: str = "v_prediction",
                   num_inference_steps: int = 50) -> DDIMScheduler:
    """The sampler (MONAI ``DDIMScheduler``) with clipping of the predicted x0 off (latents are not in [-1, 1])."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}")
    sched = DDIMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule, clip_sample=False,
                          prediction_type=prediction_type)
    sched.set_timesteps(num_inference_steps)
    return sched


@torch.no_grad()
def sample(model: nn.Module, cond: torch.Tensor, num_inference_steps: int = 50, eta: float = 0.0, seed: int = 0,
           progress: bool = False, *, num_train_timesteps: int = 1000, schedule: str = "cosine",
           prediction_type: str = "v_prediction") -> torch.Tensor:
    """DDIM: target latents ``[B, C, T, h, w]`` for baseline latents ``cond`` (same shape).

    ``model(z_t, timesteps, cond)``: a ``LatentDiffusion`` or ``SeriesDenoiser``. The starting noise comes
    from a CPU generator seeded with ``seed`` (the same on every device); with ``eta=0`` every step is
    deterministic, so the same seed gives the same latents.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sched = ddim_scheduler(num_train_timesteps, schedule, prediction_type, num_inference_steps)
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(cond.shape, generator=gen, dtype=torch.float32).to(cond.device)
    step_gen = gen if cond.device.type == "cpu" else torch.Generator(cond.device).manual_seed(int(seed) + 1)
    steps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="DDIM", leave=False)
    for t in steps:
        v = model(z, torch.full((cond.shape[0],), int(t), device=cond.device), cond).float()
        z, _ = sched.step(v, int(t), z, eta=eta, generator=step_gen)
    return z


@torch.no_grad()
def translate(model: nn.Module, baseline: torch.Tensor, num_inference_steps: int = 50, eta: float = 0.0,
              seed: int = 0, progress: bool = False, **schedule: Any) -> torch.Tensor:
    """Generated target series ``[B, 1, T, H, W]`` (float32) for baseline series ``[B, 1, T, H, W]``:
    encode with ``model.vae`` (a ``LatentDiffusion``), :func:`sample` (``schedule``: its keyword
    arguments), decode."""
    cond = model.vae.encode(baseline).float()
    z = sample(model, cond, num_inference_steps, eta, seed, progress, **schedule)
    return model.vae.decode(z).float()
