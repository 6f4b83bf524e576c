"""Spatial InfoNCE across encoder levels (research note A2, "cross-level contrastive loss").

Feature maps taken at several depths of the encoder are aligned to the grid of the first one
(trilinear), projected by a 1x1x1 convolution per level (``projection_dim``, 128) and L2-normalised.
In every sample, up to ``num_samples`` (256) locations are drawn among the visible ones, the same for
all levels. For each consecutive pair of levels (shallow, deep) and each drawn location ``l``: the
anchor is the shallow vector at ``l``, the positive the deep vector at the same ``l``, the negatives
the deep vectors at the sample's other drawn locations; the loss is the cross-entropy of the positive
among them at ``temperature`` (0.1), averaged over all anchors of the batch, then over level pairs.

The notes' triple loop over (d, h, w) defines these semantics; here they are one batched matrix
product per pair (``[B, n, n]`` logits, padded positions masked out). ``tests/test_contrastive.py``
compares the two to 1e-5; the loop itself is :func:`spatial_info_nce_reference`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_locations(visible: torch.Tensor, num_samples: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_samples`` random visible locations per sample.

    ``visible`` [B, N] bool (flattened grid) -> ``(index [B, n], valid [B, n])`` with
    ``n = min(num_samples, N)``; a sample with fewer visible locations fills its row with invalid
    entries (``valid`` False). Draws come from ``generator`` (or torch's global generator).
    """
    if visible.ndim != 2:
        raise ValueError(f"sample_locations: visible must be [B, N], got shape {tuple(visible.shape)}")
    n = min(int(num_samples), visible.shape[1])
    gen_device = generator.device if generator is not None else torch.device("cpu")
    scores = torch.rand(visible.shape, generator=generator, device=gen_device).to(visible.device)
    scores = torch.where(visible, scores, torch.full_like(scores, -1.0))  # visible ones come first
    index = scores.topk(n, dim=1).indices
    return index, visible.gather(1, index)


def spatial_info_nce(anchors: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """InfoNCE of matching rows: ``anchors``, ``positives`` [B, n, P] (already normalised), ``valid`` [B, n].

    Logits ``anchors @ positives^T / temperature`` per sample; row i's target is column i; invalid
    columns are excluded as negatives and invalid rows as anchors. Mean over all valid anchors.
    """
    logits = torch.einsum("bip,bjp->bij", anchors.float(), positives.float()) / temperature
    n = logits.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    # Invalid columns are no negatives; the diagonal stays, so that padding rows stay finite (weight 0).
    logits = logits.masked_fill(~valid[:, None, :] & ~eye, float("-inf"))
    target = torch.arange(n, device=logits.device).expand(logits.shape[0], -1)
    per_anchor = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    weights = valid.flatten().float()
    return (per_anchor * weights).sum() / weights.sum().clamp(min=1.0)


class SpatialInfoNCE(nn.Module):
    """Cross-level spatial InfoNCE; see the module docstring.

    ``forward(features, visible=None, generator=None)``: ``features`` a list of >= 2 maps
    ``[B, C_i, *grid_i]`` (``C_i = channels[i]``), ``visible`` [B, *grid_0] bool (None: all) -> scalar.
    """

    def __init__(self, channels: Sequence[int], projection_dim: int = 128, temperature: float = 0.1,
                 num_samples: int = 256):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"SpatialInfoNCE: channels needs >= 2 levels of >= 1 channel, got {channels}")
        if not temperature > 0:
            raise ValueError(f"SpatialInfoNCE: temperature must be > 0, got {temperature!r}")
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"SpatialInfoNCE: num_samples must be an int >= 2, got {num_samples!r}")
        self.channels, self.temperature, self.num_samples = channels, float(temperature), num_samples
        self.projectors = nn.ModuleList(nn.Conv3d(c, projection_dim, kernel_size=1, bias=False) for c in channels)

    def align(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The maps, checked and aligned (trilinear) to level 0's grid: [B, C_i, *grid_0]."""
        if len(features) != len(self.channels):
            raise ValueError(f"SpatialInfoNCE: expected {len(self.channels)} feature maps, got {len(features)}")
        grid = features[0].shape[2:]
        out = []
        for i, f in enumerate(features):
            if f.ndim != 5 or f.shape[1] != self.channels[i] or f.shape[0] != features[0].shape[0]:
                raise ValueError(f"SpatialInfoNCE: level {i} must be [B, {self.channels[i]}, d, h, w] with the "
                                 f"batch of level 0, got shape {tuple(f.shape)}")
            out.append(f if f.shape[2:] == grid else F.interpolate(f, size=grid, mode="trilinear", align_corners=False))
        return out

    def forward(self, features: Sequence[torch.Tensor], visible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        aligned = self.align(features)
        b, grid = aligned[0].shape[0], tuple(aligned[0].shape[2:])
        if visible is None:
            visible = torch.ones((b, *grid), dtype=torch.bool, device=aligned[0].device)
        if tuple(visible.shape) != (b, *grid):
            raise ValueError(f"SpatialInfoNCE: visible must be [B, d, h, w] = {(b, *grid)}, "
                             f"got shape {tuple(visible.shape)}")
        index, valid = sample_locations(visible.reshape(b, -1), self.num_samples, generator)
        # The projection and the normalisation act on each location alone: apply them to the drawn ones only
        # (num_samples of d*h*w locations; 16x less work at the prod grid than projecting whole maps).
        # Channels-last rows ([B, N, C]: a view of maps stored so, as the encoder's are), and the 1x1x1
        # convolution as the matrix product it is (oneDNN's weight gradient of it on [B, C, n, 1, 1] was slow).
        gathered = []
        for f, proj in zip(aligned, self.projectors):
            rows = f.permute(0, 2, 3, 4, 1).reshape(b, -1, f.shape[1])
            drawn = rows.gather(1, index[:, :, None].expand(-1, -1, f.shape[1]))           # [B, n, C]
            gathered.append(F.normalize(F.linear(drawn, proj.weight.flatten(1)).float(), dim=-1))  # [B, n, P]
        losses = [spatial_info_nce(gathered[i], gathered[i + 1], valid, self.temperature)
                  for i in range(len(gathered) - 1)]
        return torch.stack(losses).mean()


@torch.no_grad()
def spatial_info_nce_reference(loss: SpatialInfoNCE, features: Sequence[torch.Tensor], visible: torch.Tensor,
                               locations: Sequence[Sequence[tuple[int, int, int]]] | None = None) -> torch.Tensor:
    """The notes' semantics as plain Python loops: for every sample and every (visible, drawn) location,
    the anchor is the shallow vector there, the positive the deep vector at the same (d, h, w), the
    negatives the deep vectors at the sample's other locations; cross-entropy of the positive.

    The independent reference of :class:`SpatialInfoNCE` (``tests/test_contrastive.py``, ``lib.bench``): one
    dot product at a time, in float64. ``locations``: per sample, the (d, h, w) locations to use (e.g. those
    :func:`sample_locations` drew); None: every visible one. Slow by design: O(samples x n^2) Python steps.
    """
    grid = features[0].shape[2:]
    projected = []
    for f, conv in zip(features, loss.projectors):
        if f.shape[2:] != grid:
            f = F.interpolate(f, size=grid, mode="trilinear", align_corners=False)
        w = conv.weight[:, :, 0, 0, 0].double()
        p = torch.einsum("pc,bcdhw->bpdhw", w, f.double())
        projected.append(p / p.norm(dim=1, keepdim=True).clamp(min=1e-12))
    pair_losses = []
    for shallow, deep in zip(projected[:-1], projected[1:]):
        total, count = 0.0, 0
        for b in range(shallow.shape[0]):
            if locations is None:
                locs = [(d, h, w) for d in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])
                        if visible[b, d, h, w]]
            else:
                locs = locations[b]
            for i, (d, h, w) in enumerate(locs):
                anchor = shallow[b, :, d, h, w]
                keys = [deep[b, :, d, h, w]] + [deep[b, :, *loc] for j, loc in enumerate(locs) if j != i]
                logits = torch.stack([anchor @ k for k in keys]) / loss.temperature
                total += -torch.log_softmax(logits, dim=0)[0]
                count += 1
        pair_losses.append(total / count)
    return torch.stack(pair_losses).mean()
