"""The CXR change-map family (05_cxr_change): a baseline and a follow-up radiograph -> a signed change map,
against naive subtraction.

Composed from the layers below: :class:`lib.data.datasets.CXRPairs` (pairs of the built-in cohort), the
networks of :mod:`lib.models.cxr_change` (sized by a :class:`ChangeModelConfig` made from the resolved
preset), the losses of :mod:`lib.losses.cxr_change`, the change-map metrics of :mod:`lib.metrics`
(:func:`~lib.metrics.choose_threshold`, :func:`~lib.metrics.change_metrics`,
:func:`~lib.metrics.change_summary`) and :func:`lib.train.fit`. The notebook's cells call, in order:
:func:`datasets`, :func:`pair_counts`, :func:`loaders`, :func:`build` (and :func:`parameter_counts`),
:func:`pretrain_encoder` (and :func:`mim_example`), :func:`train`, :func:`evaluate` (which writes
``test_scores.csv``, ``test_pairs.csv`` and ``heldout_metrics.json``), :func:`real_radiograph`, the
figures of :mod:`lib.viz` and :func:`finish_summary`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from lib import metrics, multigpu
from lib import train as loop
from lib.atomic import write_csv
from lib.checkpoint import best_or_last
from lib.config import args_for, resolve
from lib.data import radiograph
from lib.data.paired import CXRPairs
from lib.device import autocast
from lib.families.common import count_parameters, data_root, resume_mode, split_loaders  # noqa: F401  (count_parameters: re-exported for the notebooks)
from lib.families.results import row, write_heldout
from lib.losses.cxr_change import change_loss, masked_reconstruction_loss, random_patch_mask
from lib.models.cxr_change import (ChangeModelConfig, LongitudinalMIMModel, LongitudinalMIMModelBig,
                                   MaskedReconstructionModel)

NOTEBOOK = "05_cxr_change"
SPLITS = ("train", "val", "test")
VARIANTS = {"big": LongitudinalMIMModelBig, "small": LongitudinalMIMModel}
TASK = "signed change map of a radiograph pair"
BASELINE = "naive subtraction (threshold chosen on val)"


# --------------------------------------------------------------------------- data

def datasets(cfg: Mapping[str, Any], root: str | Path | None = None) -> dict[str, CXRPairs]:
    """The train, val and test pairs of ``cfg.real_data`` (a prepared dataset of pairs with change maps, e.g.
    ``ct_to_cxr_pairs``) or of the built-in cohort ``cfg.cohort`` (built if missing), unless ``root`` is
    given, resized to ``cfg.image_size``."""
    if root is None:
        root = data_root(cfg)
    return {s: CXRPairs(root, s, cfg["image_size"]) for s in SPLITS}


def pair_counts(data: Mapping[str, CXRPairs]) -> pd.DataFrame:
    """Pairs, nuisance-only pairs and the median changed area per split."""
    return pd.DataFrame([{"split": s, "pairs": len(d), "nuisance only": int(d.pairs["nuisance_only"].astype(int).sum()),
                          "changed pixels (median)": int(d.pairs["changed_px"].median())} for s, d in data.items()])


def loaders(cfg: Mapping[str, Any], data: Mapping[str, CXRPairs]) -> dict[str, DataLoader]:
    """One loader per split: the training one shuffled (seeded by ``cfg.seed``), full batches only."""
    return split_loaders(cfg, data)


def augment_pairs(baseline: torch.Tensor, followup: torch.Tensor, change: torch.Tensor,
                  generator: torch.Generator | None = None, findings: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple:
    """Per pair, at random: swap baseline and follow-up (the change map changes sign) and mirror left-right
    (all three together). Both keep the pair physically consistent; tensors ``[B, C, S, S]``. With
    ``findings`` (each image's multi-hot ``[B, K]``), they are swapped with their images and returned fourth."""
    n, where = baseline.shape[0], generator.device if generator is not None else "cpu"  # draw where it lives
    swap = (torch.rand(n, generator=generator, device=where) < 0.5).to(baseline.device).view(n, 1, 1, 1)
    flip = (torch.rand(n, generator=generator, device=where) < 0.5).to(baseline.device).view(n, 1, 1, 1)
    b, f = torch.where(swap, followup, baseline), torch.where(swap, baseline, followup)
    c = torch.where(swap, -change, change)
    b, f, c = (torch.where(flip, x.flip(-1), x) for x in (b, f, c))
    if findings is None:
        return b, f, c
    fb, ff = findings
    s = swap.view(n, 1).to(fb.device)
    return b, f, c, (torch.where(s, ff, fb), torch.where(s, fb, ff))


# --------------------------------------------------------------------------- networks

def model_config(cfg: Mapping[str, Any]) -> ChangeModelConfig:
    """The architecture of a resolved 05_cxr_change configuration (its keys named like the fields)."""
    return ChangeModelConfig(**args_for(ChangeModelConfig, cfg))


def build(cfg: Mapping[str, Any]) -> LongitudinalMIMModelBig:
    """The change model of a resolved configuration: ``variant`` (big: U-Net decoder with skips, small:
    without) sized by :func:`model_config`."""
    model = VARIANTS.get(cfg["variant"])
    if model is None:
        raise ValueError(f"variant must be 'big' or 'small', got {cfg['variant']!r}")
    return model(model_config(cfg))


def build_mim(cfg: Mapping[str, Any]) -> MaskedReconstructionModel:
    """The masked-reconstruction model whose encoder has the change model's architecture."""
    return MaskedReconstructionModel(model_config(cfg))


def freeze_encoder(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or restart) gradients into ``model.encoder``; returns how many parameters changed state.

    Build the optimizer over ``requires_grad`` parameters after calling this.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"{type(model).__name__} has no encoder to freeze")
    n = 0
    for p in encoder.parameters():
        n += p.numel() if p.requires_grad == frozen else 0
        p.requires_grad_(not frozen)
    return n


def parameter_counts(cfg: Mapping[str, Any], model: nn.Module) -> pd.DataFrame:
    """Parameters (all, and of the encoder) of ``model`` at this preset and of both variants at ``prod``
    (built on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        prod = {m.__name__: m(model_config(resolve(NOTEBOOK, "prod"))) for m in VARIANTS.values()}
    return pd.DataFrame([{"model": name, "preset": p, "parameters": count_parameters(m),
                          "encoder": count_parameters(m.encoder)}
                         for p, ms in ((cfg["preset"], {type(model).__name__: model}), ("prod", prod))
                         for name, m in ms.items()])


# --------------------------------------------------------------------------- training

def mim_step(net: nn.Module, batch: Mapping[str, Any], *, image_size: int, patch: int, ratio: float) -> torch.Tensor:
    """Masked-reconstruction loss of both images of each pair (no change labels)."""
    x = torch.cat([batch["baseline"], batch["followup"]])
    mask = random_patch_mask(x.shape[0], image_size, patch, ratio, device=x.device)
    return masked_reconstruction_loss(net(x, mask), x, mask)


def change_step(net: nn.Module, batch: Mapping[str, Any], *, augment: bool, dice_weight: float):
    """``(loss, {"mse", "soft_dice"})`` of one batch; pairs are augmented while ``net`` trains."""
    b, f, c = batch["baseline"], batch["followup"], batch["change"]
    if net.training and augment:
        b, f, c = augment_pairs(b, f, c)
    return change_loss(net(b, f), c, dice_weight)


def steps(cfg: Mapping[str, Any], stage: str = "change") -> tuple[functools.partial, functools.partial]:
    """``(train, val)`` step functions of ``stage`` (``mim`` or ``change``) for :func:`lib.train.fit`, bound
    to ``cfg``'s settings (picklable). One function serves both: it augments only in training mode."""
    if stage == "mim":
        step = functools.partial(mim_step, image_size=cfg["image_size"], patch=cfg["mim_patch"],
                                 ratio=cfg["mim_mask_ratio"])
    elif stage == "change":
        step = functools.partial(change_step, augment=cfg["augment"], dice_weight=cfg["dice_weight"])
    else:
        raise ValueError(f"stage must be 'mim' or 'change', got {stage!r}")
    return step, step


def pretrain_encoder(cfg: Mapping[str, Any], model: nn.Module, data_loaders: Mapping[str, DataLoader],
                     out_dir: str | Path, device: torch.device | None = None
                     ) -> tuple[MaskedReconstructionModel | None, loop.FitResult | None]:
    """Masked-reconstruction pre-training (``cfg.mim_epochs``; 0: none, returns ``(None, None)``) of a
    :func:`build_mim` model in ``out_dir``; its best weights' encoder is loaded into ``model.encoder``."""
    if not cfg["mim_epochs"]:
        return None, None
    mim = build_mim(cfg)
    n = multigpu.processes(cfg)
    if n > 1:
        result = multigpu.fit_in_processes(mim_process, cfg, out_dir, mim, device, n)
    else:
        step, val = steps(cfg, "mim")
        optimizer = loop.adamw(mim.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        result = loop.fit(mim, step, data_loaders["train"], optimizer, out_dir=out_dir, config=cfg,
                          val_loader=data_loaders["val"], val_step=val, resume=resume_mode(cfg), device=device,
                          settings=loop.TrainSettings.from_config(cfg, epochs=cfg["mim_epochs"]))
    loop.load_weights(mim, result.best_checkpoint or result.checkpoint)
    model.encoder.load_state_dict(mim.encoder.state_dict())
    return mim, result


def mim_process(cfg: Mapping[str, Any], out_dir: Path) -> tuple[nn.Module, loop.FitResult]:
    """The masked-reconstruction stage of 05_cxr_change in one of several processes (:mod:`lib.multigpu`)."""
    return pretrain_encoder(cfg, build(cfg), loaders(cfg, datasets(cfg)), out_dir)


def change_process(cfg: Mapping[str, Any], out_dir: Path) -> tuple[nn.Module, loop.FitResult]:
    """The change-map training of 05_cxr_change in one of several processes (:mod:`lib.multigpu`): the
    notebook's data and model, the encoder of the masked-reconstruction stage (``out_dir/mim``), :func:`train`."""
    model = build(cfg)
    if cfg["mim_epochs"]:
        mim = loop.load_weights(build_mim(cfg), best_or_last(Path(out_dir) / "mim" / "checkpoints"))
        model.encoder.load_state_dict(mim.encoder.state_dict())
    return model, train(cfg, model, loaders(cfg, datasets(cfg)), out_dir)


PROCESSES = ((mim_process, "mim"), (change_process, ""))  # what python -m lib.launch runs: (function, sub-folder)


def mim_example(cfg: Mapping[str, Any], mim: MaskedReconstructionModel, data: CXRPairs,
                device: torch.device) -> dict[str, torch.Tensor]:
    """The first pair's follow-up of ``data``, a mask (seeded by ``cfg.seed``), what the encoder saw and the
    reconstruction with the visible pixels pasted back: ``{name: [1, 1, S, S]}`` for :func:`lib.viz`."""
    mim.to(device)  # where the data goes (a no-op when it is there already)
    x = data[0]["followup"][None].to(device)
    mask = random_patch_mask(1, cfg["image_size"], cfg["mim_patch"], cfg["mim_mask_ratio"], device=device,
                             generator=torch.Generator().manual_seed(cfg["seed"]))
    with torch.no_grad(), autocast(device, cfg["amp"]):
        rec = mim.eval()(x, mask).float()
    return {"follow-up": x, "mask": mask, "encoder input": x * (1 - mask),
            "reconstruction": torch.where(mask.bool(), rec, x)}


def train(cfg: Mapping[str, Any], model: nn.Module, data_loaders: Mapping[str, DataLoader], out_dir: str | Path,
          device: torch.device | None = None) -> loop.FitResult:
    """Train the change model with :func:`lib.train.fit` (only fusion and decoder with
    ``cfg.freeze_encoder``; with the auxiliary networks of ``adv_weight`` / ``classify_weight``,
    :mod:`lib.families.cxr_change_aux`), keep the best epoch by validation soft Dice and load its weights."""
    from lib.families import cxr_change_aux as aux

    if cfg["freeze_encoder"]:
        freeze_encoder(model)
    net = aux.wrap(cfg, model)
    n = multigpu.processes(cfg)
    if n > 1:
        result = multigpu.fit_in_processes(change_process, cfg, out_dir, net, device, n)
    else:
        step, val = steps(cfg, "change") if net is model else aux.steps(cfg)
        optimizer = loop.adamw([p for p in net.parameters() if p.requires_grad], lr=cfg["lr"],
                               weight_decay=cfg["weight_decay"])
        settings = loop.TrainSettings.from_config(cfg, best_metric="val_soft_dice", best_mode="max")
        # DDP's defaults: a frozen encoder has no gradient (DDP leaves it out); the auxiliary networks exist only
        # when their weight is not 0 and get their gradients outside the change model's forward, which DDP's hooks
        # see all the same (find_unused_parameters would mark them ready twice)
        result = loop.fit(net, step, data_loaders["train"], optimizer, out_dir=out_dir, config=cfg,
                          val_loader=data_loaders["val"], val_step=val, settings=settings, resume=resume_mode(cfg),
                          device=device)
    loop.load_weights(net, result.best_checkpoint or result.checkpoint)
    return result


# --------------------------------------------------------------------------- inference and evaluation

@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, amp: bool = True) -> dict:
    """Run a change model over a loader of :class:`lib.data.datasets.CXRPairs` batches.

    Returns ``baseline``, ``followup``, ``change``, ``pred`` (``[N, 1, S, S]`` float32 on the CPU),
    ``nuisance_only`` ``[N]`` and ``pair`` (names).
    """
    model.to(device)  # where the data goes (a no-op when it is there already)
    was = model.training
    model.eval()
    out: dict = {k: [] for k in ("baseline", "followup", "change", "pred", "nuisance_only", "pair")}
    for batch in loader:
        b, f = batch["baseline"].to(device), batch["followup"].to(device)
        with autocast(device, amp):
            y = model(b, f)
        out["pred"].append(y.float().cpu())
        for k in ("baseline", "followup", "change", "nuisance_only"):
            if k in batch:  # pairs without change maps (MS-CXR-T) have no change
                out[k].append(torch.as_tensor(batch[k]).cpu())
        out["pair"] += list(batch["pair"])
    model.train(was)
    return {k: v if k == "pair" else torch.cat(v) for k, v in out.items() if k == "pair" or v}


def subtraction_baseline(baseline: torch.Tensor, followup: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """The naive baseline's signed map: ``followup / a - baseline``, ``a`` the least-squares gain between them.

    Registration-free: the only alignment is of intensity (exposure differs between visits); nothing is
    moved. Optionally smoothed by a sampled Gaussian of ``sigma`` pixels (MONAI ``GaussianFilter``, 4 sigma,
    zero padding). Its change score is ``abs()`` of the result. ``[B, C, S, S]`` in and out.
    """
    if baseline.shape != followup.shape or baseline.ndim != 4:
        raise ValueError(f"baseline and followup must share one shape [B, C, S, S], got {tuple(baseline.shape)} "
                         f"and {tuple(followup.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    b, f = baseline.float(), followup.float()
    gain = (f * b).flatten(1).sum(1) / (b * b).flatten(1).sum(1).clamp_min(1e-12)
    d = f / gain.clamp_min(1e-6).view(-1, 1, 1, 1) - b
    if sigma > 0:
        from monai.networks.layers import GaussianFilter

        d = GaussianFilter(2, sigma, truncated=4.0, approx="sampled")(d)
    return d


def _model_map(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return p["pred"]


def _subtraction_map(p: Mapping[str, torch.Tensor], sigma: float = 0.0) -> torch.Tensor:
    return subtraction_baseline(p["baseline"], p["followup"], sigma)


def methods(cfg: Mapping[str, Any]) -> dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]]:
    """The scored methods, model first: each maps :func:`predict`'s output to a signed change map."""
    sigma = cfg["baseline_sigma"]
    return {"model": _model_map, "subtraction": _subtraction_map,
            f"subtraction, smoothed {sigma:g} px": functools.partial(_subtraction_map, sigma=sigma)}


@dataclass
class Evaluation:
    test: dict                        # predict()'s output on the test split
    signed: dict[str, torch.Tensor]   # each method's signed map of the test pairs
    scores: pd.DataFrame              # per method (index): dice, signed_dice, pixel_auc, fp_area, threshold
    pairs: pd.DataFrame               # per test pair: what changed, model and subtraction dice and fp_area
    rows: list[dict]                  # heldout_metrics.json


def heldout_rows(scores: pd.DataFrame, pairs: pd.DataFrame) -> list[dict]:
    """The family's rows of ``heldout_metrics.json``: the model beside the naive subtraction; the headline is
    Dice on changed pixels over the pairs with change. No false-positive row without nuisance-only pairs
    (its value would be NaN)."""
    m, b = scores.loc["model"], scores.loc["subtraction"]
    nuisance = pairs["nuisance_only"].astype(int).astype(bool)
    n_all, n_nuisance = len(pairs), int(nuisance.sum())
    out = [row(TASK, "Dice on changed pixels (mean over pairs with change)", m["dice"], BASELINE, b["dice"], True,
               n_all - n_nuisance, headline=True),
           row(TASK, "pixel AUC of |change| (all pixels of all pairs)", m["pixel_auc"], BASELINE, b["pixel_auc"],
               True, n_all)]
    if n_nuisance:
        out.append(row(TASK, "false-positive area on nuisance-only pairs (fraction of pixels)", m["fp_area"],
                       BASELINE, b["fp_area"], False, n_nuisance))
    return out


def evaluate(cfg: Mapping[str, Any], model: nn.Module, data_loaders: Mapping[str, DataLoader],
             run_dir: str | Path, device: torch.device) -> Evaluation:
    """Score every method of :func:`methods` on the test pairs at the threshold that maximises its mean Dice
    on the validation pairs, and write ``test_scores.csv``, ``test_pairs.csv`` (per pair: model and
    subtraction) and ``heldout_metrics.json`` (:func:`heldout_rows`) to ``run_dir``."""
    val, test = (predict(model, data_loaders[s], device, cfg["amp"]) for s in ("val", "test"))
    summaries, signed = [], {}
    for name, method in methods(cfg).items():
        threshold = metrics.choose_threshold(method(val).abs(), val["change"])  # validation split only
        signed[name] = method(test)
        summaries.append({"method": name, **metrics.change_summary(signed[name], test["change"], threshold)})
    scores = pd.DataFrame(summaries).set_index("method")
    dataset = data_loaders["test"].dataset
    if len(test["pair"]) != len(dataset) or not scores["pixel_auc"].between(0, 1).all():
        raise RuntimeError(f"evaluate: {len(test['pair'])} of {len(dataset)} pairs scored, "
                           f"pixel AUC {scores['pixel_auc'].tolist()}")
    pairs = dataset.pairs[["pair", "appeared", "resolved", "nuisance_only", "changed_px"]].copy()
    for name in ("model", "subtraction"):
        per = metrics.change_metrics(signed[name], test["change"], scores.loc[name, "threshold"])
        pairs[f"{name} dice"], pairs[f"{name} fp_area"] = per["dice"].numpy(), per["fp_area"].numpy()
    run_dir = Path(run_dir)
    write_csv(run_dir / "test_scores.csv", scores.reset_index())
    write_csv(run_dir / "test_pairs.csv", pairs)
    rows = heldout_rows(scores, pairs)
    write_heldout(run_dir, rows)
    return Evaluation(test, signed, scores, pairs, rows)


def real_radiograph(cfg: Mapping[str, Any], model: nn.Module, path: str | Path, threshold: float,
                    device: torch.device) -> tuple[radiograph.Radiograph, torch.Tensor, float]:
    """A real DICOM radiograph through the preprocessing and ``model`` as its own follow-up: the radiograph,
    ``model(x, x)`` ``[1, 1, S, S]`` on the CPU and the share of its pixels above ``threshold``."""
    model.to(device)  # where the data goes (a no-op when it is there already)
    xr = radiograph.read_radiograph(path, cfg["image_size"])
    x = xr.tensor().to(device)
    with torch.no_grad(), autocast(device, cfg["amp"]):
        y = model.eval()(x, x).float().cpu()
    if y.shape != (1, 1, cfg["image_size"], cfg["image_size"]) or not torch.isfinite(y).all():
        raise RuntimeError(f"real_radiograph: {path} gave a map of shape {tuple(y.shape)} with non-finite values")
    return xr, y, float((y.abs() > threshold).float().mean())


def finish_summary(ev: Evaluation, cfg: Mapping[str, Any], sizes: pd.DataFrame, flagged: float) -> dict[str, Any]:
    """The ``run.finish`` summary of 05 (tests and 08_visualize read some of these keys)."""
    s = ev.scores
    return {"test_dice_model": s.loc["model", "dice"], "test_dice_subtraction": s.loc["subtraction", "dice"],
            "test_dice_subtraction_smoothed": s.iloc[2]["dice"], "test_scores": s.reset_index().to_dict("records"),
            "parameters": {f"{r.model} @ {r.preset}": int(r.parameters) for r in sizes.itertuples()},
            "mim_epochs": cfg["mim_epochs"], "freeze_encoder": cfg["freeze_encoder"],
            "real_radiograph_flagged": flagged}
