"""WaveFormer3D: a 3D vision transformer whose self-attention runs on the Haar-wavelet low band.

One encoder for brain MRI (1 channel) and CT (3 windowed channels): two patch embeddings, chosen by
the input's channel count, feed one shared stack of transformer blocks (research note A1, "dual patch
embedding"). Inside every block, attention follows WaveFormer (Al Hasan et al., 2025): the token grid
is decomposed by an orthonormal 3D Haar transform (``wavelet_levels`` times), multi-head attention
(``F.scaled_dot_product_attention``) runs on the low-frequency band only, and the inverse transform
brings the result back to full resolution together with the untouched detail bands (weighted by a
learned per-channel gain that starts at zero, so a fresh block adds the upsampled attention and
learns how much of the detail to add). One level divides the number of attended tokens by 8, so the
quadratic part of attention by 64; ``python -m lib.bench --only attention`` measures it against full attention.
Because the transform is linear and orthonormal, that whole pipeline equals, per cell of ``2**levels``
tokens per axis, ``up(attention(mean) - g * mean) + g * x``: the layer computes it so (average pooling,
attention, nearest upsampling), and :func:`wavelet_attention_reference`, with the explicit transforms,
is what the tests hold it to (float64: equal to 1e-15, gradients included).

Shapes::

    x            [B, 1 or 3, D, H, W]      D, H, W multiples of patch_size (any other channel count: ValueError)
    embed(x)     [B, E, d, h, w]           d = D / patch_size (the token grid), E = embed_dim
    forward(x)   [B, E, d, h, w]           the final, layer-normalised feature map
    forward(x, return_intermediate=True)   list of ``depth`` maps [B, E, d, h, w], one per block;
                                           the last is the final (normalised) map

Positional encoding: ``"sincos"`` (fixed, computed for whatever grid the input has) or ``"learned"``
(a table at the grid of ``img_size``, trilinearly resized for other grids); both work at any grid.
``grad_checkpointing=True`` recomputes each block in the backward pass (activation memory of one block
instead of all) when training. ``self.config`` holds the constructor arguments, so a checkpoint can
rebuild the module (see :func:`lib.checkpoint.save_encoder`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lib.models.attention import attention

IN_CHANNELS = (1, 3)  # MRI, CT (three windows)
POS_EMBEDS = ("sincos", "learned")


# --------------------------------------------------------------------------- Haar wavelet transform

def _haar_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """8x8 orthonormal 3D Haar analysis matrix: row k = sub-band (bits d, h, w: 0 low, 1 high), column j
    = offset (od, oh, ow) inside a 2x2x2 cell. Row 0 is the low band (LLL). Symmetric, its own inverse."""
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    return torch.kron(torch.kron(h, h), h).to(device=device, dtype=dtype)


def haar_dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 3D Haar transform.

    ``x`` [B, C, D, H, W] with even D, H, W -> coefficients [B, C, 8, D/2, H/2, W/2]; band 0 is the
    low band (the 2x2x2 mean times sqrt(8)), bands 1..7 the details (band index bits: d, h, w).
    """
    if x.ndim != 5:
        raise ValueError(f"haar_dwt3d: x must be [B, C, D, H, W], got shape {tuple(x.shape)}")
    b, c, d, h, w = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"haar_dwt3d: spatial size must be even, got {(d, h, w)}")
    cells = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    cells = cells.reshape(b, c, 8, d // 2, h // 2, w // 2)
    return torch.einsum("kj,bcjdhw->bckdhw", _haar_matrix(x.device, x.dtype), cells)


def haar_idwt3d(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_dwt3d`: [B, C, 8, d, h, w] -> [B, C, 2d, 2h, 2w]."""
    if coeffs.ndim != 6 or coeffs.shape[2] != 8:
        raise ValueError(f"haar_idwt3d: coefficients must be [B, C, 8, d, h, w], got shape {tuple(coeffs.shape)}")
    b, c, _, d, h, w = coeffs.shape
    cells = torch.einsum("kj,bckdhw->bcjdhw", _haar_matrix(coeffs.device, coeffs.dtype), coeffs)
    cells = cells.reshape(b, c, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return cells.reshape(b, c, 2 * d, 2 * h, 2 * w)


# --------------------------------------------------------------------------- positional encoding

def sincos_position_encoding(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 3D sine-cosine positional encoding, [dim, d, h, w].

    ``dim // 6`` frequencies per axis, laid out as MONAI's ``build_sincos_position_embedding``
    (sin/cos of axis 1, of axis 0, of axis 2), which it equals when ``dim`` is a multiple of 6; the
    ``dim % 6`` channels left over are zero (MONAI refuses such dims; 128 is one of them).
    """
    if dim < 6:
        raise ValueError(f"sincos_position_encoding: dim must be >= 6, got {dim}")
    n = dim // 6
    omega = 1.0 / temperature ** (torch.arange(n, dtype=torch.float64) / n)
    axes = torch.meshgrid(*[torch.arange(int(s), dtype=torch.float64) for s in grid], indexing="ij")
    parts = []
    for axis in (1, 0, 2):
        angles = axes[axis].reshape(-1, 1) * omega  # [N, n]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    table = F.pad(table, (0, dim - table.shape[1]))
    return table.T.reshape(dim, *[int(s) for s in grid]).float()


# --------------------------------------------------------------------------- blocks

def _replicate_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` [B, C, d, h, w] padded at the far end of each axis (replicate) to a multiple of ``multiple``."""
    pad = [p for s in reversed(x.shape[2:]) for p in (0, (-s) % multiple)]
    return F.pad(x, pad, mode="replicate") if any(pad) else x


class WaveletAttention(nn.Module):
    """Multi-head self-attention on the Haar low band of the token grid, inverse-transformed back.

    ``x`` [B, E, d, h, w] -> [B, E, d, h, w]. The grid is padded (replicate) to a multiple of
    ``2**levels`` and cropped back, so any grid works.
    """

    def __init__(self, dim: int, num_heads: int, levels: int = 1, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WaveletAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if levels < 0:
            raise ValueError(f"WaveletAttention: levels must be >= 0, got {levels}")
        self.num_heads, self.levels = num_heads, levels
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # How much of the detail bands the inverse transform adds back, per channel; 0 at first.
        self.detail_gain = nn.Parameter(torch.zeros(dim))

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain multi-head self-attention over a token sequence [B, N, E] (also the full-attention baseline)."""
        b, n, e = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, self.num_heads, e // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed in closed form (:func:`wavelet_attention_reference` spells out the transforms).

        The orthonormal Haar transform is linear, and its low band after ``L`` levels is the mean over
        each cell of ``2**L`` voxels per axis times ``sqrt(8)**L``. Replacing that band by attention over
        the cell means (scaled alike) and multiplying every detail band by ``g`` (``detail_gain``), the
        inverse transform gives, voxel by voxel, ``up(attention(mean) - g * mean) + g * x``, with ``up``
        repeating a cell's value over the cell: one pooling, one upsampling, no transforms.
        """
        size, m = x.shape[2:], 2 ** self.levels
        x = _replicate_pad(x, m)
        mean = F.avg_pool3d(x, m) if self.levels else x
        attended = self.attend(mean.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(mean.shape)
        if not self.levels:
            return attended  # full attention on every token
        # Full-size work in the attention's dtype (bf16 under autocast, as the transforms' matmuls were).
        gain = self.detail_gain.view(1, -1, 1, 1, 1).to(attended.dtype)
        out = F.interpolate(attended - gain * mean.to(attended.dtype), scale_factor=m, mode="nearest")
        out = out.addcmul_(gain, x.to(attended.dtype))  # in place: the upsampling's backward keeps no output
        return out[:, :, : size[0], : size[1], : size[2]]


def wavelet_attention_reference(attn: WaveletAttention, x: torch.Tensor) -> torch.Tensor:
    """What :meth:`WaveletAttention.forward` computes, spelled out with the transforms: ``levels`` Haar
    analyses of the (replicate-padded) grid, attention on the low band (taken as cell means), every detail
    band times ``detail_gain``, ``levels`` Haar syntheses, crop. The tests compare the two."""
    size = x.shape[2:]
    low = _replicate_pad(x, 2 ** attn.levels)
    details = []
    for _ in range(attn.levels):
        coeffs = haar_dwt3d(low)
        low, detail = coeffs[:, :, 0], coeffs[:, :, 1:]
        details.append(detail)
    scale = math.sqrt(8.0) ** attn.levels
    out = attn.attend((low / scale).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(low.shape) * scale
    gain = attn.detail_gain.view(1, -1, 1, 1, 1, 1).to(out.dtype)
    for detail in reversed(details):
        out = haar_idwt3d(torch.cat([out.unsqueeze(2), detail.to(out.dtype) * gain], dim=2))
    return out[:, :, : size[0], : size[1], : size[2]]


class WaveFormerBlock(nn.Module):
    """Pre-norm transformer block: x + WaveletAttention(LN(x)), then x + MLP(LN(x)). [B, E, d, h, w] in and out."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, levels: int = 1, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        from monai.networks.blocks import MLPBlock
        from monai.networks.layers import DropPath

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WaveletAttention(dim, num_heads, levels, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), 0.0, act="GELU")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @staticmethod
    def _channels_last(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 4, 1)

    @staticmethod
    def _channels_first(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._channels_first(self.norm1(self._channels_last(x)))
        x = x + self.drop_path(self.attn(y))
        z = self._channels_last(x)
        z = z + self.drop_path(self.mlp(self.norm2(z)))
        return self._channels_first(z)


# --------------------------------------------------------------------------- the backbone

class WaveFormer3D(nn.Module):
    """The pre-training backbone; see the module docstring for shapes.

    Args:
        img_size: nominal input size (voxels per axis); sets the learned positional table's grid
            (``img_size // patch_size``). Inputs of other sizes (multiples of ``patch_size``) work.
        patch_size: voxels per token along each axis (convolution kernel = stride).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer width, blocks, heads, MLP width
            factor, bias of the q/k/v projection.
        wavelet_levels: Haar levels before attention (0: full attention on every token).
        pos_embed: ``"sincos"`` or ``"learned"``.
        drop_path: stochastic-depth rate of the last block (linearly from 0 over the blocks).
        grad_checkpointing: recompute blocks in the backward pass (saves activation memory).
        return_intermediate: what ``forward`` returns when its own argument is None (``load_encoder``
            sets it, so that ``encoder(x)`` gives the list of feature maps).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, embed_dim: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, wavelet_levels: int = 1, pos_embed: str = "sincos",
                 qkv_bias: bool = True, drop_path: float = 0.0, grad_checkpointing: bool = False,
                 return_intermediate: bool = False):
        super().__init__()
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("embed_dim", embed_dim),
                            ("depth", depth), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WaveFormer3D: {name} must be an int >= 1, got {value!r}")
        if img_size % patch_size:
            raise ValueError(f"WaveFormer3D: img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"WaveFormer3D: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if embed_dim < 6:
            raise ValueError(f"WaveFormer3D: embed_dim must be >= 6 (3D positional encoding), got {embed_dim}")
        if not isinstance(wavelet_levels, int) or wavelet_levels < 0:
            raise ValueError(f"WaveFormer3D: wavelet_levels must be an int >= 0, got {wavelet_levels!r}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"WaveFormer3D: pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"WaveFormer3D: drop_path must be in [0, 1), got {drop_path!r}")
        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=float(mlp_ratio), wavelet_levels=wavelet_levels,
                           pos_embed=pos_embed, qkv_bias=qkv_bias, drop_path=float(drop_path),
                           grad_checkpointing=grad_checkpointing, return_intermediate=return_intermediate)
        self.patch_size, self.embed_dim, self.depth = patch_size, embed_dim, depth
        self.grad_checkpointing, self.return_intermediate = grad_checkpointing, return_intermediate
        self.patch_embed_1ch = nn.Conv3d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_embed_3ch = nn.Conv3d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid, grid)) if pos_embed == "learned" else None
        self._sincos: dict[tuple, torch.Tensor] = {}
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(WaveFormerBlock(embed_dim, num_heads, mlp_ratio, wavelet_levels, qkv_bias, r)
                                    for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for conv in (self.patch_embed_1ch, self.patch_embed_3ch):  # as a linear layer on the flattened patch (MAE)
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding by channel count: [B, 1 or 3, D, H, W] -> tokens [B, E, d, h, w] (no position yet)."""
        if x.ndim != 5:
            raise ValueError(f"WaveFormer3D: input must be [B, C, D, H, W], got shape {tuple(x.shape)}")
        channels = x.shape[1]
        if channels not in IN_CHANNELS:
            raise ValueError(f"WaveFormer3D: unsupported channel count {channels}; expected 1 (MRI) or 3 (CT windows)")
        bad = [s for s in x.shape[2:] if s % self.patch_size or s == 0]
        if bad:
            raise ValueError(f"WaveFormer3D: spatial size {tuple(x.shape[2:])} must be positive multiples of "
                             f"patch_size {self.patch_size}")
        conv = self.patch_embed_1ch if channels == 1 else self.patch_embed_3ch
        # A convolution whose kernel is its stride is a matrix product per patch: computed so, channels-last (on a
        # CPU, oneDNN's weight gradient of this convolution cost more than every linear layer of the subset step).
        b, p, (d, h, w) = x.shape[0], self.patch_size, (s // self.patch_size for s in x.shape[2:])
        patches = x.reshape(b, channels, d, p, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        tokens = F.linear(patches.reshape(b, d, h, w, -1), conv.weight.flatten(1), conv.bias)
        return tokens.permute(0, 4, 1, 2, 3)  # [B, E, d, h, w], stored channels-last

    def position(self, grid: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The positional encoding of a token grid, [1, E, d, h, w]."""
        grid = tuple(int(s) for s in grid)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if tuple(pos.shape[2:]) != grid:
                pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
            return pos.to(dtype)
        key = (grid, str(device), dtype)
        if key not in self._sincos:
            self._sincos[key] = sincos_position_encoding(grid, self.embed_dim).to(device=device, dtype=dtype)[None]
        return self._sincos[key]

    def forward_tokens(self, tokens: torch.Tensor, return_intermediate: bool | None = None):
        """Blocks over embedded tokens [B, E, d, h, w] (e.g. with some replaced by a mask token)."""
        if tokens.ndim != 5 or tokens.shape[1] != self.embed_dim:
            raise ValueError(f"WaveFormer3D: tokens must be [B, {self.embed_dim}, d, h, w], got shape {tuple(tokens.shape)}")
        if return_intermediate is None:
            return_intermediate = self.return_intermediate
        x = tokens + self.position(tokens.shape[2:], tokens.device, tokens.dtype)
        maps = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            maps.append(x)
        final = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        if not return_intermediate:
            return final
        maps[-1] = final
        return maps

    def forward(self, x: torch.Tensor, return_intermediate: bool | None = None):
        """``x`` [B, 1 or 3, D, H, W] -> final map [B, E, d, h, w], or the list of every block's map."""
        return self.forward_tokens(self.embed(x), return_intermediate)
