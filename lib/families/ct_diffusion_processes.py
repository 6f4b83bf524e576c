"""04_ct_diffusion's two training stages: their calls into :func:`lib.train.fit` (:func:`fit_vae`,
:func:`fit_denoiser`, in whatever process trains), and their process functions for several processes
(:mod:`lib.multigpu`, ``python -m lib.launch``).

A process function rebuilds from the configuration what the notebook's cells built before the stage, then calls the stage's
fit. Stage 2
takes the VAE as stage 1 left it: ``denoiser_checkpoint``'s, else the run's ``vae/`` (beside its
``denoiser/``), else ``vae_checkpoint``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from lib import distributed, multigpu
from lib.config import Config
from lib.families import ct_diffusion as cd
from lib.families.common import resume_mode
from lib.models.diffusion import LatentDiffusion
from lib.train import FitResult, TrainSettings, adamw, fit, load_weights


def fit_vae(cfg: Mapping[str, Any], vae: torch.nn.Module, data: Mapping, out_dir: Path, device: torch.device | None,
            time_budget_s: float | None) -> FitResult:
    """Stage 1's call into :func:`lib.train.fit` (in this process: one of several, or the only one)."""
    train, val = cd.vae_loaders(cfg, data)
    train_step, val_step = cd.vae_steps(cfg)
    # the preset's grad_accum and ema_decay are the denoiser's
    settings = TrainSettings.from_config(cfg, epochs=cfg["vae_epochs"], grad_accum=cfg["vae_grad_accum"], ema_decay=None,
                                         time_budget_s=time_budget_s)
    optimizer = adamw(vae.parameter_groups(cfg["vae_lr"]), weight_decay=cfg["weight_decay"])
    # DDP's defaults: the discriminator exists only with adv_weight > 0 and then gets its gradient outside the
    # VAE's forward, which DDP's hooks see all the same (find_unused_parameters would mark it ready twice)
    return fit(vae, train_step, train, optimizer, out_dir=out_dir, config=cfg, settings=settings, val_loader=val,
               val_step=val_step, resume=resume_mode(cfg), device=device)


def fit_denoiser(cfg: Mapping[str, Any], ldm: LatentDiffusion, latents: Mapping, out_dir: Path,
                 device: torch.device | None, time_budget_s: float | None) -> FitResult:
    """Stage 2's call into :func:`lib.train.fit` (the frozen VAE has no gradient: DDP's defaults fit)."""
    train, val = cd.denoiser_loaders(cfg, latents)
    train_step, val_step = cd.denoiser_steps(cfg)
    optimizer = adamw(ldm.denoiser.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return fit(ldm, train_step, train, optimizer, out_dir=out_dir, config=cfg,
               settings=TrainSettings.from_config(cfg, time_budget_s=time_budget_s), val_loader=val,
               val_step=val_step, resume=resume_mode(cfg), device=device)


def fit_stage(stage: str, cfg: Mapping[str, Any], model: torch.nn.Module, data: Mapping, run,
              time_budget_s: float | None) -> FitResult:
    """Stage ``"vae"`` (``data``: the series) or ``"denoiser"`` (``data``: the latents) into ``run.dir/<stage>``:
    in this process, or in ``gpus`` processes (:func:`vae_process`, :func:`denoiser_process`)."""
    n = multigpu.processes(cfg)
    if n > 1:
        process = {"vae": vae_process, "denoiser": denoiser_process}[stage]
        return multigpu.fit_in_processes(process, Config(cfg, time_budget_s=time_budget_s), run.dir / stage, model,
                                         run.device, n)
    fit_here = {"vae": fit_vae, "denoiser": fit_denoiser}[stage]
    return fit_here(cfg, model, data, run.dir / stage, run.device, time_budget_s)


def vae_process(cfg: Mapping[str, Any], out_dir: Path) -> tuple[torch.nn.Module, FitResult | None]:
    vae = cd.build_vae(cfg)
    if not cfg["vae_epochs"] or cfg["denoiser_checkpoint"]:
        return vae, None
    if cfg["vae_checkpoint"]:
        load_weights(vae, cfg["vae_checkpoint"])
    _, _, data = cd.load_pairs(cfg)
    return vae, fit_vae(cfg, vae, data, out_dir, None, cfg["time_budget_s"])


def denoiser_process(cfg: Mapping[str, Any], out_dir: Path) -> tuple[torch.nn.Module, FitResult | None]:
    vae, denoiser = cd.build_vae(cfg), cd.build_denoiser(cfg)
    ldm = LatentDiffusion(vae, denoiser)
    if not cfg["epochs"]:
        return ldm, None
    if cfg["denoiser_checkpoint"]:
        load_weights(ldm, cfg["denoiser_checkpoint"])
    elif cfg["vae_epochs"]:
        load_weights(vae, Path(out_dir).parent / "vae" / "checkpoints" / "last.pt")
    else:
        load_weights(vae, cfg["vae_checkpoint"])
    device = distributed.process_device(cfg.get("device"))
    vae.to(device).eval()
    _, _, data = cd.load_pairs(cfg)
    latents = cd.encode_latents(cfg, vae, data, device)
    return ldm, fit_denoiser(cfg, ldm, latents, out_dir, device, cfg["time_budget_s"])


PROCESSES = ((vae_process, "vae"), (denoiser_process, "denoiser"))
