"""Parameters and presets of 05_cxr_change (the CXR change-map family): see :mod:`lib.config` for what a preset is."""

from lib.config import Family, Param, _spec

NB_05 = _spec(
    "longitudinal chest X-ray change detection",
    {
        "cohort": Param("demo", str, "built-in cohort whose baseline/follow-up pairs are used (lib.data.demo) when real_data is empty", ("smoke", "demo")),
        "real_data": Param("", str, "a prepared dataset of radiograph pairs with change maps to train on instead (folder or name; "
                           "prod: ct_to_cxr_pairs, rendered from LIDC-IDRI); stops at once, saying how to get it if missing"),
        "external": Param("", str, "MS-CXR-T pairs (prepared ms_cxr_t: progression labels, no maps) on which the predicted change "
                          "area is scored (AUC); 'auto': when found; '' none"),
        "variant": Param("big", str, "big: LongitudinalMIMModelBig (U-Net decoder with skips); small: LongitudinalMIMModel (no skips)", ("big", "small")),
        "image_size": Param(512, int, "radiographs are resized to this many pixels per side (note: 512)", range=">=1"),
        "channels": Param((64, 48, 80, 224, 640), tuple, "encoder widths: the channel-expansion stem, then one per stride-2 MBConv level (note: 640 x 32 x 32 at 512)"),
        "blocks": Param((1, 1, 2, 4), tuple, "MBConv blocks per stride-2 level (note: 8 selected EfficientNet blocks)"),
        "expand_ratio": Param(6, int, "MBConv inverted-bottleneck expansion (levels after the first)", range=">=1"),
        "kernel_size": Param(3, int, "MBConv depthwise kernel size", range=">=1"),
        "hidden_size": Param(768, int, "transformer bottleneck width (note: ViT-Base, 768)", range=">=1"),
        "transformer_layers": Param(12, int, "transformer blocks in the bottleneck (ViT-Base: 12)", range=">=1"),
        "num_heads": Param(12, int, "attention heads", range=">=1"),
        "mlp_dim": Param(3072, int, "transformer MLP width", range=">=1"),
        "patch_size": Param(2, int, "transformer patch size on the deepest feature map (note: 32x32 / 2 = 256 patches)", range=">=1"),
        "inter_channels": Param(704, int, "width of the bottleneck's conv branch (note: intermediate 704)", range=">=1"),
        "norm_groups": Param(32, int, "GroupNorm groups (note: 32; a layer uses its gcd with the width)", range=">=1"),
        "grad_checkpointing": Param(False, bool, "recompute the encoder's stem, MBConv levels and transformer blocks and the "
                                    "decoder blocks in the backward pass (less activation memory, about 1/3 more compute)"),
        "decoder_channels": Param((320, 160, 80, 40), tuple, "U-Net decoder widths, one per x2 upsampling"),
        "adv_weight": Param(0.0, float, "weight of the PatchGAN Discriminator's adversarial term on the change map; 0: off", range=">=0"),
        "classify_weight": Param(0.0, float, "weight of the ClassificationModel head naming each image's inserted findings "
                                 "(multi-label, on the shared encoder); 0: off", range=">=0"),
        "aux_ablation": Param(False, bool, "also train the same model without, with only the adversarial and with only the "
                              "classification term (same seed, no MIM) and report each against the one without"),
        "dice_weight": Param(1.0, float, "weight of the signed soft Dice beside the MSE to sign(change)", range=">=0"),
        "augment": Param(True, bool, "random swap of baseline/follow-up (sign flips) and left-right mirroring"),
        "mim_epochs": Param(20, int, "masked-reconstruction pre-training epochs of the shared encoder; 0: none", range=">=0"),
        "mim_mask_ratio": Param(0.6, float, "fraction of mask patches hidden in pre-training (SimMIM: 0.6)", range="(0,1)"),
        "mim_patch": Param(32, int, "side of a mask patch in pixels", range=">=1"),
        "freeze_encoder": Param(False, bool, "train only fusion and decoder on the (pre-trained) encoder"),
        "baseline_sigma": Param(2.0, float, "Gaussian smoothing (px) of the second, smoothed subtraction baseline (the naive one has none)", range=">=0"),
        "figure_pairs": Param(4, int, "held-out pairs shown with their true and predicted change", range=">=0"),
    },
    training=True,
    smoke={"cohort": "smoke", "image_size": 64, "channels": (8, 8, 16, 16, 32), "blocks": (1, 1, 1, 1),
           "expand_ratio": 2, "hidden_size": 32, "transformer_layers": 1, "num_heads": 2, "mlp_dim": 64,
           "patch_size": 1, "inter_channels": 32, "norm_groups": 8, "decoder_channels": (16, 16, 8, 8),
           "epochs": 1, "batch_size": 8, "lr": 1e-3, "mim_epochs": 1, "mim_patch": 8, "figure_pairs": 2,
           "adv_weight": 0.05, "classify_weight": 0.1, "aux_ablation": True},
    demo={"image_size": 64, "channels": (16, 24, 32, 48, 64), "blocks": (1, 1, 1, 1), "expand_ratio": 4,
          "hidden_size": 64, "transformer_layers": 2, "num_heads": 4, "mlp_dim": 128, "patch_size": 1,
          "inter_channels": 64, "norm_groups": 8, "decoder_channels": (48, 32, 24, 16), "epochs": 40,
          "batch_size": 8, "lr": 2e-3, "warmup_epochs": 1.0, "mim_epochs": 5, "mim_patch": 8},
    subset={"image_size": 256, "channels": (32, 24, 40, 112, 320), "blocks": (1, 1, 2, 2), "hidden_size": 384,
            "transformer_layers": 6, "num_heads": 6, "mlp_dim": 1536, "inter_channels": 352,
            "decoder_channels": (160, 80, 40, 20), "epochs": 60, "batch_size": 8, "lr": 3e-4,
            "warmup_epochs": 2.0, "mim_epochs": 20, "mim_patch": 16, "num_workers": 2},
    # micro-batch x grad_accum and checkpointing: what fits a 16 GB T4 (lib.bench.memory, lib/bench/t4_memory.json)
    prod={"real_data": "ct_to_cxr_pairs", "external": "auto", "adv_weight": 0.05, "classify_weight": 0.1,
          "aux_ablation": True, "epochs": 100, "batch_size": 4, "grad_accum": 4, "grad_checkpointing": True, "lr": 1e-4,
          "warmup_epochs": 2.0, "ema_decay": 0.999, "mim_epochs": 50, "num_workers": 4},
)

NOTEBOOKS = {"05_cxr_change": NB_05}
FAMILY = Family(name="cxr_change", module="cxr_change", notebook="05_cxr_change",
                question="does the model find changed pixels better than subtraction?")
