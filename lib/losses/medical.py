"""``MedicalGradeLoss`` for X-ray -> CT reconstruction (06_xray_to_ct).

Six terms, each weighted separately (design note D; weights of the research note in brackets)::

    l1                mean |pred - target|                                              [1.0]
    ssim              1 - 3D SSIM (MONAI's definition: Gaussian window 11, sigma 1.5)    [0.3]
    perceptual        mean over feature maps of |phi(pred) - phi(target)|, phi a frozen  [0.2]
                      3D network (the 03_pretrain encoder); off without one
    edge              mean |  |Sobel(pred)| - |Sobel(target)|  |, 3D Sobel gradient       [0.2]
                      magnitude (the kernels of MONAI's SobelGradients)
    deep_supervision  mean over the coarser outputs of L1 against the target             [0.2]
                      area-averaged to their size
    frequency         mean |FFT(pred) - FFT(target)| over the high frequencies           [0.3]
                      (radius > ``high_freq_cutoff`` cycles/voxel; orthonormal 3D FFT)

The loss returns ``(total, terms)``: ``total = sum(weight * term)`` and ``terms`` the unweighted value of
every term that is on, for the training loop to log. A term is on when its weight is > 0 and it can be
computed (the perceptual term needs a feature network; without one it is off and the constructor
logs a notice, kept in ``.notice``).

The family's evaluation metrics (PSNR, 3D SSIM, MAE in HU, cosine) are
:func:`lib.metrics.reconstruction_metrics`; :func:`ssim_3d` here is the loss's own, differentiable SSIM.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

TERMS = ("l1", "ssim", "perceptual", "edge", "deep_supervision", "frequency")
DEFAULT_WEIGHTS = {"l1": 1.0, "ssim": 0.3, "perceptual": 0.2, "edge": 0.2, "deep_supervision": 0.2, "frequency": 0.3}


SOBEL_DIFF = (-0.5, 0.0, 0.5)      # MONAI SobelGradients' normalised kernels
SOBEL_SMOOTH = (0.25, 0.5, 0.25)


def filter3(x: torch.Tensor, taps: Sequence[float], dim: int) -> torch.Tensor:
    """``x`` correlated with a 3-tap kernel along ``dim``, reflect padding (as MONAI's ``separable_filtering``
    does with ``mode="reflect"``), as a weighted sum of three shifted views.

    On a CPU, the 1-channel ``conv3d`` that MONAI runs per axis is slow: the Sobel magnitude of two
    ``[2, 1, 64, 64, 64]`` volumes, forward and backward, took 514 ms that way and 35 ms this way, about
    a tenth of the 06 training step at the subset preset (``lib.bench``, section 2)."""
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"filter3: reflect padding needs at least 2 voxels along dim {dim}, got shape {tuple(x.shape)}")
    padded = torch.cat([x.narrow(dim, 1, 1), x, x.narrow(dim, n - 2, 1)], dim=dim)
    out = None
    for shift, w in enumerate(taps):
        if w:
            term = padded.narrow(dim, shift, n) * w
            out = term if out is None else out + term
    return out


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """3D Sobel gradient magnitude of ``[B, C, D, H, W]`` (central difference [-1, 0, 1]/2 along one axis,
    smoothing [1, 2, 1]/4 along the others, reflect padding; MONAI ``SobelGradients``' normalised kernels,
    applied by :func:`filter3`)."""
    if x.ndim != 5:
        raise ValueError(f"sobel_magnitude needs [B, C, D, H, W], got shape {tuple(x.shape)}")
    squares = 0.0
    for axis in range(3):
        g = x
        for d in range(3):
            g = filter3(g, SOBEL_DIFF if d == axis else SOBEL_SMOOTH, d + 2)
        squares = squares + g * g
    return torch.sqrt(squares + 1e-12)


def high_frequency_l1(pred: torch.Tensor, target: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Mean ``|FFT(pred) - FFT(target)|`` (orthonormal 3D FFT) over frequencies with radius > ``cutoff``
    cycles/voxel (Nyquist is 0.5)."""
    if not 0 <= cutoff < 0.5 * 3 ** 0.5:
        raise ValueError(f"high_freq_cutoff must be in [0, {0.5 * 3 ** 0.5:.3f}) cycles/voxel, got {cutoff}")
    dims = (-3, -2, -1)
    diff = torch.fft.fftn(pred.float() - target.float(), dim=dims, norm="ortho")  # linear: FFT(p) - FFT(t)
    freqs = [torch.fft.fftfreq(n, device=pred.device) for n in pred.shape[-3:]]
    fz, fy, fx = torch.meshgrid(*freqs, indexing="ij")
    mask = (fz ** 2 + fy ** 2 + fx ** 2).sqrt() > cutoff
    return diff.abs()[..., mask].mean()


def ssim_3d(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
            sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """3D SSIM per sample ``[B]`` of ``[B, C, D, H, W]`` volumes: MONAI ``SSIMMetric``'s definition
    (Gaussian window, valid positions only, channels averaged), with the Gaussian applied as three 1D
    passes instead of one 11^3 kernel: the same numbers (tests/test_medical_loss.py) at a fraction of
    the cost (the full kernel's backward was ~45 % of a training step at 32^3 on the CPU)."""
    if pred.ndim != 5 or pred.shape != target.shape:
        raise ValueError(f"ssim_3d: need two [B, C, D, H, W] volumes of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    r = torch.arange(win_size, dtype=pred.dtype, device=pred.device) - (win_size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    c = pred.shape[1]
    maps = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = win_size
        maps = F.conv3d(maps, g.reshape(1, 1, *shape).expand(5 * c, 1, *shape), groups=5 * c)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = maps.split(c, dim=1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    var_x, var_y, cov = mu_xx - mu_x ** 2, mu_yy - mu_y ** 2, mu_xy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)) * ((2 * cov + c2) / (var_x + var_y + c2))
    return s.flatten(1).mean(1)


class MedicalGradeLoss(nn.Module):
    """The research note's six-term reconstruction loss (see the module docstring).

    ``forward(pred, target, deep=None)``: ``pred``, ``target`` ``[B, 1, D, H, W]`` (target in [0, 1]);
    ``deep`` the coarser outputs of the model, each ``[B, 1, d, h, w]``. Returns ``(total, terms)``.

    Args:
        weights: weight per term (names in ``TERMS``); missing names take ``DEFAULT_WEIGHTS``.
        feature_net: frozen 3D network ``[B, C, D, H, W]`` -> list of feature maps (the 03_pretrain encoder,
            :func:`lib.checkpoint.load_encoder`); None turns the perceptual term off (notice logged).
        feature_windows: CT windows ``[(centre, width), ...]`` in HU that turn the [0, 1] volume into the
            feature network's input channels (the pre-training's brain, subdural, bone windows); None feeds
            the volume as one channel.
        hu_range: the HU interval mapped to [0, 1] (to apply ``feature_windows``).
        high_freq_cutoff: the frequency term's cut-off in cycles/voxel.
        ssim_window: SSIM Gaussian window (narrowed to fit volumes smaller than it).
    """

    def __init__(self, weights: Mapping[str, float] | None = None, feature_net: nn.Module | None = None,
                 feature_windows: Sequence[tuple[float, float]] | None = None,
                 hu_range: tuple[float, float] = (-1000.0, 1000.0), high_freq_cutoff: float = 0.25,
                 ssim_window: int = 11):
        super().__init__()
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ValueError(f"MedicalGradeLoss: unknown loss term(s) {unknown}; valid: {', '.join(TERMS)}")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"MedicalGradeLoss: weight of {name!r} must be a number >= 0, got {w!r}")
        self.weights = {name: float(weights.get(name, DEFAULT_WEIGHTS[name])) for name in TERMS}
        if feature_windows is not None and (not feature_windows
                                            or any(len(w) != 2 or w[1] <= 0 for w in feature_windows)):
            raise ValueError(f"feature_windows must be (centre, width > 0) pairs in HU, got {feature_windows!r}")
        if not hu_range[1] > hu_range[0]:
            raise ValueError(f"hu_range must be (low, high) with high > low, got {hu_range!r}")
        zeros = torch.zeros(1, 1, 2, 2, 2)
        high_frequency_l1(zeros, zeros, high_freq_cutoff)  # checks the cut-off
        self.feature_windows = None if feature_windows is None else [tuple(map(float, w)) for w in feature_windows]
        self.hu_range, self.high_freq_cutoff = tuple(map(float, hu_range)), float(high_freq_cutoff)
        self.ssim_window = ssim_window
        self.feature_net = feature_net
        if feature_net is not None:
            feature_net.eval()
            for p in feature_net.parameters():
                p.requires_grad_(False)
        self.notice = None
        if self.weights["perceptual"] > 0 and feature_net is None:
            self.notice = (f"MedicalGradeLoss: perceptual term off (weight {self.weights['perceptual']:g} unused): "
                           f"no 3D feature network given (pass a 03_pretrain encoder checkpoint)")
            log.warning(self.notice)
        self.active = tuple(n for n in TERMS if self.weights[n] > 0 and (n != "perceptual" or feature_net is not None))
        if not self.active:
            raise ValueError(f"MedicalGradeLoss: every term is off (weights {self.weights})")

    def train(self, mode: bool = True) -> "MedicalGradeLoss":
        super().train(mode)
        if self.feature_net is not None:
            self.feature_net.eval()  # frozen: its normalisation statistics never move
        return self

    def _features_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_windows is None:
            return x
        lo, hi = self.hu_range
        hu = lo + x * (hi - lo)
        return torch.cat([((hu - (c - w / 2)) / w).clamp(0, 1) for c, w in self.feature_windows], dim=1)

    def perceptual(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.feature_net is None:
            raise RuntimeError("MedicalGradeLoss.perceptual: no feature network (the term is off)")
        with torch.no_grad():
            ft = self.feature_net(self._features_input(target))
        fp = self.feature_net(self._features_input(pred))
        if len(fp) == 0 or len(fp) != len(ft):
            raise ValueError(f"feature network returned {len(fp)} and {len(ft)} feature maps; need a non-empty list")
        return torch.stack([F.l1_loss(a.float(), b.float()) for a, b in zip(fp, ft)]).mean()

    def ssim(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smallest = min(pred.shape[2:])
        win = min(self.ssim_window, smallest if smallest % 2 else smallest - 1)
        if win < 3:
            raise ValueError(f"MedicalGradeLoss: volumes of size {tuple(pred.shape[2:])} are too small for SSIM")
        return 1.0 - ssim_3d(pred, target, win_size=win).mean()

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                deep: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if pred.ndim != 5 or pred.shape != target.shape or pred.shape[1] != 1:
            raise ValueError(f"MedicalGradeLoss: pred and target must both be [B, 1, D, H, W], got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        # The terms run in float32: FFT, SSIM's variances and the Sobel magnitude lose too much in bf16.
        with torch.autocast(pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            terms: dict[str, torch.Tensor] = {}
            if "l1" in self.active:
                terms["l1"] = F.l1_loss(pred, target)
            if "ssim" in self.active:
                terms["ssim"] = self.ssim(pred, target)
            if "perceptual" in self.active:
                terms["perceptual"] = self.perceptual(pred, target)
            if "edge" in self.active:
                terms["edge"] = F.l1_loss(sobel_magnitude(pred), sobel_magnitude(target))
            if "deep_supervision" in self.active and deep:
                terms["deep_supervision"] = torch.stack([
                    F.l1_loss(out.float(), F.adaptive_avg_pool3d(target, out.shape[-3:])) for out in deep]).mean()
            if "frequency" in self.active:
                terms["frequency"] = high_frequency_l1(pred, target, self.high_freq_cutoff)
            total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms

