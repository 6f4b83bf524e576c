"""The X-ray to CT family (06_xray_to_ct): N radiographs of a patient -> the 3D CT, against the mean training volume.

Composed from the layers below: :class:`lib.data.datasets.DRRVolumes` (radiographs and CT of the built-in
cohort), :class:`lib.models.xray2ct.HybridCNNViTUNet3D`, :class:`lib.losses.medical.MedicalGradeLoss`,
:func:`lib.metrics.reconstruction_metrics` and :func:`lib.train.fit`. The notebook's cells call, in order:
:func:`datasets`, :func:`loaders`, :func:`mean_volume`, :func:`build` (and :func:`parameter_counts`),
:func:`build_loss`, :func:`train`, :func:`evaluate` (which writes ``heldout_metrics.json``),
:func:`export_nifti`, :func:`lib.viz.xray_to_ct_reconstruction` and :func:`finish_summary`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from lib import distributed, multigpu
from lib import train as loop
from lib.atomic import write_csv, write_json
from lib.checkpoint import load_encoder
from lib.config import args_for, resolve
from lib.data import transforms
from lib.data.cache import ArrayCache
from lib.data.paired import DRRVolumes
from lib.data.io import Volume, load_volume, save_volume
from lib.device import autocast
from lib.families.common import count_parameters, data_root, resume_mode, split_loaders  # noqa: F401  (count_parameters: re-exported for the notebooks)
from lib.families.results import row, write_heldout
from lib.losses import medical
from lib.metrics import reconstruction_metrics
from lib.models.xray2ct import HybridCNNViTUNet3D

NOTEBOOK = "06_xray_to_ct"
SPLITS = ("train", "val", "test")
BASELINE = "mean training volume"
# per-patient metric -> (its name in heldout_metrics.json, higher is better); PSNR is the headline
METRICS = {"psnr": ("PSNR (dB; HU [{lo:g}, {hi:g}] -> [0, 1], data range 1)", True),
           "ssim": ("SSIM (3D, Gaussian window 11)", True),
           "mae_hu": ("MAE (HU)", False),
           "cosine": ("cosine similarity", True)}
HEADLINE = "psnr"


def default_angles(views: int) -> tuple[float, ...]:
    """``views`` angles evenly spread over 180 degrees (parallel rays: 180 more adds nothing):
    1 -> (0,), 2 -> (0, 90) frontal + lateral, 4 -> (0, 45, 90, 135)."""
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ValueError(f"views must be an int >= 1, got {views!r}")
    return tuple(180.0 * k / views for k in range(views))


def hu_range(cfg: Mapping[str, Any]) -> tuple[float, float]:
    """The HU interval that the CT targets are mapped from onto [0, 1]."""
    return (cfg["hu_min"], cfg["hu_max"])


# --------------------------------------------------------------------------- data

def datasets(cfg: Mapping[str, Any], root: str | Path | None = None) -> dict[str, DRRVolumes]:
    """The train, val and test splits of ``cfg.real_data`` (a prepared chest CT dataset with DRRs, e.g.
    ``lidc_idri``) or of the built-in cohort ``cfg.cohort`` (built if missing), unless ``root`` is given,
    at ``cfg.views`` angles (:func:`default_angles`), ``image_size``, ``volume_size`` and ``hu_range``,
    sharing one array cache for the rendered views."""
    if root is None:
        root = data_root(cfg)
    cache = ArrayCache()
    return {s: DRRVolumes(root, s, default_angles(cfg["views"]), cfg["image_size"], cfg["volume_size"],
                          hu_range(cfg), cache=cache) for s in SPLITS}


def loaders(cfg: Mapping[str, Any], data: Mapping[str, DRRVolumes]) -> dict[str, DataLoader]:
    """One loader per split: the training one shuffled (seeded by ``cfg.seed``), full batches only."""
    return split_loaders(cfg, data)


def mean_volume(dataset: DRRVolumes) -> torch.Tensor:
    """The baseline: the voxel-wise mean of the training CTs ``[1, D, D, D]`` (also the model's prior)."""
    return torch.stack([dataset[i]["ct"] for i in range(len(dataset))]).mean(0)


# --------------------------------------------------------------------------- model and loss

def build(cfg: Mapping[str, Any], volume_extent: Sequence[float] = (1.0, 1.0, 1.0),
          prior: torch.Tensor | None = None) -> HybridCNNViTUNet3D:
    """The model of a 06_xray_to_ct configuration (a resolved preset): ``views`` spread over 180 degrees
    (:func:`default_angles`), ``image_size``, ``volume_size``, ``base_channels``, ``attention_channels``,
    ``attention_heads`` (also the Swin heads), ``cross_view_layers``, ``window_size``, ``dense_layers``. The
    geometry and the prior come from the data (:meth:`DRRVolumes.volume_extent`, :func:`mean_volume`);
    ``prior`` is used only with ``cfg.residual_prior``."""
    return HybridCNNViTUNet3D(angles=default_angles(cfg["views"]), swin_heads=cfg["attention_heads"],
                              volume_extent=volume_extent, prior=prior if cfg["residual_prior"] else None,
                              **args_for(HybridCNNViTUNet3D, cfg, skip=("angles", "swin_heads", "volume_extent",
                                                                        "prior")))


def parameter_counts(cfg: Mapping[str, Any], model: HybridCNNViTUNet3D) -> pd.DataFrame:
    """Views, sizes and parameters of ``model`` (this preset) and of the ``prod`` model (built on the meta
    device: shapes only, no memory)."""
    with torch.device("meta"):
        prod = build(resolve(NOTEBOOK, "prod"))
    return pd.DataFrame([{"preset": p, "views": m.angles, "image": m.image_size, "volume": m.volume_size,
                          "parameters": count_parameters(m)} for p, m in ((cfg["preset"], model), ("prod", prod))])


def build_loss(cfg: Mapping[str, Any], device: torch.device | str = "cpu") -> medical.MedicalGradeLoss:
    """``MedicalGradeLoss`` weighted by ``cfg.loss_*``; its perceptual term reads the 03_pretrain encoder
    of ``cfg.perceptual_checkpoint`` under the pre-training's CT windows (off, with a notice, without one)."""
    feature_net = load_encoder(cfg["perceptual_checkpoint"]) if cfg["perceptual_checkpoint"] else None
    return medical.MedicalGradeLoss({name: cfg[f"loss_{name}"] for name in medical.TERMS}, feature_net,
                                    feature_windows=[transforms.WINDOWS[w] for w in transforms.CT_WINDOWS],
                                    hu_range=hu_range(cfg), high_freq_cutoff=cfg["high_freq_cutoff"]).to(device)


# --------------------------------------------------------------------------- training

def train_step(model: nn.Module, batch: Mapping[str, Any], loss_fn: nn.Module):
    """``(loss, terms)`` of one batch: the volume and its deep-supervision outputs against the CT."""
    volume, deep = model(batch["views"])
    return loss_fn(volume, batch["ct"], deep)


def val_step(model: nn.Module, batch: Mapping[str, Any], loss_fn: nn.Module,
             hu_range: tuple[float, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`train_step`'s loss and terms, plus PSNR and 3D SSIM of the prediction clipped to [0, 1]."""
    volume, deep = model(batch["views"])
    loss, terms = loss_fn(volume, batch["ct"], deep)
    m = reconstruction_metrics(volume.float().clamp(0, 1), batch["ct"], hu_range)
    return loss, {**terms, "psnr": m["psnr"].mean(), "ssim_3d": m["ssim"].mean()}


def steps(cfg: Mapping[str, Any], loss_fn: nn.Module) -> tuple[functools.partial, functools.partial]:
    """``(train, val)`` step functions for :func:`lib.train.fit`, bound to ``loss_fn`` (picklable)."""
    return (functools.partial(train_step, loss_fn=loss_fn),
            functools.partial(val_step, loss_fn=loss_fn, hu_range=hu_range(cfg)))


def train(cfg: Mapping[str, Any], model: nn.Module, loss_fn: nn.Module, data_loaders: Mapping[str, DataLoader],
          out_dir: str | Path, device: torch.device | None = None) -> loop.FitResult:
    """Train with :func:`lib.train.fit` (AdamW, warm-up + cosine, ``cfg``'s settings), keeping the best
    epoch by validation PSNR; ``cfg.resume`` continues the run in ``out_dir``. With ``gpus`` > 1:
    :func:`train_process` in that many processes, the result loaded into ``model``."""
    n = multigpu.processes(cfg)
    if n > 1:
        return multigpu.fit_in_processes(train_process, cfg, out_dir, model, device, n)
    step, val = steps(cfg, loss_fn)
    optimizer = loop.adamw(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    settings = loop.TrainSettings.from_config(cfg, best_metric="val_psnr", best_mode="max")
    return loop.fit(model, step, data_loaders["train"], optimizer, out_dir=out_dir, config=cfg,
                    val_loader=data_loaders["val"], val_step=val, settings=settings, resume=resume_mode(cfg),
                    device=device, ddp=DDP_OPTIONS)


# The attention gates hold BatchNorm: normalised over every rank's batch on CUDA (on a CPU each rank uses
# its own). Deep supervision: a coarse output whose loss weight is 0 would leave its head without gradient.
DDP_OPTIONS = {"sync_batchnorm": True, "find_unused_parameters": True}


def train_process(cfg: Mapping[str, Any], out_dir: Path) -> tuple[nn.Module, loop.FitResult]:
    """The training of 06_xray_to_ct in one of several processes (:mod:`lib.multigpu`, ``python -m
    lib.launch``): the notebook's data, model and loss cells, then :func:`train`."""
    data = datasets(cfg)
    model = build(cfg, volume_extent=data["train"].volume_extent(), prior=mean_volume(data["train"]))
    device = distributed.process_device(cfg.get("device"))
    return model, train(cfg, model, build_loss(cfg, device), loaders(cfg, data), out_dir)


PROCESSES = ((train_process, ""),)  # what python -m lib.launch runs: (function, sub-folder of the run)


# --------------------------------------------------------------------------- inference and evaluation

@torch.no_grad()
def predict(model: HybridCNNViTUNet3D, loader, device: torch.device, amp: bool = True) -> dict:
    """Run ``model`` (eval mode) over a loader of ``DRRVolumes`` batches: ``{"subject": [...], "views",
    "ct", "pred"}`` on the CPU, ``pred`` clipped to [0, 1] (the range the targets are mapped to)."""
    model.to(device)  # where the data goes (a no-op when it is there already)
    model.eval()
    out: dict = {"subject": [], "views": [], "ct": [], "pred": []}
    for batch in loader:
        with autocast(device, amp):
            volume = model(batch["views"].to(device))[0]
        out["subject"] += list(batch["subject"])
        out["views"].append(batch["views"])
        out["ct"].append(batch["ct"])
        out["pred"].append(volume.float().clamp(0, 1).cpu())
    return {k: v if k == "subject" else torch.cat(v) for k, v in out.items()}


@dataclass
class Evaluation:
    test: dict                 # predict()'s output on the test split
    per_patient: pd.DataFrame  # subject, method, psnr, ssim, mae_hu, cosine
    table: pd.DataFrame        # mean and std per method (rows) and metric (columns)
    rows: list[dict]           # heldout_metrics.json


def score(test: Mapping[str, Any], baseline: torch.Tensor, hu: tuple[float, float]) -> pd.DataFrame:
    """Per-patient metrics of the model's predictions and of the mean training volume, model rows first."""
    methods = {"model": test["pred"], BASELINE: baseline.expand_as(test["ct"])}
    return pd.DataFrame([{"subject": s, "method": name, **{k: float(v[i]) for k, v in m.items()}}
                         for name, pred in methods.items()
                         for m in [reconstruction_metrics(pred, test["ct"], hu)]
                         for i, s in enumerate(test["subject"])])


def heldout_rows(cfg: Mapping[str, Any], table: pd.DataFrame, n: int) -> list[dict]:
    """The family's rows of ``heldout_metrics.json``: every metric's mean beside the mean training volume's."""
    task = f"X-ray to CT, {cfg['views']} view(s), {cfg['volume_size']}^3"
    lo, hi = hu_range(cfg)
    return [row(task, name.format(lo=lo, hi=hi), table.loc["model", (k, "mean")], BASELINE, table.loc[BASELINE, (k, "mean")],
                higher_is_better=higher, n=n, headline=k == HEADLINE, seeds=str(cfg["seed"]))
            for k, (name, higher) in METRICS.items()]


def evaluate(cfg: Mapping[str, Any], model: HybridCNNViTUNet3D, loader: DataLoader, baseline: torch.Tensor,
             run_dir: str | Path, device: torch.device, checkpoint: str | Path | None = None) -> Evaluation:
    """Held-out scores per patient, of the model (the weights of ``checkpoint`` when given) and of the
    ``baseline`` volume, written to ``run_dir``: ``per_patient.csv`` / ``.json``, ``summary.json`` (mean and
    std over patients) and ``heldout_metrics.json`` (:func:`heldout_rows`)."""
    if checkpoint is not None:
        loop.load_weights(model, checkpoint)
    test = predict(model, loader, device, cfg["amp"])
    per_patient = score(test, baseline, hu_range(cfg))
    if len(test["subject"]) != len(loader.dataset) or not per_patient["ssim"].between(-1, 1).all():
        raise RuntimeError(f"evaluate: {len(test['subject'])} of {len(loader.dataset)} patients scored, "
                           f"SSIM {per_patient['ssim'].tolist()}")
    table = per_patient.groupby("method", sort=False)[list(METRICS)].agg(["mean", "std"])
    run_dir = Path(run_dir)
    write_csv(run_dir / "per_patient.csv", per_patient)
    write_json(run_dir / "per_patient.json", per_patient.to_dict("records"))
    write_json(run_dir / "summary.json", {m: {k: {"mean": table.loc[m, (k, "mean")], "std": table.loc[m, (k, "std")]}
                                              for k in METRICS} for m in table.index})
    rows = heldout_rows(cfg, table, len(test["subject"]))
    write_heldout(run_dir, rows)
    return Evaluation(test, per_patient, table, rows)


def export_nifti(cfg: Mapping[str, Any], test: Mapping[str, Any], dataset: DRRVolumes,
                 folder: str | Path) -> tuple[list[Path], Volume]:
    """Each test patient's prediction and target in HU on the CT's field of view
    (:meth:`DRRVolumes.volume_affine`) as ``<subject>_pred.nii.gz`` / ``_target.nii.gz`` in ``folder``;
    returns the paths and the first file read back (checked against what was written)."""
    lo, scale = cfg["hu_min"], cfg["hu_max"] - cfg["hu_min"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, subject in enumerate(test["subject"]):
        affine = dataset.volume_affine(subject)
        for kind, vol in (("pred", test["pred"][i, 0]), ("target", test["ct"][i, 0])):
            paths.append(save_volume((vol * scale + lo).numpy(), folder / f"{subject}_{kind}.nii.gz", affine))
    back = load_volume(paths[0], channels=(1,))
    if not (np.allclose(back.affine, dataset.volume_affine(test["subject"][0]))
            and np.allclose(back.array[0], test["pred"][0, 0].numpy() * scale + lo, atol=1e-3)):
        raise RuntimeError(f"export_nifti: {paths[0]} does not read back as written")
    return paths, back


def finish_summary(ev: Evaluation, cfg: Mapping[str, Any], sizes: pd.DataFrame, loss_fn: medical.MedicalGradeLoss,
                   train_status: str) -> dict[str, Any]:
    """The ``run.finish`` summary of 06 (08_visualize and the tests read some of these keys)."""
    model, base = ev.table.loc["model"], ev.table.loc[BASELINE]
    out = {f"test_{k}_{who}": r[(k, "mean")] for k in ("psnr", "ssim", "mae_hu")
           for who, r in (("model", model), ("baseline", base))}
    return {**out, "beats_baseline": bool(model[("psnr", "mean")] > base[("psnr", "mean")]
                                          and model[("ssim", "mean")] > base[("ssim", "mean")]),
            "views": cfg["views"], "residual_prior": cfg["residual_prior"],
            "perceptual": loss_fn.feature_net is not None,
            "parameters": {r.preset: int(r.parameters) for r in sizes.itertuples()}, "train_status": train_status}
