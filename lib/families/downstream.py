"""Does pre-training help? The SSL family's downstream comparison, run by 07_evaluate.

Task (on the built-in cohort): is there an aneurysm-like blob in this patch? Patches of ``size``³
voxels are cut from the CTA head CT (3 windows) and MRA (1 channel) volumes at their native grid:
positives around each blob centre (jittered), negatives on contrast-filled vessels away from any blob,
the same number from every subject, seeded, so the task is about the blob and not about finding
vessels. Subjects keep their train / val / test split.

Arms, with the same architecture (encoder -> mean over tokens -> linear logit), data, epochs and
seeds: ``scratch`` (the encoder freshly initialised), ``finetune`` (initialised from the 03_pretrain
encoder, all weights trained) and ``probe`` (pre-trained encoder frozen, only the head trained). Test
ROC AUC over all test patches, per seed; the summary reports mean ± std over seeds.

Every training number (seeds, epochs, patch size, patches per subject, learning rate, weight decay,
batch size) is a parameter of 07_evaluate (``downstream_*`` in :mod:`lib.presets.evaluate`);
:func:`compare` reads them from its resolved configuration.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lib import metrics, runs
from lib.data.datasets import AlternatingLoader, Cohort, cohort, normalise_mri
from lib.data.io import load_volume
from lib.data.transforms import ct_windows
from lib.models.waveformer import WaveFormer3D
from lib.train import adamw, fit

ARMS = ("scratch", "finetune", "probe")
DATA_SEED = 0  # the task's patches are the same for every training seed: seeds vary the training only


def _centres(rng: np.random.Generator, vessels: np.ndarray, blob: np.ndarray | None, n: int, half: int,
             keep_away: float, jitter: int) -> tuple[list, list]:
    shape = np.array(vessels.shape)
    inside = lambda c: np.clip(c, half, shape - half)  # noqa: E731
    pos = []
    if blob is not None:
        pos = [inside(blob + rng.integers(-jitter, jitter + 1, 3)) for _ in range(n)]
    candidates = np.argwhere(vessels)
    if blob is not None:
        candidates = candidates[np.linalg.norm(candidates - blob, axis=1) > keep_away]
    neg = [inside(candidates[i]) for i in rng.choice(len(candidates), size=n, replace=len(candidates) < n)]
    return pos, neg


def _patch(volume: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    lo = np.asarray(centre) - size // 2
    return volume[:, lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size]


def blob_patches(root: Cohort, split: str, size: int, per_subject: int = 4, seed: int = DATA_SEED,
                 with_centres: bool = False, jitter: int = 2, margin: float = 4.0) -> dict:
    """``{"CT": (x [N,3,s,s,s], y [N]), "MRI": (x [N,1,s,s,s], y [N])}`` for one split
    (``with_centres``: a third element, the list of (subject, centre voxel)).

    ``jitter``: positives sit up to this many voxels off the blob centre per axis; negatives lie more
    than ``size / 2 + margin`` voxels from it (so no negative patch holds the blob). Images and blob
    centres come from the cohort's index and ``points.csv`` (label ``aneurysm``: voxel i, j, k)."""
    ds, out = cohort(root), {}
    points = ds.points[ds.points["label"] == "aneurysm"] if len(ds.points) else pd.DataFrame(columns=["image_id"])
    centres = {r.image_id: np.array([int(r.i), int(r.j), int(r.k)]) for r in points.itertuples()}
    for modality, dataset, name in (("CT", "head_ct", "ct"), ("MRI", "brain_mri", "mra")):
        xs, ys, where = [], [], []
        for _, s in ds.images(split=split, dataset=dataset, sequence=name).iterrows():
            rng = np.random.default_rng([seed, 1 if dataset == "head_ct" else 2, int(s["subject"].split("-")[1])])
            v = load_volume(s["file"])
            if modality == "CT":
                array, vessels = ct_windows(v.array), v.array[0] > 150
            else:
                array = normalise_mri(v.array)
                vessels = array[0] > 0.6
            blob = centres.get(s["image_id"])
            pos, neg = _centres(rng, vessels, blob, per_subject, size // 2, keep_away=size / 2 + margin, jitter=jitter)
            xs += [_patch(array, c, size) for c in pos + neg]
            ys += [1.0] * len(pos) + [0.0] * len(neg)
            where += [(s["subject"], tuple(int(v) for v in c)) for c in pos + neg]
        out[modality] = (torch.from_numpy(np.stack(xs)).float(), torch.tensor(ys)) + ((where,) if with_centres else ())
    return out


class BlobClassifier(nn.Module):
    """Encoder (a WaveFormer3D returning its final map) -> mean over tokens -> one logit."""

    def __init__(self, encoder: nn.Module, embed_dim: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x, return_intermediate=False)
        return self.head(features.flatten(2).mean(-1)).squeeze(-1)


def arm_encoder(arm: str, pretrained: nn.Module, seed: int) -> nn.Module:
    """The encoder of ``arm``: a copy of ``pretrained`` (``finetune``; ``probe``: frozen, in eval mode) or a
    fresh encoder of its shape (``scratch``), seeded by ``seed``."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    torch.manual_seed(seed)
    if arm == "scratch":
        encoder = WaveFormer3D(**{**pretrained.config, "return_intermediate": False})
    else:
        encoder = copy.deepcopy(pretrained)
        encoder.return_intermediate = False
    encoder.requires_grad_(arm != "probe")
    encoder.train(arm != "probe")
    return encoder


def make_model(arm: str, pretrained: nn.Module, seed: int) -> BlobClassifier:
    """The classifier of ``arm`` around a copy of ``pretrained`` (``scratch``: a fresh encoder of its shape)."""
    return BlobClassifier(arm_encoder(arm, pretrained, seed), pretrained.embed_dim)


def train_step(model: BlobClassifier, batch: Any) -> torch.Tensor:
    """``lib.train.fit`` step on an :class:`AlternatingLoader` batch ``(modality, (x, y))``."""
    _, (x, y) = batch
    logits = model(x)
    return F.binary_cross_entropy_with_logits(logits.float(), y.float())


@torch.no_grad()
def scores(model: BlobClassifier, data: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model.to(device)  # where the data goes (a no-op when it is there already)
    model.eval()
    s, y = [], []
    for x, labels in data.values():
        for i in range(0, len(x), 16):
            s.append(model(x[i:i + 16].to(device)).float().cpu())
        y.append(labels)
    return torch.cat(s), torch.cat(y)


def train_arm(model: BlobClassifier, train: dict, val: dict, out_dir: str | Path, config: Mapping[str, Any],
              seed: int, device: torch.device) -> BlobClassifier:
    """Train one arm in place with ``lib.train.fit``: only the weights that require gradients are given to
    the optimizer (a probe's encoder is not). ``config``: 07_evaluate's (``downstream_*`` keys)."""
    batch = config["downstream_batch_size"]
    loaders = {m: DataLoader(TensorDataset(*xy), batch_size=batch, shuffle=True, **runs.loader_seeding(seed))
               for m, xy in train.items()}
    val_loaders = {m: DataLoader(TensorDataset(*xy), batch_size=batch) for m, xy in val.items()}
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=config["downstream_lr"],
                      weight_decay=config["downstream_weight_decay"])
    fit_config = {**config, "epochs": config["downstream_epochs"], "ema_decay": None, "best_metric": "val_loss",
                  "seed": seed}
    fit(model, train_step, AlternatingLoader(loaders), optimizer, out_dir=out_dir, config=fit_config,
        val_loader=AlternatingLoader(val_loaders), device=device, settings=None)
    return model


def compare(pretrained: nn.Module, root: str | Path, out_dir: str | Path, config: Mapping[str, Any],
            device: torch.device) -> pd.DataFrame:
    """Train every arm for every seed (``config``: 07_evaluate's resolved configuration); one row per
    (arm, seed) with the test AUC. Each training writes its logs under ``out_dir/<arm>-seed<seed>``."""
    data = {split: blob_patches(root, split, config["downstream_size"], config["downstream_per_subject"])
            for split in ("train", "val", "test")}
    rows = []
    for seed in range(config["downstream_seeds"]):
        for arm in ARMS:
            runs.seed_everything(seed)
            model = make_model(arm, pretrained, seed)
            train_arm(model, data["train"], data["val"], Path(out_dir) / f"{arm}-seed{seed}", {**config, "arm": arm},
                      seed, device)
            s, y = scores(model.to(device), data["test"], device)
            rows.append({"arm": arm, "seed": seed, "test_auc": metrics.auc(s, y),
                         "test_accuracy": float(((s > 0).float() == y).float().mean()), "n_test": len(y),
                         "n_train": sum(len(xy[1]) for xy in data["train"].values())})
    return pd.DataFrame(rows)


def summary_rows(results: pd.DataFrame) -> list[dict]:
    """Rows for results/summary.csv: fine-tuned (headline) and probed against scratch, mean ± std."""
    stats = results.groupby("arm")["test_auc"].agg(["mean", "std"])
    n, seeds = int(results["n_test"].iloc[0]), ",".join(map(str, sorted(results["seed"].unique())))
    rows = []
    for arm, headline in (("finetune", True), ("probe", False)):
        std, base_std = stats.loc[arm, "std"], stats.loc["scratch", "std"]
        rows.append({"task": "aneurysm-like blob presence (patch classification)",
                     "metric": f"test AUC, {arm}: mean over seeds (std {std:.3f}; scratch std {base_std:.3f})",
                     "headline": headline, "higher_is_better": True, "value": round(stats.loc[arm, "mean"], 4),
                     "baseline": "same encoder from scratch", "baseline_value": round(stats.loc["scratch", "mean"], 4),
                     "split": "test", "n": n, "seeds": seeds})
    return rows
