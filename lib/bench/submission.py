"""Section 9 of :mod:`lib.bench`: the RSNA 2025 submission's time per series, DICOM folder to 14 probabilities.

One clean CTA series at a real size (:func:`lib.data.fixtures.rsna2025_aneurysm.write_clean`: ``SIZE``x``SIZE``
slices, ``SLICES`` of them, 1 mm apart; ``--quick``: a tiny one) through
:class:`lib.families.rsna_aneurysm_submit.Predictor` with the classifier at the encoder size of 03's ``prod``
preset (random weights: the time does not depend on them; ``--quick``: ``smoke``): reading the series with
the converter's code, preprocessing (the box around the Circle of Willis, windows) and the model, on this
CPU. The first call is a warm-up; the row is the best of ``REPEATS``. The T4 estimate keeps the CPU stages
as measured here and puts the model's FLOPs at :data:`lib.families.rsna_aneurysm_submit.T4_EFFECTIVE_FLOPS`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SIZE, SLICES, REPEATS = 512, 160, 2


def per_series(quick: bool, ceilings: dict | None = None, out=None) -> list[dict]:
    """Rows per stage (seconds), the model's GFLOP, and the T4 estimate against the competition's limit."""
    import numpy as np
    import torch

    from lib.config import args_for, resolve
    from lib.data.fixtures import rsna2025_aneurysm as fixture
    from lib.families import rsna_aneurysm as rsna
    from lib.families import rsna_aneurysm_submit as sub
    from lib.models.waveformer import WaveFormer3D

    preset, size, slices = ("smoke", 64, 16) if quick else ("prod", SIZE, SLICES)
    torch.manual_seed(0)
    encoder = WaveFormer3D(**args_for(WaveFormer3D, resolve("03_pretrain", preset)))
    model = rsna.SeriesClassifier(encoder, encoder.embed_dim).eval()
    meta = {"roi_mm": [120.0, 120.0, 90.0], "depth_mm": rsna.DEFAULT_DEPTH_MM, "prevalence": [0.5] * len(rsna.LABELS)}
    predictor = sub.Predictor(model, meta, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        fixture.write_clean(Path(tmp), n_series=1, size=size, slices=slices)
        (folder,) = (Path(tmp) / "series").iterdir()
        for _ in range(1 + (1 if quick else REPEATS)):
            predictor(folder)
    if any(r["fallback"] for r in predictor.log):
        raise RuntimeError(f"the bench series fell back: {predictor.log[-1]['fallback']}")
    best = min(predictor.log[1:], key=lambda r: r["total_s"])
    flops = sub.model_flops(model)
    t4 = sub.t4_seconds(best["read_s"], best["preprocess_s"], flops)
    common = {"series": f"{size}x{size}x{slices} CTA", "preset": preset, "img_size": encoder.config["img_size"]}
    rows = [{"name": stage.removesuffix("_s"), **common, "seconds": round(float(best[stage]), 3)}
            for stage in ("read_s", "preprocess_s", "model_s", "total_s")]
    rows.append({"name": "T4 estimate", **common, "seconds": round(float(t4), 3), "model_gflop": round(flops / 1e9, 1),
                 "limit_s": float(sub.LIMIT_S), "first_place_s": sub.FIRST_PLACE_S,
                 "share_of_limit": float(np.round(t4 / sub.LIMIT_S, 5))})
    return rows


def targets(rows: list[dict]) -> list[str]:
    by = {r["name"]: r for r in rows}
    t4 = by["T4 estimate"]
    return [f"INFO: RSNA submission, one {t4['series']} series at the {t4['preset']} encoder ({t4['img_size']}^3): "
            f"{by['total']['seconds']:.2f} s on this CPU (read {by['read']['seconds']:.2f}, preprocess "
            f"{by['preprocess']['seconds']:.2f}, model {by['model']['seconds']:.2f}); T4 estimate {t4['seconds']:.2f} s "
            f"({t4['model_gflop']:.0f} GFLOP), against the {t4['limit_s']:.0f} s limit and the 1st place's "
            f"~{t4['first_place_s']:.0f} s"]
