"""Parameters and presets of 03_pretrain (the SSL pre-training family): see :mod:`lib.config` for what a preset is."""

from lib.config import Family, Param, _spec

NB_03 = _spec(
    "self-supervised 3D pre-training",
    {
        "cohort": Param("demo", str, "built-in cohort to pre-train on (lib.data.demo) when real_data is empty", ("smoke", "demo")),
        "real_data": Param("", str, "comma-separated real datasets of data_manifest.csv to pre-train on instead "
                           "(prod: openmind,rsna2025_aneurysm); the run stops at once, saying how to get any that is missing"),
        "spacing": Param(None, (float, type(None)), "isotropic spacing (mm) of the cached volumes; None keeps the grid (as 02_prepare_data)", range=">0"),
        "prep_size": Param(64, int, "cached volumes are cropped/padded to this size (as 02_prepare_data), then resized to img_size", range=">=1"),
        "img_size": Param(32, int, "model input: volumes resized to img_size^3 (note: 32 subset, 128 prod)", range=">=1"),
        "patch_size": Param(4, int, "voxels per token along each axis (note: 4 -> 8^3 tokens at 32; 8 -> 16^3 at 128)", range=">=1"),
        "embed_dim": Param(128, int, "WaveFormer3D width (note: 128 subset, 768 prod)", range=">=1"),
        "depth": Param(4, int, "WaveFormer3D blocks (note: 4 subset, 12 prod)", range=">=1"),
        "num_heads": Param(4, int, "attention heads (note: 4 subset, 12 prod)", range=">=1"),
        "wavelet_levels": Param(1, int, "Haar levels before attention; each divides the attended tokens by 8", range=">=0"),
        "pos_embed": Param("sincos", str, "positional encoding: fixed 3D sine-cosine or a learned table (resized per grid)", ("sincos", "learned")),
        "drop_path": Param(0.0, float, "stochastic depth of the last block (linear over blocks)", range="[0,1)"),
        "grad_checkpointing": Param(False, bool, "recompute WaveFormer blocks in the backward pass (less activation memory)"),
        "spark_dim": Param(128, int, "channels of the SparK-style sparse stages above the token grid", range=">=1"),
        "spark_levels": Param(1, int, "stride-2 sparse stages (<= log2 of the MiM block edge: 1 up to 8^3 tokens, 2 at 16^3)", range=">=0"),
        "decoder_dim": Param(64, int, "width of the SparK light decoder", range=">=1"),
        "mask_ratio": Param(0.6, float, "MiM global mask: fraction of blocks hidden from the encoder (note: 0.6)", range="(0,1)"),
        "local_ratio": Param(0.8, float, "MiM local mask: fraction of the masked region masked again, the hard targets (note: 0.8)", range="(0,1)"),
        "min_unmasked_blocks": Param(2, int, "MiM: blocks always left visible (note: 2)", range=">=0"),
        "contrastive_weight": Param(0.5, float, "loss = reconstruction + this x spatial InfoNCE (note: 0.5)", range=">=0"),
        "contrastive_levels": Param((0, -1), tuple, "encoder blocks whose maps the InfoNCE ties together, shallow to deep (note: first and last)"),
        "temperature": Param(0.1, float, "InfoNCE temperature (note: 0.07-0.1)", range=">0"),
        "projection_dim": Param(128, int, "InfoNCE 1x1x1 projection width (note: 128)", range=">=1"),
        "num_samples": Param(256, int, "visible locations per sample in the InfoNCE (note: 256)", range=">=1"),
        "ct_batch_size": Param(None, (int, type(None)), "CT batch size; None: half of batch_size (CT has 3 channels)", range=">=1"),
        "eval_repeats": Param(4, int, "mask draws per held-out volume for the held-out reconstruction loss", range=">=1"),
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
)

NOTEBOOKS = {"03_pretrain": NB_03}
FAMILY = Family(name="ssl_pretraining", module="pretrain", notebook="03_pretrain",
                question="does pre-training make the downstream task better than training from scratch?")
