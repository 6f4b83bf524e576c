"""Parameters and presets of 07_evaluate and 08_visualize: see :mod:`lib.config` for what a preset is."""

from lib.config import Param, _spec

NB_07 = _spec(
    "held-out numbers of every family against its baseline -> results/summary.csv and summary.md",
    {
        "cohort": Param("demo", str, "built-in cohort of the downstream comparison", ("smoke", "demo")),
        "run_03": Param("", str, "run id of 03_pretrain to evaluate; '' = latest completed at this preset"),
        "run_04": Param("", str, "run id of 04_ct_diffusion; '' = latest completed at this preset"),
        "run_05": Param("", str, "run id of 05_cxr_change; '' = latest completed at this preset"),
        "run_06": Param("", str, "run id of 06_xray_to_ct; '' = latest completed at this preset"),
        "run_09": Param("", str, "run id of 09_rsna_aneurysm (the SSL family's headline when there is one); '' = latest "
                        "completed at this preset"),
        "downstream_seeds": Param(3, int, "seeds of the SSL downstream comparison (scratch vs pre-trained)", range=">=1"),
        "downstream_epochs": Param(8, int, "epochs of each downstream training (same budget for both arms)", range=">=1"),
        "downstream_size": Param(32, int, "input size (voxels per axis) of the downstream task", range=">=1"),
        "downstream_per_subject": Param(4, int, "downstream patches per subject and class (positives around the blob, negatives on vessels)", range=">=1"),
        "downstream_lr": Param(3e-4, float, "learning rate of every downstream arm (AdamW, cosine decay)", range=">0"),
        "downstream_weight_decay": Param(1e-4, float, "AdamW weight decay of every downstream arm", range=">=0"),
        "downstream_batch_size": Param(8, int, "patches per downstream batch (each modality its own batches)", range=">=1"),
    },
    smoke={"cohort": "smoke", "downstream_seeds": 2, "downstream_epochs": 1, "downstream_size": 16},
    demo={},
    subset={"downstream_seeds": 5, "downstream_epochs": 30},
    prod={"downstream_seeds": 5, "downstream_epochs": 50, "downstream_size": 64},
)

NB_08 = _spec(
    "figures of every family and interactive viewers -> results/figures/",
    {"gif_frames": Param(16, int, "frames of the animated CT series GIF", range=">=1"),
     "cohort": Param("demo", str, "built-in cohort whose images the viewers show", ("smoke", "demo"))},
    smoke={"gif_frames": 4, "cohort": "smoke"}, demo={}, subset={}, prod={},
)

NOTEBOOKS = {"07_evaluate": NB_07, "08_visualize": NB_08}
