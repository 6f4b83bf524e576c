"""Parameters and presets of 06_xray_to_ct (the X-ray to CT family): see :mod:`lib.config` for what a preset is."""

from lib.config import Family, Param, _spec

NB_06 = _spec(
    "biplanar (or N-view) X-ray to 3D CT with HybridCNNViTUNet3D, against the mean training volume",
    {
        "cohort": Param("demo", str, "built-in cohort whose chest CTs and DRRs are used (lib.data.demo) when real_data is empty", ("smoke", "demo")),
        "real_data": Param("", str, "a prepared chest CT dataset with DRRs to train on instead (folder or name; prod: lidc_idri, "
                           "prepared as X2CT-GAN does); stops at once, saying how to get it if missing"),
        "views": Param(2, int, "radiographs per patient at angles spread over 180 degrees (1: frontal; 2: frontal + lateral; "
                       "4: 0/45/90/135); angles other than 0 and 90 are rendered from the CT (Beer-Lambert) and cached", range=">=1"),
        "image_size": Param(512, int, "radiographs are resampled to this many pixels per side (note: 512; divisible by 8)", range=">=1"),
        "volume_size": Param(64, int, "CT volumes are resampled to this many voxels per axis (note: 64; divisible by 16)", range=">=1"),
        "hu_min": Param(-1000.0, float, "HU mapped to 0 (the [0, 1] scale PSNR is computed on)"),
        "hu_max": Param(1000.0, float, "HU mapped to 1"),
        "base_channels": Param(32, int, "U-Net and 2D pyramid base width c: c, 2c, 4c, 8c, 16c (note: 32)", range=">=1"),
        "attention_channels": Param(512, int, "cross-view transformer width (note: 512)", range=">=1"),
        "attention_heads": Param(8, int, "cross-view and Swin attention heads (note: 8)", range=">=1"),
        "cross_view_layers": Param(1, int, "cross-view transformer layers at 1/8 of the image (note: 1)", range=">=1"),
        "window_size": Param(4, int, "3D Swin window (note: 4)", range=">=1"),
        "dense_layers": Param(4, int, "layers per residual dense block (note: 4)", range=">=1"),
        "grad_checkpointing": Param(False, bool, "recompute the 2D pyramid, the view fusion and the U-Net blocks in the "
                                    "backward pass (less activation memory, about 1/3 more compute)"),
        "residual_prior": Param(True, bool, "predict a residual on top of the mean training volume (the baseline); "
                                "False: predict the volume itself"),
        "loss_l1": Param(1.0, float, "MedicalGradeLoss weight of L1 (note: 1.0)", range=">=0"),
        "loss_ssim": Param(0.3, float, "weight of 1 - 3D SSIM (note: 0.3)", range=">=0"),
        "loss_perceptual": Param(0.2, float, "weight of the perceptual term (note: 0.2); needs perceptual_checkpoint", range=">=0"),
        "loss_edge": Param(0.2, float, "weight of the 3D Sobel edge term (note: 0.2)", range=">=0"),
        "loss_deep_supervision": Param(0.2, float, "weight of the deep supervision at 1/8, 1/4, 1/2 (note: 0.2)", range=">=0"),
        "loss_frequency": Param(0.3, float, "weight of the FFT high-frequency term (note: 0.3)", range=">=0"),
        "high_freq_cutoff": Param(0.25, float, "the frequency term covers frequencies above this (cycles/voxel; Nyquist 0.5)", range="(0,0.5]"),
        "perceptual_checkpoint": Param("", str, "03_pretrain encoder checkpoint for the perceptual term "
                                       "(lib.checkpoint.load_encoder); '' turns the term off, with a notice"),
    },
    training=True,
    smoke={"cohort": "smoke", "image_size": 32, "volume_size": 16, "base_channels": 4, "attention_channels": 32,
           "epochs": 1, "lr": 1e-3},
    demo={"image_size": 64, "volume_size": 32, "base_channels": 8, "attention_channels": 64, "epochs": 12,
          "lr": 1e-3, "warmup_epochs": 1.0},
    subset={"image_size": 256, "base_channels": 16, "attention_channels": 256, "epochs": 30, "lr": 2e-4,
            "ckpt_every": 5, "num_workers": 2},
    # micro-batch x grad_accum and checkpointing: what fits a 16 GB T4 (lib.bench.memory, lib/bench/t4_memory.json)
    prod={"real_data": "lidc_idri", "volume_size": 128, "hu_min": -1024.0, "hu_max": 1476.0, "epochs": 60,
          "batch_size": 1, "grad_accum": 2, "grad_checkpointing": True, "ckpt_every": 5, "num_workers": 4},
)

NOTEBOOKS = {"06_xray_to_ct": NB_06}
FAMILY = Family(name="xray_to_ct", module="xray_to_ct", notebook="06_xray_to_ct",
                question="does the reconstruction beat the mean training volume?")
