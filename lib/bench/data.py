"""Section 5 of :mod:`lib.bench`: the data path of 03_pretrain on the demo cohort.

On the same training files of the demo cohort (``FILES`` per modality; the smoke cohort with
``--quick``), with the 03_pretrain subset preset's preprocessing (``prep_size``, ``spacing``, ``img_size``,
``batch_size``), per modality (MRI; CT with its three windows), volumes per second:

- ``level`` "arrays": :func:`lib.data.datasets.throughput` (what 02_prepare_data reports), in this
  process: ``decode_vol_per_s`` decodes each ``.nii.gz`` and preprocesses it (``decode_only_vol_per_s``:
  decoding alone), ``cache_vol_per_s`` reads the preprocessed array from :class:`lib.data.cache.ArrayCache`;
- ``level`` "loader", for ``workers`` 0, 1, 2: what training sees, a ``DataLoader`` over
  :class:`lib.data.datasets.VolumeDataset` (items resized to ``img_size`` and batched) without a cache
  (``decode_vol_per_s``: decode, preprocess, resize) and with it (``cache_vol_per_s``: a read of the
  cached model-size entry);
- ``step_vol_per_s``: what the subset training step consumes (the pretrainer's forward, backward and
  AdamW step under autocast on the MRI batch, independent of the loader); ``loop_vol_per_s``: the cached
  loader feeding that step, end to end (MRI).

The cache lives in a temporary folder (the repository's ``data/cache`` is not touched) and is filled
before anything is timed. A loader's rate is volumes over the wall time of a whole pass over the files,
best of ``REPEATS`` after one untimed pass, with persistent workers: the steady state, without the
workers' start-up (which the notebook pays once per epoch; about 0.1 s per worker here).
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch.utils.data import DataLoader

from lib import config, train
from lib.bench.measure import train_step

FILES = 24
REPEATS = 2
WORKERS = (0, 1, 2)


def _rate(loader: DataLoader, repeats: int, consume=None) -> float:
    def one_pass() -> int:
        n = 0
        for x in loader:
            if consume is not None:
                consume(x)
            n += x.shape[0]
        return n

    one_pass()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        n = one_pass()
        best = min(best, time.perf_counter() - t)
    return n / best


def data_path(quick: bool, ceilings: dict | None = None, out=None) -> list[dict]:
    from lib import device as _device
    from lib.bench.cases import build_case
    from lib.data import datasets, demo
    from lib.data.cache import ArrayCache

    cfg = config.resolve("03_pretrain", "subset")
    root, _ = demo.ensure("smoke" if quick else "demo", progress=False)
    n_files, repeats = (4, 1) if quick else (FILES, REPEATS)

    case = build_case("WaveFormer pretrainer", "smoke" if quick else "subset")
    step = train_step(case.model, case.batch, case.loss, cfg.amp, repeats=1 if quick else 3, lr=cfg.lr)
    step_rate = case.samples / step["ms"] * 1e3
    dev = _device.pick_device()
    optimizer = train.adamw(case.model.parameters(), lr=cfg.lr)

    def train_on(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _device.autocast(dev, cfg.amp):
            loss = case.loss(case.model, x.to(dev))
        loss.backward()
        optimizer.step()

    rows = []
    with tempfile.TemporaryDirectory(prefix="medimg-bench-cache-") as tmp:
        cache = ArrayCache(tmp)
        for modality in datasets.MODALITIES:
            files = datasets.volume_files(root, modality, "train")[:n_files]

            def loader(cached: bool, workers: int) -> DataLoader:
                ds = datasets.VolumeDataset(files, modality, cfg.img_size, prep_size=(cfg.prep_size,) * 3,
                                            spacing=cfg.spacing, cache=cache if cached else None)
                return DataLoader(ds, batch_size=cfg.batch_size, num_workers=workers, persistent_workers=workers > 0)

            arrays = datasets.throughput(files, modality, cache, cfg.spacing, cfg.prep_size)  # also fills the cache
            rows.append({"name": "03_pretrain volumes", "modality": modality, "files": len(files), "level": "arrays",
                         "decode_vol_per_s": arrays["decode_and_prepare_per_s"],
                         "cache_vol_per_s": arrays["cache_per_s"], "step_vol_per_s": step_rate,
                         "cache_vs_decode": arrays["cache_per_s"] / arrays["decode_and_prepare_per_s"],
                         "cache_vs_step": arrays["cache_per_s"] / step_rate,
                         "decode_only_vol_per_s": arrays["decode_nii_gz_per_s"]})
            for workers in WORKERS:
                decode, cached = _rate(loader(False, workers), repeats), _rate(loader(True, workers), repeats)
                row = {"name": "03_pretrain volumes", "modality": modality, "files": len(files), "level": "loader",
                       "workers": workers, "decode_vol_per_s": decode, "cache_vol_per_s": cached,
                       "step_vol_per_s": step_rate, "cache_vs_decode": cached / decode,
                       "cache_vs_step": cached / step_rate}
                if modality == "MRI" and not quick:
                    row["loop_vol_per_s"] = _rate(loader(True, workers), 1, consume=train_on)
                rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[str]:
    lines = []
    workers = config.resolve("03_pretrain", "subset").num_workers
    for modality in sorted({r["modality"] for r in rows}):
        arrays = next(r for r in rows if r["modality"] == modality and r["level"] == "arrays")
        loaders = [r for r in rows if r["modality"] == modality and r["level"] == "loader"]
        at = next((r for r in loaders if r["workers"] == workers), loaders[-1])
        for level, r, where in (("arrays", arrays, "as arrays"),
                                ("loader", at, f"through the DataLoader at the subset preset's {at['workers']} workers")):
            met = r["cache_vs_decode"] >= 10 and r["cache_vs_step"] >= 3
            lines.append(f"{'MET' if met else 'NOT MET'}: {modality} from the cache, {where}: "
                         f"{r['cache_vs_decode']:.1f}x faster than decoding .nii.gz and preprocessing, "
                         f"{r['cache_vs_step']:.1f}x what the subset step consumes (target: >= 10x and >= 3x)")
        lines[-1] += "; other worker counts: " + ", ".join(
            f"{r['workers']}: {r['cache_vs_decode']:.1f}x and {r['cache_vs_step']:.1f}x" for r in loaders if r is not at)
    return lines
