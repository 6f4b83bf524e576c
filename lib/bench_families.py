"""Benchmarks of the model families (sections 2, 6 and 7 of :mod:`lib.bench`).

Every model is built from a resolved preset by the family's own builder (``build_pretrainer``,
``build_vae``, ``build_denoiser``, ``build_change_model``, ``build_model``), fed random inputs of the
preset's size and batch, and trained with the loss its notebook uses. Its MONAI counterpart gets the
same input size and batch in the same run:

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
change_loss (05)                  ``pretrained=False``: nothing   model encodes baseline and follow-up in one
                                  is downloaded)                  pass), image_size; 14-label BCE
HybridCNNViTUNet3D +              ``SwinUNETR`` (3D)              the output volume: V input channels (the
MedicalGradeLoss (06,                                             views), volume_size rounded up to a multiple
perceptual term off)                                              of 32 (SwinUNETR's constraint), feature_size
                                                                  the smallest multiple of 12 >= base_channels,
                                                                  window_size; L1
================================  ==============================  =============================================

Section 7 (memory at prod) records, during one forward pass under autocast at batch 1 and at batch 2,
every tensor that autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``;
each storage once, parameters excluded), and which checkpointable block (see ``Case.blocks``) saved
it; see :func:`memory_estimate` for the arithmetic and its assumptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, EfficientNetBN, SwinUNETR, ViT

from lib import bench, config
from lib import device as _device
from lib.losses import medical
from lib.models import pretrainer as pt
from lib.models.cxr_change import build_change_model, change_loss
from lib.models.diffusion import LatentDiffusion, build_denoiser, diffusion_loss, noise_scheduler
from lib.models.vae import build_vae, from_frames, kl_divergence, to_frames, vae_loss
from lib.models.xray2ct import build_model

# --------------------------------------------------------------------------- the cases


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


def _pretrainer(cfg, batch=None) -> Case:
    b = batch or cfg.batch_size
    # Without activation checkpointing (demo and subset train without it; section 7 estimates its effect).
    cfg = config.Config(cfg, grad_checkpointing=False)
    x = torch.rand(b, 1, *(cfg.img_size,) * 3, generator=_gen())
    return Case(pt.build_pretrainer(cfg), x, lambda m, x: pt.pretrain_step(m, x)[0], b, "MRI volume",
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
    return (z0, cond), noise_scheduler(cfg.num_train_timesteps), f"{batch}x{cfg.latent_channels}x{cfg.frames}x{h}^2"


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


def _change(cfg, batch=None) -> Case:
    b = batch or cfg.batch_size
    g = _gen()
    images = [torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g) for _ in range(2)]
    change = torch.randn(b, 1, cfg.image_size, cfg.image_size, generator=g)
    change = change * (change.abs() > 1.5)  # about 13 % of the pixels changed, both signs
    def blocks(m):
        return [m.encoder.features.stem, *m.encoder.features.levels, *m.encoder.bottleneck.transformer.blocks, *m.decoder]

    return Case(build_change_model(cfg), (*images, change),
                lambda m, t: change_loss(m(t[0], t[1]), t[2], cfg.dice_weight)[0], b, "pair",
                f"2x{b}x1x{cfg.image_size}^2", blocks)


def _efficientnet(cfg, batch=None) -> Case:
    case = _change(cfg, batch)
    images = torch.cat(case.batch[:2])
    labels = (torch.rand(images.shape[0], 14, generator=_gen()) < 0.2).float()
    case.model = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=14)
    case.batch = (images, labels)
    case.loss = lambda m, t: F.binary_cross_entropy_with_logits(m(t[0]).float(), t[1])
    case.blocks = lambda m: list(m._blocks)
    return case


def _xray2ct(cfg, batch=None) -> Case:
    b, s, d = batch or cfg.batch_size, cfg.image_size, cfg.volume_size
    g = _gen()
    views, ct = torch.rand(b, cfg.views, 1, s, s, generator=g), torch.rand(b, 1, d, d, d, generator=g)
    prior = torch.rand(d, d, d, generator=g) if cfg.residual_prior else None
    loss_fn = medical.MedicalGradeLoss({n: cfg[f"loss_{n}"] for n in medical.TERMS}, hu_range=(cfg.hu_min, cfg.hu_max),
                                       high_freq_cutoff=cfg.high_freq_cutoff)

    def loss(m, t):
        volume, deep = m(t[0])
        return loss_fn(volume, t[1], deep)[0]

    return Case(build_model(cfg, prior=prior), (views, ct), loss, b, "patient", f"{b}x{cfg.views}x1x{s}^2 -> {d}^3",
                lambda m: [*m.pyramid.stages, *m.encoders, m.bottleneck, *m.decoders])


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


# name -> (notebook, builder); the families, each followed by its MONAI counterpart(s) in PAIRS.
CASES: dict[str, tuple[str, Callable[..., Case]]] = {
    "WaveFormer3D encoder": ("03_pretrain", _waveformer),
    "WaveFormer pretrainer": ("03_pretrain", _pretrainer),
    "MONAI ViT": ("03_pretrain", _vit),
    "FrameVAE": ("04_ct_diffusion", _vae),
    "MONAI AutoencoderKL": ("04_ct_diffusion", _autoencoder_kl),
    "SeriesDenoiser": ("04_ct_diffusion", _denoiser),
    "MONAI DiffusionModelUNet": ("04_ct_diffusion", _diffusion_unet),
    "LongitudinalMIMModelBig": ("05_cxr_change", _change),
    "MONAI EfficientNetBN b0": ("05_cxr_change", _efficientnet),
    "HybridCNNViTUNet3D": ("06_xray_to_ct", _xray2ct),
    "MONAI SwinUNETR": ("06_xray_to_ct", _swin_unetr),
}
PAIRS = {"WaveFormer3D encoder": "MONAI ViT", "WaveFormer pretrainer": "MONAI ViT", "FrameVAE": "MONAI AutoencoderKL",
         "SeriesDenoiser": "MONAI DiffusionModelUNet", "LongitudinalMIMModelBig": "MONAI EfficientNetBN b0",
         "HybridCNNViTUNet3D": "MONAI SwinUNETR"}
TRAINING_STEPS = [n for n in PAIRS if n != "WaveFormer3D encoder"]  # what each notebook trains


def build_case(name: str, preset: str, **kw) -> Case:
    notebook, build = CASES[name]
    torch.manual_seed(0)
    return build(config.resolve(notebook, preset), **kw)


# --------------------------------------------------------------------------- section 2: training steps

def step_case(name: str, preset: str, amp: bool, repeats: int) -> dict:
    """One row of section 2 (run in a child by :func:`lib.bench.isolated`)."""
    case = build_case(name, preset)
    row = bench.train_step(case.model, case.batch, case.loss, amp, repeats,
                           lr=config.resolve(CASES[name][0], preset).lr)
    return {"name": name, "preset": preset, "dtype": row.pop("dtype"), "input": case.input,
            "batch": f"{case.samples} {case.unit}", "params_m": sum(p.numel() for p in case.model.parameters()) / 1e6,
            **row, "samples_per_s": case.samples / row["ms"] * 1e3}


TARGET_PROCESSES = 2  # the cases the targets judge (subset, autocast) run in this many processes; the fastest counts


def steps(quick: bool, ceilings: dict, out=None) -> list[dict]:
    """Section 2: every case of :data:`CASES` at demo and subset (smoke with ``quick``), fp32 and autocast, each
    in its own process (:func:`step_case`; median of 3 steps). Step times of one case differ by up to about
    5 % from one process to the next, so the subset autocast cases, on which the targets are judged, are
    measured in ``TARGET_PROCESSES`` processes and the fastest is kept (``processes`` in the row)."""
    presets = ("smoke",) if quick else ("demo", "subset")
    rows = []
    for preset in presets:
        for name in CASES:
            for amp in (False, True):
                runs = TARGET_PROCESSES if preset == "subset" and amp else 1
                measured = [bench.isolated(step_case, name, preset, amp, 1 if quick else 3) for _ in range(runs)]
                row, peak = min(measured, key=lambda m: m[0]["ms"])
                cap = ceilings.get(row["dtype"])
                row.update(fraction_of_ceiling=row["gflops"] / cap if cap else None, peak_mb=peak, processes=runs)
                rows.append(row)
                print(f"  {name} {preset} {row['dtype']}: {row['ms']:.0f} ms, {row['gflops']:.0f} GFLOP/s, "
                      f"{peak:.0f} MB", flush=True)
    for row in rows:
        if row["name"] in PAIRS:
            other = next(r for r in rows if r["name"] == PAIRS[row["name"]] and r["preset"] == row["preset"]
                         and r["dtype"] == row["dtype"])
            row["monai_fraction"] = other["fraction_of_ceiling"]
            row["vs_monai"] = row["gflops"] / other["gflops"]
    return rows


def _targets_steps(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["name"] not in TRAINING_STEPS or r["preset"] != "subset" or r["dtype"] == "float32":
            continue
        ours, theirs = r["fraction_of_ceiling"], r["monai_fraction"]
        met = ours >= theirs and (theirs < 0.35 or ours >= 0.35)
        floor = " and >= 35 % since MONAI reaches it" if theirs >= 0.35 else ""
        lines.append(f"{'MET' if met else 'NOT MET'}: {r['name']} {r['dtype']} step at subset reaches {ours:.1%} of the "
                     f"{r['dtype']} ceiling against {theirs:.1%} for {PAIRS[r['name']]} "
                     f"(target: at least MONAI's{floor})")
    return lines


# --------------------------------------------------------------------------- section 6: diffusion sampling

def diffusion_sampling(quick: bool, ceilings: dict | None = None, out=None) -> list[dict]:
    """DDIM translation of one series at the demo size (the notebook's ``ldm.translate`` under autocast), and
    the VAE's encode/decode frames/s at the demo and subset frame sizes (no_grad, fp32 and autocast)."""

    dev = _device.pick_device()
    rows = []
    cfg = config.resolve("04_ct_diffusion", "smoke" if quick else "demo")
    torch.manual_seed(0)
    vae = build_vae(config.Config(cfg, scale_factor=1.0))  # an untrained VAE costs what a trained one does
    ldm = LatentDiffusion(vae, build_denoiser(cfg), cfg.num_train_timesteps).to(dev).eval()
    baseline = (torch.rand(1, 1, cfg.frames, cfg.frame_size, cfg.frame_size, generator=_gen()) * 2 - 1).to(dev)
    with torch.no_grad():
        cond = vae.encode(baseline)
    for what, fn in (("translate: encode, DDIM, decode", lambda n: ldm.translate(baseline, n)),
                     ("DDIM sampling in latent space", lambda n: ldm.sample(cond, n))):
        with _device.autocast(dev), torch.no_grad():
            fn(1)  # warm-up
            t = bench.measure(lambda: fn(cfg.ddim_steps), repeats=1, warmup=0)
        frames = baseline.shape[2]
        rows.append({"name": what, "preset": cfg.preset, "frames": f"1x{frames}x{cfg.frame_size}^2",
                     "ddim_steps": cfg.ddim_steps, "ms_per_frame": t["wall_s"] * 1e3 / frames,
                     "cpu_ms_per_frame": t["cpu_s"] * 1e3 / frames,
                     "ms_per_frame_and_step": t["wall_s"] * 1e3 / frames / cfg.ddim_steps})
    for preset in ("smoke",) if quick else ("demo", "subset"):
        cfg = config.resolve("04_ct_diffusion", preset)
        torch.manual_seed(0)
        vae = build_vae(config.Config(cfg, scale_factor=1.0)).to(dev).eval()
        n = 8 if quick else 32
        x = (torch.rand(1, 1, n, cfg.frame_size, cfg.frame_size, generator=_gen()) * 2 - 1).to(dev)
        with torch.no_grad():
            z = vae.encode(x)
        chunk = max(8, 2 ** 22 // cfg.frame_size ** 2)  # frames per pass, as the notebook
        for amp in (False, True):
            for what, fn in (("VAE encode", lambda: vae.encode(x, chunk)), ("VAE decode", lambda: vae.decode(z, chunk))):
                with _device.autocast(dev, amp), torch.no_grad():
                    t = bench.measure(fn, repeats=1 if quick else 3)
                rows.append({"name": what, "preset": preset, "frames": f"{n}x{cfg.frame_size}^2",
                             "dtype": str(_device.autocast_dtype(dev) if amp else torch.float32).replace("torch.", ""),
                             "frames_per_s": n / t["wall_s"], "cpu_s_per_frame": t["cpu_s"] / n})
    return rows


# --------------------------------------------------------------------------- section 7: memory at prod

def saved_activations(name: str, preset: str, batch: int) -> dict:
    """Bytes autograd saves for the backward pass in one forward (+ loss) under autocast, and per block."""
    case = build_case(name, preset, batch=batch)
    model = case.model.train()
    blocks = case.blocks(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, torch.UntypedStorage] = {}  # alive until the end, as in the autograd graph
    inside, inputs, stack = [0] * len(blocks), [0] * len(blocks), []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in kept:
            kept[s.data_ptr()] = s
            if stack:
                inside[stack[-1]] += s.nbytes()
        return t

    def enter(i):
        def hook(module, args, kwargs):
            inputs[i] += sum(a.numel() * a.element_size() for a in (*args, *kwargs.values()) if torch.is_tensor(a))
            stack.append(i)
        return hook

    handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
    def leave(*_) -> None:
        stack.pop()

    handles += [b.register_forward_hook(leave) for b in blocks]
    dev = torch.device("cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _device.autocast(dev):
        case.loss(model, case.batch)
    for h in handles:
        h.remove()
    total = sum(s.nbytes() for s in kept.values())
    return {"total": total, "checkpointed": total - sum(inside) + sum(inputs) + max(inside, default=0),
            "params": sum(p.numel() for p in model.parameters()), "unit": case.unit}


GPU_BYTES = 15360 * 2 ** 20       # what a T4 ("16 GB") reports as usable
RESERVED_BYTES = 1024 * 2 ** 20   # CUDA context, cuDNN/cuBLAS workspaces
HEADROOM = 0.9                    # allocator fragmentation and backward-pass temporaries
STATE_BYTES_PER_PARAM = 16        # fp32 weights, fp32 gradients, AdamW's two fp32 moments


def memory_estimate(quick: bool, ceilings: dict | None = None, out=None) -> list[dict]:
    """Largest micro-batch of every family at prod on a 16 GB GPU (Kaggle's T4), an estimate.

    Measured on this CPU (in a child per case): the bytes autograd saves in one forward under autocast
    at batch 1 and 2 (:func:`saved_activations`; bf16 here, fp16 on a T4: the same sizes). Their
    difference is the activation memory per sample, the rest (half-precision weight copies, buffers) a
    fixed part. With activation checkpointing per block (``Case.blocks``: WaveFormer blocks, VAE
    encoder/decoder blocks, denoiser res/attention blocks, encoder levels, transformer and decoder
    blocks, U-Net levels), a block keeps only its inputs, and the block being recomputed holds its own
    activations once: saved = total - sum(inside blocks) + sum(block inputs) + max(inside a block).
    Largest batch = (usable - parameter state - fixed part) / per sample, with usable =
    ``HEADROOM`` x (15,360 MiB - 1 GiB for the CUDA context) and 16 bytes of state per parameter.
    Not counted: the peak of the backward pass above the saved tensors (gradient buffers of the
    largest layer), which the headroom stands for.
    """
    preset = "smoke" if quick else "prod"
    usable = HEADROOM * (GPU_BYTES - RESERVED_BYTES)
    rows = []
    for name in TRAINING_STEPS:
        one, _ = bench.isolated(saved_activations, name, preset, 1)
        two, _ = bench.isolated(saved_activations, name, preset, 2)
        state = STATE_BYTES_PER_PARAM * one["params"]
        row = {"name": name, "preset": preset, "unit": one["unit"], "params_m": one["params"] / 1e6,
               "state_gb": state / 1e9}
        for key, label in (("total", "autocast"), ("checkpointed", "checkpointing")):
            per_sample = max(two[key] - one[key], 1)
            fixed = one[key] - per_sample
            row[f"act_gb_per_sample_{label}"] = per_sample / 1e9
            row[f"fixed_gb_{label}"] = fixed / 1e9
            row[f"max_batch_{label}"] = max(0, int((usable - state - fixed) // per_sample))
        notebook = CASES[name][0]
        cfg = config.resolve(notebook, preset)
        row["preset_batch"] = cfg.vae_batch_size if name == "FrameVAE" else cfg.batch_size
        rows.append(row)
    return rows


def _targets_memory(rows: list[dict]) -> list[str]:
    return [f"estimate: {r['name']} at {r['preset']} on a 16 GB T4: a micro-batch of at most {r['max_batch_autocast']} "
            f"with autocast, {r['max_batch_checkpointing']} with activation checkpointing too (unit: {r['unit']}; "
            f"the preset uses {r['preset_batch']})" for r in rows]


def targets(rows: list[dict]) -> list[str]:
    sections = {r["section"] for r in rows}
    return (_targets_steps(rows) if "steps" in sections else []) + (_targets_memory(rows) if "memory" in sections else [])
