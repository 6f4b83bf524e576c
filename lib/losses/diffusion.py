"""Losses of the two stages of CT series latent diffusion (04_ct_diffusion).

Stage 1, the frame VAE (:func:`vae_loss`): L1 reconstruction, ``kl_weight`` × KL divergence to N(0, I)
(:func:`kl_divergence`), optionally ``ms_ssim_weight`` × (1 − MS-SSIM) (:func:`ms_ssim_loss`) and
``adv_weight`` × a least-squares patch adversarial term. The discriminator lives inside the VAE (as in the
latent-diffusion code, so it is checkpointed and resumed with it) and is trained by the same optimizer in
the same backward pass: the generator term sees the discriminator through detached weights, the
discriminator term sees detached reconstructions, so each part only receives its own gradient. MAISI's
perceptual term needs pretrained weights (none here).

Stage 2, the denoiser (:func:`diffusion_loss`): MSE to the schedule's target (the velocity for
v-prediction) at a uniform random step.

Series are ``[B, C, T, H, W]``; every 2D term runs on the ``B*T`` frames.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.metrics import compute_ms_ssim
from torch.func import functional_call

# MS-SSIM scale weights of Wang et al. (2003); fewer scales (renormalised) for small frames.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

_ADVERSARIAL = PatchAdversarialLoss(criterion="least_squares")


def _frames(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W] → [B*T, C, H, W]`` (what ``lib.models.vae.to_frames`` does; losses import no model)."""
    return x.transpose(1, 2).flatten(0, 1)


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over a frame's latent (channels and pixels), mean over frames.
    ``mu``, ``sigma``: ``[B, C, T, h, w]``."""
    mu, sigma = mu.float(), sigma.float()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.sum(dim=(1, 3, 4)).mean()


def ms_ssim_weights(size: int, kernel_sizes: Sequence[int] = (11, 9, 7)) -> tuple[tuple[float, ...], int]:
    """The most MS-SSIM scales (weights renormalised) and the widest window that fit ``size``-pixel frames:
    the coarsest scale ``size / 2**(scales-1)`` must hold the window, and MONAI's own size rule must pass.
    5 scales with an 11-pixel window at 256², 4 scales with 7 pixels at 64², 3 at 32²."""
    for n in range(len(MS_SSIM_WEIGHTS), 0, -1):
        for k in kernel_sizes:
            if size / 2 ** (n - 1) >= k and size // max(1, n - 1) ** 2 > k - 1:
                w = MS_SSIM_WEIGHTS[:n]
                return tuple(v / sum(w) for v in w), k
    raise ValueError(f"frames of {size} pixels are too small for MS-SSIM (need at least {min(kernel_sizes)})")


def ms_ssim_loss(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """``1 − MS-SSIM`` of frame series ``[B, 1, T, H, W]`` (each frame in 2D, MONAI's ``compute_ms_ssim``),
    in float32. ``data_range`` 2: the diffusion window scaled to [-1, 1]."""
    p, t = _frames(pred).float(), _frames(target).float()
    weights, k = ms_ssim_weights(min(p.shape[-2:]))
    with torch.autocast(device_type=p.device.type, enabled=False):
        value = compute_ms_ssim(p, t, spatial_dims=2, data_range=data_range, kernel_size=k, weights=weights)
    return 1.0 - value.mean()


def _logits(out) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out  # PatchDiscriminator returns every layer's output


def adversarial_terms(disc: nn.Module, recon: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(adv_g, adv_d)`` of series ``[B, 1, T, H, W]``: the least-squares generator term through the
    discriminator's *detached* weights, and the discriminator's own term on *detached* reconstructions
    (so that one backward of their weighted sum trains both players correctly)."""
    fake, real = _frames(recon), _frames(x.float())
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    adv_g = _ADVERSARIAL(_logits(functional_call(disc, frozen, (fake,))), target_is_real=True, for_discriminator=False)
    adv_d = 0.5 * (_ADVERSARIAL(_logits(disc(fake.detach())), target_is_real=False, for_discriminator=True)
                   + _ADVERSARIAL(_logits(disc(real)), target_is_real=True, for_discriminator=True))
    return adv_g, adv_d


def vae_loss(model: nn.Module, x: torch.Tensor, kl_weight: float = 1e-6, ms_ssim_weight: float = 0.0,
             adv_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stage-1 training loss of series ``x [B, 1, T, H, W]`` and its parts.

    ``model``: a ``FrameVAE`` (``model(x) -> (reconstruction, z_mu, z_sigma)``, ``model.discriminator``) or
    its DDP wrapper. ``rec`` (L1) + ``kl_weight``·``kl`` + ``ms_ssim_weight``·(1 − MS-SSIM) +
    ``adv_weight``·``adv_g`` + ``adv_d``; the last two only when ``adv_weight > 0`` (needs a discriminator;
    see :func:`adversarial_terms`).
    """
    recon, mu, sigma = model(x)
    recon = recon.float()
    rec = F.l1_loss(recon, x.float())
    kl = kl_divergence(mu, sigma)
    loss = rec + kl_weight * kl
    parts = {"rec": rec.detach(), "kl": kl.detach()}
    if ms_ssim_weight > 0:
        ms = ms_ssim_loss(recon, x)
        loss = loss + ms_ssim_weight * ms
        parts["ms_ssim"] = (1.0 - ms).detach()
    if adv_weight > 0:
        disc = getattr(model, "module", model).discriminator  # the module itself under DDP
        if disc is None:
            raise ValueError("vae_loss: adv_weight > 0 needs a FrameVAE built with discriminator_channels")
        adv_g, adv_d = adversarial_terms(disc, recon, x)
        loss = loss + adv_weight * adv_g + adv_d
        parts.update(adv_g=adv_g.detach(), adv_d=adv_d.detach())
    return loss, parts


def diffusion_loss(model: nn.Module, z0: torch.Tensor, cond: torch.Tensor, scheduler
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE between ``model(z_t, t, cond)`` and its target (v for v-prediction), t uniform over the schedule.

    ``model``: a ``LatentDiffusion`` or ``SeriesDenoiser`` (or their DDP wrapper); ``z0`` target latents and
    ``cond`` baseline latents ``[B, C, T, h, w]`` (scaled); ``scheduler``: MONAI's ``DDPMScheduler`` (its
    ``add_noise``, ``get_velocity``, ``num_train_timesteps``, ``prediction_type``). Uses torch's global RNG.
    """
    z0 = z0.float()
    noise = torch.randn_like(z0)
    t = torch.randint(0, scheduler.num_train_timesteps, (z0.shape[0],), device=z0.device)
    zt = scheduler.add_noise(z0, noise, t)
    if scheduler.prediction_type == "v_prediction":
        target = scheduler.get_velocity(z0, noise, t)
    elif scheduler.prediction_type == "epsilon":
        target = noise
    else:
        target = z0
    pred = model(zt, t, cond).float()
    loss = F.mse_loss(pred, target)
    return loss, {"mse_latent": loss.detach()}
