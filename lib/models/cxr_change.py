"""Longitudinal chest X-ray change detection networks (design note C, notebook 05_cxr_change).

Given a baseline and a follow-up frontal radiograph of one patient, predict a pixel-wise map of what
changed. The networks follow the research note (Longitudinal_MIM); every size is a field of
:class:`ChangeModelConfig` whose default is the note's constant, and the notebook's presets scale them
down (``lib.families.cxr_change.build`` makes the config from a resolved preset).

Output: a signed change map. The public code this comes from ends in a sigmoid, which cannot say that
a finding resolved; here the change models end in ``tanh`` and return one channel ``y`` in [-1, 1]
with the sign convention of the demo cohort's change maps (:mod:`lib.data.demo`)::

    change = DRR(follow-up) - DRR(baseline)      y > 0: attenuation increased   ("appeared")
                                                 y < 0: attenuation decreased   ("resolved")

So a nodule, consolidation, effusion or a larger heart that appears is positive, and the same finding
resolving is negative; a pneumothorax (air replacing lung) that appears is negative. ``|y|`` is the
change score: ranked over pixels it gives the pixel AUC, thresholded it gives the changed-pixel mask,
and the sign of ``y`` on that mask says which way the change went. The training target and loss are
in :mod:`lib.losses.cxr_change`.

Architecture of :class:`LongitudinalMIMModelBig` (defaults: the note's 512² input)::

    baseline, follow-up [B, 1, 512, 512]
      └─ BottleneckEncoder, one set of weights for both images
           ChannelExpansionStem   1 -> 64                       @512   (skip 0)
           EfficientNetMiniEncoder: MBConv levels 48, 80, 224, 640 @256, 128, 64, 32 (skips 1-3)
           BottleneckBlock: TransformerBranch (ViT-Base: 16x16 = 256 patches of 768) beside a conv
                            branch (640 -> 704 -> 640), merged by a 1x1 conv       -> [B, 640, 32, 32]
      └─ DifferenceFusion of the two feature maps: 1x1 per-channel (grouped) + 3x3 + 7x7 depthwise
         separable paths, summed                                                  -> [B, 640, 32, 32]
      └─ U-Net decoder 32 -> 64 -> 128 -> 256 -> 512 (640 -> 320 -> 160 -> 80 -> 40), each level
         concatenating both images' encoder features of that level (Siamese "conc" skips)
      └─ 1x1 conv -> tanh                                                        -> [B, 1, 512, 512]

Also here: :class:`LongitudinalMIMModel` (the same encoder and fusion, a decoder without skips),
:class:`MaskedReconstructionModel` (masked image modelling that pre-trains the shared encoder, SimMIM
style), and the research's auxiliary :class:`ClassificationModel` (14 labels) and :class:`Discriminator`
(PatchGAN, MONAI). ``grad_checkpointing``: stem, MBConv levels, transformer and decoder blocks recomputed in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lib.models.attention import route_short_sequences

INIT_STD = 0.02  # the note's std of linear-layer weights


@dataclass(frozen=True)
class ChangeModelConfig:
    """The architecture shared by every network of this module (nanoGPT's ``GPTConfig``).

    The defaults are the note's constants (Longitudinal_MIM's ``constants.py``): 512² input, encoder
    widths with EfficientNet-B7's stage widths ending in 640 x 32 x 32 features, 8 MBConv blocks in all
    (the note's 8 selected blocks), a ViT-Base bottleneck (12 x 768, 12 heads, MLP 3072) on 2 x 2 patches
    (16 x 16 = 256 patches), a conv branch of 704, GroupNorm 32. The field names are the notebook's
    parameter names, so a resolved 05_cxr_change configuration fills them by name.
    """

    image_size: int = 512
    channels: tuple[int, ...] = (64, 48, 80, 224, 640)  # the stem, then one width per stride-2 level
    blocks: tuple[int, ...] = (1, 1, 2, 4)              # MBConv blocks per stride-2 level
    expand_ratio: int = 6
    kernel_size: int = 3
    hidden_size: int = 768
    transformer_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 2
    inter_channels: int = 704
    norm_groups: int = 32
    decoder_channels: tuple[int, ...] = (320, 160, 80, 40)  # one per x2 upsampling (change models only)
    grad_checkpointing: bool = False                        # recompute blocks in the backward pass

    def __post_init__(self):
        for name in ("channels", "blocks", "decoder_channels"):  # hashable, and equal to a preset's tuple
            object.__setattr__(self, name, tuple(int(c) for c in getattr(self, name)))


def _groups(channels: int, norm_groups: int) -> int:
    """GroupNorm groups for ``channels``: the note's 32, or the largest common divisor with it."""
    return math.gcd(channels, norm_groups)


def _conv_norm_act(cin: int, cout: int, norm_groups: int, kernel: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
              nn.GroupNorm(_groups(cout, norm_groups), cout)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """The note's initialisation: Kaiming normal (fan-in, ReLU gain) for convolutions, a normal of std
    :data:`INIT_STD` truncated at two std for linear layers, ones and zeros for norms. ``model.apply`` it."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _run(block: nn.Module, *args, checkpointed: bool = False):
    """``block(*args)``; recomputed in the backward pass when ``checkpointed`` and training."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def _check_images(name: str, x: torch.Tensor, in_channels: int, image_size: int) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != in_channels or tuple(x.shape[2:]) != (image_size, image_size):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be [B, {in_channels}, {image_size}, {image_size}] (the model's in_channels and "
                         f"image_size), got {got}")


# --------------------------------------------------------------------------- building blocks

class ChannelExpansionStem(nn.Sequential):
    """``[B, in, S, S]`` -> ``[B, channels, S, S]``: two 3x3 conv + GroupNorm + SiLU at full resolution."""

    def __init__(self, in_channels: int, channels: int, norm_groups: int):
        super().__init__(_conv_norm_act(in_channels, channels, norm_groups), _conv_norm_act(channels, channels, norm_groups))


class EfficientNetMiniEncoder(nn.Module):
    """Stem plus EfficientNet-style MBConv levels (MONAI's ``MBConvBlock``, GroupNorm instead of BatchNorm).

    Input ``[B, in_channels, S, S]``; output a list of ``len(channels)`` feature maps, level ``l`` being
    ``[B, channels[l], S / 2**l, S / 2**l]``. Level 0 is the stem; each further level starts with a
    stride-2 MBConv and adds ``blocks[l-1] - 1`` stride-1 MBConvs. The first level expands by 1 (as
    EfficientNet's first stage: no inverted bottleneck at high resolution), the others by ``expand_ratio``;
    squeeze-and-excitation 0.25 everywhere.
    """

    def __init__(self, image_size: int, in_channels: int, channels: Sequence[int], blocks: Sequence[int],
                 expand_ratio: int, kernel_size: int, norm_groups: int):
        super().__init__()
        from monai.networks.nets.efficientnet import MBConvBlock

        channels, blocks = tuple(channels), tuple(blocks)
        if len(blocks) != len(channels) - 1 or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must give one count >= 1 per level after the stem ({len(channels) - 1} for "
                             f"channels={channels}), got {blocks}")
        self.stem = ChannelExpansionStem(in_channels, channels[0], norm_groups)
        self.levels = nn.ModuleList()
        size = image_size
        for level, (cin, cout, n) in enumerate(zip(channels[:-1], channels[1:], blocks), start=1):
            stage = []
            for i in range(n):
                c_in, expand = (cin if i == 0 else cout), (1 if level == 1 else expand_ratio)
                # MBConvBlock normalises its expanded (c_in * expand) and projected (cout) channels with
                # one group count: gcd(c_in, cout, norm_groups) divides both.
                norm = ("group", {"num_groups": math.gcd(c_in, cout, norm_groups)})
                stage.append(MBConvBlock(2, c_in, cout, kernel_size, 2 if i == 0 else 1, [size, size], expand,
                                         0.25, True, norm, drop_connect_rate=None))
                size = size // 2 if i == 0 else size
            self.levels.append(nn.Sequential(*stage))
        self.channels, self.grad_checkpointing = channels, False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [_run(self.stem, x, checkpointed=self.grad_checkpointing)]
        for level in self.levels:
            feats.append(_run(level, feats[-1], checkpointed=self.grad_checkpointing))
        return feats


class TransformerBranch(nn.Module):
    """ViT over the deepest feature map: ``[B, C, f, f]`` -> ``[B, C, f, f]``.

    Patches of ``patch_size`` (MONAI ``PatchEmbeddingBlock``, learnable position embedding: 32x32 features
    in patches of 2 give the note's 16x16 = 256 patches), ``layers`` MONAI ``TransformerBlock``s
    (``F.scaled_dot_product_attention``), LayerNorm, then a transposed convolution back to ``f x f x C``.
    """

    def __init__(self, channels: int, feature_size: int, hidden_size: int, patch_size: int, layers: int,
                 num_heads: int, mlp_dim: int):
        super().__init__()
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

        if feature_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the feature map size {feature_size} "
                             f"(image_size / 2**levels)")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.grid = feature_size // patch_size
        self.embed = PatchEmbeddingBlock(channels, feature_size, patch_size, hidden_size, num_heads,
                                         proj_type="conv", pos_embed_type="learnable", spatial_dims=2)
        self.blocks = nn.Sequential(*[TransformerBlock(hidden_size, mlp_dim, num_heads, qkv_bias=True,
                                                       use_flash_attention=True) for _ in range(layers)])
        for block in self.blocks:  # MONAI builds this LayerNorm even without cross-attention; it would
            block.norm_cross_attn = nn.Identity()  # be an unused parameter (DDP refuses those)
        self.norm = nn.LayerNorm(hidden_size)
        self.unpatch = nn.ConvTranspose2d(hidden_size, channels, patch_size, stride=patch_size)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route_short_sequences([block.attn for block in self.blocks], x, self.grid ** 2)
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = _run(block, tokens, checkpointed=self.grad_checkpointing)
        tokens = self.norm(tokens)                                          # [B, N, hidden]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        return self.unpatch(grid)


class BottleneckBlock(nn.Module):
    """Transformer branch beside a conv branch (``C -> inter -> C``), merged by a 1x1 conv, plus the input.

    ``[B, C, f, f]`` -> ``[B, C, f, f]``.
    """

    def __init__(self, channels: int, feature_size: int, inter_channels: int, norm_groups: int, **transformer):
        super().__init__()
        self.transformer = TransformerBranch(channels, feature_size, **transformer)
        self.conv = nn.Sequential(_conv_norm_act(channels, inter_channels, norm_groups),
                                  _conv_norm_act(inter_channels, channels, norm_groups, act=False))
        self.merge = _conv_norm_act(2 * channels, channels, norm_groups, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.merge(torch.cat([self.transformer(x), self.conv(x)], dim=1))


class BottleneckEncoder(nn.Module):
    """The shared encoder: :class:`EfficientNetMiniEncoder` then :class:`BottleneckBlock` on its last level.

    Input ``[B, in_channels, S, S]`` with ``S == image_size``; output the list of level features (see
    :class:`EfficientNetMiniEncoder`), the last one replaced by the bottleneck's
    ``[B, channels[-1], S/16, S/16]`` (for five levels). Pre-trained by :class:`MaskedReconstructionModel`.
    Sizes from ``config`` (default: the note's); raises ``ValueError`` for an impossible one.
    """

    def __init__(self, config: ChangeModelConfig | None = None, in_channels: int = 1):
        super().__init__()
        c = config or ChangeModelConfig()
        channels = c.channels
        sizes = ("image_size", "expand_ratio", "hidden_size", "transformer_layers", "num_heads", "mlp_dim",
                 "patch_size", "inter_channels", "norm_groups")
        for name, value in [("in_channels", in_channels), *((n, getattr(c, n)) for n in sizes)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if c.kernel_size not in (3, 5, 7):
            raise ValueError(f"kernel_size must be 3, 5 or 7, got {c.kernel_size!r}")
        if len(channels) < 2 or any(w < 1 for w in channels):
            raise ValueError(f"channels must list >= 2 positive widths (stem, then one per stride-2 level), got {channels}")
        stride = 2 ** (len(channels) - 1)
        if c.image_size % stride:
            raise ValueError(f"image_size {c.image_size} must be divisible by 2**{len(channels) - 1} = {stride} "
                             f"(one halving per level of channels={channels})")
        self.image_size, self.in_channels, self.channels = c.image_size, in_channels, channels
        self.feature_size = c.image_size // stride
        self.features = EfficientNetMiniEncoder(c.image_size, in_channels, channels, c.blocks, c.expand_ratio,
                                                c.kernel_size, c.norm_groups)
        self.bottleneck = BottleneckBlock(channels[-1], self.feature_size, c.inter_channels, c.norm_groups,
                                          hidden_size=c.hidden_size, patch_size=c.patch_size,
                                          layers=c.transformer_layers, num_heads=c.num_heads, mlp_dim=c.mlp_dim)
        self.features.grad_checkpointing = self.bottleneck.transformer.grad_checkpointing = c.grad_checkpointing

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_images("image", x, self.in_channels, self.image_size)
        feats = self.features(x)
        return feats[:-1] + [self.bottleneck(feats[-1])]


class DifferenceFusion(nn.Module):
    """Fuse the two images' bottleneck features: ``[B, C, f, f]`` x 2 -> ``[B, C, f, f]``.

    The features are interleaved channel by channel (``b0, f0, b1, f1, ...``) and compressed along three
    paths that are summed: a grouped 1x1 conv (one group per channel pair: a learnt per-channel
    difference, the note's "1x1 depthwise"), a full 3x3 conv, and a 7x7 depthwise-separable conv.
    """

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        c2 = 2 * channels
        self.pointwise = nn.Conv2d(c2, channels, 1, groups=channels, bias=False)
        self.full = nn.Conv2d(c2, channels, 3, padding=1, bias=False)
        self.separable = nn.Sequential(nn.Conv2d(c2, c2, 7, padding=3, groups=c2, bias=False),
                                       nn.Conv2d(c2, channels, 1, bias=False))
        self.out = nn.Sequential(nn.GroupNorm(_groups(channels, norm_groups), channels), nn.SiLU())

    def forward(self, base: torch.Tensor, follow: torch.Tensor) -> torch.Tensor:
        x = torch.stack([base, follow], dim=2).flatten(1, 2)
        return self.out(self.pointwise(x) + self.full(x) + self.separable(x))


class DecoderBlock(nn.Module):
    """2x2 transposed conv (x2 upsampling), concatenation of a skip, two 3x3 conv + GroupNorm + SiLU.

    ``[B, in, h, w]`` (+ skip ``[B, skip, 2h, 2w]``) -> ``[B, out, 2h, 2w]``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = nn.Sequential(_conv_norm_act(out_channels + skip_channels, out_channels, norm_groups),
                                  _conv_norm_act(out_channels, out_channels, norm_groups))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


# --------------------------------------------------------------------------- the change models

class LongitudinalMIMModelBig(nn.Module):
    """Baseline + follow-up -> signed change map (see the module docstring).

    ``forward(baseline, followup)``: both ``[B, in_channels, image_size, image_size]``; returns
    ``[B, 1, image_size, image_size]`` in [-1, 1] (``tanh``), + = attenuation increased (appeared),
    - = decreased (resolved). Sizes from ``config`` (default: the note's): ``channels`` has one width
    per level (stem, then one per halving), ``decoder_channels`` one per upsampling
    (``len(channels) - 1``). ``encoder`` is shared by both images and is what
    :class:`MaskedReconstructionModel` pre-trains (and what the family may freeze).
    """

    skips = True

    def __init__(self, config: ChangeModelConfig | None = None, in_channels: int = 1):
        super().__init__()
        self.config = config or ChangeModelConfig()
        norm_groups = self.config.norm_groups
        self.encoder = BottleneckEncoder(self.config, in_channels)
        channels, decoder_channels = self.encoder.channels, self.config.decoder_channels
        if len(decoder_channels) != len(channels) - 1 or any(c < 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels must give {len(channels) - 1} positive widths (one per upsampling of "
                             f"channels={channels}), got {decoder_channels}")
        self.image_size, self.in_channels = self.config.image_size, in_channels
        self.fusion = DifferenceFusion(channels[-1], norm_groups)
        ins = (channels[-1],) + decoder_channels[:-1]
        skip = [2 * c if self.skips else 0 for c in reversed(channels[:-1])]
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o, norm_groups) for i, s, o in zip(ins, skip, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], 1, 1)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.head.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)  # start near y = 0

    def forward(self, baseline: torch.Tensor, followup: torch.Tensor) -> torch.Tensor:
        _check_images("baseline", baseline, self.in_channels, self.image_size)
        _check_images("followup", followup, self.in_channels, self.image_size)
        if baseline.shape != followup.shape:
            raise ValueError(f"baseline {tuple(baseline.shape)} and followup {tuple(followup.shape)} differ in shape")
        n = baseline.shape[0]
        feats = self.encoder(torch.cat([baseline, followup]))  # one pass through the shared weights
        x = self.fusion(feats[-1][:n], feats[-1][n:])
        for block, f in zip(self.decoder, reversed(feats[:-1])):
            x = _run(block, x, torch.cat([f[:n], f[n:]], dim=1) if self.skips else None,
                     checkpointed=self.config.grad_checkpointing)
        return torch.tanh(self.head(x))


class LongitudinalMIMModel(LongitudinalMIMModelBig):
    """The smaller variant: the same shared encoder and difference fusion, a decoder without skip
    connections (every level upsamples the fused bottleneck alone). Same inputs and output."""

    skips = False



# --------------------------------------------------------------------------- auxiliary models

class MaskedReconstructionModel(nn.Module):
    """Masked image modelling (SimMIM style) that pre-trains :class:`BottleneckEncoder`.

    ``forward(image, mask)``: ``image`` ``[B, in_channels, S, S]``, ``mask`` ``[B, 1, S, S]`` (1 = hidden,
    see :func:`lib.losses.cxr_change.random_patch_mask`). Hidden pixels are replaced by a learnt value,
    the encoder sees the result, and a 1x1 conv plus pixel shuffle (x ``2**levels``) predicts the image:
    ``[B, in_channels, S, S]``. Train with :func:`lib.losses.cxr_change.masked_reconstruction_loss`; hand
    ``encoder`` to a change model afterwards.
    """

    def __init__(self, config: ChangeModelConfig | None = None, in_channels: int = 1):
        super().__init__()
        self.config = config or ChangeModelConfig()
        image_size = self.config.image_size
        self.encoder = BottleneckEncoder(self.config, in_channels)
        stride = image_size // self.encoder.feature_size
        self.mask_value = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        self.head = nn.Sequential(nn.Conv2d(self.encoder.channels[-1], stride * stride * in_channels, 1),
                                  nn.PixelShuffle(stride))
        self.image_size, self.in_channels = image_size, in_channels
        self.apply(init_weights)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_images("image", image, self.in_channels, self.image_size)
        if mask.shape != (image.shape[0], 1, *image.shape[2:]):
            raise ValueError(f"mask must be [B, 1, S, S] = {(image.shape[0], 1, *image.shape[2:])}, got {tuple(mask.shape)}")
        m = mask.to(image.dtype)
        return self.head(self.encoder(image * (1 - m) + self.mask_value * m)[-1])


class ClassificationModel(nn.Module):
    """Multi-label findings from one radiograph: ``[B, in_channels, S, S]`` -> logits ``[B, labels_num]``.

    The shared encoder (sized by ``config``), global average pooling, LayerNorm and a linear layer
    (sigmoid/BCE outside); ``labels_num`` 14: the note's findings.
    """

    def __init__(self, config: ChangeModelConfig | None = None, labels_num: int = 14, in_channels: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(labels_num, int) or labels_num < 1:
            raise ValueError(f"labels_num must be an int >= 1, got {labels_num!r}")
        self.config = config or ChangeModelConfig()
        self.encoder = BottleneckEncoder(self.config, in_channels)
        c = self.encoder.channels[-1]
        self.classifier = nn.Sequential(nn.LayerNorm(c), nn.Dropout(dropout), nn.Linear(c, labels_num))
        self.apply(init_weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(image)[-1].mean(dim=(2, 3)))


class Discriminator(nn.Module):
    """Conditional PatchGAN (pix2pix) on ``(baseline, followup, change)``: MONAI's ``PatchDiscriminator``.

    ``forward(baseline, followup, change)``: each ``[B, image_channels, S, S]``; returns real/fake logits,
    one per overlapping receptive patch: ``[B, 1, S/8 - 2, S/8 - 2]`` with three layers (pix2pix's 70x70
    PatchGAN, 30 x 30 logits at 256). GroupNorm, LeakyReLU 0.2. Its sizes are its own (it judges images,
    it shares no encoder); only ``norm_groups`` defaults to :class:`ChangeModelConfig`'s.
    """

    def __init__(self, image_channels: int = 1, channels: int = 64, num_layers: int = 3,
                 norm_groups: int = ChangeModelConfig.norm_groups):
        super().__init__()
        from monai.networks.nets import PatchDiscriminator

        if num_layers < 1 or channels < 1:
            raise ValueError(f"num_layers and channels must be >= 1, got {num_layers}, {channels}")
        self.image_channels = image_channels
        self.net = PatchDiscriminator(spatial_dims=2, channels=channels, in_channels=3 * image_channels, out_channels=1,
                                      num_layers_d=num_layers, norm=("group", {"num_groups": _groups(2 * channels, norm_groups)}))

    def forward(self, baseline: torch.Tensor, followup: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        shapes = {tuple(t.shape) for t in (baseline, followup, change)}
        if len(shapes) != 1 or baseline.ndim != 4 or baseline.shape[1] != self.image_channels:
            raise ValueError(f"baseline, followup and change must share one shape [B, {self.image_channels}, S, S], "
                             f"got {[tuple(t.shape) for t in (baseline, followup, change)]}")
        return self.net(torch.cat([baseline, followup, change], dim=1))[-1]
