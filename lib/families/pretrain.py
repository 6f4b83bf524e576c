"""The SSL pre-training family (03_pretrain): WaveFormer3D pre-trained with MiM masks, SparK-style dense
decoding and spatial InfoNCE, and its downstream comparison (run by 07_evaluate).

Composed from the layers: the network is :class:`lib.models.pretrainer.WaveFormerSparKMiMPretrainer`
around :class:`lib.models.waveformer.WaveFormer3D`; :func:`build` hands it the masking
(:class:`lib.losses.masking.MiMHierarchicalMasking`) and the contrastive loss
(:class:`lib.losses.contrastive.SpatialInfoNCE`) configured from the notebook's parameters, so every
research value of the preset (mask ratios, temperature, ...) and every ``-p`` override reaches the model.

One function per heavy cell of 03_pretrain: :func:`find_data` and :class:`Volumes` / :func:`loaders`
(data), :func:`build`, :func:`mask_shares`, :func:`spread` (the collapse check), :func:`train_model`,
:func:`heldout_scores` + :func:`evaluate` (test split against the mean patch: ``heldout_reconstruction.csv``
and ``heldout_metrics.json``), :func:`reconstruction_examples` (figure data for
:func:`lib.viz.reconstruction_figure`), :func:`export_encoder` (``encoder.pt``) and
:func:`preset_parameter_counts`. 07_evaluate calls :func:`downstream_rows` (the hook it looks for on every
family module) for the comparison in :mod:`lib.families.downstream`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader

from lib import metrics, multigpu, train
from lib.atomic import write_csv
from lib.checkpoint import load_encoder, save_encoder
from lib.config import args_for, resolve
from lib.data import datasets, demo, locate, prepared
from lib.data.cache import ArrayCache
from lib.families import downstream, results
from lib.families.common import resume_mode
from lib.losses.contrastive import SpatialInfoNCE
from lib.losses.masking import MiMHierarchicalMasking
from lib.models.pretrainer import WaveFormerSparKMiMPretrainer, normalise_patches, patchify, unpatchify
from lib.models.waveformer import WaveFormer3D
from lib.loaders import loader

FAMILY = "ssl_pretraining"
EVAL_SEED = 20250  # masks of val_step: the same at every validation, so validation losses compare
TASK, BASELINE = "masked-patch reconstruction", "predicting the mean patch"
SPLITS = ("train", "val", "test")
MEAN_PATCH_BATCH, TEST_BATCH = 8, 4  # held-out masks are drawn per test batch: the batch is part of the protocol


# --------------------------------------------------------------------------- the network

def build(cfg: Mapping[str, Any]) -> WaveFormerSparKMiMPretrainer:
    """The pretrainer of a resolved 03_pretrain configuration (``lib.config.resolve``): the encoder from its
    WaveFormer3D keys, the MiM masking, the InfoNCE and the decoder from theirs."""
    encoder = WaveFormer3D(**args_for(WaveFormer3D, cfg))
    masking = MiMHierarchicalMasking(cfg["mask_ratio"], cfg["local_ratio"], cfg["min_unmasked_blocks"])
    contrastive = functools.partial(SpatialInfoNCE, projection_dim=cfg["projection_dim"],
                                    temperature=cfg["temperature"], num_samples=cfg["num_samples"])
    return WaveFormerSparKMiMPretrainer(
        encoder, masking=masking, contrastive=contrastive, spark_dim=cfg["spark_dim"],
        spark_levels=cfg["spark_levels"], decoder_dim=cfg["decoder_dim"],
        contrastive_weight=cfg["contrastive_weight"], contrastive_levels=cfg["contrastive_levels"])


def parameter_counts(model: WaveFormerSparKMiMPretrainer) -> dict[str, int]:
    return {"encoder (WaveFormer3D)": sum(p.numel() for p in model.encoder.parameters()),
            "pretrainer (all)": sum(p.numel() for p in model.parameters())}


def preset_parameter_counts(presets: Sequence[str] = ("subset", "prod")) -> dict[str, dict[str, int]]:
    """:func:`parameter_counts` of the model of each preset, built on the meta device (shapes only)."""
    counts = {}
    for name in presets:
        with torch.device("meta"):
            counts[name] = parameter_counts(build(resolve("03_pretrain", name)))
    return counts


# --------------------------------------------------------------------------- data

def find_data(cfg: Mapping[str, Any]) -> tuple[dict, pd.DataFrame]:
    """``({(modality, split): files}, volumes per modality and split)``.

    With ``real_data`` (comma-separated prepared dataset folders or names, :func:`lib.data.locate.require_prepared`)
    stops first, naming whatever is missing and the commands that fetch and convert it; then takes every MRI
    (1 channel, any contrast) and CT (3 windows) image of those datasets, split as they were prepared.
    Otherwise builds (or verifies) the built-in cohort and takes its brain MRI and head CT. A modality
    may be absent (OpenMind is MRI only); one that is present needs volumes in every split.
    """
    if cfg["real_data"]:
        sets = [prepared.open_dataset(root) for root in locate.require_prepared(cfg["real_data"])]
        files = {(m, s): [f for d in sets for f in d.files(m, s)] for m in datasets.MODALITIES for s in SPLITS}
    else:
        root, _ = demo.ensure(cfg["cohort"], progress=False)
        files = {(m, s): datasets.volume_files(root, m, s) for m in datasets.MODALITIES for s in SPLITS}
    counts = pd.DataFrame([{"modality": m, "split": s, "volumes": len(f)} for (m, s), f in files.items()])
    table = counts.pivot(index="modality", columns="split", values="volumes")[list(SPLITS)]
    present = table[table.sum(axis=1) > 0]
    if present.empty or not (present > 0).all().all():
        raise ValueError(f"every modality present needs volumes in every split (train, val, test):\n{table}")
    return {k: v for k, v in files.items() if k[0] in present.index}, table


class Volumes:
    """The cohort's volumes at the model's size: datasets and loaders by modality and split.

    MRI and CT cannot share a batch (1 against 3 channels): training alternates an MRI and a CT batch,
    CT at ``ct_batch_size`` or half the MRI batch.
    """

    def __init__(self, cfg: Mapping[str, Any], files: dict, cache: ArrayCache | None = None):
        self.cfg, self.files, self.cache = cfg, files, cache
        self.ct_batch = cfg["ct_batch_size"] or max(1, cfg["batch_size"] // 2)
        self.modalities = [m for m in datasets.MODALITIES if files.get((m, "train"))]

    def dataset(self, modality: str, split: str, augment: bool = False) -> datasets.VolumeDataset:
        c = self.cfg
        return datasets.VolumeDataset(self.files[modality, split], modality, c["img_size"],
                                      prep_size=(c["prep_size"],) * 3, spacing=c["spacing"], augment=augment,
                                      cache=self.cache)

    def alternating(self, split: str, train_mode: bool) -> datasets.AlternatingLoader:
        sizes = {"MRI": self.cfg["batch_size"], "CT": self.ct_batch}
        return datasets.AlternatingLoader({
            m: loader(self.dataset(m, split, augment=train_mode), self.cfg, train=train_mode, batch_size=sizes[m],
                      seed_offset=i, drop_last=False)
            for i, m in enumerate(datasets.MODALITIES) if m in self.modalities})

    def loader(self, modality: str, split: str, batch_size: int) -> DataLoader:
        """Un-augmented, in file order."""
        return DataLoader(self.dataset(modality, split), batch_size=batch_size)

    def stack(self, modality: str, split: str, n: int) -> torch.Tensor:
        """The first ``n`` volumes of a split as one batch [n, C, S, S, S]."""
        ds = self.dataset(modality, split)
        return torch.cat([ds[i][None] for i in range(min(n, len(ds)))])


def loaders(data: Volumes) -> tuple[datasets.AlternatingLoader, datasets.AlternatingLoader, torch.Tensor]:
    """The training and validation loaders, and the first training batch (checked: an MRI batch of the
    model's size). Drawing it advances the seeded loaders and augmentations, as the run always has."""
    train_loader, val_loader = data.alternating("train", True), data.alternating("val", False)
    name, first = next(iter(train_loader))
    size, expected = data.cfg["img_size"], data.modalities[0]
    channels = 1 if expected == "MRI" else 3
    if name != expected or tuple(first.shape[1:]) != (channels,) + (size,) * 3:
        raise ValueError(f"first training batch: expected {expected} [B, {channels}, {size}, {size}, {size}], "
                         f"got {name} {tuple(first.shape)}")
    return train_loader, val_loader, first


# --------------------------------------------------------------------------- masks, collapse, training

def mask_shares(model: WaveFormerSparKMiMPretrainer, x: torch.Tensor, seed: int) -> dict[str, float]:
    """One draw of the masks for ``x``: the block edge and the visible, local (hard) and global-only (easy)
    shares of the grid; checks that every sample keeps visible and masked positions."""
    masks = model.draw_masks(x, torch.Generator().manual_seed(seed))
    if not (masks.visible.flatten(1).any(1).all() and masks.masked.flatten(1).any(1).all()):
        raise ValueError("a sample without visible or without masked positions")
    return {"block edge": masks.block_size, "visible": masks.visible.float().mean().item(),
            "local (hard)": masks.local.float().mean().item(),
            "global only (easy)": (masks.masked & ~masks.local).float().mean().item()}


@torch.no_grad()
def spread(encoder: WaveFormer3D, probe: torch.Tensor, device: torch.device | str) -> dict[str, float]:
    """The collapse check: the shares of the encoder's final-map variance across the locations of a volume
    and across volumes at the same location (:func:`lib.metrics.location_variance_ratio`,
    :func:`lib.metrics.content_variance_ratio`); leaves the encoder in training mode."""
    encoder.to(device)  # where the data goes (a no-op when it is there already)
    encoder.eval()
    f = encoder(probe.to(device))
    encoder.train()
    return {"across locations": metrics.location_variance_ratio(f), "across volumes": metrics.content_variance_ratio(f)}


def _volume(batch: Any) -> torch.Tensor:
    """A batch of :class:`lib.data.datasets.AlternatingLoader` (``(modality, x)``) or a bare tensor."""
    return batch[1] if isinstance(batch, (tuple, list)) else batch


def train_step(model: WaveFormerSparKMiMPretrainer, batch: Any) -> tuple[torch.Tensor, dict]:
    """``lib.train.fit`` step: masks from torch's (seeded) global generator."""
    out = model(_volume(batch))
    return out.loss, out.metrics()


def val_step(model: WaveFormerSparKMiMPretrainer, batch: Any, seed: int = EVAL_SEED) -> tuple[torch.Tensor, dict]:
    """Validation step: the same masks (``seed``) at every validation, so the numbers compare."""
    x = _volume(batch)
    out = model(x, generator=torch.Generator(device=x.device).manual_seed(seed))
    return out.loss, out.metrics()


# MRI and CT batches go through different patch embeddings and heads: each step leaves some parameters unused.
DDP_OPTIONS = {"find_unused_parameters": True}


def train_model(model: WaveFormerSparKMiMPretrainer, cfg: Mapping[str, Any], train_loader: Any, val_loader: Any,
                out_dir: str | Path, device: torch.device | None) -> train.FitResult:
    """One call into ``lib.train.fit``: AdamW, warm-up + cosine, the run's settings; a ``steps.csv`` row per
    MRI + CT pair of steps. With ``gpus`` > 1: :func:`train_process` in that many processes (the loaders
    given here are then unused), the result loaded into ``model``."""
    n = multigpu.processes(cfg)
    if n > 1:
        return multigpu.fit_in_processes(train_process, cfg, out_dir, model, device, n)
    optimizer = train.adamw(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    settings = train.TrainSettings.from_config(cfg, log_every=2)
    return train.fit(model, train_step, train_loader, optimizer, out_dir=out_dir, config=cfg, val_loader=val_loader,
                     val_step=val_step, settings=settings, resume=resume_mode(cfg), device=device, ddp=DDP_OPTIONS)


def train_process(cfg: Mapping[str, Any], out_dir: Path) -> tuple[WaveFormerSparKMiMPretrainer, train.FitResult]:
    """The training of 03_pretrain in one of several processes (:mod:`lib.multigpu`, ``python -m lib.launch``):
    the notebook's data and model cells, then :func:`train_model`."""
    files, _ = find_data(cfg)
    train_loader, val_loader, _ = loaders(Volumes(cfg, files, ArrayCache()))
    model = build(cfg)
    return model, train_model(model, cfg, train_loader, val_loader, out_dir, None)


PROCESSES = ((train_process, ""),)  # what python -m lib.launch runs: (function, sub-folder of the run), in order


def load_best(model: WaveFormerSparKMiMPretrainer, result: train.FitResult, device: torch.device) -> Path:
    """Load the weights of the best validation epoch (else the last) into ``model``, on ``device``."""
    weights = result.best_checkpoint or result.checkpoint
    train.load_weights(model, weights)
    model.to(device)
    return weights


# --------------------------------------------------------------------------- held-out evaluation

@torch.no_grad()
def mean_patch(volumes: Iterable[torch.Tensor], patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """The mean per-patch-normalised patch over every token of ``volumes`` (batches [B, C, D, H, W])."""
    total, count = None, 0
    for x in volumes:
        t, _, _ = normalise_patches(patchify(_volume(x).float(), patch_size), eps)
        s = t.sum(dim=(0, 1))
        total = s if total is None else total + s
        count += t.shape[0] * t.shape[1]
    if total is None:
        raise ValueError("mean_patch: no volumes given")
    return total / count


@torch.no_grad()
def heldout_reconstruction(model: WaveFormerSparKMiMPretrainer, volumes: Iterable[torch.Tensor],
                           baseline: torch.Tensor, repeats: int = 4, seed: int = 0,
                           device: torch.device | str = "cpu") -> dict[str, float]:
    """Reconstruction loss of ``model`` and of predicting ``baseline`` (the mean patch) on held-out volumes.

    Both are the per-patch-normalised MSE over the same masked tokens: ``repeats`` mask draws per
    batch from a generator seeded with ``seed``. Returns means over all masked tokens (fp32, eval mode),
    the number of masked tokens and of volumes.
    """
    model.to(device)  # where the data goes (a no-op when it is there already)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {"model": 0.0, "mean_patch": 0.0}
    n = count = 0
    for x in volumes:
        x = _volume(x).to(device).float()
        count += x.shape[0]
        for _ in range(repeats):
            out = model(x, generator=generator)
            m = out.masks.masked.reshape(x.shape[0], -1)
            sums["model"] += float(((out.pred - out.target) ** 2).mean(-1)[m].sum())
            sums["mean_patch"] += float(((baseline.to(device) - out.target) ** 2).mean(-1)[m].sum())
            n += int(m.sum())
    model.train(was_training)
    if n == 0:
        raise ValueError("heldout_reconstruction: no volumes given")
    return {"model": sums["model"] / n, "mean_patch": sums["mean_patch"] / n, "masked_patches": n, "volumes": count}


def heldout_scores(model: WaveFormerSparKMiMPretrainer, data: Volumes, cfg: Mapping[str, Any],
                   device: torch.device) -> dict[str, dict[str, float]]:
    """:func:`heldout_reconstruction` per modality on the test split, the mean patch from the training split."""
    scores = {}
    for m in data.modalities:
        mean = mean_patch(data.loader(m, "train", MEAN_PATCH_BATCH), cfg["patch_size"])
        scores[m] = heldout_reconstruction(model, data.loader(m, "test", TEST_BATCH), mean,
                                           repeats=cfg["eval_repeats"], seed=cfg["seed"], device=device)
    return scores


def heldout_frame(scores: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """One row per modality: pretrained and mean-patch loss, masked patches, volumes, relative reduction."""
    table = pd.DataFrame(scores).T.rename(columns={"model": "pretrained", "mean_patch": "mean patch"})
    table["reduction"] = 1 - table["pretrained"] / table["mean patch"]
    return table


def heldout_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The held-out rows of :func:`heldout_frame` (modality as index): one per modality, no headline (the
    family's headline is 07_evaluate's downstream comparison)."""
    return [results.row(TASK, f"per-patch-normalised MSE on masked patches, {modality}", r["pretrained"], BASELINE,
                        r["mean patch"], higher_is_better=False, n=r["volumes"])
            for modality, r in table.iterrows()]


def evaluate(scores: Mapping[str, Mapping[str, float]], run_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``heldout_reconstruction.csv`` and ``heldout_metrics.json`` of :func:`heldout_scores`; the rows."""
    table = heldout_frame(scores)
    write_csv(Path(run_dir) / "heldout_reconstruction.csv", table.reset_index(names="modality"))
    rows = heldout_rows(table)
    results.write_heldout(run_dir, rows)
    return rows


# --------------------------------------------------------------------------- figures and the encoder

@torch.no_grad()
def reconstruction_example(model: WaveFormerSparKMiMPretrainer, x: torch.Tensor,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Input, mask and reconstruction of one batch, as voxel volumes [B, C, D, H, W].

    ``mask`` is 1 on masked voxels. ``reconstruction`` keeps the visible voxels and fills the masked
    patches with the prediction, un-normalised with each true patch's mean and std (MAE's display
    convention: the model predicts the normalised patch, not its brightness).
    """
    was_training = model.training
    model.eval()
    x = x.float()
    out = model(x, generator=generator)
    model.train(was_training)
    p, c = model.encoder.patch_size, x.shape[1]
    grid = [s // p for s in x.shape[2:]]
    _, mean, std = normalise_patches(patchify(x, p), model.norm_eps)
    filled = torch.where(out.masks.masked.reshape(x.shape[0], -1, 1), out.pred * std + mean, patchify(x, p))
    mask = out.masks.masked.float().reshape(x.shape[0], -1, 1).expand(-1, -1, c * p ** 3)
    return {"input": x, "mask": unpatchify(mask, c, p, grid), "reconstruction": unpatchify(filled, c, p, grid),
            "recon": out.recon}


def reconstruction_examples(model: WaveFormerSparKMiMPretrainer, data: Volumes, seed: int,
                            device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`reconstruction_example` of the first test volume of each modality (masks seeded per modality)."""
    model.to(device)  # where the data goes (a no-op when it is there already)
    out = {}
    for i, m in enumerate(data.modalities):
        x = data.dataset(m, "test")[0][None].to(device)
        out[m] = reconstruction_example(model, x, torch.Generator(device=device).manual_seed(seed + i))
    return out


def export_encoder(model: WaveFormerSparKMiMPretrainer, run_dir: str | Path, x: torch.Tensor,
                   **meta: Any) -> tuple[Path, list[tuple[int, ...]]]:
    """Write the encoder as ``run_dir/encoder.pt`` (:func:`lib.checkpoint.save_encoder`), load it back as the
    later notebooks will and check it on ``x`` against ``model.encoder`` (moved to the CPU, eval mode):
    frozen, one map per block, the same final map. Returns the path and the maps' shapes."""
    path = save_encoder(model.encoder, Path(run_dir) / "encoder.pt", **meta)
    frozen = load_encoder(run_dir)
    model.encoder.cpu().eval()
    with torch.no_grad():
        maps, final = frozen(x), model.encoder(x)
    if len(maps) != model.encoder.depth or not torch.allclose(maps[-1], final, atol=1e-5):
        raise RuntimeError(f"{path}: the reloaded encoder does not reproduce the trained one")
    if any(p.requires_grad for p in frozen.parameters()):
        raise RuntimeError(f"{path}: load_encoder returned trainable weights")
    return path, [tuple(f.shape) for f in maps]


# --------------------------------------------------------------------------- 07_evaluate's hook

def downstream_rows(run_dir: str | Path, cfg: Mapping[str, Any], out_dir: str | Path,
                    device: torch.device) -> list[dict[str, Any]]:
    """Does pre-training help? The encoder of the 03_pretrain run ``run_dir`` against the same encoder from
    scratch (and frozen under a linear probe) on :mod:`lib.families.downstream`'s task, with 07_evaluate's
    ``downstream_*`` parameters. Writes ``out_dir/downstream.csv`` (one row per arm and seed) and the
    trainings' logs under ``out_dir/downstream/``; returns the summary rows (fine-tuned: the headline)."""
    encoder = load_encoder(run_dir)
    root, _ = demo.ensure(cfg["cohort"])
    table = downstream.compare(encoder, root, Path(out_dir) / "downstream", cfg, device)
    write_csv(Path(out_dir) / "downstream.csv", table)
    rows = [{**r, "family": FAMILY, "preset": cfg["preset"], "run_id": Path(run_dir).name}
            for r in downstream.summary_rows(table)]
    rsna = rsna_rows(cfg)
    return [{**r, "headline": False} for r in rows] + rsna if rsna else rows


def rsna_rows(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the 09_rsna_aneurysm run ``cfg.run_09`` (or the newest completed one at this preset): the
    job the pre-training exists for, whose fine-tuned-against-scratch row becomes the family's headline;
    ``[]`` when there is none."""
    from lib import paths, summary
    from lib.runs import read_index

    if cfg.get("run_09"):
        run = summary.latest_run("09_rsna_aneurysm", cfg["preset"], cfg["run_09"])
    else:  # the newest completed training run (a submission run, mode=submit, scores nothing)
        root = paths.results_dir()
        done = sorted((r for r in read_index(root) if r["notebook"] == "09_rsna_aneurysm" and r["preset"] == cfg["preset"]
                       and r["status"] == "completed" and (root / r["path"] / "heldout_metrics.json").is_file()),
                      key=lambda r: r["start_time"])
        run = root / done[-1]["path"] if done else None
    if run is None or not (run / "heldout_metrics.json").is_file():
        return []
    return summary.run_rows(FAMILY, run, cfg["preset"])
