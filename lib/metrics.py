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

    s = np.asarray(torch.as_tensor(scores).detach().float().flatten())
    y = np.asarray(torch.as_tensor(labels).detach().flatten()) > 0
    if s.shape != y.shape:
        raise ValueError(f"auc: {s.size} scores but {y.size} labels")
    if y.all() or not y.any():
        raise ValueError("auc: labels hold a single class; the ROC AUC is undefined")
    return float(roc_auc_score(y, s))
