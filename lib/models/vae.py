"""Grayscale 2D VAE applied frame by frame to CT slice series: stage 1 of latent diffusion (04_ct_diffusion).

A series ``[B, 1, T, H, W]`` (one channel, float, CT under the diffusion window scaled to [-1, 1]) is
folded into ``B*T`` frames, each encoded by MONAI's ``AutoencoderKL`` (2D), and unfolded again. With
``channels=(64, 128, 256, 256)`` the encoder has a 1→64 stem and three 2× downsamplings: 8× spatial
compression to ``latent_channels=4``, ``(B, 1, T, 256, 256) → (B, 4, T, 32, 32)``, about 13M parameters
(the research note's 43M VAE is its own variant). MAISI's VAE is 3D-only, so it does not apply to
2D + time; grayscale is native (no RGB replication), and nothing is quantised.

Latent scale factor: the denoiser wants latents of about unit variance. :meth:`FrameVAE.encode`
multiplies by ``scale_factor`` and :meth:`FrameVAE.decode` divides by it. It is a buffer, so it travels
with the weights in every checkpoint. Either set it at construction (the research note's 0.18215 is
Stable Diffusion's value, right only for that VAE) or compute ``1 / std`` of training latents with
:meth:`FrameVAE.fit_scale_factor` (MONAI's and MAISI's practice); ``0`` means "not set yet", and
:meth:`encode`/:meth:`decode` refuse to run until it is.

The optional ``PatchDiscriminator`` of the adversarial term lives inside :class:`FrameVAE` (as the
discriminator lives inside the autoencoder's loss in the latent-diffusion code), so it is checkpointed and
resumed with the autoencoder and trained by the same optimizer. The training losses are in
:mod:`lib.losses.diffusion` (``vae_loss``); the preset's VAE is built by ``lib.families.ct_diffusion.build_vae``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from lib.models.attention import contiguous_outputs


def check_series(x: torch.Tensor, name: str = "x", channels: int = 1) -> None:
    """Raise ``ValueError`` unless ``x`` is a float series ``[B, channels, T, H, W]``."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor [B, {channels}, T, H, W], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (CT in [-1, 1], never quantised), got dtype {x.dtype}")
    if x.ndim != 5:
        raise ValueError(f"{name} must be a series [B, {channels}, T, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s) (grayscale CT; no RGB replication), "
                         f"got {x.shape[1]} in shape {tuple(x.shape)}")


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W] → [B*T, C, H, W]``."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def from_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B*T, C, H, W] → [B, C, T, H, W]``."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


class FrameVAE(nn.Module):
    """KL autoencoder (MONAI ``AutoencoderKL``, 2D) applied to every frame of a grayscale series.

    Input ``[B, 1, T, H, W]`` float, H and W divisible by ``2 ** (len(channels) - 1)``.
    ``forward(x) -> (reconstruction [B, 1, T, H, W], z_mu, z_sigma [B, latent_channels, T, h, w])``
    (unscaled latents, for training); :meth:`encode` → scaled latents ``[B, latent_channels, T, h, w]``,
    :meth:`decode` → ``[B, 1, T, H, W]``. ``h = H / 2 ** (len(channels) - 1)``.

    ``attention_levels``: self-attention per encoder/decoder level (default none: cheap at 256²);
    ``mid_attention``: the non-local attention block at the latent resolution of encoder and decoder.
    ``scale_factor``: None computes it later (:meth:`fit_scale_factor`); a number fixes it.
    ``discriminator_channels``: if set, a 2D ``PatchDiscriminator`` of that width and
    ``discriminator_layers`` layers for the adversarial term (``lib.losses.diffusion.vae_loss``).
    """

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 256), latent_channels: int = 4,
                 num_res_blocks: int = 2, norm_num_groups: int = 32, attention_levels: Sequence[bool] | None = None,
                 mid_attention: bool = True, scale_factor: float | None = None,
                 discriminator_channels: int | None = None, discriminator_layers: int = 3):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels (one 2x downsampling), got {channels}")
        bad = [c for c in channels if c <= 0 or c % norm_num_groups]
        if bad:
            raise ValueError(f"channels {channels}: every width must be a positive multiple of norm_num_groups="
                             f"{norm_num_groups}; offending: {bad}")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        attention_levels = tuple(attention_levels) if attention_levels is not None else (False,) * len(channels)
        if len(attention_levels) != len(channels):
            raise ValueError(f"attention_levels {attention_levels} must have one entry per level of channels "
                             f"{channels}")
        if scale_factor is not None and not (math.isfinite(scale_factor) and scale_factor > 0):
            raise ValueError(f"scale_factor must be None (compute it from training latents) or a number > 0, "
                             f"got {scale_factor!r}")
        self.channels, self.latent_channels = channels, latent_channels
        self.factor = 2 ** (len(channels) - 1)
        self.autoencoder = AutoencoderKL(
            spatial_dims=2, in_channels=1, out_channels=1, channels=channels, latent_channels=latent_channels,
            num_res_blocks=num_res_blocks, norm_num_groups=norm_num_groups, attention_levels=attention_levels,
            with_encoder_nonlocal_attn=mid_attention, with_decoder_nonlocal_attn=mid_attention,
            use_flash_attention=True)  # F.scaled_dot_product_attention
        contiguous_outputs(self.autoencoder, SpatialAttentionBlock)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor or 0.0)))
        self.discriminator = None
        if discriminator_channels is not None:
            if discriminator_channels < 1 or discriminator_layers < 1:
                raise ValueError(f"discriminator_channels ({discriminator_channels}) and discriminator_layers "
                                 f"({discriminator_layers}) must be >= 1")
            self.discriminator = PatchDiscriminator(spatial_dims=2, channels=discriminator_channels, in_channels=1,
                                                    out_channels=1, num_layers_d=discriminator_layers)

    # ---------------------------------------------------------------- shapes

    def _check_input(self, x: torch.Tensor, name: str = "x") -> None:
        check_series(x, name)
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"{name}: frame size {h}x{w} must be divisible by {self.factor} "
                             f"(the VAE downsamples {len(self.channels) - 1} times)")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(latent_channels, T, h, w)`` of a series of ``frames`` frames of ``height × width``."""
        return (self.latent_channels, frames, height // self.factor, width // self.factor)

    # ---------------------------------------------------------------- training pass

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction ``[B, 1, T, H, W]`` through a sampled latent, and ``z_mu``, ``z_sigma``
        ``[B, latent_channels, T, h, w]`` (unscaled)."""
        self._check_input(x)
        b = x.shape[0]
        recon, mu, sigma = self.autoencoder(to_frames(x))
        return from_frames(recon, b), from_frames(mu, b), from_frames(sigma, b)

    # ---------------------------------------------------------------- latents for diffusion

    @property
    def has_scale_factor(self) -> bool:
        return bool(self.scale_factor > 0)

    def _require_scale(self, what: str) -> None:
        if not self.has_scale_factor:
            raise RuntimeError(f"FrameVAE.{what}: the latent scale factor is not set; call fit_scale_factor(latents) "
                               f"on training latents (encode_unscaled) or pass scale_factor= at construction")

    def encode_unscaled(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Posterior means ``[B, latent_channels, T, h, w]`` without the scale factor.
        ``chunk``: encode at most this many frames at a time (memory)."""
        self._check_input(x)
        frames = to_frames(x)
        step = chunk or frames.shape[0]
        mu = torch.cat([self.autoencoder.encode(frames[i:i + step])[0] for i in range(0, frames.shape[0], step)])
        return from_frames(mu, x.shape[0])

    def encode(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Scaled latents ``[B, latent_channels, T, h, w]`` (posterior mean × ``scale_factor``)."""
        self._require_scale("encode")
        return self.encode_unscaled(x, chunk) * self.scale_factor

    def decode(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Series ``[B, 1, T, H, W]`` from scaled latents ``[B, latent_channels, T, h, w]``."""
        self._require_scale("decode")
        check_series(z, "z", self.latent_channels)
        frames = to_frames(z / self.scale_factor)
        step = chunk or frames.shape[0]
        out = torch.cat([self.autoencoder.decode(frames[i:i + step]) for i in range(0, frames.shape[0], step)])
        return from_frames(out, z.shape[0])

    @torch.no_grad()
    def fit_scale_factor(self, latents: torch.Tensor | Sequence[torch.Tensor]) -> float:
        """Set ``scale_factor = 1 / std`` of unscaled training latents (a tensor or a list of them); return it."""
        flat = torch.cat([z.detach().float().flatten() for z in ([latents] if torch.is_tensor(latents) else latents)])
        if flat.numel() < 2:
            raise ValueError(f"fit_scale_factor needs training latents, got {flat.numel()} value(s)")
        std = float(flat.std())
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"fit_scale_factor: the latents' standard deviation is {std}; cannot scale by 1/std")
        self.scale_factor.fill_(1.0 / std)
        return 1.0 / std

    def parameter_groups(self, lr: float, discriminator_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: the autoencoder at ``lr``, the discriminator (if any) at
        ``discriminator_lr`` (default ``lr``)."""
        groups = [{"params": list(self.autoencoder.parameters()), "lr": lr}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "lr": discriminator_lr or lr})
        return groups

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, except that discriminator weights may be present or absent
        on either side (a VAE trained with an adversarial term loads into one without, and vice versa)."""
        state = dict(state_dict)
        if self.discriminator is None:
            state = {k: v for k, v in state.items() if not k.startswith("discriminator.")}
        elif not any(k.startswith("discriminator.") for k in state):
            state.update({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()})
        return super().load_state_dict(state, strict=strict, assign=assign)
