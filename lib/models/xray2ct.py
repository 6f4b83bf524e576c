"""Radiographs to CT: ``HybridCNNViTUNet3D`` reconstructs a 3D CT volume from N X-ray views (06_xray_to_ct).

The research note's "medical-grade hybrid CNN-ViT" (design note D), generalised from two views to N::

    views [B, V, 1, S, S]
      -> MultiScaleFeaturePyramid (per view, shared weights): maps at 1, 1/2, 1/4, 1/8 of S
      -> CrossViewAttention at 1/8: every view's tokens attend to the tokens of all other views
         (frontal <-> lateral in both directions for V = 2; self-attention when V = 1)
      -> multi-scale merge: the four levels and the attended tokens, resampled to D x D
      -> 2D->3D projection: each view's map is back-projected along its rays into the D^3 grid
      -> ViewFusion3D: the V back-projected volumes (+ voxel coordinates + the prior) -> one feature volume
      -> 3D U-Net: residual dense blocks (4 layers) at every level, attention gates on every skip,
         hybrid CNN + 3D Swin blocks (window 4) at the mid encoder level (1/4), in the bottleneck (1/16)
         and at the mid decoder level (1/4)
      -> deep supervision: an output at 1/8, 1/4, 1/2 and full resolution.

Geometry of the views (that of :mod:`lib.data.drr`): parallel rays, the source rotated by ``angle`` degrees
about the patient's superior axis (0 frontal, 90 lateral); image rows run superior -> inferior, columns
patient right -> left in the frontal view. The volume is RAS ``[X, Y, Z]``. A voxel at normalised
coordinates ``(x, y, z)`` in [-1, 1] (voxel centres, ``align_corners=False``) is seen in the view at
angle ``a`` at image coordinates (normalised the same way)::

    u (column) = -(e_x * x * cos a + e_y * y * sin a)        v (row) = -e_z * z

where ``volume_extent = (e_x, e_y, e_z)`` is the half-extent of the volume along R, A, S in units of the
image's half-width (:meth:`lib.data.datasets.DRRVolumes.volume_extent` computes it for a cohort).

Output parameterisation: with a ``prior`` volume (e.g. the mean training CT) the network predicts a
residual on top of it, with zero-initialised output heads, so an untrained model returns the prior
exactly; without one it predicts the volume directly. The prior is a buffer (saved with the weights).

``grad_checkpointing=True`` recomputes, in the backward pass, the 2D pyramid, the view fusion and every
U-Net block (activation memory of their inputs and of one block instead of all) when training: at the
prod volume of 128^3 one patient's activations otherwise take about 14 GB under fp16 autocast
(:mod:`lib.bench.memory`).

The network only: building it from a 06_xray_to_ct configuration, the angles of N views and the inference
loop are in :mod:`lib.families.xray_to_ct`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.attentionunet import AttentionBlock
from monai.networks.nets.swin_unetr import BasicLayer
from torch.utils.checkpoint import checkpoint


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when they divide the channels (batches of 1-2 volumes rule out BatchNorm)."""
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def conv_block(dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> Convolution:
    """Conv -> GroupNorm -> LeakyReLU (MONAI ``Convolution``)."""
    return Convolution(spatial_dims=dims, in_channels=cin, out_channels=cout, kernel_size=kernel, strides=stride,
                       act=("leakyrelu", {"negative_slope": 0.1, "inplace": True}),
                       norm=("group", {"num_groups": _groups(cout)}))


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sine-cosine position codes ``[h * w, dim]`` (dim divisible by 4), for any image size."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    ay, ax = ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)


def view_grid(angles: Sequence[float], size: int, extent: Sequence[float]) -> torch.Tensor:
    """Where each voxel of a ``size``^3 RAS grid falls in each view: ``[V, size, size * size, 2]`` (u, v)
    for ``F.grid_sample`` (see the module docstring for the geometry)."""
    c = (torch.arange(size, dtype=torch.float64) * 2 + 1) / size - 1  # voxel centres, align_corners=False
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    grids = []
    for a in angles:
        r = math.radians(a)
        u = -(extent[0] * x * math.cos(r) + extent[1] * y * math.sin(r))
        v = -extent[2] * z
        grids.append(torch.stack([u, v], dim=-1).reshape(size, size * size, 2))
    return torch.stack(grids).float()


def backproject(planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """2D->3D projection: ``planes`` ``[B, V, C, H, W]`` smeared along each view's rays -> ``[B, V, C, D, D, D]``."""
    b, v, c, h, w = planes.shape
    d = grid.shape[1]
    g = grid.to(planes.dtype).unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * v, d, d * d, 2)
    out = F.grid_sample(planes.reshape(b * v, c, h, w), g, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(b, v, c, d, d, d)


# --------------------------------------------------------------------------- 2D: per-view features

class MultiScaleFeaturePyramid(nn.Module):
    """Per-view CNN features at 1, 1/2, 1/4 and 1/8 of the image: ``[N, 1, S, S]`` -> 4 maps with
    ``channels[i]`` channels at ``S / 2**i``."""

    def __init__(self, channels: Sequence[int], in_channels: int = 1):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"MultiScaleFeaturePyramid needs 4 channel counts (scales 1, 1/2, 1/4, 1/8), "
                             f"got {channels}")
        stages, cin = [], in_channels
        for i, c in enumerate(channels):
            stages.append(nn.Sequential(conv_block(2, cin, c, stride=1 if i == 0 else 2), conv_block(2, c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class CrossViewAttention(nn.Module):
    """Cross-view transformer layer for N views (pre-norm, ``F.scaled_dot_product_attention``).

    ``tokens`` ``[B, V, N, C]``: the queries of view ``v`` attend to the keys/values of every other view
    (for V = 2: frontal -> lateral and lateral -> frontal, the research note's bidirectional attention,
    with shared weights); with one view the layer is plain self-attention. Then a GELU MLP (ratio 4).
    """

    def __init__(self, channels: int, heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"CrossViewAttention: channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_mlp = (nn.LayerNorm(channels) for _ in range(3))
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, heads, N, C / heads]
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, v, n, c = tokens.shape
        q_all, (k_all, v_all) = self.q(self.norm_q(tokens)), self.kv(self.norm_kv(tokens)).chunk(2, dim=-1)
        out = []
        for i in range(v):
            others = [j for j in range(v) if j != i] or [i]
            k = k_all[:, others].reshape(b, -1, c)
            val = v_all[:, others].reshape(b, -1, c)
            a = F.scaled_dot_product_attention(self._split(q_all[:, i]), self._split(k), self._split(val))
            out.append(a.transpose(1, 2).reshape(b, n, c))
        x = tokens + self.proj(torch.stack(out, dim=1))
        return x + self.mlp(self.norm_mlp(x))


# --------------------------------------------------------------------------- 3D: blocks of the U-Net

class ResidualDenseBlock3D(nn.Module):
    """Residual dense block: ``layers`` 3x3x3 conv layers, each fed all earlier outputs (growth
    ``growth`` channels each), a 1x1x1 fusion back to ``channels`` and a residual connection.
    ``[B, C, D, H, W]`` -> same shape."""

    def __init__(self, channels: int, growth: int, layers: int = 4):
        super().__init__()
        if layers < 1 or growth < 1:
            raise ValueError(f"ResidualDenseBlock3D: layers ({layers}) and growth ({growth}) must be >= 1")
        self.layers = nn.ModuleList(conv_block(3, channels + i * growth, growth) for i in range(layers))
        self.fuse = nn.Conv3d(channels + layers * growth, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return x + self.fuse(torch.cat(feats, dim=1))


class SwinTransformerBlock3D(nn.Module):
    """Two 3D Swin transformer blocks (window, then shifted window; MONAI's ``BasicLayer``).
    ``[B, C, D, H, W]`` -> same shape; windows shrink to the volume when it is smaller."""

    def __init__(self, channels: int, heads: int = 8, window: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SwinTransformerBlock3D: channels ({channels}) must be divisible by heads ({heads})")
        self.layer = BasicLayer(dim=channels, depth=2, num_heads=heads, window_size=(window,) * 3, drop_path=[0.0, 0.0],
                                qkv_bias=True, downsample=None, use_flash_attention=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.contiguous())


class TransformerEnhancedBlock3D(nn.Module):
    """Hybrid CNN + transformer block: a residual dense block, then a local 3x3x3 conv branch and a
    global Swin branch side by side, concatenated, fused by a 1x1x1 conv, added back. Shape-preserving."""

    def __init__(self, channels: int, growth: int, heads: int = 8, window: int = 4, dense_layers: int = 4):
        super().__init__()
        self.dense = ResidualDenseBlock3D(channels, growth, dense_layers)
        self.local = conv_block(3, channels, channels)
        self.globl = SwinTransformerBlock3D(channels, heads, window)
        self.fuse = nn.Conv3d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense(x)
        return x + self.fuse(torch.cat([self.local(x), self.globl(x)], dim=1))


class EncoderBlock3D(nn.Module):
    """Strided 3x3x3 conv (halves the size; none at the first level), then a residual dense block or a
    hybrid block."""

    def __init__(self, cin: int, cout: int, growth: int, down: bool, hybrid: bool, heads: int, window: int,
                 dense_layers: int):
        super().__init__()
        self.down = down
        self.entry = conv_block(3, cin, cout, stride=2 if down else 1)
        self.body = (TransformerEnhancedBlock3D(cout, growth, heads, window, dense_layers) if hybrid
                     else ResidualDenseBlock3D(cout, growth, dense_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.entry(x))


class DecoderBlock3D(nn.Module):
    """Transposed conv (doubles the size), attention gate on the skip (MONAI ``AttentionBlock``, gated by
    the upsampled decoder features), concatenation, 3x3x3 conv, then a residual dense or hybrid block."""

    def __init__(self, cin: int, cskip: int, cout: int, growth: int, hybrid: bool, heads: int, window: int,
                 dense_layers: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2)
        self.gate = AttentionBlock(spatial_dims=3, f_int=max(cskip // 2, 1), f_g=cout, f_l=cskip)
        self.merge = conv_block(3, cout + cskip, cout)
        self.body = (TransformerEnhancedBlock3D(cout, growth, heads, window, dense_layers) if hybrid
                     else ResidualDenseBlock3D(cout, growth, dense_layers))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        return self.body(self.merge(torch.cat([up, self.gate(g=up, x=skip)], dim=1)))


# --------------------------------------------------------------------------- the model

class HybridCNNViTUNet3D(nn.Module):
    """N radiographs -> CT volume (see the module docstring for the pipeline and the view geometry).

    Input ``views`` ``[B, V, 1, S, S]`` with ``V = len(angles)`` and ``S = image_size``, in the order of
    ``angles``. Output ``(volume, deep)``: ``volume`` ``[B, 1, D, D, D]`` (``D = volume_size``, RAS axes,
    same units as the training targets, e.g. HU mapped to [0, 1]; not clipped) and ``deep``, the
    deep-supervision outputs ``[B, 1, D/8, ...]``, ``[B, 1, D/4, ...]``, ``[B, 1, D/2, ...]`` (coarse
    first; with ``volume`` they are the 4 output scales).

    Args:
        angles: view angles in degrees about the superior axis (0 frontal, 90 lateral); any number >= 1.
        image_size: S, divisible by 8 (the pyramid's 1/8 level carries the cross-view attention).
        volume_size: D, divisible by 16 (four 2x downsamplings to the bottleneck).
        base_channels: c; the U-Net has c, 2c, 4c, 8c channels at 1, 1/2, 1/4, 1/8 and 16c in the
            bottleneck; the 2D pyramid has c, 2c, 4c, 8c at 1, 1/2, 1/4, 1/8.
        attention_channels / attention_heads / cross_view_layers: width, heads and depth of the
            cross-view transformer (the note: 512 channels, 8 heads).
        swin_heads / window_size: heads and window of the 3D Swin blocks (the note: 8 and 4).
        growth / dense_layers: growth rate (default c/2 at each level) and layers (the note: 4) of the
            residual dense blocks.
        volume_extent: the volume's half-extent along R, A, S in image half-widths (the geometry above).
        prior: ``[D, D, D]`` or ``[1, D, D, D]`` volume the network adds its output to (a residual
            parameterisation; e.g. the mean training volume); None: the network predicts the volume.
        grad_checkpointing: recompute the pyramid, the fusion and the U-Net blocks in the backward pass
            (less activation memory, about a third more compute).
    """

    def __init__(self, angles: Sequence[float] = (0.0, 90.0), image_size: int = 512, volume_size: int = 64,
                 base_channels: int = 32, attention_channels: int = 512, attention_heads: int = 8,
                 cross_view_layers: int = 1, swin_heads: int = 8, window_size: int = 4, growth: int | None = None,
                 dense_layers: int = 4, volume_extent: Sequence[float] = (1.0, 1.0, 1.0),
                 prior: torch.Tensor | None = None, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        angles = tuple(float(a) for a in angles)
        if not angles or not all(math.isfinite(a) for a in angles):
            raise ValueError(f"angles must be one or more finite angles in degrees, got {angles!r}")
        if not isinstance(image_size, int) or image_size < 8 or image_size % 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {image_size!r}")
        if not isinstance(volume_size, int) or volume_size < 16 or volume_size % 16:
            raise ValueError(f"volume_size must be a positive multiple of 16, got {volume_size!r}")
        if not isinstance(base_channels, int) or base_channels < 1:
            raise ValueError(f"base_channels must be a positive int, got {base_channels!r}")
        if attention_channels % attention_heads or attention_channels % 4:
            raise ValueError(f"attention_channels ({attention_channels}) must be divisible by attention_heads "
                             f"({attention_heads}) and by 4")
        swin_levels = (4 * base_channels, 16 * base_channels)
        if any(c % swin_heads for c in swin_levels):
            raise ValueError(f"swin_heads ({swin_heads}) must divide the Swin levels' channels {swin_levels} "
                             f"(4 and 16 x base_channels {base_channels})")
        if len(volume_extent) != 3 or not all(e > 0 for e in volume_extent):
            raise ValueError(f"volume_extent must be 3 positive numbers (R, A, S), got {volume_extent!r}")
        if growth is not None and growth < 1:
            raise ValueError(f"growth must be None or >= 1, got {growth!r}")
        d = volume_size
        if prior is None:
            prior = torch.zeros(1, 1, d, d, d)
        else:
            prior = torch.as_tensor(prior, dtype=torch.float32)
            if prior.shape[-3:] != (d, d, d) or prior.numel() != d ** 3:
                raise ValueError(f"prior must be [{d}, {d}, {d}] or [1, {d}, {d}, {d}] (volume_size {d}), got "
                                 f"{tuple(prior.shape)}")
            prior = prior.reshape(1, 1, d, d, d)
        self.angles, self.image_size, self.volume_size = angles, image_size, volume_size
        self.volume_extent = tuple(float(e) for e in volume_extent)
        c, v = base_channels, len(angles)
        ch = [c, 2 * c, 4 * c, 8 * c, 16 * c]

        def grow(cc: int) -> int:
            return growth or max(cc // 2, 1)

        # 2D, per view
        self.pyramid = MultiScaleFeaturePyramid(ch[:4])
        self.to_tokens = nn.Conv2d(ch[3], attention_channels, 1)
        self.angle_embedding = nn.Linear(2, attention_channels)
        self.cross_view = nn.ModuleList(CrossViewAttention(attention_channels, attention_heads)
                                        for _ in range(cross_view_layers))
        self.from_tokens = nn.Conv2d(attention_channels, c, 1)
        self.laterals = nn.ModuleList(nn.Conv2d(k, c, 1) for k in ch[:4])
        self.plane = conv_block(2, c, c)
        # 2D -> 3D and view fusion
        self.register_buffer("grid", view_grid(angles, d, self.volume_extent), persistent=False)
        coords = (torch.arange(d, dtype=torch.float32) * 2 + 1) / d - 1
        self.register_buffer("coords", torch.stack(torch.meshgrid(coords, coords, coords, indexing="ij"))[None],
                             persistent=False)
        self.register_buffer("prior", prior)
        self.fusion = nn.Sequential(conv_block(3, v * c + 4, c, kernel=1), conv_block(3, c, c))
        # 3D U-Net: hybrid blocks at the mid encoder level (1/4), the bottleneck (1/16), the mid decoder level (1/4)
        kw = dict(heads=swin_heads, window=window_size, dense_layers=dense_layers)
        self.encoders = nn.ModuleList([
            EncoderBlock3D(c, ch[0], grow(ch[0]), down=False, hybrid=False, **kw),
            EncoderBlock3D(ch[0], ch[1], grow(ch[1]), down=True, hybrid=False, **kw),
            EncoderBlock3D(ch[1], ch[2], grow(ch[2]), down=True, hybrid=True, **kw),
            EncoderBlock3D(ch[2], ch[3], grow(ch[3]), down=True, hybrid=False, **kw),
        ])
        self.bottleneck = EncoderBlock3D(ch[3], ch[4], grow(ch[4]), down=True, hybrid=True, **kw)
        self.decoders = nn.ModuleList([
            DecoderBlock3D(ch[4], ch[3], ch[3], grow(ch[3]), hybrid=False, **kw),  # 1/8
            DecoderBlock3D(ch[3], ch[2], ch[2], grow(ch[2]), hybrid=True, **kw),   # 1/4
            DecoderBlock3D(ch[2], ch[1], ch[1], grow(ch[1]), hybrid=False, **kw),  # 1/2
            DecoderBlock3D(ch[1], ch[0], ch[0], grow(ch[0]), hybrid=False, **kw),  # 1
        ])
        self.heads = nn.ModuleList(nn.Conv3d(k, 1, 1) for k in (ch[3], ch[2], ch[1], ch[0]))
        for head in self.heads:  # start at the prior: an untrained model returns it exactly
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        v, s, d = len(self.angles), self.image_size, self.volume_size
        if views.ndim != 5 or views.shape[1:] != (v, 1, s, s):
            raise ValueError(f"views must be [B, {v}, 1, {s}, {s}] ({v} view(s) at angles {self.angles}, image_size "
                             f"{s}), got {tuple(views.shape)}")
        b = views.shape[0]
        feats = self._run(self.pyramid, views.reshape(b * v, 1, s, s), size=s)
        tokens = self.to_tokens(feats[-1])
        ca, h, w = tokens.shape[1:]
        t = tokens.flatten(2).transpose(1, 2).reshape(b, v, h * w, ca)
        rad = torch.tensor(self.angles, device=views.device) * (math.pi / 180)
        t = t + sincos_2d(h, w, ca, views.device).to(t.dtype) + self.angle_embedding(
            torch.stack([rad.cos(), rad.sin()], dim=1)).to(t.dtype)[None, :, None]
        for layer in self.cross_view:
            t = layer(t)
        tokens = t.reshape(b * v, h * w, ca).transpose(1, 2).reshape(b * v, ca, h, w)
        plane = _resize2d(self.from_tokens(tokens), d)
        for lateral, f in zip(self.laterals, feats):
            plane = plane + _resize2d(lateral(f), d)
        plane = self.plane(plane)                                     # [B*V, c, D, D]
        volumes = backproject(plane.reshape(b, v, -1, d, d), self.grid)  # [B, V, c, D, D, D]
        extra = torch.cat([self.coords, self.prior], dim=1).to(volumes.dtype).expand(b, -1, -1, -1, -1)
        x = self._run(self.fusion, torch.cat([volumes.flatten(1, 2), extra], dim=1), size=d)
        skips = []
        for enc in self.encoders:
            x = self._run(enc, x, size=x.shape[-1] // 2 if enc.down else x.shape[-1])
            skips.append(x)
        x = self._run(self.bottleneck, x, size=x.shape[-1] // 2)
        outs = []
        for dec, head, skip in zip(self.decoders, self.heads, reversed(skips)):
            x = self._run(dec, x, skip, size=skip.shape[-1])
            prior = self.prior if x.shape[-1] == d else F.adaptive_avg_pool3d(self.prior, x.shape[-3:])
            outs.append(prior + head(x).float())
        return outs[-1], outs[:-1]

    def _run(self, block: nn.Module, *inputs: torch.Tensor, size: int):
        """:func:`_guarded`, recomputed in the backward pass with ``grad_checkpointing`` when training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(_guarded, block, *inputs, size=size, use_reentrant=False)
        return _guarded(block, *inputs, size=size)


def _guarded(block: nn.Module, *inputs: torch.Tensor, size: int) -> torch.Tensor:
    """Run a U-Net block; in float32 when it works on 2^3 voxels or fewer. There the CPU's bf16 conv3d
    weight gradient (oneDNN, torch 2.13) returned Inf/NaN from finite inputs now and then (measured; see
    tests/test_xray2ct.py), and such blocks cost nothing in float32."""
    if size > 2 or not torch.is_autocast_enabled(inputs[0].device.type):
        return block(*inputs)
    with torch.autocast(inputs[0].device.type, enabled=False):
        return block(*(t.float() for t in inputs))


def _resize2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average down or bilinear up to ``size`` x ``size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

