"""Losses of the CXR change-map family (05_cxr_change): the signed change loss and SimMIM's masked
reconstruction loss with its patch masks.

The change models (:mod:`lib.models.cxr_change`) output a signed map ``y`` in [-1, 1] with the demo
cohort's sign (+ = attenuation increased, "appeared"; - = decreased, "resolved"). Its training target is
the sign of the cleaned change map, ``t = sign(change)`` in {-1, 0, +1} (:func:`change_target`), learnt
with :func:`change_loss`: a two-channel soft Dice (``relu(y)`` against appeared, ``relu(-y)`` against
resolved) plus the mean squared error of ``y`` against ``t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def change_target(change: torch.Tensor) -> torch.Tensor:
    """The training target of the signed map: ``sign(change)`` in {-1, 0, +1} (the cleaned map is 0 where
    nothing changed)."""
    return torch.sign(change.float())


def change_loss(pred: torch.Tensor, change: torch.Tensor, dice_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Loss of a signed change map ``pred`` (``[B, 1, S, S]`` in [-1, 1]) against the cohort's ``change``.

    ``mse(pred, sign(change)) + dice_weight * soft Dice`` over two channels, ``relu(pred)`` against the
    appeared mask and ``relu(-pred)`` against the resolved one (MONAI ``DiceLoss``, pooled over the batch,
    so a batch of nuisance-only pairs still has a defined loss). Returns ``(loss, {"mse", "soft_dice"})``.
    """
    from monai.losses import DiceLoss

    if pred.shape != change.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(f"pred and change must both be [B, 1, S, S], got {tuple(pred.shape)} and {tuple(change.shape)}")
    pred, t = pred.float(), change_target(change)
    mse = F.mse_loss(pred, t)
    probs = torch.cat([pred.clamp_min(0), (-pred).clamp_min(0)], dim=1)
    masks = torch.cat([(t > 0), (t < 0)], dim=1).float()
    dice = DiceLoss(batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(probs, masks)
    return mse + dice_weight * dice, {"mse": mse.detach(), "soft_dice": 1 - dice.detach()}


def random_patch_mask(batch: int, image_size: int, patch: int, ratio: float, *, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch, 1, S, S]`` float masks hiding exactly ``round(ratio * n)`` of the ``n`` patches of each image."""
    if image_size % patch:
        raise ValueError(f"mask patch {patch} must divide image_size {image_size}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    g = image_size // patch
    n, k = g * g, round(ratio * g * g)
    # drawn where the generator lives (torch's global one: the CPU), then moved to ``device``
    order = torch.rand(batch, n, generator=generator,
                       device=generator.device if generator is not None else "cpu").argsort(dim=1)
    hidden = torch.zeros(batch, n, device=order.device)
    hidden.scatter_(1, order[:, :k], 1.0)
    hidden = hidden.reshape(batch, 1, g, g)
    return hidden.repeat_interleave(patch, 2).repeat_interleave(patch, 3).to(device)


def masked_reconstruction_loss(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the hidden pixels only (SimMIM's L1), in float32: the count of hidden pixels
    overflows float16 (65504) and is rounded in bfloat16."""
    m = mask.float().expand_as(pred)
    return ((pred.float() - image.float()).abs() * m).sum() / m.sum().clamp_min(1)
