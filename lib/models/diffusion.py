"""Latent diffusion that translates CT slice series: stage 2 of 04_ct_diffusion.

:class:`SeriesDenoiser` is a U-Net over latent frame series ``[B, C, T, h, w]`` ("2D + time"): every
spatial block (MONAI's ``DiffusionUNetResnetBlock``, ``SpatialAttentionBlock``, down- and upsamplers)
runs on each frame, and a :class:`TemporalAttention` block after each of them lets every latent pixel
attend to the same pixel in the other frames (video-diffusion style factorised space-time attention;
its output projection starts at zero, so an untrained model is a per-frame 2D U-Net). The baseline
series' latents condition it by concatenation with the noisy target latents. At ``prod``: model
channels 128, multipliers 1, 2, 4, 4, spatial attention at levels 1 and 2, two residual blocks per level.

:class:`LatentDiffusion` holds a frozen :class:`lib.models.vae.FrameVAE` (its latent scale factor
included, so one checkpoint translates) and the denoiser. The schedules (MONAI's 1000-step cosine schedule
trained with v-prediction, sampled with DDIM without clipping) and the sampling loop are in
``lib.families.ct_diffusion``; the loss is ``lib.losses.diffusion.diffusion_loss``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, SABlock, SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import (DiffusionUNetResnetBlock, DiffusionUnetDownsample,
                                                      WrappedUpsample, get_timestep_embedding)

from lib.models.attention import explicit_attention, route_short_sequences
from lib.models.vae import from_frames, to_frames


class TemporalAttention(nn.Module):
    """Self-attention across the ``T`` frames at every pixel, with a sinusoidal frame-position embedding.

    Input and output: frames ``[B*T, C, h, w]`` of ``batch`` series (residual; zero-initialised output).
    """

    def __init__(self, channels: int, num_head_channels: int = 32, norm_num_groups: int = 32):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"TemporalAttention: channels ({channels}) must be divisible by num_head_channels "
                             f"({num_head_channels})")
        self.channels = channels
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        # MONAI's SABlock holds the projections (qkv, out_proj); forward computes the attention itself.
        self.attn = SABlock(hidden_size=channels, num_heads=channels // num_head_channels, qkv_bias=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        t, p, heads = bt // batch, h * w, self.attn.num_heads
        y = self.norm(x).reshape(batch, t, c, p).permute(0, 3, 1, 2).reshape(batch * p, t, c)
        y = y + get_timestep_embedding(torch.arange(t, device=x.device), c).to(y.dtype)
        # SABlock's projections around matmul-softmax-matmul, what SABlock computes: over a few frames,
        # with fewer layout copies than its rearranges and SDPA (a third less time per layer at subset on
        # a CPU), on every device (SDPA would be slower for such short sequences in float32 on a CPU too).
        # SABlock's qkv features are ordered (q|k|v, head, channel).
        q, k, v = self.attn.qkv(y).view(batch * p, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = self.attn.out_proj(explicit_attention(q, k, v).transpose(1, 2).reshape(batch * p, t, c))
        return x + y.reshape(batch, p, t, c).permute(0, 2, 3, 1).reshape(bt, c, h, w)


class _Block(nn.Module):
    """Residual block (per frame), optional spatial attention (per frame), optional temporal attention."""

    def __init__(self, cin: int, cout: int, temb: int, spatial_attention: bool, temporal: bool, heads: int,
                 groups: int):
        super().__init__()
        self.res = DiffusionUNetResnetBlock(spatial_dims=2, in_channels=cin, out_channels=cout, temb_channels=temb,
                                            norm_num_groups=groups)
        self.attn = None
        if spatial_attention:
            self.attn = SpatialAttentionBlock(spatial_dims=2, num_channels=cout, num_head_channels=heads,
                                              norm_num_groups=groups, use_flash_attention=True)
        self.temporal = TemporalAttention(cout, heads, groups) if temporal else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch: int) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            route_short_sequences([self.attn.attn], x, x.shape[-2] * x.shape[-1])
            # MONAI's block returns channels-last strides (its SDPA path); every layer after it would inherit them,
            # and in float32 on a CPU each convolution's backward then converted its weights and their gradients
            # to that layout and back (a tenth of the subset step); under autocast the GroupNorms ran 6-13x slower.
            x = self.attn(x).contiguous()
        if self.temporal is not None:
            x = self.temporal(x, batch)
        return x


class SeriesDenoiser(nn.Module):
    """U-Net denoiser for latent frame series, conditioned on the baseline series' latents.

    ``forward(x, timesteps, cond)``: ``x`` noisy target latents ``[B, latent_channels, T, h, w]``,
    ``timesteps`` ``[B]`` (ints in [0, num_train_timesteps)), ``cond`` baseline latents
    ``[B, cond_channels, T, h, w]``; returns the prediction (here v) ``[B, latent_channels, T, h, w]``.
    ``h`` and ``w`` must be divisible by ``2 ** (len(channel_mult) - 1)``.

    ``attention_levels``: spatial self-attention per level (default: levels 1 and 2 of 4);
    ``temporal_levels``: temporal attention per level (default: every level; the middle block has both).
    """

    def __init__(self, latent_channels: int = 4, cond_channels: int = 4, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_levels: Sequence[bool] | None = None, temporal_levels: Sequence[bool] | None = None,
                 num_head_channels: int = 32, norm_num_groups: int = 32):
        super().__init__()
        mult = tuple(int(m) for m in channel_mult)
        levels = len(mult)
        if levels < 1 or any(m < 1 for m in mult):
            raise ValueError(f"channel_mult must be positive integers, got {channel_mult}")
        attention_levels = tuple(attention_levels) if attention_levels is not None else \
            tuple(i in (1, 2) for i in range(levels))
        temporal_levels = tuple(temporal_levels) if temporal_levels is not None else (True,) * levels
        for name, value in (("attention_levels", attention_levels), ("temporal_levels", temporal_levels)):
            if len(value) != levels:
                raise ValueError(f"{name} {value} needs one entry per level of channel_mult {mult}")
        ch = [model_channels * m for m in mult]
        bad = [c for c in ch if c % norm_num_groups or c % num_head_channels]
        if bad:
            raise ValueError(f"model_channels {model_channels} x channel_mult {mult} = {ch}: every width must be a "
                             f"multiple of norm_num_groups ({norm_num_groups}) and num_head_channels "
                             f"({num_head_channels}); offending: {bad}")
        if latent_channels < 1 or cond_channels < 0 or num_res_blocks < 1:
            raise ValueError(f"latent_channels ({latent_channels}) and num_res_blocks ({num_res_blocks}) must be "
                             f">= 1, cond_channels ({cond_channels}) >= 0")
        self.latent_channels, self.cond_channels, self.model_channels = latent_channels, cond_channels, model_channels
        self.factor = 2 ** (levels - 1)
        temb = 4 * model_channels
        g, heads = norm_num_groups, num_head_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = Convolution(spatial_dims=2, in_channels=latent_channels + cond_channels, out_channels=ch[0],
                                   kernel_size=3, padding=1, conv_only=True)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch[0]], ch[0]
        for i in range(levels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_Block(c, ch[i], temb, attention_levels[i], temporal_levels[i], heads, g))
                c = ch[i]
                skips.append(c)
            self.down.append(blocks)
            last = i == levels - 1
            self.downsample.append(nn.Identity() if last else DiffusionUnetDownsample(2, c, use_conv=True))
            if not last:
                skips.append(c)
        self.mid = nn.ModuleList([_Block(c, c, temb, True, True, heads, g), _Block(c, c, temb, False, False, heads, g)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(_Block(c + skips.pop(), ch[i], temb, attention_levels[i], temporal_levels[i], heads, g))
                c = ch[i]
            self.up.append(blocks)
            self.upsample.append(nn.Identity() if i == 0 else WrappedUpsample(
                spatial_dims=2, mode="nontrainable", in_channels=c, out_channels=c, interp_mode="nearest",
                scale_factor=2.0, align_corners=None,
                post_conv=Convolution(spatial_dims=2, in_channels=c, out_channels=c, kernel_size=3, padding=1,
                                      conv_only=True)))
        self.out = nn.Sequential(nn.GroupNorm(g, c, eps=1e-6), nn.SiLU(),
                                 Convolution(spatial_dims=2, in_channels=c, out_channels=latent_channels,
                                             kernel_size=3, padding=1, conv_only=True))
        nn.init.zeros_(self.out[-1].conv.weight)
        nn.init.zeros_(self.out[-1].conv.bias)

    def _check(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None) -> None:
        for name, v, c in (("x", x, self.latent_channels), ("cond", cond, self.cond_channels)):
            if v is None:
                if c:
                    raise ValueError(f"SeriesDenoiser: cond [B, {c}, T, h, w] is required")
                continue
            if not torch.is_tensor(v) or not v.is_floating_point() or v.ndim != 5 or v.shape[1] != c:
                raise ValueError(f"SeriesDenoiser: {name} must be a float tensor [B, {c}, T, h, w], got "
                                 f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}"
                                 f"{f' {v.dtype}' if torch.is_tensor(v) else ''}")
        if cond is not None and (cond.shape[0], *cond.shape[2:]) != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"SeriesDenoiser: cond {tuple(cond.shape)} must match x {tuple(x.shape)} in B, T, h, w")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"SeriesDenoiser: latent size {tuple(x.shape[-2:])} must be divisible by {self.factor}")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"SeriesDenoiser: timesteps must have shape [B] = ({x.shape[0]},), got "
                             f"{tuple(timesteps.shape)}")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, timesteps, cond)
        b, t = x.shape[0], x.shape[2]
        emb = get_timestep_embedding(timesteps, self.model_channels).to(x.dtype)
        emb = self.time_embed(emb).repeat_interleave(t, dim=0)  # one embedding per frame
        h = self.conv_in(to_frames(x if cond is None else torch.cat([x, cond], dim=1)))
        skips = [h]
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, emb, b)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb, b)
        for blocks, up in zip(self.up, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, b)
            h = up(h)
        return from_frames(self.out(h), b)


class LatentDiffusion(nn.Module):
    """A frozen frame VAE and a :class:`SeriesDenoiser`, one module so that one checkpoint translates.

    ``forward(z_t, timesteps, cond)`` is the denoiser's (what ``lib.losses.diffusion.diffusion_loss`` trains):
    latents ``[B, C, T, h, w]`` in, the prediction out. ``vae`` needs ``encode``/``decode`` of scaled latents
    (:class:`lib.models.vae.FrameVAE` with its scale factor set, a buffer: it travels in this module's
    state dict); it stays frozen and in eval mode. The schedules and the DDIM sampling loop are in
    ``lib.families.ct_diffusion``.
    """

    def __init__(self, vae: nn.Module, denoiser: SeriesDenoiser):
        super().__init__()
        latent = getattr(vae, "latent_channels", None)
        if latent is not None and (latent != denoiser.latent_channels or latent != denoiser.cond_channels):
            raise ValueError(f"LatentDiffusion: the VAE has {latent} latent channels, the denoiser takes "
                             f"{denoiser.latent_channels} (+ {denoiser.cond_channels} conditioning)")
        self.vae = vae.requires_grad_(False).eval()
        self.denoiser = denoiser

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    def forward(self, z_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(z_t, timesteps, cond)
