"""The CT series diffusion family (04_ct_diffusion): non-contrast → contrast chest CT slice series.

Stage 1 trains a grayscale 2D VAE frame by frame (:class:`lib.models.vae.FrameVAE`); stage 2 a series
denoiser (:class:`lib.models.diffusion.SeriesDenoiser`) on the frozen VAE's latents, conditioned on the
non-contrast latents; the losses are in :mod:`lib.losses.diffusion`. This module owns what is specific to
the family, one function per heavy cell of the notebook: the networks from a resolved preset
(:func:`build_vae`, :func:`build_denoiser`), the paired series (:func:`load_pairs`), the two stages
(:func:`train_vae`, :func:`encode_latents`, :func:`train_denoiser`, with module-level step functions bound
by :func:`vae_steps` / :func:`denoiser_steps`: picklable), the VAE's ceiling (:func:`vae_ceiling`), the
translation (:func:`predict`; the sampling loop is :mod:`lib.families.ct_diffusion_sampling`), the
held-out scores (:func:`evaluate` → ``heldout_metrics.json``) and the NIfTI export (:func:`export_nifti`).

Scores are computed on the diffusion window scaled to [-1, 1], so PSNR and SSIM use a data range of 2;
the headline is the MAE in HU over the voxels whose target differs from the input by more than
``threshold_hu`` (the enhanced blood pool), pooled over all held-out voxels, beside the identity (the
input copied) and the VAE's round trip of the target (the ceiling).
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from lib import metrics
from lib.families.common import data_root
from lib.data.cache import ArrayCache
from lib.data.paired import SeriesPairs
from lib.data.io import save_volume
from lib.data.transforms import WINDOWS
from lib.device import autocast
from lib.families.ct_diffusion_sampling import (ddim_scheduler, noise_scheduler, sample,  # noqa: F401 (re-exported)
                                                schedule_of, translate)
from lib.families.results import row, write_heldout
from lib.losses.diffusion import diffusion_loss, vae_loss
from lib.models.diffusion import LatentDiffusion, SeriesDenoiser
from lib.models.vae import FrameVAE
from lib.loaders import loader
from lib.train import FitResult, load_weights

DATA_RANGE = 2.0  # the diffusion window scaled to [-1, 1] (lib.data.datasets.SeriesPairs)
HU_PER_UNIT = WINDOWS["diffusion"][1] / DATA_RANGE  # 900 HU per unit of the [-1, 1] scale
# Memory, not modelling: the VAE encodes at most this many pixels (about 4M: 64 frames of 256²) per pass.
ENCODE_PIXELS, MIN_ENCODE_FRAMES = 2 ** 22, 8
VAE_VAL_FRAMES = 128  # cost of stage-1 validation: about this many validation frames (every k-th)


# --------------------------------------------------------------------------- networks

def build_vae(cfg: Mapping[str, Any]) -> FrameVAE:
    """The :class:`FrameVAE` of a resolved preset: ``vae_channels``, ``latent_channels``, ``vae_res_blocks``,
    ``norm_groups``, ``vae_mid_attention``, ``scale_factor``, and a discriminator of ``disc_channels`` and
    ``disc_layers`` when ``adv_weight > 0``."""
    adversarial = cfg["adv_weight"] > 0
    return FrameVAE(cfg["vae_channels"], cfg["latent_channels"], cfg["vae_res_blocks"], cfg["norm_groups"],
                    mid_attention=cfg["vae_mid_attention"], scale_factor=cfg["scale_factor"],
                    discriminator_channels=cfg["disc_channels"] if adversarial else None,
                    discriminator_layers=cfg["disc_layers"])


def build_denoiser(cfg: Mapping[str, Any]) -> SeriesDenoiser:
    """The :class:`SeriesDenoiser` of a resolved preset: conditioned on the baseline latents
    (``latent_channels`` each), ``model_channels``, ``channel_mult``, ``num_res_blocks``, ``attention_levels``,
    temporal attention at every level if ``temporal_attention``, ``num_head_channels``, ``norm_groups``."""
    return SeriesDenoiser(cfg["latent_channels"], cfg["latent_channels"], cfg["model_channels"], cfg["channel_mult"],
                          cfg["num_res_blocks"], cfg["attention_levels"],
                          (cfg["temporal_attention"],) * len(cfg["channel_mult"]), cfg["num_head_channels"],
                          cfg["norm_groups"])


def parameter_counts(vae: FrameVAE, denoiser: SeriesDenoiser) -> dict[str, int]:
    """Parameters of the autoencoder, its discriminator (0 without one) and the denoiser."""
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    return {"vae": count(vae.autoencoder), "discriminator": count(vae.discriminator), "denoiser": count(denoiser)}


# --------------------------------------------------------------------------- data

def load_pairs(cfg: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """The paired series per split, of ``cfg.real_data`` (registered phase pairs, e.g. Coltea's native ->
    ``target_phase``) or of the built-in cohort: ``(datasets, items, tensors)``; ``tensors[split]`` holds
    ``baseline`` and ``target`` ``[N, 1, T, H, W]`` float32 in [-1, 1]. Training and validation keep whole
    series (their central ``series_frames`` slices when set; series of unequal length are cut to the
    shortest of their split); the test split takes the central run of ``frames`` slices."""
    root, cache = data_root(cfg), ArrayCache()
    kept = cfg["series_frames"] or None
    splits = {s: SeriesPairs(root, s, frames=cfg["frames"] if s == "test" else kept, size=cfg["frame_size"],
                             cache=cache, target=cfg["target_phase"]) for s in ("train", "val", "test")}
    series = {s: [ds[i] for i in range(len(ds))] for s, ds in splits.items()}
    data = {s: {k: torch.stack(common_length([it[k] for it in items], s)) for k in ("baseline", "target")}
            for s, items in series.items()}
    for s, d in data.items():
        print(f"{s:5s}: {len(series[s]):3d} series, source and target {tuple(d['target'].shape)} "
              f"{d['target'].dtype}")
    bad = [s for s, d in data.items() for x in d.values()
           if not (x.dtype == torch.float32 and x.shape[1] == 1 and x.abs().max() <= 1)]
    if bad:
        raise ValueError(f"splits {bad}: series must be float32 [N, 1, T, H, W] in [-1, 1]")
    return splits, series, data


def common_length(stacks: Sequence[torch.Tensor], split: str = "") -> list[torch.Tensor]:
    """Frame stacks ``[1, T, H, W]`` cut to their central run of the shortest ``T`` (noted when any is cut)."""
    n = min(x.shape[1] for x in stacks)
    if any(x.shape[1] != n for x in stacks):
        print(f"{split}: series of {sorted({x.shape[1] for x in stacks})} slices keep their central {n}")
    return [x[:, (x.shape[1] - n) // 2:(x.shape[1] - n) // 2 + n] for x in stacks]


def frames_of(pair: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every frame of every series of a split, non-contrast and contrast, as series of one frame
    ``[N, 1, 1, H, W]`` (the samples of stage 1)."""
    x = torch.cat([pair["baseline"], pair["target"]])
    return x.transpose(1, 2).reshape(-1, 1, 1, *x.shape[-2:])


def random_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """One random ``size × size`` crop (the same for the whole batch) of series ``[..., H, W]``, from torch's
    RNG; ``size`` 0 or the full size returns ``x``. The VAE is convolutional: crops train it at a fraction
    of the cost of whole frames."""
    h, w = x.shape[-2:]
    if not size or (size == h and size == w):
        return x
    if not 0 < size <= min(h, w):
        raise ValueError(f"crop size {size} must be in (0, {min(h, w)}] for frames of {h}x{w}")
    i, j = (int(torch.randint(0, n - size + 1, ())) for n in (h, w))
    return x[..., i:i + size, j:j + size]


def series_windows(x: torch.Tensor, frames: int, stride: int = 1) -> torch.Tensor:
    """All runs of ``frames`` consecutive frames of series ``[B, C, T, h, w]`` with ``stride``:
    ``[B * n, C, frames, h, w]``, series by series (for training on every window of precomputed latents)."""
    if x.ndim != 5 or not 1 <= frames <= x.shape[2] or stride < 1:
        raise ValueError(f"series_windows: need [B, C, T, h, w] with 1 <= frames <= T and stride >= 1; got shape "
                         f"{tuple(x.shape)}, frames={frames}, stride={stride}")
    w = x.unfold(2, frames, stride)  # [B, C, n, h, w, frames]
    return w.permute(0, 2, 1, 5, 3, 4).reshape(-1, x.shape[1], frames, *x.shape[3:])


def encode_chunk(frame_size: int) -> int:
    """Frames per VAE pass (memory; see :data:`ENCODE_PIXELS`)."""
    return max(MIN_ENCODE_FRAMES, ENCODE_PIXELS // frame_size ** 2)


# --------------------------------------------------------------------------- step functions

def vae_train_step(model: torch.nn.Module, batch: Sequence[torch.Tensor], *, crop: int, kl_weight: float,
                   ms_ssim_weight: float, adv_weight: float):
    """Stage 1: the full VAE loss on a random crop (``crop`` 0: whole frames) of the batch's frames."""
    return vae_loss(model, random_crop(batch[0], crop), kl_weight, ms_ssim_weight, adv_weight)


def vae_val_step(model: torch.nn.Module, batch: Sequence[torch.Tensor], *, kl_weight: float):
    """Stage-1 validation: L1 + KL on whole frames (no MS-SSIM or adversarial term)."""
    return vae_loss(model, batch[0], kl_weight)


def vae_steps(cfg: Mapping[str, Any]) -> tuple[partial, partial]:
    """``(train_step, val_step)`` of stage 1 for :func:`lib.train.fit`, bound to the preset's weights."""
    return (partial(vae_train_step, crop=cfg["vae_crop"], kl_weight=cfg["kl_weight"],
                    ms_ssim_weight=cfg["ms_ssim_weight"], adv_weight=cfg["adv_weight"]),
            partial(vae_val_step, kl_weight=cfg["kl_weight"]))


def denoiser_step(model: torch.nn.Module, batch: Sequence[torch.Tensor], *, scheduler):
    """Stage 2: the diffusion loss of a batch ``(target latents, baseline latents)``."""
    target_latents, baseline_latents = batch
    return diffusion_loss(model, target_latents, baseline_latents, scheduler)


def denoiser_steps(cfg: Mapping[str, Any]) -> tuple[partial, partial]:
    """``(train_step, val_step)`` of stage 2 (the same loss), bound to the preset's noise schedule."""
    step = partial(denoiser_step, scheduler=noise_scheduler(**schedule_of(cfg)))
    return step, step


# --------------------------------------------------------------------------- stage 1: the VAE

def vae_loaders(cfg: Mapping[str, Any], data: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[DataLoader, DataLoader]:
    """Every training frame (shuffled, seeded) and about :data:`VAE_VAL_FRAMES` validation frames."""
    val_frames = frames_of(data["val"])
    train = loader(TensorDataset(frames_of(data["train"])), cfg, train=True, batch_size=cfg["vae_batch_size"],
                   workers=False)
    val = loader(TensorDataset(val_frames[:: max(1, len(val_frames) // VAE_VAL_FRAMES)]), cfg, train=False,
                 batch_size=cfg["vae_batch_size"], workers=False)
    print(f"{len(train.dataset)} training frames, {len(train)} steps per epoch; {len(val.dataset)} validation frames")
    return train, val


def train_vae(cfg: Mapping[str, Any], vae: FrameVAE, denoiser: SeriesDenoiser, data: Mapping, run,
              time_budget_s: float | None = None) -> FitResult | None:
    """Stage 1, leaving ``vae`` trained (or loaded) and in eval mode; the fit result, None without training.

    A ``denoiser_checkpoint`` holds the VAE it was trained with (and its scale factor): loaded into
    ``vae`` and ``denoiser``, and ``vae_epochs`` must be 0. Otherwise from ``vae_checkpoint`` if given,
    then ``vae_epochs`` of training into ``run.dir / "vae"`` (a stop at the time budget raises, so that
    stage 2 never runs on a half-trained VAE).
    """
    result = None
    if cfg["denoiser_checkpoint"]:
        if cfg["vae_epochs"]:
            raise ValueError("denoiser_checkpoint holds its own VAE: set vae_epochs=0")
        load_weights(LatentDiffusion(vae, denoiser), cfg["denoiser_checkpoint"])
    else:
        if cfg["vae_checkpoint"]:
            load_weights(vae, cfg["vae_checkpoint"])
        if cfg["vae_epochs"]:
            from lib.families.ct_diffusion_processes import fit_stage

            result = fit_stage("vae", cfg, vae, data, run, time_budget_s)
            print(result.status, {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)})
            if result.status != "completed":
                raise RuntimeError(f"stage 1 stopped at the time budget; continue it with resume=True and "
                                   f"MEDIMG_RUN_ID={run.run_id}")
            load_weights(vae, result.checkpoint)
        elif not cfg["vae_checkpoint"]:
            raise ValueError("vae_epochs=0 needs a vae_checkpoint or a denoiser_checkpoint")
    vae.eval()
    return result


def encode_latents(cfg: Mapping[str, Any], vae: FrameVAE, data: Mapping, device: torch.device) -> dict:
    """Scaled latents (posterior means, on the CPU) of every training and validation series, ``{split: {baseline,
    target}}``; unless the VAE has a scale factor, it becomes 1 / std of the training latents first."""
    vae.to(device)  # where the data goes (a no-op when it is there already)
    computed = not vae.has_scale_factor
    chunk = encode_chunk(cfg["frame_size"])
    with torch.no_grad(), autocast(device):
        unscaled = {s: {k: vae.encode_unscaled(x.to(device), chunk).float() for k, x in data[s].items()}
                    for s in ("train", "val")}
    if computed:
        vae.fit_scale_factor(list(unscaled["train"].values()))
    # on the CPU: the loaders pin them (pinning a CUDA tensor fails) and fit moves each batch to the device
    latents = {s: {k: (z * vae.scale_factor).cpu() for k, z in d.items()} for s, d in unscaled.items()}
    std = float(torch.cat([z.flatten() for z in latents["train"].values()]).std())
    print(f"scale factor {float(vae.scale_factor):.4f} ({'computed' if computed else 'given'}); "
          f"training latents {tuple(latents['train']['target'].shape)}, std {std:.4f}")
    if computed and abs(std - 1) >= 1e-3:
        raise RuntimeError(f"the scaled training latents have std {std}, not 1")
    return latents


def scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per series ``[B]``: PSNR over the whole series and SSIM per frame averaged, on the [-1, 1] window
    (data range :data:`DATA_RANGE`)."""
    return metrics.series_scores(pred, target, data_range=DATA_RANGE)


def vae_ceiling(cfg: Mapping[str, Any], vae: FrameVAE, target: torch.Tensor, device: torch.device
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VAE's round trip of the held-out targets and its :func:`scores`: no translation can do better."""
    vae.to(device)  # where the data goes (a no-op when it is there already)
    chunk = encode_chunk(cfg["frame_size"])
    with torch.no_grad(), autocast(device):
        recon = vae.decode(vae.encode(target.to(device), chunk), chunk).float().cpu()
    ceiling = scores(recon, target)
    print(f"VAE reconstruction of {len(target)} held-out contrast series: PSNR {ceiling['psnr'].mean():.2f} dB, "
          f"SSIM {ceiling['ssim'].mean():.4f}")
    return recon, ceiling


# --------------------------------------------------------------------------- stage 2: the denoiser

def denoiser_loaders(cfg: Mapping[str, Any], latents: Mapping) -> tuple[DataLoader, DataLoader]:
    """Every run of ``frames`` latent frames (every ``window_stride``-th start) of the training series,
    shuffled and seeded; non-overlapping runs of the validation series. Batches: (target, baseline)."""
    windows = {s: TensorDataset(*(series_windows(latents[s][k], cfg["frames"],
                                                 cfg["window_stride"] if s == "train" else cfg["frames"])
                                  for k in ("target", "baseline"))) for s in ("train", "val")}
    train = loader(windows["train"], cfg, train=True, workers=False)
    val = loader(windows["val"], cfg, train=False, workers=False)
    print(f"{len(windows['train'])} training windows ({len(train)} steps per epoch), "
          f"{len(windows['val'])} validation windows")
    return train, val


def train_denoiser(cfg: Mapping[str, Any], ldm: LatentDiffusion, latents: Mapping, run,
                   time_budget_s: float | None = None) -> FitResult | None:
    """Stage 2: ``epochs`` of the denoiser on the frozen VAE's latents into ``run.dir / "denoiser"`` (the
    checkpoints hold the VAE too), then its best (EMA, if any) weights; leaves ``ldm`` in eval mode.
    ``epochs=0`` needs a ``denoiser_checkpoint`` (already loaded by :func:`train_vae`)."""
    result = None
    if cfg["epochs"]:
        from lib.families.ct_diffusion_processes import fit_stage

        result = fit_stage("denoiser", cfg, ldm, latents, run, time_budget_s)
        load_weights(ldm, result.checkpoint)  # the EMA weights when ema_decay is set
        print(result.status, {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)})
    elif not cfg["denoiser_checkpoint"]:
        raise ValueError("epochs=0 needs a denoiser_checkpoint")
    ldm.eval()
    return result


def predict(cfg: Mapping[str, Any], ldm: LatentDiffusion, baseline: torch.Tensor, device: torch.device
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """The translation of the held-out ``baseline`` series ``[N, 1, T, H, W]`` (DDIM, ``ddim_steps``,
    ``eta``, ``sample_seed``) and its timing per frame (encoding, sampling and decoding); checks that the
    same seed gives the same first series again."""
    ldm.to(device)  # where the data goes (a no-op when it is there already)
    sampling = dict(num_inference_steps=cfg["ddim_steps"], eta=cfg["eta"], seed=cfg["sample_seed"], **schedule_of(cfg))
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast(device):
        generated = translate(ldm, baseline.to(device), progress=True, **sampling).cpu()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_frames = generated.shape[0] * generated.shape[2]
    timing = {"frames": n_frames, "ddim_steps": cfg["ddim_steps"], "ms_per_frame_wall": 1000 * wall / n_frames,
              "ms_per_frame_cpu": 1000 * cpu / n_frames}
    print(f"{n_frames} frames of {cfg['frame_size']}x{cfg['frame_size']} in {wall:.1f} s: "
          f"{timing['ms_per_frame_wall']:.1f} ms per frame (wall), {timing['ms_per_frame_cpu']:.1f} ms CPU")
    with autocast(device):
        again, first = (translate(ldm, baseline[:1].to(device), **sampling).cpu() for _ in range(2))
    if not torch.equal(again, first):
        raise RuntimeError("the same seed gave two different series")
    if generated.dtype != torch.float32 or generated.shape != baseline.shape:
        raise RuntimeError(f"generated {generated.dtype} {tuple(generated.shape)}, expected float32 "
                           f"{tuple(baseline.shape)}")
    return generated, timing


# --------------------------------------------------------------------------- scores

def _pooled(mae: torch.Tensor, n: torch.Tensor) -> float:
    """MAE over every changed voxel of every series (series without any count for nothing)."""
    return float(torch.nansum(mae * n) / n.sum())


def score_series(predictions: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor], items: Sequence[Mapping],
                 threshold_hu: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per (comparison, held-out series): PSNR, SSIM, MAE over the changed voxels and their number;
    and the MAE pooled over the changed voxels per comparison. ``predictions``: name → ``[N, 1, T, H, W]``."""
    target, baseline = test["target"], test["baseline"]
    rows, pooled = [], {}
    for name, pred in predictions.items():
        s = scores(pred, target)
        mae, n = metrics.changed_voxel_mae(pred, target, baseline, threshold_hu, HU_PER_UNIT)
        pooled[name] = _pooled(mae, n)
        rows += [{"comparison": name, "subject": it["subject"], "psnr_db": float(s["psnr"][i]),
                  "ssim": float(s["ssim"][i]), "mae_changed_hu": float(mae[i]), "changed_voxels": int(n[i])}
                 for i, it in enumerate(items)]
    return pd.DataFrame(rows), pooled


def scores_table(per_series: pd.DataFrame, pooled: Mapping[str, float]) -> pd.DataFrame:
    """Mean and std of PSNR and SSIM per comparison, and the pooled MAE over the changed voxels."""
    table = per_series.groupby("comparison", sort=False)[["psnr_db", "ssim"]].agg(["mean", "std"])
    table.columns = [f"{a}_{b}" for a, b in table.columns]
    return table.assign(mae_changed_hu=pd.Series(pooled)).round(4)


def heldout_rows(per_series: pd.DataFrame, threshold_hu: float) -> list[dict[str, Any]]:
    """The family's held-out rows (:mod:`lib.families.results`) from the per-series scores: the headline
    MAE over the changed voxels beside the identity, then beside the VAE ceiling; PSNR and SSIM beside the
    identity; PSNR beside the ceiling."""
    by = {name: g for name, g in per_series.groupby("comparison")}
    model, identity, ceiling = by["translation"], by["identity"], by["vae_ceiling"]

    def pooled(g):  # float64 over the per-series values (what lib.summary computed before the family layer)
        return float((g["mae_changed_hu"] * g["changed_voxels"]).sum() / g["changed_voxels"].sum())

    n, task = len(model), "non-contrast -> contrast chest CT series"
    mae = f"MAE (HU) over voxels the contrast changes by > {threshold_hu:g} HU"
    psnr = "PSNR (dB), diffusion window [-1, 1], data range 2"
    copied, round_trip = "identity (input copied)", "VAE round trip of the target (ceiling)"
    return [row(task, mae, pooled(model), copied, pooled(identity), False, n, headline=True),
            row(task, mae, pooled(model), round_trip, pooled(ceiling), False, n),
            row(task, psnr, model["psnr_db"].mean(), copied, identity["psnr_db"].mean(), True, n),
            row(task, "SSIM (2D per frame, averaged)", model["ssim"].mean(), copied, identity["ssim"].mean(), True, n),
            row(task, psnr, model["psnr_db"].mean(), round_trip, ceiling["psnr_db"].mean(), True, n)]


def evaluate(cfg: Mapping[str, Any], run, predictions: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor],
             items: Sequence[Mapping]) -> list[dict[str, Any]]:
    """Score ``predictions`` (``vae_ceiling``, ``translation``, ``identity``: name → held-out series) against
    the test targets; write ``scores_per_series.csv``, ``scores.csv`` and ``heldout_metrics.json`` in the run
    folder; return the held-out rows."""
    per_series, pooled = score_series(predictions, test, items, cfg["threshold_hu"])
    run.save_csv("scores_per_series.csv", per_series)
    run.save_csv("scores.csv", scores_table(per_series, pooled).reset_index())
    rows = heldout_rows(per_series, cfg["threshold_hu"])
    write_heldout(run.dir, rows)
    return rows


def outcome(run_dir: str | os.PathLike) -> dict[str, float]:
    """The run's closing numbers, read back from its ``scores_per_series.csv``: mean PSNR of the translation
    and the identity, and the pooled changed-voxel MAE of the translation, the identity and the ceiling
    (float32, as :func:`score_series` pools them)."""
    t = pd.read_csv(Path(run_dir) / "scores_per_series.csv")
    by = {name: g for name, g in t.groupby("comparison")}
    pooled = {name: _pooled(torch.tensor(g["mae_changed_hu"].to_numpy(), dtype=torch.float32),
                            torch.tensor(g["changed_voxels"].to_numpy())) for name, g in by.items()}
    return {"translation_psnr": float(by["translation"]["psnr_db"].mean()),
            "identity_psnr": float(by["identity"]["psnr_db"].mean()), "mae_changed_hu": pooled["translation"],
            "identity_mae_changed_hu": pooled["identity"], "vae_ceiling_mae_changed_hu": pooled["vae_ceiling"]}


def closing_note(run_dir: str | os.PathLike, threshold_hu: float) -> str:
    """One sentence with the run's headline numbers (read from its files)."""
    t = pd.read_csv(Path(run_dir) / "scores_per_series.csv")
    translation, identity = (t[t["comparison"] == c] for c in ("translation", "identity"))
    wins = int((translation["mae_changed_hu"].to_numpy() < identity["mae_changed_hu"].to_numpy()).sum())
    o = outcome(run_dir)
    return (f"MAE over the {identity['changed_voxels'].sum()} held-out voxels changed by more than {threshold_hu:g} HU: "
            f"translation {o['mae_changed_hu']:.1f} HU, identity {o['identity_mae_changed_hu']:.1f} HU, VAE ceiling "
            f"{o['vae_ceiling_mae_changed_hu']:.1f} HU; the translation wins on {wins} of {len(translation)} series")


# --------------------------------------------------------------------------- export

def to_hu(x: torch.Tensor) -> np.ndarray:
    """A series on the [-1, 1] diffusion window back in HU (numpy)."""
    return WINDOWS["diffusion"][0] + x.detach().cpu().numpy() * WINDOWS["diffusion"][1] / 2


def export_nifti(run, dataset: SeriesPairs, items: Sequence[Mapping], series: Mapping[str, torch.Tensor],
                 count: int) -> list[Path]:
    """The first ``count`` held-out series of every entry of ``series`` (name → ``[N, 1, T, H, W]``) as
    ``samples/<subject>_<name>.nii.gz`` in HU, with the source volume's affine (frames back in RAS, the
    in-plane resize undone in the voxel size)."""
    written = []
    for i, item in enumerate(items[:count]):
        affine = dataset.series_affine(item["subject"], item["start"])
        for name, x in series.items():
            path = run.path("samples", f"{item['subject']}_{name}.nii.gz")
            written.append(save_volume(to_hu(x[i, 0]).astype(np.float32), path, affine))
    return written
