"""Self-supervised pre-training of :class:`~lib.models.waveformer.WaveFormer3D`: MiM masking, a SparK-style
dense encoder/decoder over the masked grid, masked-voxel reconstruction and spatial InfoNCE.

One forward pass of :class:`WaveFormerSparKMiMPretrainer` on ``x`` [B, 1 or 3, D, H, W]:

1. **Masked input.** The patch embedding turns ``x`` into tokens [B, E, d, h, w]; the ``masking`` it
   is given (the family passes :class:`~lib.losses.masking.MiMHierarchicalMasking`) draws the global
   mask (60 % of blocks) and the local mask nested in it; masked tokens are replaced by a learned
   ``mask_token`` *before* the transformer, so the encoder never sees a masked voxel.
2. **Encoder.** The WaveFormer blocks run on that grid (all ``depth`` maps are kept).
3. **SparK-style sparse levels** (:class:`SparseEncoder3D`): the final map, with masked positions
   emptied (zero), and ``spark_levels`` stride-2 stages computed as SparK emulates sparse convolution
   densely: every convolution's output is multiplied by the visibility of its level (a coarse
   position is visible when any of its 2x2x2 children is, as a strided sparse convolution would
   have it), and normalisation statistics come from visible positions only (:class:`MaskedGroupNorm`).
4. **Decoder** (:class:`LightDecoder3D`, SparK's light U-Net decoder): from the coarsest level up,
   empty positions are filled with that level's learned mask token, projected, added to the upsampled
   coarser result and convolved; a 1x1x1 head per input channel count predicts every token's voxel
   patch (``patch_size**3 * C`` values).
5. **Losses.** Reconstruction: MSE against the per-patch-normalised voxel patch (mean 0, variance 1 per
   patch, as MAE and SparK), over masked tokens only (reported also for the local "hard" and the
   global-only "easy" targets). Contrastive: the module that ``contrastive`` builds (the family passes
   :class:`~lib.losses.contrastive.SpatialInfoNCE`) between encoder depths ``contrastive_levels`` at
   visible locations. ``loss = recon + contrastive_weight * contrast`` (0.5).

Why not the research notes' objective (reconstruct the backbone's own features at masked positions of
an unmasked input): that target moves with the encoder and is met by collapsing the features, and an
encoder that saw the input cannot learn to infer what was hidden. Voxel targets cannot collapse.

The masking and the contrastive loss come in as constructor arguments, so this module imports no loss
and every research value (mask ratios, temperature, ...) is set by whoever builds the network
(:func:`lib.families.pretrain.build` from a resolved configuration). The steps, the held-out evaluation
and the encoder's checkpoint live in :mod:`lib.families.pretrain` and :mod:`lib.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.models.waveformer import IN_CHANNELS, WaveFormer3D


# --------------------------------------------------------------------------- patches

def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, N, C * p**3], tokens in (d, h, w) order, values in (c, pd, ph, pw) order."""
    b, c, d, h, w = x.shape
    p = patch_size
    if d % p or h % p or w % p:
        raise ValueError(f"patchify: spatial size {(d, h, w)} is not a multiple of patch_size {p}")
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (d // p) * (h // p) * (w // p), c * p ** 3)


def unpatchify(patches: torch.Tensor, channels: int, patch_size: int, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, C * p**3] -> [B, C, d*p, h*p, w*p]."""
    b = patches.shape[0]
    p, (d, h, w) = patch_size, (int(s) for s in grid)
    x = patches.reshape(b, d, h, w, channels, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, d * p, h * p, w * p)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch standardisation (MAE's ``norm_pix_loss``): returns ``(normalised, mean, std)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


# --------------------------------------------------------------------------- SparK-style sparse levels

def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class MaskedGroupNorm(nn.Module):
    """GroupNorm whose mean and variance come from the visible positions only; masked outputs are 0.

    ``forward(x [B, C, *S], visible [B, 1, *S] in {0, 1})`` -> [B, C, *S]. Statistics are taken in float32.
    """

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"MaskedGroupNorm: channels ({channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        xg = x.float().reshape(b, self.num_groups, c // self.num_groups, -1)
        v = visible.float().reshape(b, 1, 1, -1)
        n = (v.sum(dim=-1, keepdim=True) * xg.shape[2]).clamp(min=1.0)
        mean = (xg * v).sum(dim=(2, 3), keepdim=True) / n
        var = (((xg - mean) ** 2) * v).sum(dim=(2, 3), keepdim=True) / n
        y = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        shape = (1, c) + (1,) * (x.ndim - 2)
        return (y * self.weight.view(shape) + self.bias.view(shape)) * visible.float()


def _pad_even(t: torch.Tensor) -> torch.Tensor:
    pad = [p for s in reversed(t.shape[2:]) for p in (0, s % 2)]
    return F.pad(t, pad) if any(pad) else t


class _SparseStage(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.down = nn.Conv3d(in_channels, dim, kernel_size=2, stride=2)
        self.norm1 = MaskedGroupNorm(_groups(dim), dim)
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.norm2 = MaskedGroupNorm(_groups(dim), dim)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visible = F.max_pool3d(_pad_even(visible), 2)  # visible if any child is (strided sparse conv)
        x = F.gelu(self.norm1(self.down(_pad_even(x)) * visible, visible))
        x = F.gelu(self.norm2(self.conv(x) * visible, visible))
        return x, visible


class SparseEncoder3D(nn.Module):
    """Dense emulation of SparK's sparse encoder on the token grid.

    ``forward(x [B, C, d, h, w], visible [B, 1, d, h, w] float)`` -> list of ``levels + 1`` pairs
    ``(features, visible)``: level 0 is ``x`` with masked positions zeroed, level k has ``dim``
    channels on a grid halved k times (odd sizes padded). Masked positions hold 0 at every level.
    """

    def __init__(self, in_channels: int, dim: int, levels: int):
        super().__init__()
        if levels < 0:
            raise ValueError(f"SparseEncoder3D: levels must be >= 0, got {levels}")
        self.stages = nn.ModuleList(_SparseStage(in_channels if i == 0 else dim, dim) for i in range(levels))
        self.channels = [in_channels] + [dim] * levels

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = x * visible.to(x.dtype)
        out = [(x, visible)]
        for stage in self.stages:
            x, visible = stage(x, visible)
            out.append((x, visible))
        return out


class _DecoderBlock(nn.Module):
    """3x3x3 convolution, GroupNorm, GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(_groups(dim), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(self.conv(x)))


class LightDecoder3D(nn.Module):
    """SparK's light decoder: per-level mask tokens fill the empty positions, coarse to fine.

    ``forward(levels)`` takes :class:`SparseEncoder3D`'s output and returns [B, dim, d, h, w] on level 0's grid.
    """

    def __init__(self, level_channels: Sequence[int], dim: int):
        super().__init__()
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1, 1)) for c in level_channels)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        self.densify = nn.ModuleList(nn.Conv3d(c, dim, kernel_size=1) for c in level_channels)
        self.up = nn.ModuleList(nn.ConvTranspose3d(dim, dim, kernel_size=2, stride=2) for _ in level_channels[1:])
        self.blocks = nn.ModuleList(_DecoderBlock(dim) for _ in level_channels)

    def forward(self, levels: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if len(levels) != len(self.densify):
            raise ValueError(f"LightDecoder3D: expected {len(self.densify)} levels, got {len(levels)}")
        h = None
        for k in reversed(range(len(levels))):
            features, visible = levels[k]
            dense = torch.where(visible.bool(), features, self.mask_tokens[k].to(features.dtype))
            d = self.densify[k](dense)
            if h is not None:
                d = d + self.up[k](h)[:, :, : d.shape[2], : d.shape[3], : d.shape[4]]
            h = self.blocks[k](d)
        return h


# --------------------------------------------------------------------------- the pretrainer

@dataclass
class PretrainOutput:
    loss: torch.Tensor          # recon + contrastive_weight * contrast
    recon: torch.Tensor         # per-patch-normalised MSE over masked tokens
    contrast: torch.Tensor      # spatial InfoNCE
    recon_local: torch.Tensor   # the same MSE over the local ("hard") masked tokens
    recon_easy: torch.Tensor    # ... over the global-only ("easy") masked tokens
    pred: torch.Tensor          # [B, N, C * p**3] predicted normalised patches (every token)
    target: torch.Tensor        # [B, N, C * p**3] normalised voxel patches
    masks: Any                  # what the masking drew: .masked, .local, .visible [B, d, h, w], .block_size
    features: list              # the encoder's maps [B, E, d, h, w], one per block

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"recon": self.recon.detach(), "contrast": self.contrast.detach(),
                "recon_local": self.recon_local.detach(), "recon_easy": self.recon_easy.detach()}


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(per_token.shape).float()
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


class WaveFormerSparKMiMPretrainer(nn.Module):
    """WaveFormer3D + MiM + SparK-style decoder + spatial InfoNCE; see the module docstring.

    Args:
        encoder: the backbone to pre-train (kept as ``self.encoder``; its weights are what is exported).
        masking: draws the masks, ``masking(batch_size, grid, generator=, device=)`` -> an object with
            ``masked`` and ``local`` [B, d, h, w] booleans, ``visible`` and ``block_size``
            (:class:`lib.losses.masking.MiMHierarchicalMasking`); kept as ``self.masking``.
        contrastive: builds the cross-level contrastive loss from the channel counts of the compared
            maps, ``contrastive([E, E]) -> module(features, visible, generator) -> scalar`` (e.g.
            ``functools.partial(SpatialInfoNCE, projection_dim=128, temperature=0.1, num_samples=256)``);
            the module is ``self.contrastive``. It is built here, after the decoder, because its
            projections draw their initial weights from torch's generator in that order.
        spark_dim, spark_levels: channels and number of stride-2 sparse stages above the token grid.
            With the adaptive MiM block edge b, levels <= log2(b) (1 at grids <= 8, 2 at 16) make every
            level hold fully masked positions, so every level's mask token is trained at every step.
        decoder_dim: width of the light decoder.
        contrastive_weight: weight of the contrastive term (0.5).
        contrastive_levels: indices of the encoder blocks whose maps the InfoNCE compares (shallow -> deep).
        norm_eps: epsilon of the per-patch normalisation of the targets.

    ``forward(x, masks=None, generator=None)``: ``x`` [B, 1 or 3, D, H, W] -> :class:`PretrainOutput`.
    Masks are drawn from ``generator`` (or torch's global generator) unless given.
    """

    def __init__(self, encoder: WaveFormer3D, *, masking: Callable[..., Any],
                 contrastive: Callable[[list[int]], nn.Module], spark_dim: int = 128, spark_levels: int = 1,
                 decoder_dim: int = 64, contrastive_weight: float = 0.5, contrastive_levels: Sequence[int] = (0, -1),
                 norm_eps: float = 1e-6):
        super().__init__()
        if not isinstance(encoder, WaveFormer3D):
            raise ValueError(f"WaveFormerSparKMiMPretrainer: encoder must be a WaveFormer3D, got {type(encoder).__name__}")
        if not callable(masking) or not callable(contrastive):
            raise ValueError(f"WaveFormerSparKMiMPretrainer: masking and contrastive must be callables, got "
                             f"{type(masking).__name__} and {type(contrastive).__name__}")
        levels = [int(i) for i in contrastive_levels]
        if len(levels) < 2 or any(not -encoder.depth <= i < encoder.depth for i in levels):
            raise ValueError(f"WaveFormerSparKMiMPretrainer: contrastive_levels must be >= 2 block indices in "
                             f"[-{encoder.depth}, {encoder.depth}), got {list(contrastive_levels)}")
        if contrastive_weight < 0:
            raise ValueError(f"WaveFormerSparKMiMPretrainer: contrastive_weight must be >= 0, got {contrastive_weight}")
        e, p = encoder.embed_dim, encoder.patch_size
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, e, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.masking = masking
        self.sparse_encoder = SparseEncoder3D(e, spark_dim, spark_levels)
        self.decoder = LightDecoder3D(self.sparse_encoder.channels, decoder_dim)
        self.heads = nn.ModuleDict({f"{c}ch": nn.Conv3d(decoder_dim, c * p ** 3, kernel_size=1) for c in IN_CHANNELS})
        self.contrastive = contrastive([e] * len(levels))
        self.contrastive_levels, self.contrastive_weight, self.norm_eps = levels, float(contrastive_weight), norm_eps

    def draw_masks(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Any:
        grid = [s // self.encoder.patch_size for s in x.shape[2:]]
        return self.masking(x.shape[0], grid, generator=generator, device=x.device)

    def forward(self, x: torch.Tensor, masks: Any = None, generator: torch.Generator | None = None) -> PretrainOutput:
        tokens = self.encoder.embed(x)  # validates shape and channels
        b, grid = x.shape[0], tokens.shape[2:]
        if masks is None:
            masks = self.draw_masks(x, generator)
        if tuple(masks.masked.shape) != (b, *grid):
            raise ValueError(f"WaveFormerSparKMiMPretrainer: masks must be [B, d, h, w] = {(b, *grid)}, "
                             f"got shape {tuple(masks.masked.shape)}")
        hidden = masks.masked[:, None]
        tokens = torch.where(hidden, self.mask_token.to(tokens.dtype), tokens)
        maps = self.encoder.forward_tokens(tokens, return_intermediate=True)
        # The SparK levels, decoder and head run in float32: they cost little next to the transformer, and
        # bf16 on CPU computes wrong weight gradients for a 3x3x3 convolution over a side of 2 voxels
        # (oneDNN, torch 2.13; errors up to 1e33), which is what a coarse level of a small grid is.
        with torch.autocast(device_type=x.device.type, enabled=False):
            visible = (~hidden).float()
            decoded = self.decoder(self.sparse_encoder(maps[-1].float(), visible))
            pred = self.heads[f"{x.shape[1]}ch"](decoded).flatten(2).transpose(1, 2)
        target, _, _ = normalise_patches(patchify(x.float(), self.encoder.patch_size), self.norm_eps)
        per_token = ((pred - target) ** 2).mean(dim=-1)  # [B, N]
        recon = _masked_mean(per_token, masks.masked)
        contrast = self.contrastive([maps[i] for i in self.contrastive_levels], masks.visible, generator)
        return PretrainOutput(
            loss=recon + self.contrastive_weight * contrast, recon=recon, contrast=contrast,
            recon_local=_masked_mean(per_token, masks.local),
            recon_easy=_masked_mean(per_token, masks.masked & ~masks.local),
            pred=pred, target=target, masks=masks, features=maps)
