"""Parameters and presets of 09_rsna_aneurysm (the SSL family's downstream job: RSNA 2025 intracranial aneurysm
detection); see :mod:`lib.config` for what a preset is. Not a family of its own: its rows are the SSL family's
headline in 07_evaluate."""

from lib.config import Param, _spec

NB_09 = _spec(
    "RSNA 2025 aneurysm detection: the 03 encoder fine-tuned (and from scratch, and probed) into a 14-label series "
    "classifier, the competition metric, label efficiency, and a submission",
    {
        "cohort": Param("demo", str, "size of the built-in RSNA-shaped mini competition (lib.data.demo_rsna) used when "
                        "real_data is empty", ("smoke", "demo")),
        "real_data": Param("", str, "the prepared RSNA 2025 training set (folder or name; prod: rsna2025_aneurysm)"),
        "encoder": Param("", str, "03_pretrain run folder or encoder checkpoint; '' = the latest completed 03 run at "
                         "this preset"),
        "mode": Param("train", str, "train: the arms, the label-efficiency curve and a local submission; submit: load "
                      "`weights`, never train, serve predict() (Kaggle's inference server when present)", ("train", "submit")),
        "weights": Param("", str, "submit: a 09 run folder (or its model.pt) with the trained classifier"),
        "roi_mm": Param(None, (tuple, type(None)), "R, A, S extent (mm) of the box around the Circle of Willis that the "
                        "model sees, resampled to the encoder's img_size; None: a cube of the field of view the 03 encoder "
                        "was pre-trained on (its prep_size x spacing), (120, 120, 90) when that is unknown"),
        "cow_depth_mm": Param(None, (float, type(None)), "depth of the box centre below the top of the head (mm); None: "
                              "the median over the training localizers (95 without any)", range=">0"),
        "point_weight": Param(0.5, float, "weight of the localizer term: each location's point on the encoder's token grid "
                              "(auxiliary supervision; 0: off)", range=">=0"),
        "arms": Param(("finetune", "scratch", "probe"), tuple, "arms trained on every training label, same seeds"),
        "seeds": Param(3, int, "seeds per arm and label fraction (mean ± std)", range=">=1"),
        "label_fractions": Param((0.25, 0.5, 1.0), tuple, "fractions of the training series (labels) of the "
                                 "label-efficiency curve (finetune against scratch)"),
        "submission_series": Param(0, int, "held-out series fed to the local gateway (0: every test series)", range=">=0"),
    },
    training=True,
    smoke={"cohort": "smoke", "epochs": 1, "batch_size": 4, "lr": 1e-3, "seeds": 1, "label_fractions": (0.5, 1.0),
           "submission_series": 3},
    demo={"epochs": 8, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0.5},
    subset={"real_data": "rsna2025_aneurysm", "epochs": 10, "batch_size": 4, "lr": 3e-4, "num_workers": 2},
    prod={"real_data": "rsna2025_aneurysm", "epochs": 30, "batch_size": 4, "grad_accum": 4, "lr": 1e-4,
          "warmup_epochs": 1.0, "num_workers": 4, "time_budget_s": 41400.0},
)

NOTEBOOKS = {"09_rsna_aneurysm": NB_09}
