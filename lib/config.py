"""Presets: the named configurations of every notebook, defined once, here.

Each notebook declares its parameters (name, type, default, meaning) and four presets, nnU-Net style:

- ``smoke``:  CI on a CPU, seconds. Exercises every code path, learns nothing.
- ``demo``:   a laptop CPU, minutes, on the built-in demo cohort; learns something measurable.
- ``subset``: the validated small GPU configuration of the research notes.
- ``prod``:   the full configuration of the research notes (GPU, hours to days).

A preset is a small dictionary that only names what differs from the parameter defaults.
:func:`resolve` merges defaults, preset and explicit overrides, and checks every key and type, so a
typo or a wrong type fails loudly with the valid choices instead of silently training the wrong model.

In a notebook, the cell tagged ``parameters`` sets ``preset`` (default ``$PRESET`` or ``demo``) and
any override (``None`` means "the preset's value"); the next cell passes them to
:func:`lib.runs.start_notebook`, which calls :func:`params_from_namespace` and :func:`resolve`.
Papermill only warns about unknown ``-p`` names; the check here turns them into errors.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

PRESETS = ("smoke", "demo", "subset", "prod")


@dataclass(frozen=True)
class Param:
    """One notebook parameter: its default, the accepted type(s), and what it means."""

    default: Any
    type: type | tuple[type, ...]
    help: str
    choices: tuple | None = None  # the allowed values, when the parameter is categorical


@dataclass(frozen=True)
class NotebookSpec:
    params: dict[str, Param]
    presets: dict[str, dict[str, Any]]
    about: str = ""


class Config(dict):
    """A resolved configuration: a plain, JSON-serialisable dict that also allows ``cfg.key``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"configuration has no key {key!r}; keys: {sorted(self)}") from None


# Parameters every notebook has.
COMMON: dict[str, Param] = {
    "seed": Param(0, int, "seeds python, numpy, torch and data-loader workers (lib.runs.seed_everything)"),
    "device": Param("auto", str, "auto | cpu | cuda | cuda:N | mps; 'auto' honours $MEDIMG_DEVICE (lib.device)"),
    "deterministic": Param(False, bool, "torch.use_deterministic_algorithms: bit-exact reruns, slower"),
}


# Parameters of every training notebook (03-06). The names are those of lib.train.TrainSettings
# (which reads them from the resolved configuration) plus the optimiser and loader basics.
_OPT_FLOAT = (float, type(None))
TRAINING: dict[str, Param] = {
    "epochs": Param(1, int, "passes over the training data"),
    "batch_size": Param(2, int, "samples per micro-batch"),
    "lr": Param(1e-4, float, "peak learning rate (AdamW)"),
    "weight_decay": Param(1e-4, float, "AdamW weight decay"),
    "grad_accum": Param(1, int, "micro-batches per optimizer step"),
    "clip_grad_norm": Param(1.0, _OPT_FLOAT, "clip the gradient norm to this; None: no clipping"),
    "warmup_epochs": Param(0.0, float, "linear warm-up before the cosine decay, in epochs"),
    "ema_decay": Param(None, _OPT_FLOAT, "EMA of the weights (e.g. 0.999); None: off"),
    "val_every": Param(1, int, "validate every N epochs"),
    "ckpt_every": Param(0, int, "keep a checkpoint every N epochs besides last and best; 0: off"),
    "time_budget_s": Param(None, _OPT_FLOAT, "stop cleanly with a checkpoint before this many seconds (Kaggle: ~11.5 h)"),
    "amp": Param(True, bool, "mixed precision (bf16 on CPU and Ampere+, fp16 + loss scaling on older GPUs)"),
    "num_workers": Param(0, int, "data-loader worker processes"),
    "resume": Param(False, bool, "continue the run whose folder is given by $MEDIMG_RUN_ID from its last checkpoint"),
}


def _spec(about: str, params: dict[str, Param] | None = None, training: bool = False,
          **presets: dict[str, Any]) -> NotebookSpec:
    missing = [p for p in PRESETS if p not in presets]
    if missing:
        raise ValueError(f"notebook spec {about!r} lacks presets {missing}")
    return NotebookSpec(params={**COMMON, **(TRAINING if training else {}), **(params or {})},
                        presets=presets, about=about)


NOTEBOOKS: dict[str, NotebookSpec] = {
    "01_explore_data": _spec(
        "manifest status and a look at the local image files",
        {
            "max_files": Param(400, int, "at most this many local image files have their headers read"),
            "n_preview": Param(8, int, "middle slices shown in the preview grid"),
            "hist_files": Param(3, int, "files per dataset and modality whose intensities are histogrammed"),
        },
        smoke={"max_files": 100, "n_preview": 4, "hist_files": 1},
        demo={},
        subset={"max_files": 2000, "n_preview": 12},
        prod={"max_files": 10000, "n_preview": 12, "hist_files": 5},
    ),
    "02_prepare_data": _spec(
        "build or fetch, verify, preprocess and cache the data",
        {
            "cohort": Param("demo", str, "built-in cohort size to build and prepare (lib.data.demo)", ("smoke", "demo")),
            "rebuild": Param(False, bool, "rebuild the cohort even if it verifies against data_manifest.csv"),
            "fetch": Param("", str, "comma-separated real datasets of data_manifest.csv to download (opt-in; needs credentials)"),
            "spacing": Param(None, (float, type(None)), "isotropic spacing (mm) of prepared volumes; None keeps the grid"),
            "prep_size": Param(64, int, "prepared volumes are centre-cropped or padded to this size (voxels per axis)"),
            "throughput_files": Param(24, int, "volumes read to measure decoding .nii.gz against the cache"),
        },
        smoke={"cohort": "smoke", "prep_size": 48, "throughput_files": 4},
        demo={},
        subset={"spacing": 1.5, "prep_size": 128},
        prod={"spacing": 1.0, "prep_size": 160},
    ),
    # The notebooks below hold only the common parameters until their issue lands; their presets
    # are empty on purpose (the defaults of COMMON apply) and grow with the notebook.
    "03_pretrain": _spec(
        "self-supervised 3D pre-training",
        {
            "cohort": Param("demo", str, "built-in cohort to pre-train on (lib.data.demo) when real_data is empty", ("smoke", "demo")),
            "real_data": Param("", str, "comma-separated real datasets of data_manifest.csv to pre-train on instead "
                               "(prod: openmind,rsna2025_aneurysm); the run stops at once, saying how to get any that is missing"),
            "spacing": Param(None, (float, type(None)), "isotropic spacing (mm) of the cached volumes; None keeps the grid (as 02_prepare_data)"),
            "prep_size": Param(64, int, "cached volumes are cropped/padded to this size (as 02_prepare_data), then resized to img_size"),
            "img_size": Param(32, int, "model input: volumes resized to img_size^3 (note: 32 subset, 128 prod)"),
            "patch_size": Param(4, int, "voxels per token along each axis (note: 4 -> 8^3 tokens at 32; 8 -> 16^3 at 128)"),
            "embed_dim": Param(128, int, "WaveFormer3D width (note: 128 subset, 768 prod)"),
            "depth": Param(4, int, "WaveFormer3D blocks (note: 4 subset, 12 prod)"),
            "num_heads": Param(4, int, "attention heads (note: 4 subset, 12 prod)"),
            "wavelet_levels": Param(1, int, "Haar levels before attention; each divides the attended tokens by 8"),
            "pos_embed": Param("sincos", str, "positional encoding: fixed 3D sine-cosine or a learned table (resized per grid)", ("sincos", "learned")),
            "drop_path": Param(0.0, float, "stochastic depth of the last block (linear over blocks)"),
            "grad_checkpointing": Param(False, bool, "recompute WaveFormer blocks in the backward pass (less activation memory)"),
            "spark_dim": Param(128, int, "channels of the SparK-style sparse stages above the token grid"),
            "spark_levels": Param(1, int, "stride-2 sparse stages (<= log2 of the MiM block edge: 1 up to 8^3 tokens, 2 at 16^3)"),
            "decoder_dim": Param(64, int, "width of the SparK light decoder"),
            "mask_ratio": Param(0.6, float, "MiM global mask: fraction of blocks hidden from the encoder (note: 0.6)"),
            "local_ratio": Param(0.8, float, "MiM local mask: fraction of the masked region masked again, the hard targets (note: 0.8)"),
            "min_unmasked_blocks": Param(2, int, "MiM: blocks always left visible (note: 2)"),
            "contrastive_weight": Param(0.5, float, "loss = reconstruction + this x spatial InfoNCE (note: 0.5)"),
            "temperature": Param(0.1, float, "InfoNCE temperature (note: 0.07-0.1)"),
            "projection_dim": Param(128, int, "InfoNCE 1x1x1 projection width (note: 128)"),
            "num_samples": Param(256, int, "visible locations per sample in the InfoNCE (note: 256)"),
            "ct_batch_size": Param(None, (int, type(None)), "CT batch size; None: half of batch_size (CT has 3 channels)"),
            "eval_repeats": Param(4, int, "mask draws per held-out volume for the held-out reconstruction loss"),
        },
        training=True,
        smoke={"cohort": "smoke", "prep_size": 48, "img_size": 16, "embed_dim": 24, "depth": 2, "num_heads": 2,
               "spark_dim": 16, "decoder_dim": 16, "projection_dim": 16, "num_samples": 32, "eval_repeats": 1,
               "lr": 1e-3},
        demo={"embed_dim": 96, "epochs": 24, "batch_size": 4, "lr": 2e-3, "warmup_epochs": 1.0},
        subset={"epochs": 10, "batch_size": 2, "ct_batch_size": 2, "lr": 1e-3},
        prod={"real_data": "openmind,rsna2025_aneurysm", "spacing": 1.0, "prep_size": 160, "img_size": 128, "patch_size": 8,
              "embed_dim": 768, "depth": 12, "num_heads": 12, "wavelet_levels": 2, "drop_path": 0.1,
              "grad_checkpointing": True, "spark_dim": 256, "spark_levels": 2, "decoder_dim": 128, "epochs": 100,
              "batch_size": 8, "ct_batch_size": 4, "lr": 1e-4, "warmup_epochs": 5.0, "num_workers": 4,
              "time_budget_s": 41400.0},
    ),
    "04_ct_diffusion": _spec(
        "grayscale frame VAE + latent diffusion translating non-contrast into contrast chest CT slice series",
        {
            "cohort": Param("demo", str, "built-in cohort whose paired chest CT series are used (lib.data.demo)", ("smoke", "demo")),
            "frame_size": Param(256, int, "axial frames are resized to frame_size x frame_size (divisible by the VAE's compression)"),
            "frames": Param(16, int, "T: consecutive slices per series the denoiser sees (training windows and held-out series)"),
            # stage 1: the VAE
            "vae_channels": Param((64, 128, 256, 256), tuple, "VAE widths per level; len - 1 downsamplings (4 levels: 8x compression)"),
            "latent_channels": Param(4, int, "VAE latent channels (note: 4)"),
            "vae_res_blocks": Param(2, int, "residual blocks per VAE level (MONAI default 2: 18.2M parameters; 1 gives the note's ~13M)"),
            "vae_mid_attention": Param(True, bool, "non-local attention at the VAE's latent resolution (encoder and decoder)"),
            "norm_groups": Param(32, int, "GroupNorm groups of the VAE and the denoiser"),
            "vae_epochs": Param(10, int, "stage 1: passes over every training frame (non-contrast and contrast); 0 with vae_checkpoint: use it as is"),
            "vae_batch_size": Param(16, int, "frames per VAE micro-batch"),
            "vae_lr": Param(1e-4, float, "peak learning rate of the VAE (AdamW, warm-up cosine)"),
            "vae_crop": Param(0, int, "train the VAE on random crops of this size (it is convolutional); 0: whole frames"),
            "kl_weight": Param(1e-6, float, "weight of the KL term (per-frame sum over the latent; MAISI 1e-7)"),
            "ms_ssim_weight": Param(0.0, float, "weight of (1 - MS-SSIM) in the VAE loss; 0: off (note: optional, off)"),
            "adv_weight": Param(0.0, float, "weight of the least-squares patch adversarial term; 0: off (MAISI 0.1)"),
            "disc_channels": Param(64, int, "width of the PatchDiscriminator (used when adv_weight > 0)"),
            "scale_factor": Param(None, (float, type(None)), "latent scale; None: 1 / std of the training latents (stored in the checkpoints)"),
            "vae_checkpoint": Param("", str, "start stage 1 from this lib.train checkpoint of the VAE ('' = from scratch)"),
            # stage 2: the denoiser
            "model_channels": Param(128, int, "denoiser U-Net base width (note: 128)"),
            "channel_mult": Param((1, 2, 4, 4), tuple, "denoiser width multipliers per level (note: 1, 2, 4, 4)"),
            "attention_levels": Param((False, True, True, False), tuple, "spatial self-attention per denoiser level (note: levels 1 and 2)"),
            "temporal_attention": Param(True, bool, "temporal attention at every level, so that frames attend to each other"),
            "num_res_blocks": Param(2, int, "residual blocks per denoiser level"),
            "num_head_channels": Param(32, int, "channels per attention head (spatial and temporal)"),
            "window_stride": Param(1, int, "stride between the training windows of `frames` slices cut from every training series"),
            "num_train_timesteps": Param(1000, int, "diffusion steps of the cosine schedule (note: 1000)"),
            "ddim_steps": Param(50, int, "DDIM sampling steps (note: 50)"),
            "eta": Param(0.0, float, "DDIM eta; 0: deterministic sampling"),
            "sample_seed": Param(0, int, "seed of the sampling noise: same seed, same generated series"),
            "denoiser_checkpoint": Param("", str, "start stage 2 from this lib.train checkpoint of the latent diffusion model (it holds its VAE, "
                                         "so vae_epochs must be 0); epochs=0: only evaluate"),
            "threshold_hu": Param(100.0, float, "headline MAE over the voxels whose target differs from the input by more than this (HU)"),
            "nifti_series": Param(2, int, "held-out series written as NIfTI (generated, input, target)"),
        },
        training=True,
        smoke={"cohort": "smoke", "frame_size": 32, "frames": 4, "vae_channels": (8, 8, 16, 16), "vae_res_blocks": 1,
               "vae_mid_attention": False, "norm_groups": 8, "vae_epochs": 1, "vae_batch_size": 64, "vae_lr": 2e-3,
               "ms_ssim_weight": 0.1, "adv_weight": 0.1, "disc_channels": 8, "model_channels": 16, "channel_mult": (1, 2),
               "attention_levels": (False, True), "num_res_blocks": 1, "num_head_channels": 8, "window_stride": 4,
               "batch_size": 8, "lr": 1e-3, "ddim_steps": 4, "nifti_series": 1},
        demo={"frame_size": 64, "frames": 8, "vae_channels": (16, 32, 64, 64), "vae_res_blocks": 1, "vae_mid_attention": False,
              "norm_groups": 8, "vae_epochs": 1, "vae_batch_size": 3, "vae_lr": 2e-3,
              "model_channels": 32, "channel_mult": (1, 2, 2), "attention_levels": (False, True, False), "num_res_blocks": 1,
              "num_head_channels": 16, "window_stride": 2, "epochs": 5, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 0.1},
        subset={"frame_size": 128, "frames": 8, "vae_channels": (32, 64, 128, 128), "vae_epochs": 20, "vae_lr": 5e-4,
                "model_channels": 64, "epochs": 50, "batch_size": 8, "lr": 2e-4, "ema_decay": 0.999, "num_workers": 2},
        prod={"vae_epochs": 50, "kl_weight": 1e-7, "adv_weight": 0.1, "epochs": 50, "batch_size": 2, "grad_accum": 16,
              "lr": 1e-4, "warmup_epochs": 1.0, "ema_decay": 0.9999, "num_workers": 4, "time_budget_s": 41400.0},
    ),
    "05_cxr_change": _spec(
        "longitudinal chest X-ray change detection",
        {
            "cohort": Param("demo", str, "built-in cohort whose baseline/follow-up pairs are used (lib.data.demo)", ("smoke", "demo")),
            "variant": Param("big", str, "big: LongitudinalMIMModelBig (U-Net decoder with skips); small: LongitudinalMIMModel (no skips)", ("big", "small")),
            "image_size": Param(512, int, "radiographs are resized to this many pixels per side (note: 512)"),
            "channels": Param((64, 48, 80, 224, 640), tuple, "encoder widths: the channel-expansion stem, then one per stride-2 MBConv level (note: 640 x 32 x 32 at 512)"),
            "blocks": Param((1, 1, 2, 4), tuple, "MBConv blocks per stride-2 level (note: 8 selected EfficientNet blocks)"),
            "expand_ratio": Param(6, int, "MBConv inverted-bottleneck expansion (levels after the first)"),
            "kernel_size": Param(3, int, "MBConv depthwise kernel size"),
            "hidden_size": Param(768, int, "transformer bottleneck width (note: ViT-Base, 768)"),
            "transformer_layers": Param(12, int, "transformer blocks in the bottleneck (ViT-Base: 12)"),
            "num_heads": Param(12, int, "attention heads"),
            "mlp_dim": Param(3072, int, "transformer MLP width"),
            "patch_size": Param(2, int, "transformer patch size on the deepest feature map (note: 32x32 / 2 = 256 patches)"),
            "inter_channels": Param(704, int, "width of the bottleneck's conv branch (note: intermediate 704)"),
            "norm_groups": Param(32, int, "GroupNorm groups (note: 32; a layer uses its gcd with the width)"),
            "decoder_channels": Param((320, 160, 80, 40), tuple, "U-Net decoder widths, one per x2 upsampling"),
            "dice_weight": Param(1.0, float, "weight of the signed soft Dice beside the MSE to sign(change)"),
            "augment": Param(True, bool, "random swap of baseline/follow-up (sign flips) and left-right mirroring"),
            "mim_epochs": Param(20, int, "masked-reconstruction pre-training epochs of the shared encoder; 0: none"),
            "mim_mask_ratio": Param(0.6, float, "fraction of mask patches hidden in pre-training (SimMIM: 0.6)"),
            "mim_patch": Param(32, int, "side of a mask patch in pixels"),
            "freeze_encoder": Param(False, bool, "train only fusion and decoder on the (pre-trained) encoder"),
            "baseline_sigma": Param(2.0, float, "Gaussian smoothing (px) of the second, smoothed subtraction baseline (the naive one has none)"),
            "figure_pairs": Param(4, int, "held-out pairs shown with their true and predicted change"),
        },
        training=True,
        smoke={"cohort": "smoke", "image_size": 64, "channels": (8, 8, 16, 16, 32), "blocks": (1, 1, 1, 1),
               "expand_ratio": 2, "hidden_size": 32, "transformer_layers": 1, "num_heads": 2, "mlp_dim": 64,
               "patch_size": 1, "inter_channels": 32, "norm_groups": 8, "decoder_channels": (16, 16, 8, 8),
               "epochs": 1, "batch_size": 8, "lr": 1e-3, "mim_epochs": 1, "mim_patch": 8, "figure_pairs": 2},
        demo={"image_size": 64, "channels": (16, 24, 32, 48, 64), "blocks": (1, 1, 1, 1), "expand_ratio": 4,
              "hidden_size": 64, "transformer_layers": 2, "num_heads": 4, "mlp_dim": 128, "patch_size": 1,
              "inter_channels": 64, "norm_groups": 8, "decoder_channels": (48, 32, 24, 16), "epochs": 40,
              "batch_size": 8, "lr": 2e-3, "warmup_epochs": 1.0, "mim_epochs": 5, "mim_patch": 8},
        subset={"image_size": 256, "channels": (32, 24, 40, 112, 320), "blocks": (1, 1, 2, 2), "hidden_size": 384,
                "transformer_layers": 6, "num_heads": 6, "mlp_dim": 1536, "inter_channels": 352,
                "decoder_channels": (160, 80, 40, 20), "epochs": 60, "batch_size": 8, "lr": 3e-4,
                "warmup_epochs": 2.0, "mim_epochs": 20, "mim_patch": 16, "num_workers": 2},
        prod={"epochs": 100, "batch_size": 4, "grad_accum": 4, "lr": 1e-4, "warmup_epochs": 2.0, "ema_decay": 0.999,
              "mim_epochs": 50, "num_workers": 4},
    ),
    "06_xray_to_ct": _spec(
        "biplanar (or N-view) X-ray to 3D CT with HybridCNNViTUNet3D, against the mean training volume",
        {
            "cohort": Param("demo", str, "built-in cohort whose chest CTs and DRRs are used (lib.data.demo)", ("smoke", "demo")),
            "views": Param(2, int, "radiographs per patient at angles spread over 180 degrees (1: frontal; 2: frontal + lateral; "
                           "4: 0/45/90/135); angles other than 0 and 90 are rendered from the CT (Beer-Lambert) and cached"),
            "image_size": Param(512, int, "radiographs are resampled to this many pixels per side (note: 512; divisible by 8)"),
            "volume_size": Param(64, int, "CT volumes are resampled to this many voxels per axis (note: 64; divisible by 16)"),
            "hu_min": Param(-1000.0, float, "HU mapped to 0 (the [0, 1] scale PSNR is computed on)"),
            "hu_max": Param(1000.0, float, "HU mapped to 1"),
            "base_channels": Param(32, int, "U-Net and 2D pyramid base width c: c, 2c, 4c, 8c, 16c (note: 32)"),
            "attention_channels": Param(512, int, "cross-view transformer width (note: 512)"),
            "attention_heads": Param(8, int, "cross-view and Swin attention heads (note: 8)"),
            "window_size": Param(4, int, "3D Swin window (note: 4)"),
            "dense_layers": Param(4, int, "layers per residual dense block (note: 4)"),
            "residual_prior": Param(True, bool, "predict a residual on top of the mean training volume (the baseline); "
                                    "False: predict the volume itself"),
            "loss_l1": Param(1.0, float, "MedicalGradeLoss weight of L1 (note: 1.0)"),
            "loss_ssim": Param(0.3, float, "weight of 1 - 3D SSIM (note: 0.3)"),
            "loss_perceptual": Param(0.2, float, "weight of the perceptual term (note: 0.2); needs perceptual_checkpoint"),
            "loss_edge": Param(0.2, float, "weight of the 3D Sobel edge term (note: 0.2)"),
            "loss_deep_supervision": Param(0.2, float, "weight of the deep supervision at 1/8, 1/4, 1/2 (note: 0.2)"),
            "loss_frequency": Param(0.3, float, "weight of the FFT high-frequency term (note: 0.3)"),
            "high_freq_cutoff": Param(0.25, float, "the frequency term covers frequencies above this (cycles/voxel; Nyquist 0.5)"),
            "perceptual_checkpoint": Param("", str, "03_pretrain encoder checkpoint for the perceptual term "
                                           "(lib.models.pretrainer.load_encoder); '' turns the term off, with a notice"),
        },
        training=True,
        smoke={"cohort": "smoke", "image_size": 32, "volume_size": 16, "base_channels": 4, "attention_channels": 32,
               "epochs": 1, "lr": 1e-3},
        demo={"image_size": 64, "volume_size": 32, "base_channels": 8, "attention_channels": 64, "epochs": 12,
              "lr": 1e-3, "warmup_epochs": 1.0},
        subset={"image_size": 256, "base_channels": 16, "attention_channels": 256, "epochs": 30, "lr": 2e-4,
                "ckpt_every": 5, "num_workers": 2},
        prod={"epochs": 60, "ckpt_every": 5, "num_workers": 4},
    ),
    "07_evaluate": _spec(
        "held-out numbers of every family against its baseline -> results/summary.csv and summary.md",
        {
            "cohort": Param("demo", str, "built-in cohort of the downstream comparison", ("smoke", "demo")),
            "run_03": Param("", str, "run id of 03_pretrain to evaluate; '' = latest completed at this preset"),
            "run_04": Param("", str, "run id of 04_ct_diffusion; '' = latest completed at this preset"),
            "run_05": Param("", str, "run id of 05_cxr_change; '' = latest completed at this preset"),
            "run_06": Param("", str, "run id of 06_xray_to_ct; '' = latest completed at this preset"),
            "downstream_seeds": Param(3, int, "seeds of the SSL downstream comparison (scratch vs pre-trained)"),
            "downstream_epochs": Param(8, int, "epochs of each downstream training (same budget for both arms)"),
            "downstream_size": Param(32, int, "input size (voxels per axis) of the downstream task"),
        },
        smoke={"cohort": "smoke", "downstream_seeds": 2, "downstream_epochs": 1, "downstream_size": 16},
        demo={},
        subset={"downstream_seeds": 5, "downstream_epochs": 30},
        prod={"downstream_seeds": 5, "downstream_epochs": 50, "downstream_size": 64},
    ),
    "08_visualize": _spec(
        "figures of every family and interactive viewers -> results/figures/",
        {"gif_frames": Param(16, int, "frames of the animated CT series GIF"),
         "cohort": Param("demo", str, "built-in cohort whose images the viewers show", ("smoke", "demo"))},
        smoke={"gif_frames": 4, "cohort": "smoke"}, demo={}, subset={}, prod={},
    ),
}


def _spec_of(notebook: str) -> NotebookSpec:
    if notebook not in NOTEBOOKS:
        raise ValueError(f"unknown notebook {notebook!r}; valid notebooks: {', '.join(NOTEBOOKS)}")
    return NOTEBOOKS[notebook]


def _type_name(t: type | tuple[type, ...]) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("None" if x is type(None) else x.__name__ for x in ts)


def _check(notebook: str, key: str, value: Any, param: Param, origin: str) -> Any:
    accepted = param.type if isinstance(param.type, tuple) else (param.type,)
    # bool is an int in Python; a flag given as 1 or a count given as True is a mistake, not a cast.
    if isinstance(value, bool) and bool not in accepted:
        ok = False
    elif float in accepted and type(value) is int:
        return float(value)
    elif tuple in accepted and isinstance(value, list):
        return tuple(value)
    else:
        ok = isinstance(value, accepted)
    if not ok:
        raise ValueError(
            f"{notebook}: parameter {key!r} ({origin}) must be {_type_name(param.type)}, "
            f"got {type(value).__name__} {value!r}. {param.help}"
        )
    if param.choices is not None and value not in param.choices:
        raise ValueError(f"{notebook}: parameter {key!r} ({origin}) is {value!r}; valid choices: "
                         f"{', '.join(map(str, param.choices))}")
    return value


def resolve(notebook: str, preset: str, **overrides: Any) -> Config:
    """The complete, validated configuration of ``notebook`` under ``preset``.

    Defaults are overlaid by the preset, then by ``overrides``; an override of ``None`` keeps the
    preset's value (that is how the notebooks' parameters cells say "not set").
    Raises ``ValueError`` naming the valid choices for an unknown notebook, preset or key, and the
    expected type for a value of the wrong type.
    """
    spec = _spec_of(notebook)
    if not isinstance(preset, str) or preset not in spec.presets:
        raise ValueError(f"{notebook}: unknown preset {preset!r}; valid presets: {', '.join(spec.presets)}")
    unknown = sorted(set(overrides) - set(spec.params))
    if unknown:
        raise ValueError(
            f"{notebook}: unknown parameter(s) {', '.join(unknown)}; valid parameters: "
            f"preset, {', '.join(spec.params)}"
        )
    cfg = Config(notebook=notebook, preset=preset)
    for key, param in spec.params.items():
        value, origin = param.default, "default"
        if key in spec.presets[preset]:
            value, origin = spec.presets[preset][key], f"preset {preset}"
        if overrides.get(key) is not None:
            value, origin = overrides[key], "override"
        cfg[key] = _check(notebook, key, value, param, origin)
    return cfg


def describe(notebook: str) -> str:
    """A readable table of a notebook's parameters and presets (for docs and error messages)."""
    spec = _spec_of(notebook)
    lines = [f"{notebook}: {spec.about}", ""]
    for key, p in spec.params.items():
        per_preset = ", ".join(f"{name}={pre[key]!r}" for name, pre in spec.presets.items() if key in pre)
        lines.append(f"  {key} ({_type_name(p.type)}, default {p.default!r}) {p.help}"
                     + (f" [{per_preset}]" if per_preset else ""))
    return "\n".join(lines)


# Names IPython puts into a notebook's namespace by itself.
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def params_from_namespace(namespace: dict[str, Any]) -> dict[str, Any]:
    """The parameters a notebook defined (its ``parameters`` cell plus what papermill injected).

    Everything that is not private, an IPython built-in, a module, a function or a class counts, so
    a mistyped ``papermill -p epcohs 3`` reaches :func:`resolve` and fails there.
    """
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES:
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)):
            continue
        out[name] = value
    return out
