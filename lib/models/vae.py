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

Training losses (:func:`vae_loss`): L1 reconstruction, ``kl_weight`` × KL divergence to N(0, I),
optionally ``ms_ssim_weight`` × (1 − MS-SSIM) and ``adv_weight`` × a least-squares patch adversarial
term. The optional ``PatchDiscriminator`` lives inside :class:`FrameVAE` (as the discriminator lives
inside the autoencoder's loss in the latent-diffusion code), so it is checkpointed and resumed with the
autoencoder and trained by the same optimizer in the same backward pass: the generator term sees the
discriminator through detached weights, the discriminator term sees detached reconstructions, so
each part only receives its own gradient. MAISI's perceptual term needs pretrained weights (none here).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.metrics import compute_ms_ssim
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch.func import functional_call

from lib.models.attention import contiguous_outputs

# MS-SSIM scale weights of Wang et al. (2003); fewer scales (renormalised) for small frames.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


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


def random_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """One random ``size × size`` crop (the same for the whole batch) of series ``[..., H, W]``, from torch's
    RNG; ``size`` 0 or the full size returns ``x``. The VAE is convolutional: crops train it at a fraction
    of the cost of whole frames."""
    h, w = x.shape[-2:]
    if not size or (size == h and size == w):
        return x
    if not 0 < size <= min(h, w):
        raise ValueError(f"crop size {size} must be in (0, {min(h, w)}] for frames of {h}x{w}")
    i, j = (int(torch.randint(0, n - size + 1, ())) for n in (h, w))
    return x[..., i:i + size, j:j + size]


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
    ``discriminator_layers`` layers for the adversarial term (:func:`vae_loss`).
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


def build_vae(config) -> FrameVAE:
    """The :class:`FrameVAE` of a 04_ct_diffusion configuration (a resolved preset): ``vae_channels``,
    ``latent_channels``, ``vae_res_blocks``, ``norm_groups``, ``vae_mid_attention``, ``scale_factor``, and
    a discriminator of ``disc_channels`` when ``adv_weight > 0``."""
    return FrameVAE(config["vae_channels"], config["latent_channels"], config["vae_res_blocks"], config["norm_groups"],
                    mid_attention=config["vae_mid_attention"], scale_factor=config["scale_factor"],
                    discriminator_channels=config["disc_channels"] if config["adv_weight"] > 0 else None)


# --------------------------------------------------------------------------- losses

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
    in float32."""
    p, t = to_frames(pred).float(), to_frames(target).float()
    weights, k = ms_ssim_weights(min(p.shape[-2:]))
    with torch.autocast(device_type=p.device.type, enabled=False):
        value = compute_ms_ssim(p, t, spatial_dims=2, data_range=data_range, kernel_size=k, weights=weights)
    return 1.0 - value.mean()


_ADVERSARIAL = PatchAdversarialLoss(criterion="least_squares")


def _logits(out) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out  # PatchDiscriminator returns every layer's output


def vae_loss(model: FrameVAE, x: torch.Tensor, kl_weight: float = 1e-6, ms_ssim_weight: float = 0.0,
             adv_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stage-1 training loss of series ``x [B, 1, T, H, W]`` and its parts.

    ``rec`` (L1) + ``kl_weight``·``kl`` + ``ms_ssim_weight``·(1 − MS-SSIM) + ``adv_weight``·``adv_g`` +
    ``adv_d``; the last two only when ``adv_weight > 0`` (needs ``model.discriminator``). ``adv_g`` is
    the least-squares generator term through the discriminator's *detached* weights; ``adv_d`` the
    discriminator's own term on *detached* reconstructions (so one backward trains both correctly).
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
        fake, real = to_frames(recon), to_frames(x.float())
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        adv_g = _ADVERSARIAL(_logits(functional_call(disc, frozen, (fake,))), target_is_real=True,
                             for_discriminator=False)
        adv_d = 0.5 * (_ADVERSARIAL(_logits(disc(fake.detach())), target_is_real=False, for_discriminator=True)
                       + _ADVERSARIAL(_logits(disc(real)), target_is_real=True, for_discriminator=True))
        loss = loss + adv_weight * adv_g + adv_d
        parts.update(adv_g=adv_g.detach(), adv_d=adv_d.detach())
    return loss, parts
