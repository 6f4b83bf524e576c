"""The benchmark cases: every registered model family's networks, each beside a MONAI network of the
nearest kind (sections 2, 5, 6 and 7 of :mod:`lib.bench`).

:data:`FAMILY_CASES` is keyed by the family names of the registry (:data:`lib.families.FAMILIES`): a
family without a case there fails ``tests/test_bench.py``. Every model is built from a resolved preset
by the family's own builder, fed random inputs of the preset's size and batch, and trained with the
loss its notebook uses. Its MONAI counterpart gets the same input size and batch in the same run:

================================  ==============================  =============================================
family (notebook)                 MONAI network                   how the sizes match
================================  ==============================  =============================================
WaveFormer3D encoder, pretrainer  ``ViT`` (3D)                    img_size, patch_size, hidden = embed_dim,
(03; pretrainer loss: masked                                      MLP 4x, layers = depth, heads, qkv bias; the
reconstruction + 0.5 InfoNCE)                                     MRI batch; loss: mean square of the output
FrameVAE + vae_loss (04)          ``AutoencoderKL`` (2D)          same channels, latent channels, res blocks,
                                                                  groups, mid attention (MONAI's own attention
                                                                  code); vae_batch_size frames; L1 + KL
SeriesDenoiser + diffusion_loss   ``DiffusionModelUNet`` (2D)     every frame of the latent series (B x T
(04)                                                              frames of frame_size / 8), widths
                                                                  model_channels x channel_mult, the same
                                                                  attention levels, res blocks, head channels,
                                                                  groups, conditioning by concatenation; the
                                                                  same diffusion_loss (no temporal attention)
LongitudinalMIMModelBig +         ``EfficientNetBN`` b0 (2D,      the 2B radiographs of B pairs (the change
change_loss (05; at smoke and     ``pretrained=False``: nothing   model encodes baseline and follow-up in one
prod with the discriminator and   is downloaded)                  pass), image_size; 14-label BCE
classification head: aux_step)
HybridCNNViTUNet3D +              ``SwinUNETR`` (3D)              the output volume: V input channels (the
MedicalGradeLoss (06,                                             views), volume_size rounded up to a multiple
perceptual term off)                                              of 32 (SwinUNETR's constraint), feature_size
                                                                  the smallest multiple of 12 >= base_channels,
                                                                  window_size; L1
================================  ==============================  =============================================

This module is the one place where the benchmark imports model and loss code (the block below) and
calls an API of theirs beyond a forward pass (the builders, the losses, 04's sampler: :func:`latent_diffusion`,
:func:`translate`, :func:`sample`); the other modules of :mod:`lib.bench` take those names from here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, EfficientNetBN, SwinUNETR, ViT

from lib import config
from lib.families import FAMILIES

# --- every import of model and loss code by lib.bench (used here and by lib.bench.pretrain / .families)
from lib.data.paired import FINDINGS
from lib.families import cxr_change_aux
from lib.losses import medical
from lib.losses.contrastive import SpatialInfoNCE, sample_locations, spatial_info_nce_reference  # noqa: F401
from lib.families import ct_diffusion_sampling as sampling
from lib.families import pretrain
from lib.families.ct_diffusion import build_denoiser, build_vae
from lib.families.cxr_change import build as build_change_model
from lib.families.xray_to_ct import build as build_xray_to_ct
from lib.losses.cxr_change import change_loss
from lib.losses.diffusion import diffusion_loss, kl_divergence, vae_loss
from lib.models.diffusion import LatentDiffusion
from lib.models.vae import from_frames, to_frames
from lib.models.waveformer import WaveletAttention  # noqa: F401

# --------------------------------------------------------------------------- a case


@dataclass
class Case:
    model: nn.Module
    batch: Any                                  # what loss(model, batch) takes
    loss: Callable[[nn.Module, Any], torch.Tensor]
    samples: int                                # batch size in the family's own unit
    unit: str                                   # what a sample is
    input: str                                  # input shape, for the table
    blocks: Callable[[nn.Module], list] = field(default=lambda m: [])  # activation-checkpointing granularity


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------- 03_pretrain

def _pretrainer(cfg, batch=None) -> Case:
    b = batch or cfg.batch_size
    # Without activation checkpointing (demo and subset train without it; section 7 estimates its effect).
    cfg = config.Config(cfg, grad_checkpointing=False)
    x = torch.rand(b, 1, *(cfg.img_size,) * 3, generator=_gen())
    return Case(pretrain.build(cfg), x, lambda m, x: pretrain.train_step(m, x)[0], b, "MRI volume",
                f"{b}x1x{cfg.img_size}^3", lambda m: list(m.encoder.blocks))


def _waveformer(cfg, batch=None) -> Case:
    case = _pretrainer(cfg, batch)
    case.model = case.model.encoder
    case.loss = lambda m, x: m(x).float().square().mean()
    case.blocks = lambda m: list(m.blocks)
    return case


def _vit(cfg, batch=None) -> Case:
    case = _pretrainer(cfg, batch)
    case.model = ViT(in_channels=1, img_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.embed_dim,
                     mlp_dim=4 * cfg.embed_dim, num_layers=cfg.depth, num_heads=cfg.num_heads, qkv_bias=True,
                     spatial_dims=3)
    case.loss = lambda m, x: m(x)[0].float().square().mean()
    case.blocks = lambda m: list(m.blocks)
    return case


# --------------------------------------------------------------------------- 04_ct_diffusion

def _vae(cfg, batch=None) -> Case:
    b = batch or cfg.vae_batch_size
    x = torch.rand(b, 1, 1, cfg.frame_size, cfg.frame_size, generator=_gen()) * 2 - 1  # frames as 1-frame series
    return Case(build_vae(cfg), x, lambda m, x: vae_loss(m, x, cfg.kl_weight, cfg.ms_ssim_weight, cfg.adv_weight)[0],
                b, "frame", f"{b}x1x{cfg.frame_size}^2",
                lambda m: [*m.autoencoder.encoder.blocks, *m.autoencoder.decoder.blocks])


def _autoencoder_kl(cfg, batch=None) -> Case:
    case = _vae(cfg, batch)
    case.batch = case.batch[:, :, 0]
    case.model = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=cfg.vae_channels,
                               latent_channels=cfg.latent_channels, num_res_blocks=cfg.vae_res_blocks,
                               norm_num_groups=cfg.norm_groups, attention_levels=(False,) * len(cfg.vae_channels),
                               with_encoder_nonlocal_attn=cfg.vae_mid_attention,
                               with_decoder_nonlocal_attn=cfg.vae_mid_attention)

    def loss(m, x):
        recon, mu, sigma = m(x)
        return F.l1_loss(recon.float(), x) + cfg.kl_weight * kl_divergence(mu[:, :, None], sigma[:, :, None])

    case.loss, case.blocks = loss, lambda m: list(m.encoder.blocks) + list(m.decoder.blocks)
    return case


def _latents(cfg, batch):
    h = cfg.frame_size // 2 ** (len(cfg.vae_channels) - 1)
    g = _gen()
    z0, cond = (torch.randn(batch, cfg.latent_channels, cfg.frames, h, h, generator=g) for _ in range(2))
    return (z0, cond), sampling.noise_scheduler(**sampling.schedule_of(cfg)), f"{batch}x{cfg.latent_channels}x{cfg.frames}x{h}^2"


def _denoiser(cfg, batch=None) -> Case:
    b = batch or cfg.batch_size
    latents, sched, shape = _latents(cfg, b)
    return Case(build_denoiser(cfg), latents, lambda m, z: diffusion_loss(m, z[0], z[1], sched)[0], b,
                f"series of {cfg.frames} latent frames", shape,
                lambda m: [*(blk for level in m.down for blk in level), *m.mid, *(blk for level in m.up for blk in level)])


class PerFrameUNet(nn.Module):
    """MONAI's ``DiffusionModelUNet`` (2D) on every frame of a latent series, conditioned by concatenation:
    the :class:`lib.models.diffusion.SeriesDenoiser` interface, ``forward(x, timesteps, cond)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.unet(to_frames(torch.cat([x, cond], dim=1)), timesteps.repeat_interleave(x.shape[2]))
        return from_frames(out, x.shape[0])


def _diffusion_unet(cfg, batch=None) -> Case:
    case = _denoiser(cfg, batch)
    case.model = PerFrameUNet(DiffusionModelUNet(
        spatial_dims=2, in_channels=2 * cfg.latent_channels, out_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks, channels=[cfg.model_channels * m for m in cfg.channel_mult],
        attention_levels=cfg.attention_levels, norm_num_groups=cfg.norm_groups, num_head_channels=cfg.num_head_channels))
    case.blocks = lambda m: [*m.unet.down_blocks, m.unet.middle_block, *m.unet.up_blocks]
    return case


def latent_diffusion(cfg) -> nn.Module:
    """04's ``LatentDiffusion`` of an untrained VAE (it costs what a trained one does) and denoiser (section 6)."""
    return LatentDiffusion(build_vae(config.Config(cfg, scale_factor=1.0)), build_denoiser(cfg))


def translate(ldm: nn.Module, baseline: torch.Tensor, steps: int, cfg) -> torch.Tensor:
    """The notebook's translation: encode the baseline series, ``steps`` DDIM steps, decode."""
    return sampling.translate(ldm, baseline, steps, **sampling.schedule_of(cfg))


def sample(ldm: nn.Module, cond: torch.Tensor, steps: int, cfg) -> torch.Tensor:
    """``steps`` DDIM steps in latent space, conditioned on the baseline latents ``cond``."""
    return sampling.sample(ldm, cond, steps, **sampling.schedule_of(cfg))


# --------------------------------------------------------------------------- 05_cxr_change

def _change(cfg, batch=None) -> Case:
    """The change model, with the discriminator and classification head the preset trains beside it (prod:
    ``adv_weight``, ``classify_weight``; the classifier runs the shared encoder once more)."""
    b = batch or cfg.batch_size
    cfg = config.Config(cfg, grad_checkpointing=False)  # as _pretrainer: section 7 estimates its effect (blocks)
    g = _gen()
    images = [torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g) for _ in range(2)]
    change = torch.randn(b, 1, cfg.image_size, cfg.image_size, generator=g)
    change = change * (change.abs() > 1.5)  # about 13 % of the pixels changed, both signs
    findings = [(torch.rand(b, len(FINDINGS), generator=g) < 0.2).float() for _ in range(2)]
    model = build_change_model(cfg)
    net = cxr_change_aux.wrap(cfg, model)
    step = functools.partial(cxr_change_aux.aux_step, augment=False, dice_weight=cfg.dice_weight,
                             adv_weight=cfg.adv_weight, classify_weight=cfg.classify_weight)

    def loss(m, t):
        if m is model:
            return change_loss(m(t[0], t[1]), t[2], cfg.dice_weight)[0]
        return step(m, dict(zip(("baseline", "followup", "change", "findings_baseline", "findings_followup"), t)))[0]

    def blocks(m):
        m = getattr(m, "change", m)
        return [m.encoder.features.stem, *m.encoder.features.levels, *m.encoder.bottleneck.transformer.blocks, *m.decoder]

    return Case(net, (*images, change, *findings), loss, b, "pair", f"2x{b}x1x{cfg.image_size}^2", blocks)


def _efficientnet(cfg, batch=None) -> Case:
    case = _change(cfg, batch)
    images = torch.cat(case.batch[:2])
    labels = (torch.rand(images.shape[0], 14, generator=_gen()) < 0.2).float()
    case.model = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=14)
    case.batch = (images, labels)
    case.loss = lambda m, t: F.binary_cross_entropy_with_logits(m(t[0]).float(), t[1])
    case.blocks = lambda m: list(m._blocks)
    return case


# --------------------------------------------------------------------------- 06_xray_to_ct

def _xray2ct(cfg, batch=None) -> Case:
    b, s, d = batch or cfg.batch_size, cfg.image_size, cfg.volume_size
    # Without activation checkpointing (demo and subset train without it; section 7 estimates its effect).
    cfg = config.Config(cfg, grad_checkpointing=False)
    g = _gen()
    views, ct = torch.rand(b, cfg.views, 1, s, s, generator=g), torch.rand(b, 1, d, d, d, generator=g)
    prior = torch.rand(d, d, d, generator=g) if cfg.residual_prior else None
    loss_fn = medical.MedicalGradeLoss({n: cfg[f"loss_{n}"] for n in medical.TERMS}, hu_range=(cfg.hu_min, cfg.hu_max),
                                       high_freq_cutoff=cfg.high_freq_cutoff)

    def loss(m, t):
        volume, deep = m(t[0])
        return loss_fn(volume, t[1], deep)[0]

    return Case(build_xray_to_ct(cfg, prior=prior), (views, ct), loss, b, "patient", f"{b}x{cfg.views}x1x{s}^2 -> {d}^3",
                lambda m: [m.pyramid, m.fusion, *m.encoders, m.bottleneck, *m.decoders])  # what grad_checkpointing recomputes


def _swin_unetr(cfg, batch=None) -> Case:
    b, d = batch or cfg.batch_size, 32 * math.ceil(cfg.volume_size / 32)
    g = _gen()
    x, y = torch.rand(b, cfg.views, d, d, d, generator=g), torch.rand(b, 1, d, d, d, generator=g)
    # MONAI's instance norm cannot train on the 1^3 bottleneck of a 32^3 input: GroupNorm there (as the family's).
    norm = "instance" if d >= 64 else ("group", {"num_groups": 3})
    model = SwinUNETR(in_channels=cfg.views, out_channels=1, feature_size=12 * math.ceil(cfg.base_channels / 12),
                      window_size=cfg.window_size, norm_name=norm)
    return Case(model, (x, y), lambda m, t: F.l1_loss(m(t[0]).float(), t[1]), b, "patient", f"{b}x{cfg.views}x{d}^3",
                lambda m: [*m.swinViT.layers1, *m.swinViT.layers2, *m.swinViT.layers3, *m.swinViT.layers4])


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Benchmarked:
    """One network of a family, measured beside its MONAI peer (a key of :data:`PEERS`)."""

    name: str
    build: Callable[..., Case]
    peer: str | None
    trained: bool = True                 # its notebook trains it: the targets judge its step, section 7 sizes it
    batch_setting: str = "batch_size"    # the preset value that sets its (micro-)batch
    accum_setting: str = "grad_accum"    # the preset value that sets its stage's accumulation (section 7)
    ema: bool = True                     # its stage keeps an EMA when the preset's ema_decay is set (section 7)


PEERS: dict[str, Callable[..., Case]] = {
    "MONAI ViT": _vit, "MONAI AutoencoderKL": _autoencoder_kl, "MONAI DiffusionModelUNet": _diffusion_unet,
    "MONAI EfficientNetBN b0": _efficientnet, "MONAI SwinUNETR": _swin_unetr,
}

# family name (lib.families.FAMILIES) -> its networks, each beside its MONAI peer
FAMILY_CASES: dict[str, tuple[Benchmarked, ...]] = {
    "ssl_pretraining": (Benchmarked("WaveFormer3D encoder", _waveformer, "MONAI ViT", trained=False),
                        Benchmarked("WaveFormer pretrainer", _pretrainer, "MONAI ViT")),
    # 04's VAE stage has its own batch and accumulation, and no EMA (grad_accum and ema_decay are the denoiser's)
    "ct_diffusion": (Benchmarked("FrameVAE", _vae, "MONAI AutoencoderKL", batch_setting="vae_batch_size",
                                 accum_setting="vae_grad_accum", ema=False),
                     Benchmarked("SeriesDenoiser", _denoiser, "MONAI DiffusionModelUNet")),
    "cxr_change": (Benchmarked("LongitudinalMIMModelBig", _change, "MONAI EfficientNetBN b0"),),
    "xray_to_ct": (Benchmarked("HybridCNNViTUNet3D", _xray2ct, "MONAI SwinUNETR"),),
}


def _cases() -> dict[str, tuple[str, Callable[..., Case]]]:
    """Name -> (notebook, builder) in the registry's order, each MONAI peer after the last network that names it."""
    cases: dict[str, tuple[str, Callable[..., Case]]] = {}
    for family, spec in FAMILIES.items():
        benched = FAMILY_CASES.get(family, ())
        for i, case in enumerate(benched):
            cases[case.name] = (spec.notebook, case.build)
            if case.peer and all(later.peer != case.peer for later in benched[i + 1:]):
                cases[case.peer] = (spec.notebook, PEERS[case.peer])
    return cases


CASES = _cases()
BENCHMARKED = {c.name: c for family in FAMILIES for c in FAMILY_CASES.get(family, ())}  # the families' networks
PAIRS = {name: c.peer for name, c in BENCHMARKED.items() if c.peer}
TRAINING_STEPS = [name for name, c in BENCHMARKED.items() if c.trained]  # what each notebook trains


def build_case(name: str, preset: str, **kw) -> Case:
    notebook, build = CASES[name]
    torch.manual_seed(0)
    return build(config.resolve(notebook, preset), **kw)
