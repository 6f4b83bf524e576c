"""09_rsna_aneurysm's submission side: the trained classifier saved and loaded (``model.pt``), ``predict(series_path)``
for the competition's gateway, and the time per series.

``predict`` reads a series folder with the converter's own code (:func:`lib.data.convert.rsna2025_aneurysm.read_series`:
the same lenient assembly, CT rounded to whole HU as the converter writes it), then :func:`lib.families.rsna_aneurysm.model_input`
and the model. A series the converter would refuse (nothing decodable, every image at one position) still gets
an answer: the training prevalence of each label (noted in :attr:`Predictor.log`). The gateway itself (Kaggle's
``kaggle_evaluation`` server when present, else a local one writing ``submission.parquet``) is
:mod:`lib.families.rsna_submission`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from lib.checkpoint import load, plain, save
from lib.families.rsna_aneurysm import LABELS, SeriesClassifier, model_input
from lib.families.rsna_submission import LIMIT_S

FORMAT = "medimg-rsna-classifier/1"
T4_EFFECTIVE_FLOPS = 20e12  # stated assumption: fp16 tensor cores at about 30 % of the T4's 65 TFLOP/s peak
FIRST_PLACE_S = 18.0        # the 1st place's reported time per series on 2xT4


def save_classifier(path: str | os.PathLike, model: SeriesClassifier, roi_mm, depth_mm: float,
                    prevalence: np.ndarray, **meta: Any) -> Path:
    """``model.pt``: the encoder's constructor arguments, every weight, the preprocessing and the fallback."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save(path, {"format": FORMAT, "encoder_config": dict(model.encoder.config), "state_dict": state,
                       "roi_mm": [float(v) for v in roi_mm], "depth_mm": float(depth_mm),
                       "prevalence": [float(v) for v in prevalence], "labels": list(LABELS), "meta": plain(meta)})


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[SeriesClassifier, dict]:
    """The classifier of a 09 run folder (its ``model.pt``) or of a ``model.pt`` (``weights_only=True``), in
    eval mode on ``device``, and its metadata."""
    from lib.models.waveformer import WaveFormer3D

    path = Path(path).expanduser()
    path = path / "model.pt" if path.is_dir() else path
    obj = load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a 09_rsna_aneurysm classifier (format {FORMAT}); give the run folder of a "
                         "09 training run or its model.pt")
    missing = [k for k in ("encoder_config", "state_dict", "roi_mm", "depth_mm", "prevalence", "labels") if k not in obj]
    if missing:
        raise ValueError(f"{path}: a 09_rsna_aneurysm classifier without {', '.join(missing)}: damaged or hand-made")
    if list(obj["labels"]) != list(LABELS):
        raise ValueError(f"{path}: its labels differ from the competition's ({obj['labels'][:2]}...)")
    try:
        encoder = WaveFormer3D(**{**obj["encoder_config"], "return_intermediate": False})
        model = SeriesClassifier(encoder, encoder.embed_dim)
        model.load_state_dict(obj["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: its weights do not fit its encoder_config ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200]})") from e
    return model.to(device).eval(), {k: v for k, v in obj.items() if k != "state_dict"}


class Predictor:
    """``predict(series_path) -> pd.DataFrame`` of one row, the 14 label columns; ``log`` has one row per call
    (seconds reading the DICOM, preprocessing, in the model; the fallback reason, if any)."""

    def __init__(self, model: SeriesClassifier, meta: Mapping[str, Any], device: torch.device, amp: bool = True):
        self.model, self.meta, self.device, self.amp = model, meta, device, amp
        self.img_size = model.encoder.config["img_size"]
        self.log: list[dict] = []

    def probabilities(self, series_path: str | os.PathLike) -> tuple[np.ndarray, dict]:
        from lib.data.convert.rsna2025_aneurysm import read_series
        from lib.device import autocast

        t0 = time.perf_counter()
        series, sequence, modality = read_series(Path(series_path))
        array = np.round(series.array[0]) if modality == "CT" else series.array[0]  # as the converter writes CT
        t1 = time.perf_counter()
        x, _ = model_input(array, series.affine, modality, self.meta["roi_mm"], self.meta["depth_mm"], self.img_size)
        t2 = time.perf_counter()
        with torch.no_grad(), autocast(self.device, self.amp):
            p = torch.sigmoid(self.model(torch.from_numpy(x)[None].to(self.device)).float())[0].cpu().numpy()
        t3 = time.perf_counter()
        return p, {"sequence": sequence, "read_s": t1 - t0, "preprocess_s": t2 - t1, "model_s": t3 - t2}

    def __call__(self, series_path: str | os.PathLike) -> pd.DataFrame:
        t0 = time.perf_counter()
        try:
            p, record = self.probabilities(series_path)
            record["fallback"] = ""
        except Exception as e:  # noqa: BLE001 (a series the converter refuses still gets an answer)
            p = np.asarray(self.meta["prevalence"], np.float64)
            record = {"sequence": "", "read_s": np.nan, "preprocess_s": np.nan, "model_s": np.nan,
                      "fallback": f"{type(e).__name__}: {e}"[:300]}
        self.log.append({"series": Path(series_path).name, **record, "total_s": time.perf_counter() - t0})
        return pd.DataFrame([dict(zip(LABELS, np.clip(p, 0.0, 1.0).astype(float)))])


def held_out_folders(ds, raw_root: str | os.PathLike, limit: int = 0) -> list[Path]:
    """The raw series folders of the test split (``index.csv``'s ``source``, relative to the raw download)."""
    test = ds.images(split="test")
    folders = [Path(raw_root) / s for s in test["source"]]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} held-out series folder(s) not under {raw_root} (e.g. {missing[0]})")
    return folders[:limit] if limit else folders


def model_flops(model: SeriesClassifier, channels: int = 3) -> float:
    """FLOPs of one forward pass at the encoder's input size (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.encoder.config["img_size"]
    x = torch.zeros(1, channels, size, size, size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def t4_seconds(read_s: float, preprocess_s: float, flops: float) -> float:
    """A series' time on a T4: the CPU stages as measured, the model's ``flops`` at :data:`T4_EFFECTIVE_FLOPS`."""
    return read_s + preprocess_s + flops / T4_EFFECTIVE_FLOPS


def timing(log: list[dict], flops: float, limit_s: float = LIMIT_S) -> pd.DataFrame:
    """Seconds per series measured here (mean and max of each stage) and the model's time estimated for a T4
    (:data:`T4_EFFECTIVE_FLOPS`), beside the competition's limit and the 1st place's ~18 s."""
    df = pd.DataFrame(log)
    stages = ["read_s", "preprocess_s", "model_s", "total_s"]
    out = pd.DataFrame({"stage": stages, "mean_s": [df[s].mean() for s in stages], "max_s": [df[s].max() for s in stages]})
    est = t4_seconds(df["read_s"].mean(), df["preprocess_s"].mean(), flops)
    out.loc[len(out)] = {"stage": f"T4 estimate (CPU stages as here, model {flops / 1e9:.1f} GFLOP at "
                                  f"{T4_EFFECTIVE_FLOPS / 1e12:.0f} TFLOP/s)", "mean_s": est, "max_s": np.nan}
    out.loc[len(out)] = {"stage": "competition limit per series", "mean_s": limit_s, "max_s": np.nan}
    out.loc[len(out)] = {"stage": "1st place, per series on 2xT4 (reported)", "mean_s": FIRST_PLACE_S, "max_s": np.nan}
    return out
