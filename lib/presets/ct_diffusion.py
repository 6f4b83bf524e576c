"""Parameters and presets of 04_ct_diffusion (the CT series diffusion family): see :mod:`lib.config` for what a preset is."""

from lib.config import Family, Param, _spec

NB_04 = _spec(
    "grayscale frame VAE + latent diffusion translating non-contrast into contrast chest CT slice series",
    {
        "cohort": Param("demo", str, "built-in cohort whose paired chest CT series are used (lib.data.demo) when real_data is empty", ("smoke", "demo")),
        "real_data": Param("", str, "a prepared dataset of registered CT phase pairs to train on instead (folder or name; "
                           "prod: coltea_lung_ct_100w); the run stops at once, saying how to get it if it is missing"),
        "target_phase": Param("contrast", str, "the pairs' target series: contrast (built-in cohort); arterial or venous "
                              "(Coltea-Lung-CT-100W, registered onto the native series)", ("contrast", "arterial", "venous")),
        "series_frames": Param(0, int, "training and validation series keep their central run of this many slices (0: whole "
                               "series; real series of unequal length are cut to the shortest)", range=">=0"),
        "frame_size": Param(256, int, "axial frames are resized to frame_size x frame_size (divisible by the VAE's compression)", range=">=1"),
        "frames": Param(16, int, "T: consecutive slices per series the denoiser sees (training windows and held-out series)", range=">=1"),
        # stage 1: the VAE
        "vae_channels": Param((64, 128, 256, 256), tuple, "VAE widths per level; len - 1 downsamplings (4 levels: 8x compression)"),
        "latent_channels": Param(4, int, "VAE latent channels (note: 4)", range=">=1"),
        "vae_res_blocks": Param(2, int, "residual blocks per VAE level (MONAI default 2: 18.2M parameters; 1 gives the note's ~13M)", range=">=1"),
        "vae_mid_attention": Param(True, bool, "non-local attention at the VAE's latent resolution (encoder and decoder)"),
        "norm_groups": Param(32, int, "GroupNorm groups of the VAE and the denoiser", range=">=1"),
        "vae_epochs": Param(10, int, "stage 1: passes over every training frame (non-contrast and contrast); 0 with vae_checkpoint: use it as is", range=">=0"),
        "vae_batch_size": Param(16, int, "frames per VAE micro-batch", range=">=1"),
        "vae_grad_accum": Param(1, int, "VAE micro-batches per optimizer step (grad_accum is the denoiser's)", range=">=1"),
        "vae_lr": Param(1e-4, float, "peak learning rate of the VAE (AdamW, warm-up cosine)", range=">0"),
        "vae_crop": Param(0, int, "train the VAE on random crops of this size (it is convolutional); 0: whole frames", range=">=0"),
        "kl_weight": Param(1e-6, float, "weight of the KL term (per-frame sum over the latent; MAISI 1e-7)", range=">=0"),
        "ms_ssim_weight": Param(0.0, float, "weight of (1 - MS-SSIM) in the VAE loss; 0: off (note: optional, off)", range=">=0"),
        "adv_weight": Param(0.0, float, "weight of the least-squares patch adversarial term; 0: off (MAISI 0.1)", range=">=0"),
        "disc_channels": Param(64, int, "width of the PatchDiscriminator (used when adv_weight > 0)", range=">=1"),
        "disc_layers": Param(3, int, "layers of the PatchDiscriminator (MONAI's and MAISI's 3)", range=">=1"),
        "scale_factor": Param(None, (float, type(None)), "latent scale; None: 1 / std of the training latents (stored in the checkpoints)", range=">0"),
        "vae_checkpoint": Param("", str, "start stage 1 from this lib.train checkpoint of the VAE ('' = from scratch)"),
        # stage 2: the denoiser
        "model_channels": Param(128, int, "denoiser U-Net base width (note: 128)", range=">=1"),
        "channel_mult": Param((1, 2, 4, 4), tuple, "denoiser width multipliers per level (note: 1, 2, 4, 4)"),
        "attention_levels": Param((False, True, True, False), tuple, "spatial self-attention per denoiser level (note: levels 1 and 2)"),
        "temporal_attention": Param(True, bool, "temporal attention at every level, so that frames attend to each other"),
        "num_res_blocks": Param(2, int, "residual blocks per denoiser level", range=">=1"),
        "num_head_channels": Param(32, int, "channels per attention head (spatial and temporal)", range=">=1"),
        "window_stride": Param(1, int, "stride between the training windows of `frames` slices cut from every training series", range=">=1"),
        "num_train_timesteps": Param(1000, int, "diffusion steps of the cosine schedule (note: 1000)", range=">=1"),
        "noise_schedule": Param("cosine", str, "MONAI noise schedule (note: cosine, Nichol & Dhariwal)",
                                ("cosine", "linear_beta", "scaled_linear_beta", "sigmoid_beta")),
        "prediction_type": Param("v_prediction", str, "denoiser target (note: v; the cosine schedule ends at SNR ~ 0, "
                                 "where epsilon is ill-conditioned)", ("v_prediction", "epsilon", "sample")),
        "ddim_steps": Param(50, int, "DDIM sampling steps (note: 50)", range=">=1"),
        "eta": Param(0.0, float, "DDIM eta; 0: deterministic sampling", range="[0,1]"),
        "sample_seed": Param(0, int, "seed of the sampling noise: same seed, same generated series", range=">=0"),
        "denoiser_checkpoint": Param("", str, "start stage 2 from this lib.train checkpoint of the latent diffusion model (it holds its VAE, "
                                     "so vae_epochs must be 0); epochs=0: only evaluate"),
        "threshold_hu": Param(100.0, float, "headline MAE over the voxels whose target differs from the input by more than this (HU)", range=">=0"),
        "nifti_series": Param(2, int, "held-out series written as NIfTI (generated, input, target)", range=">=0"),
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
    # micro-batches x accumulation: what fits a 16 GB T4 with room (lib.bench.memory, lib/bench/t4_memory.json):
    # the VAE's 16 frames a step as 8 x 2 (16 at once is its limit there), the denoiser's 32 windows as 8 x 4
    prod={"real_data": "coltea_lung_ct_100w", "target_phase": "arterial", "series_frames": 64, "vae_epochs": 50,
          "vae_batch_size": 8, "vae_grad_accum": 2,
          "kl_weight": 1e-7, "adv_weight": 0.1, "epochs": 50, "batch_size": 8, "grad_accum": 4,
          "lr": 1e-4, "warmup_epochs": 1.0, "ema_decay": 0.9999, "num_workers": 4, "time_budget_s": 41400.0},
)

NOTEBOOKS = {"04_ct_diffusion": NB_04}
FAMILY = Family(name="ct_diffusion", module="ct_diffusion", notebook="04_ct_diffusion",
                question="does the translation beat copying the input where contrast changes it?")
