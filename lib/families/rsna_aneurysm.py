"""RSNA 2025 intracranial aneurysm detection (09_rsna_aneurysm): the SSL family's downstream job.

A series-level classifier with the competition's 14 outputs (13 artery locations, then ``Aneurysm Present``)
on the 03_pretrain encoder (WaveFormer3D): the encoder's final token map, averaged, then one linear layer;
beside it a 1x1x1 convolution that predicts, on the token grid, where each location's aneurysm is (the
localizers as auxiliary supervision, ``point_weight``). Three arms with the same architecture, data, epochs
and seeds (:mod:`lib.families.downstream`'s): ``finetune`` (from the 03 weights), ``scratch`` and ``probe``
(the 03 encoder frozen, heads only), and the label-efficiency curve (finetune against scratch on a seeded
fraction of the training series). Scored with :func:`lib.metrics.rsna_weighted_auc`.

Preprocessing (the same code at training and at submission, :func:`model_input`): the top solutions found
the vessel region first and classified there (1st place: nnU-Net vessel segmentation, then a 128x256x256
ROI; its CV fell from 0.916 to 0.794 without that step). Without a vessel model here, the region is a box
around the Circle of Willis (``roi_mm``; by default a cube of the field of view the 03 encoder was
pre-trained on, :func:`box_of`, so that it sees anatomy at the scale it learnt) placed by anatomy:
``cow_depth_mm`` below the top of the head (the median over the training localizers, :func:`fit_depth`)
and, in R and A, at the centre of the head at that height; series too short to hold the vertex (slab MRA) are centred on their own field
of view. The box is resampled (trilinear) to the encoder's ``img_size``^3; CT becomes the pre-training's
three windows, MR its per-volume percentile scaling. :func:`roi_coverage` reports the share of held-out
localizers inside the box.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from lib import metrics, multigpu, runs
from lib.data.cache import ArrayCache
from lib.data.convert.rsna2025_aneurysm import LABELS
from lib.data.datasets import AlternatingLoader, normalise_mri
from lib.data.io import load_volume
from lib.data.prepared import PreparedDataset
from lib.data.transforms import ct_windows
from lib.families import downstream
from lib.families.common import resume_mode
from lib.loaders import loader
from lib.train import TrainSettings, adamw, fit, load_weights

NOTEBOOK, FAMILY = "09_rsna_aneurysm", "ssl_pretraining"
LOCATIONS = LABELS[:13]
DEFAULT_DEPTH_MM = 95.0
DEFAULT_ROI_MM = (120.0, 120.0, 90.0)  # around the Circle of Willis, when the pre-training's field is unknown
AIR = {"CT": -1024.0, "MRI": 0.0}


# --------------------------------------------------------------------------- data and encoder

def find_data(cfg: Mapping[str, Any]) -> PreparedDataset:
    """The prepared training set: ``real_data`` (stops at once, saying how to get it, if missing), else the
    built-in mini competition of size ``cohort`` (built and converted if missing)."""
    from lib.data import demo_rsna, locate, prepared

    if cfg["real_data"]:
        return prepared.open_dataset(locate.require_prepared(cfg["real_data"])[0])
    return prepared.open_dataset(demo_rsna.prepared(cfg["cohort"]))


def encoder_source(cfg: Mapping[str, Any]) -> Path:
    """``cfg.encoder``, or the newest completed 03_pretrain run at this preset (stops, saying what to run)."""
    from lib import summary

    if cfg["encoder"]:
        return Path(cfg["encoder"]).expanduser()
    run = summary.latest_run("03_pretrain", cfg["preset"])
    if run is None or not (run / "encoder.pt").is_file():
        raise FileNotFoundError(f"no completed 03_pretrain run with an encoder.pt at preset {cfg['preset']}: run "
                                f"`papermill notebooks/03_pretrain.ipynb out.ipynb -p preset {cfg['preset']}` first, "
                                "or give -p encoder RUN_FOLDER")
    return run


def pretraining_field_mm(run: Path) -> float | None:
    """The field of view (mm) the 03 run's encoder saw per input: its ``prep_size`` voxels at its ``spacing``
    (or, with ``spacing`` None, at the median voxel size of the volumes it trained on); None when ``run`` is
    not a 03 run folder. :func:`box_of` matches the box to it, so that fine-tuning sees anatomy at the scale
    the encoder learnt."""
    import json

    try:
        cfg = json.loads((Path(run) / "run.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None
    spacing = cfg.get("spacing")
    if not spacing:
        from lib.data import demo, locate, prepared
        from lib.data.datasets import cohort

        sets = ([prepared.open_dataset(r) for r in locate.require_prepared(cfg["real_data"])] if cfg.get("real_data")
                else [cohort(demo.ensure(cfg["cohort"], progress=False)[0])])
        sizes = [np.mean(prepared.parse_tuple(t)) for d in sets
                 for t in d.index[d.index["modality"].isin(["MRI", "CT"])]["spacing_mm"] if str(t).strip()]
        spacing = float(np.median(sizes)) if sizes else None
    return float(cfg["prep_size"]) * float(spacing) if spacing else None


def box_of(cfg: Mapping[str, Any], source: Path) -> tuple[float, float, float]:
    """``cfg.roi_mm``, or (None) a cube of the pre-training's field of view (:func:`pretraining_field_mm`),
    else :data:`DEFAULT_ROI_MM`."""
    if cfg["roi_mm"]:
        return tuple(float(v) for v in cfg["roi_mm"])
    field = pretraining_field_mm(source if source.is_dir() else source.parent)
    return (field,) * 3 if field else DEFAULT_ROI_MM


# --------------------------------------------------------------------------- the region around the Circle of Willis

def head_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """Head voxels: CT above -300 HU; MR above a tenth of its 99th percentile."""
    if modality == "CT":
        return array > -300
    return array > 0.1 * float(np.percentile(array, 99))


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def extent_s(array: np.ndarray, affine: np.ndarray) -> float:
    """The image's extent along its third (superior) axis, mm."""
    return abs(float(np.linalg.norm(affine[:3, 2]) * (array.shape[2] - 1)))


def _head_points(array: np.ndarray, affine: np.ndarray, modality: str) -> np.ndarray:
    """RAS mm of (at most about 200,000 of) the head's voxels; every voxel when nothing passes the mask."""
    mask = head_mask(array, modality)
    ijk = np.argwhere(mask) if mask.any() else np.argwhere(np.ones_like(mask))
    return _world(affine, ijk[:: max(1, len(ijk) // 200000)].astype(np.float64))


def roi_centre(array: np.ndarray, affine: np.ndarray, modality: str, depth_mm: float) -> np.ndarray:
    """The box centre (RAS mm): ``depth_mm`` below the top of the head, at the head's centre in R and A at
    that height; an image whose S extent cannot hold the vertex and the depth is centred on itself."""
    if extent_s(array, affine) < depth_mm + 30.0:
        return _world(affine, (np.array(array.shape[:3], np.float64) - 1) / 2)
    xyz = _head_points(array, affine, modality)  # the mask once: it is most of the preprocessing time
    top = float(xyz[:, 2].max())
    slab = xyz[np.abs(xyz[:, 2] - (top - depth_mm)) < 20.0]
    ra = (slab if len(slab) else xyz)[:, :2].mean(0)
    return np.array([ra[0], ra[1], top - depth_mm])


def sample_box(array: np.ndarray, affine: np.ndarray, centre: np.ndarray, size_mm, out: int, cval: float) -> np.ndarray:
    """The RAS box ``centre ± size_mm / 2`` sampled (trilinear, voxel centres) on ``out``^3 points."""
    from scipy import ndimage

    size = np.asarray(size_mm, np.float64)
    axes = [(np.arange(out) + 0.5) / out * s - s / 2 + c for s, c in zip(size, centre)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    ijk = np.linalg.solve(affine[:3, :3], (grid - affine[:3, 3]).T)
    return ndimage.map_coordinates(np.asarray(array, np.float32), ijk, order=1, mode="constant",
                                   cval=cval).reshape(out, out, out).astype(np.float32)


def model_input(array: np.ndarray, affine: np.ndarray, modality: str, roi_mm, depth_mm: float,
                img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x [3 or 1, S, S, S], box centre)``: the box around the Circle of Willis as the encoder was
    pre-trained to see it (CT: three windows; MR: percentile scaling)."""
    centre = roi_centre(array, affine, modality, depth_mm)
    box = sample_box(array, affine, centre, roi_mm, img_size, AIR[modality])
    x = ct_windows(box[None]) if modality == "CT" else normalise_mri(box[None])
    return np.ascontiguousarray(x, np.float32), centre


def point_tokens(points: np.ndarray, centre: np.ndarray, roi_mm, grid: int) -> np.ndarray:
    """Token index (i, j, k) of each RAS point in the box's ``grid``^3 token grid; -1 rows outside it."""
    u = (np.asarray(points, np.float64) - (centre - np.asarray(roi_mm) / 2)) / np.asarray(roi_mm)
    idx = np.floor(u * grid).astype(int)
    idx[~np.all((idx >= 0) & (idx < grid), axis=1)] = -1
    return idx


def _points_of(ds: PreparedDataset) -> dict[str, list[tuple[str, np.ndarray]]]:
    pts = ds.points[ds.points["label"].isin(LOCATIONS)] if len(ds.points) else ds.points
    out: dict[str, list] = {}
    for r in pts.itertuples():
        out.setdefault(r.image_id, []).append((r.label, np.array([float(r.x), float(r.y), float(r.z)])))
    return out


def fit_depth(ds: PreparedDataset, limit: int = 200) -> tuple[float, int]:
    """``(median depth of the training localizers below the top of the head in mm, localizers used)``
    (:data:`DEFAULT_DEPTH_MM` without any); at most ``limit`` series are read."""
    points = _points_of(ds)
    modality = ds.images(split="train").set_index("image_id")["modality"]
    depths = []
    for image_id in [i for i in points if i in modality.index][:limit]:
        v = load_volume(ds.file(image_id), channels=(1,))
        if extent_s(v.array[0], v.affine) >= DEFAULT_DEPTH_MM + 30.0:
            top = float(_head_points(v.array[0], v.affine, modality[image_id])[:, 2].max())  # the top of the head
            depths += [top - p[2] for _, p in points[image_id]]
    return (float(np.median(depths)) if depths else DEFAULT_DEPTH_MM), len(depths)


# --------------------------------------------------------------------------- datasets

class SeriesSet(Dataset):
    """The series of one split and modality as model inputs: ``{"x", "y" [14], "points" [13, g, g, g],
    "has_points"}``; preprocessing cached (:class:`lib.data.cache.ArrayCache`)."""

    def __init__(self, ds: PreparedDataset, rows: pd.DataFrame, roi_mm, img_size: int, grid: int,
                 depth_mm: float, cache: ArrayCache | None = None):
        self.ds, self.rows, self.img_size, self.grid, self.depth = ds, rows.reset_index(drop=True), img_size, grid, depth_mm
        self.roi, self.cache, self.points = tuple(float(v) for v in roi_mm), cache, _points_of(ds)
        labels = ds.labels.set_index("image_id") if len(ds.labels) else pd.DataFrame(columns=LABELS)
        missing = [i for i in self.rows["image_id"] if i not in labels.index]
        if missing:
            raise ValueError(f"{ds.root}: {len(missing)} series without labels in labels.csv (e.g. {missing[0]})")
        self.y = torch.tensor(labels.loc[list(self.rows["image_id"]), LABELS].astype(float).to_numpy(), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def prepared(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.rows.iloc[i]
        path = self.ds.file(row["image_id"])

        def compute():
            v = load_volume(path, channels=(1,))
            x, centre = model_input(v.array[0], v.affine, row["modality"], self.roi, self.depth, self.img_size)
            return np.concatenate([x.ravel(), centre.astype(np.float32)])

        params = {"rsna_roi": list(self.roi), "depth": round(self.depth, 3), "size": self.img_size}
        flat = np.asarray(compute() if self.cache is None else self.cache.get(path, params, compute))
        c = 3 if row["modality"] == "CT" else 1
        return flat[:-3].reshape(c, *(self.img_size,) * 3), flat[-3:].astype(np.float64)

    def __getitem__(self, i: int) -> dict:
        x, centre = self.prepared(i)
        target = torch.zeros(len(LOCATIONS), *(self.grid,) * 3)
        pts = self.points.get(self.rows.iloc[i]["image_id"], [])
        if pts:
            idx = point_tokens(np.stack([p for _, p in pts]), centre, self.roi, self.grid)
            for (label, _), (a, b, c) in zip(pts, idx):
                if a >= 0:
                    target[LOCATIONS.index(label), a, b, c] = 1.0
        return {"x": torch.from_numpy(np.array(x)), "y": self.y[i], "points": target,
                "has_points": torch.tensor(float(bool(pts)))}


def split_sets(ds: PreparedDataset, encoder: nn.Module, roi_mm, depth_mm: float,
               cache: ArrayCache | None = None) -> dict[str, dict[str, SeriesSet]]:
    """``{split: {modality: SeriesSet}}`` at the encoder's input size (series without labels left out, said)."""
    img, grid = encoder.config["img_size"], encoder.config["img_size"] // encoder.config["patch_size"]
    labelled = set(ds.labels["image_id"]) if len(ds.labels) else set()
    out: dict[str, dict[str, SeriesSet]] = {}
    for split in ("train", "val", "test"):
        images = ds.images(split=split)
        if (~images["image_id"].isin(labelled)).any():
            print(f"{split}: {int((~images['image_id'].isin(labelled)).sum())} series without labels left out")
            images = images[images["image_id"].isin(labelled)]
        out[split] = {m: SeriesSet(ds, images[images["modality"] == m], roi_mm, img, grid, depth_mm, cache)
                      for m in ("MRI", "CT") if (images["modality"] == m).any()}
        if not out[split]:
            raise ValueError(f"{ds.root}: no series in split {split!r}")
    return out


def subset(sets: Mapping[str, SeriesSet], fraction: float, seed: int) -> dict[str, torch.utils.data.Subset]:
    """A seeded ``fraction`` of every modality's training series (at least one each)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    out = {}
    for m, s in sets.items():
        n = max(1, round(fraction * len(s)))
        order = np.random.default_rng([seed, len(m)]).permutation(len(s))
        out[m] = torch.utils.data.Subset(s, sorted(order[:n].tolist()))
    return out


# --------------------------------------------------------------------------- the model

class SeriesClassifier(nn.Module):
    """Encoder -> mean over tokens -> 14 logits; beside it, 13 location logits per token (``points``)."""

    def __init__(self, encoder: nn.Module, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head, self.point_head = nn.Linear(embed_dim, len(LABELS)), nn.Conv3d(embed_dim, len(LOCATIONS), 1)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x, return_intermediate=False)
        return self.head(features.flatten(2).mean(-1)), self.point_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


def make_model(arm: str, pretrained: nn.Module, seed: int) -> SeriesClassifier:
    """The classifier of ``arm`` (:data:`lib.families.downstream.ARMS`) around the pre-trained encoder."""
    return SeriesClassifier(downstream.arm_encoder(arm, pretrained, seed), pretrained.embed_dim)


def step(model: SeriesClassifier, batch: Any, *, point_weight: float):
    """``(loss, terms)``: BCE on the 14 labels, plus ``point_weight`` x BCE of the location maps on the series
    that have localizers."""
    _, b = batch
    logits, maps = model.forward_all(b["x"])
    labels = F.binary_cross_entropy_with_logits(logits.float(), b["y"].float())
    terms = {"labels": labels.detach()}
    loss = labels
    has = b["has_points"] > 0
    if point_weight and bool(has.any()):
        target = b["points"][has].float()
        pos = float(target[0, 0].numel())  # a location's map: one positive token among grid^3
        points = F.binary_cross_entropy_with_logits(maps[has].float(), target, pos_weight=torch.tensor(pos, device=target.device))
        loss = loss + point_weight * points
        terms["points"] = points.detach()
    return loss, terms


# --------------------------------------------------------------------------- training and scoring

def train_arm(cfg: Mapping[str, Any], arm: str, fraction: float, seed: int, pretrained: nn.Module,
              sets: Mapping[str, Mapping[str, SeriesSet]], out_dir: str | Path, device: torch.device) -> SeriesClassifier:
    """One arm at one label fraction and seed, trained with :func:`lib.train.fit` into ``out_dir`` (best epoch
    by validation loss, its weights loaded). A probe's encoder gets no optimizer state."""
    runs.seed_everything(seed)
    model = make_model(arm, pretrained, seed)
    train = {m: loader(s, {**cfg, "seed": seed}, train=True, drop_last=False)
             for m, s in subset(sets["train"], fraction, seed).items()}
    val = {m: loader(s, cfg, train=False, workers=False) for m, s in sets["val"].items()}
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    result = fit(model, functools.partial(step, point_weight=cfg["point_weight"]), AlternatingLoader(train), optimizer,
                 out_dir=out_dir, config={**cfg, "seed": seed, "arm": arm, "label_fraction": fraction},
                 val_loader=AlternatingLoader(val), settings=TrainSettings.from_config(cfg), resume=resume_mode(cfg),
                 device=device)
    load_weights(model, result.best_checkpoint or result.checkpoint)
    return model.eval()


@torch.no_grad()
def predict_split(model: SeriesClassifier, sets: Mapping[str, SeriesSet], device: torch.device,
                  batch_size: int = 4) -> pd.DataFrame:
    """Probabilities of every series of a split: ``image_id``, ``modality`` and one column per label."""
    model.to(device)  # where the data goes (a no-op when it is there already)
    model.eval()
    rows = []
    for m, s in sets.items():
        for i in range(0, len(s), batch_size):
            x = torch.stack([s[k]["x"] for k in range(i, min(i + batch_size, len(s)))]).to(device)
            p = torch.sigmoid(model(x).float()).cpu().numpy()
            rows += [{"image_id": s.rows.iloc[k]["image_id"], "modality": m, **dict(zip(LABELS, p[k - i]))}
                     for k in range(i, min(i + batch_size, len(s)))]
    return pd.DataFrame(rows)


def truth(sets: Mapping[str, SeriesSet], image_ids) -> np.ndarray:
    y = {s.rows.iloc[k]["image_id"]: s.y[k].numpy() for s in sets.values() for k in range(len(s))}
    return np.stack([y[i] for i in image_ids])


def score(pred: pd.DataFrame, sets: Mapping[str, SeriesSet]) -> dict[str, float]:
    """The competition's weighted AUC and each label's AUC (NaN where the split holds one class)."""
    result = metrics.rsna_weighted_auc(truth(sets, pred["image_id"]), pred[LABELS].to_numpy(copy=True), labels=LABELS)
    return {"weighted_auc": float(result["score"]), **{f"auc {k}": float(v) for k, v in result["auc"].items()}}


def plan(cfg: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """Every (arm, label fraction, seed) to train: all arms on every label; finetune and scratch at the other
    fractions (the label-efficiency curve)."""
    out = [(arm, 1.0, seed) for seed in range(cfg["seeds"]) for arm in cfg["arms"]]
    for fraction in sorted(set(cfg["label_fractions"]) - {1.0}):
        out += [(arm, float(fraction), seed) for seed in range(cfg["seeds"]) for arm in ("finetune", "scratch")
                if arm in cfg["arms"]]
    return out


def run_grid(cfg: Mapping[str, Any], pretrained: nn.Module, sets, out_dir: str | Path, device: torch.device,
             progress: bool = True) -> tuple[pd.DataFrame, SeriesClassifier]:
    """Train and score every entry of :func:`plan` (logs under ``out_dir/<arm>-f<fraction>-seed<seed>``); one
    row per training with its test scores. Returns the table and the finetune model on all labels, seed 0
    (the one the submission uses)."""
    from tqdm.auto import tqdm

    from lib.families import rsna_arms

    if (n := multigpu.processes(cfg)) > 1:  # independent trainings: each GPU takes its share (lib.families.rsna_arms)
        return rsna_arms.run_grid_parallel(cfg, pretrained, sets, out_dir, device, n)
    rows, kept = [], None
    for arm, fraction, seed in tqdm(plan(cfg), desc="09 arms", disable=not progress):
        model, row = rsna_arms.train_and_score(cfg, (arm, fraction, seed), pretrained, sets, out_dir, device)
        rows.append(row)
        kept = model if (arm, fraction, seed) == ("finetune", 1.0, 0) else kept
    return pd.DataFrame(rows), kept


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of the test weighted AUC per arm and label fraction."""
    return table.groupby(["label_fraction", "arm"])["weighted_auc"].agg(["mean", "std", "count"]).reset_index()


def heldout_rows(table: pd.DataFrame, n_test: int) -> list[dict]:
    """The SSL family's rows: fine-tuned against scratch on every label (the headline), probe against scratch,
    and fine-tuned against scratch at every smaller label fraction; mean over seeds (std in the metric name)."""
    from lib.families.results import row

    s = summarise(table).set_index(["label_fraction", "arm"])
    seeds = ",".join(map(str, sorted(table["seed"].unique())))
    task = "RSNA 2025 aneurysm detection (14 labels, series level)"
    out = []
    for fraction in sorted(table["label_fraction"].unique(), reverse=True):
        for arm in ("finetune", "probe"):
            if (fraction, arm) not in s.index or (fraction, "scratch") not in s.index:
                continue
            a, b = s.loc[(fraction, arm)], s.loc[(fraction, "scratch")]
            out.append(row(f"{task}, {fraction:g} of the training labels", f"weighted AUC (competition), {arm}: mean "
                           f"over seeds (std {a['std']:.3f}; scratch std {b['std']:.3f})", a["mean"], "same encoder from "
                           "scratch", b["mean"], True, n_test, headline=fraction == 1.0 and arm == "finetune", seeds=seeds))
    return out


def roi_coverage(sets: Mapping[str, SeriesSet]) -> tuple[int, int]:
    """``(localizers inside the box, localizers)`` over a split's series: how often the box holds the aneurysm."""
    inside = total = 0
    for s in sets.values():
        for i in range(len(s)):
            pts = s.points.get(s.rows.iloc[i]["image_id"], [])
            if pts:
                _, centre = s.prepared(i)
                idx = point_tokens(np.stack([p for _, p in pts]), centre, s.roi, s.grid)
                inside, total = inside + int((idx[:, 0] >= 0).sum()), total + len(pts)
    return inside, total


def raw_root(cfg: Mapping[str, Any]) -> Path:
    """The raw competition download whose test series the local gateway feeds (the built-in mini competition,
    or the RSNA download found here)."""
    from lib.data import demo_rsna, locate

    if not cfg["real_data"]:
        return demo_rsna.ensure(cfg["cohort"])
    found = locate.find_raw("rsna2025_aneurysm", "train.csv")
    if not found:
        raise FileNotFoundError("the raw RSNA download (series/ folders) is not on this machine: "
                                + locate.how_to_get("rsna2025_aneurysm"))
    return found[0]


def prevalence(sets: Mapping[str, SeriesSet]) -> np.ndarray:
    """Each label's share of positives among the training series (the answer for a series that cannot be read)."""
    return torch.cat([s.y for s in sets.values()]).mean(0).numpy()
