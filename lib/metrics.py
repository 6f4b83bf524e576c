"""Image metrics with their conventions as explicit arguments. Tensors ``[B, C, *spatial]`` in,
one value per sample ``[B]`` out (reduce yourself; report mean ± std over samples).

Conventions, because papers differ (X2CT-GAN's PSNR uses a peak of 4095 on a [0, 2500] range):

- :func:`psnr`: ``10 log10(data_range**2 / MSE)`` over every channel and voxel of a sample; say what the
  range is (e.g. HU mapped to [0, 1] with ``data_range=1``).
- :func:`ssim`: Wang et al. 2004 with a Gaussian window (sigma 1.5, 11 voxels, narrowed to fit small
  images), K1 0.01, K2 0.03, true 2D or 3D (not slice-wise), through MONAI's ``SSIMMetric``; the mean
  over the valid (unpadded) window positions, channels averaged.
- :func:`mae`: mean absolute error times ``scale`` (``scale=2000`` turns a [0, 1] volume mapped from
  [-1000, 1000] HU back into HU).
- :func:`cosine_similarity`: of the flattened sample vectors.
- :func:`dice`: binary masks (anything > 0 is foreground); two empty masks score ``empty``.
- :func:`auc`: ROC AUC of scores against binary labels over all given elements (scikit-learn).
- :func:`rsna_weighted_auc`: the RSNA 2025 aneurysm metric (per-column AUC, ``Aneurysm Present`` weighted 13,
  each location 1; single-class location columns left out, weights renormalised).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _pair(pred: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim < 3:
        raise ValueError(f"{name}: need [B, C, *spatial] tensors, got shape {tuple(pred.shape)}")
    return pred.detach().float(), target.detach().float()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) per sample; ``inf`` for identical images."""
    pred, target = _pair(pred, target, "psnr")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float, spatial_dims: int | None = None,
         win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample, true 2D or 3D (``spatial_dims`` defaults to the tensor's)."""
    from monai.metrics import SSIMMetric

    pred, target = _pair(pred, target, "ssim")
    spatial_dims = spatial_dims or pred.ndim - 2
    if spatial_dims not in (2, 3) or pred.ndim != spatial_dims + 2:
        raise ValueError(f"ssim: {spatial_dims}D SSIM needs [B, C, {'H, W' if spatial_dims == 2 else 'D, H, W'}], "
                         f"got shape {tuple(pred.shape)}")
    smallest = min(pred.shape[2:])
    win = min(win_size, smallest if smallest % 2 else smallest - 1)
    if win < 3:
        raise ValueError(f"ssim: images of size {tuple(pred.shape[2:])} are too small for a window")
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, kernel_type="gaussian",
                        win_size=win, kernel_sigma=sigma, reduction="none")
    return metric(pred, target).reshape(pred.shape[0], -1).mean(1)


def mae(pred: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean absolute error per sample, times ``scale`` (e.g. back to HU)."""
    pred, target = _pair(pred, target, "mae")
    return (pred - target).abs().flatten(1).mean(1) * scale


def cosine_similarity(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the flattened samples."""
    pred, target = _pair(pred, target, "cosine_similarity")
    return F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)


def dice(pred_mask: torch.Tensor, target_mask: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """Dice coefficient of binary masks per sample (``> 0`` is foreground)."""
    pred, target = _pair(pred_mask, target_mask, "dice")
    p, t = (pred > 0).flatten(1).float(), (target > 0).flatten(1).float()
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, float(empty)))


def auc(scores, labels) -> float:
    """ROC AUC of ``scores`` against binary ``labels`` (all elements pooled)."""
    from sklearn.metrics import roc_auc_score

    s = np.asarray(torch.as_tensor(scores).detach().float().flatten().cpu())
    y = np.asarray(torch.as_tensor(labels).detach().flatten().cpu()) > 0
    if s.shape != y.shape:
        raise ValueError(f"auc: {s.size} scores but {y.size} labels")
    if y.all() or not y.any():
        raise ValueError("auc: labels hold a single class; the ROC AUC is undefined")
    return float(roc_auc_score(y, s))


def reconstruction_metrics(pred: torch.Tensor, target: torch.Tensor,
                           hu_range: tuple[float, float] = (-1000.0, 1000.0)) -> dict[str, torch.Tensor]:
    """Per-volume metrics of the X-ray to CT family, ``[B]`` each, for volumes ``[B, 1, D, H, W]`` holding HU
    mapped linearly from ``hu_range`` to [0, 1]: ``psnr`` (dB, data range 1 on that scale), ``ssim`` (true
    3D, Gaussian window; :func:`ssim`), ``mae_hu`` (mean absolute error in HU) and ``cosine`` (cosine
    similarity of the flattened volumes)."""
    if pred.ndim != 5:
        raise ValueError(f"reconstruction_metrics needs [B, 1, D, H, W] volumes, got shape {tuple(pred.shape)}")
    with torch.autocast(pred.device.type, enabled=False):  # metrics in float32, also inside a validation step
        return {"psnr": psnr(pred, target, data_range=1.0),
                "ssim": ssim(pred, target, data_range=1.0, spatial_dims=3),
                "mae_hu": mae(pred, target, scale=hu_range[1] - hu_range[0]),
                "cosine": cosine_similarity(pred, target)}


# --------------------------------------------------------------------------- signed change maps (05_cxr_change)

def choose_threshold(scores: torch.Tensor, change: torch.Tensor, levels: int = 200) -> float:
    """The threshold on ``scores`` (``[B, 1, S, S]``, higher = more likely changed) that maximises the mean
    Dice on changed pixels over the pairs that have any. Candidates: ``levels`` quantiles of the scores
    between the median and the 99.9th percentile. Use it on the validation split only."""
    has = (change != 0).flatten(1).any(1)
    if not has.any():
        raise ValueError("choose_threshold: no pair has changed pixels")
    s, target = scores[has].float(), change[has] != 0
    flat = s.flatten()
    if flat.numel() > 2_000_000:  # torch.quantile sorts (and refuses over 2**24 elements): a fixed-seed sample
        keep = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]
        flat = flat[keep.to(flat.device)]
    # the quantile levels made on the CPU (the same numbers on every device), then where the scores are
    candidates = torch.quantile(flat, torch.linspace(0.5, 0.999, levels).to(flat.device)).unique()
    best = max(candidates.tolist(), key=lambda t: dice(s > t, target).mean().item())
    return float(best)


def change_metrics(signed: torch.Tensor, change: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Per-pair metrics of a signed change map (score ``|signed|``) thresholded at ``threshold``.

    ``dice``: Dice on changed pixels (``|signed| > threshold`` vs ``change != 0``), NaN for pairs without
    change. ``signed_dice``: the same where a pixel only counts with the right sign,
    ``2(|P+ & G+| + |P- & G-|) / (|P+| + |P-| + |G+| + |G-|)``. ``fp_area``: fraction of the image flagged
    as changed, on pairs without change (NaN elsewhere) -- the false-positive area of nuisance-only pairs.
    """
    if signed.shape != change.shape:
        raise ValueError(f"signed map {tuple(signed.shape)} and change {tuple(change.shape)} differ in shape")
    s = signed.float()
    pos_p, neg_p, pos_g, neg_g = s > threshold, s < -threshold, change > 0, change < 0
    has = (pos_g | neg_g).flatten(1).any(1)
    nan = torch.full(has.shape, float("nan"), device=has.device)
    inter = (pos_p & pos_g).flatten(1).sum(1) + (neg_p & neg_g).flatten(1).sum(1)
    total = pos_p.flatten(1).sum(1) + neg_p.flatten(1).sum(1) + pos_g.flatten(1).sum(1) + neg_g.flatten(1).sum(1)
    flagged = (pos_p | neg_p).flatten(1).float().mean(1)
    return {"dice": torch.where(has, dice(pos_p | neg_p, pos_g | neg_g), nan),
            "signed_dice": torch.where(has, 2 * inter / total.clamp_min(1), nan),
            "fp_area": torch.where(has, nan, flagged)}


def change_summary(signed: torch.Tensor, change: torch.Tensor, threshold: float) -> dict[str, float]:
    """Split-level numbers of a signed change map: mean Dice and signed Dice over pairs with change, pixel
    AUC of ``|signed|`` over every pixel of every pair (:func:`auc`), mean false-positive area over
    nuisance-only pairs, and the ``threshold``."""
    per = change_metrics(signed, change, threshold)
    return {"dice": float(per["dice"].nanmean()), "signed_dice": float(per["signed_dice"].nanmean()),
            "pixel_auc": auc(signed.abs(), change != 0), "fp_area": float(per["fp_area"].nanmean()),
            "threshold": float(threshold)}


@torch.no_grad()
def location_variance_ratio(features: torch.Tensor) -> float:
    """Share of a feature map's variance that lies across locations within a sample.

    ``features`` [B, C, *grid] -> mean over channels of var(across locations, per sample) divided by the
    mean over channels of var(across samples and locations). 0 for collapsed (location-independent)
    features, 1 when samples share their mean and only locations differ.
    """
    f = features.float().flatten(2)
    within = f.var(dim=2, unbiased=False).mean()
    total = f.transpose(0, 1).flatten(1).var(dim=1, unbiased=False).mean()
    return float(within / total.clamp(min=1e-12))


@torch.no_grad()
def content_variance_ratio(features: torch.Tensor) -> float:
    """Share of a feature map's variance that lies across inputs at the same location.

    ``features`` [B, C, *grid] (B >= 2 different inputs) -> mean over channels and locations of
    var(across samples) divided by the mean over channels of var(across samples and locations). 0 when
    the features depend on the position only (or on nothing): content has collapsed.
    """
    f = features.float().flatten(2)
    across = f.var(dim=0, unbiased=False).mean()
    total = f.transpose(0, 1).flatten(1).var(dim=1, unbiased=False).mean()
    return float(across / total.clamp(min=1e-12))


# --------------------------------------------------------------------------- CT slice series (04_ct_diffusion)

def series_scores(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> dict[str, torch.Tensor]:
    """Per series ``[B]`` of series ``[B, C, T, H, W]``: ``psnr`` over the whole series (:func:`psnr`) and
    ``ssim`` computed in 2D on every frame (:func:`ssim`), averaged over the series' frames."""
    if pred.ndim != 5:
        raise ValueError(f"series_scores needs series [B, C, T, H, W], got shape {tuple(pred.shape)}")
    frames = lambda x: x.transpose(1, 2).flatten(0, 1)  # noqa: E731  [B*T, C, H, W]
    per_frame = ssim(frames(pred), frames(target), data_range=data_range, spatial_dims=2)
    return {"psnr": psnr(pred, target, data_range=data_range), "ssim": per_frame.reshape(len(pred), -1).mean(1)}


def changed_voxel_mae(pred: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor, threshold: float = 100.0,
                      scale: float = 900.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE (in ``scale`` units per intensity unit, e.g. HU) over the voxels whose target differs from the
    baseline by more than ``threshold`` (e.g. the contrast-enhanced vessels), per sample.

    Tensors ``[B, ...]`` of one shape; returns ``(mae [B], voxels [B])``, ``mae`` NaN where no voxel changed.
    With ``pred = baseline`` it is the identity baseline. ``scale=900``: the diffusion window (1800 HU wide)
    maps onto [-1, 1], so one unit is 900 HU.
    """
    if not pred.shape == target.shape == baseline.shape:
        raise ValueError(f"changed_voxel_mae: shapes differ: pred {tuple(pred.shape)}, target "
                         f"{tuple(target.shape)}, baseline {tuple(baseline.shape)}")
    pred, target, baseline = (v.detach().float().flatten(1) for v in (pred, target, baseline))
    mask = ((target - baseline).abs() * scale > threshold).float()
    n = mask.sum(1)
    err = ((pred - target).abs() * scale * mask).sum(1)
    return torch.where(n > 0, err / n.clamp_min(1), torch.full_like(n, float("nan"))), n.long()


# --------------------------------------------------------------------------- RSNA 2025 aneurysm (09_rsna_aneurysm)

RSNA_PRESENT = "Aneurysm Present"
RSNA_PRESENT_WEIGHT, RSNA_LOCATION_WEIGHT = 13.0, 1.0


def rsna_weighted_auc(y_true, y_score, labels=None) -> dict:
    """The RSNA 2025 Intracranial Aneurysm Detection metric: weighted multilabel ROC AUC.

    ``y_true`` (binary) and ``y_score`` are ``[n, 14]`` arrays (numpy or torch) in the competition's column
    order: the 13 locations, then ``Aneurysm Present`` (``lib.data.convert.rsna2025_aneurysm.LABELS``).
    ``labels``: the 14 column names (default: ``location 0`` .. ``location 12``, ``Aneurysm Present``); the
    column named ``Aneurysm Present`` gets weight 13, every other column weight 1, and the score is
    ``(13 * AUC_present + sum(AUC_location)) / 26``. Each column's AUC is scikit-learn's ``roc_auc_score``.

    Rule for a column whose truth holds a single class (its AUC undefined, e.g. a rare location absent
    from a small validation split): its AUC is NaN, it is left out, and the weights of the remaining
    columns are renormalised: ``score = sum(w_i * AUC_i) / sum(w_i)`` over the defined columns. If
    ``Aneurysm Present`` itself is single-class, ValueError (the score would be meaningless).

    Returns ``{"score": float, "auc": {label: AUC or NaN}, "weights": {label: weight used (0 if left
    out)}, "skipped": [labels left out]}``.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(torch.as_tensor(y_true).detach().cpu().double())
    s = np.asarray(torch.as_tensor(y_score).detach().cpu().double())
    names = list(labels) if labels is not None else [f"location {i}" for i in range(13)] + [RSNA_PRESENT]
    if y.ndim != 2 or y.shape[1] != 14 or s.shape != y.shape:
        raise ValueError(f"rsna_weighted_auc: need y_true and y_score of shape [n, 14] (13 locations, then "
                         f"{RSNA_PRESENT}), got {tuple(y.shape)} and {tuple(s.shape)}")
    if len(names) != 14 or len(set(names)) != 14 or RSNA_PRESENT not in names:
        raise ValueError(f"rsna_weighted_auc: labels must be 14 distinct names including {RSNA_PRESENT!r}, "
                         f"got {len(names)}: {names}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("rsna_weighted_auc: y_true must hold only 0 and 1")
    if not np.isfinite(s).all():
        raise ValueError("rsna_weighted_auc: y_score holds NaN or infinite values")
    aucs, weights, skipped = {}, {}, []
    for j, name in enumerate(names):
        w = RSNA_PRESENT_WEIGHT if name == RSNA_PRESENT else RSNA_LOCATION_WEIGHT
        if y[:, j].min() == y[:, j].max():  # one class only (or n == 1): undefined
            if name == RSNA_PRESENT:
                raise ValueError(f"rsna_weighted_auc: {RSNA_PRESENT!r} holds a single class "
                                 f"({int(y[0, j])} for all {len(y)} series); the score is meaningless")
            aucs[name], weights[name] = float("nan"), 0.0
            skipped.append(name)
            continue
        aucs[name], weights[name] = float(roc_auc_score(y[:, j], s[:, j])), w
    score = sum(weights[n] * aucs[n] for n in names if weights[n]) / sum(weights.values())
    return {"score": float(score), "auc": aucs, "weights": weights, "skipped": skipped}
