"""MiM hierarchical masking of a token grid: a global block mask and a local mask nested inside it.

The specification is the research notes' single-resolution nested mask (published MiM, Zhuang et al.,
TMI 2025, nests masks over crops at several scales and adds a cross-level alignment loss; that is not
what this is). On a token grid ``(d, h, w)``:

1. the grid is cut into cubic blocks whose edge adapts to the grid (:func:`adaptive_block_size`:
   min dim <= 2 -> 1, <= 4 -> 2, <= 8 -> 3, else 4), so that a small grid is not masked whole;
2. the **global mask** hides ``floor(mask_ratio * blocks)`` blocks (60 %), but never more than
   ``blocks - min_unmasked_blocks``: masked and visible positions both exist at every grid size
   (a grid with fewer than ``min_unmasked_blocks + 1`` blocks is refused);
3. the **local mask** re-masks ``floor(local_ratio * n)`` (80 %, at least one) of the ``n`` finer
   blocks (edge ``max(1, block // 2)``) that lie inside the global mask.

Everything hidden by the global mask is hidden from the encoder (40 % visible). Inside it, the local
positions (48 % of the grid) are the notes' "hard" reconstruction targets and the rest (12 %) the
"easy" ones; the pretrainer reports the two losses separately. Blocks are chosen by ranking uniform
random scores, for the whole batch at once; pass a seeded ``torch.Generator`` for reproducible masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def adaptive_block_size(grid: Sequence[int]) -> int:
    """Block edge for a token grid: 1 if its smallest side is <= 2, 2 if <= 4, 3 if <= 8, else 4."""
    smallest = min(int(s) for s in grid)
    return 1 if smallest <= 2 else 2 if smallest <= 4 else 3 if smallest <= 8 else 4


@dataclass
class MiMMasks:
    """Masks of one batch on the token grid, ``[B, d, h, w]`` booleans (True = masked)."""

    masked: torch.Tensor   # the global mask: hidden from the encoder, reconstructed
    local: torch.Tensor    # the local mask, inside ``masked``: the "hard" targets
    block_size: int

    @property
    def visible(self) -> torch.Tensor:
        return ~self.masked

    def to(self, device: torch.device | str) -> "MiMMasks":
        return MiMMasks(self.masked.to(device), self.local.to(device), self.block_size)


def _expand(blocks: torch.Tensor, size: int, grid: Sequence[int]) -> torch.Tensor:
    """[B, nd, nh, nw] block flags -> [B, d, h, w] voxel flags (edge blocks cropped)."""
    out = blocks.repeat_interleave(size, 1).repeat_interleave(size, 2).repeat_interleave(size, 3)
    return out[:, : grid[0], : grid[1], : grid[2]]


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every score within its row (0 = smallest)."""
    return scores.argsort(dim=1).argsort(dim=1)


class MiMHierarchicalMasking:
    """Draws :class:`MiMMasks` for a batch: ``masking(batch_size, grid, generator=None, device=None)``."""

    def __init__(self, mask_ratio: float = 0.6, local_ratio: float = 0.8, min_unmasked_blocks: int = 2):
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"MiMHierarchicalMasking: mask_ratio must be in (0, 1), got {mask_ratio!r}")
        if not 0.0 < local_ratio <= 1.0:
            raise ValueError(f"MiMHierarchicalMasking: local_ratio must be in (0, 1], got {local_ratio!r}")
        if not isinstance(min_unmasked_blocks, int) or min_unmasked_blocks < 1:
            raise ValueError(f"MiMHierarchicalMasking: min_unmasked_blocks must be an int >= 1, got {min_unmasked_blocks!r}")
        self.mask_ratio, self.local_ratio, self.min_unmasked_blocks = mask_ratio, local_ratio, min_unmasked_blocks

    def counts(self, grid: Sequence[int]) -> tuple[int, int, int]:
        """``(block_size, blocks, masked_blocks)`` for a grid; ValueError if it cannot hold both kinds."""
        grid = tuple(int(s) for s in grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"MiMHierarchicalMasking: grid must be three sizes >= 1, got {grid}")
        size = adaptive_block_size(grid)
        blocks = math.prod(math.ceil(s / size) for s in grid)
        if blocks < self.min_unmasked_blocks + 1:
            raise ValueError(f"MiMHierarchicalMasking: grid {grid} has {blocks} block(s) of edge {size}; at least "
                             f"{self.min_unmasked_blocks + 1} are needed to keep {self.min_unmasked_blocks} visible "
                             f"and mask one (use a larger input or a smaller patch size)")
        masked = max(1, min(int(self.mask_ratio * blocks), blocks - self.min_unmasked_blocks))
        return size, blocks, masked

    def __call__(self, batch_size: int, grid: Sequence[int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> MiMMasks:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"MiMHierarchicalMasking: batch_size must be an int >= 1, got {batch_size!r}")
        grid = tuple(int(s) for s in grid)
        size, blocks, k = self.counts(grid)
        nblocks = [math.ceil(s / size) for s in grid]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        # Global: the k blocks with the smallest scores in each sample.
        scores = torch.rand(batch_size, blocks, generator=generator, device=gen_device)
        chosen = (_rank(scores) < k).view(batch_size, *nblocks)
        masked = _expand(chosen, size, grid)
        # Local: among the finer blocks inside the global mask, floor(local_ratio * n) of them (at least 1).
        fine = max(1, size // 2)  # divides size (1, 2, 3 -> 1; 4 -> 2), so fine blocks nest in coarse ones
        nfine = [math.ceil(s / fine) for s in grid]
        inside = _expand(chosen, size // fine, nfine).reshape(batch_size, -1)  # fine block lies in the global mask
        n_inside = inside.sum(1, keepdim=True)
        k_local = torch.clamp((n_inside.double() * self.local_ratio).floor().long(), min=1)
        fine_scores = torch.rand(batch_size, inside.shape[1], generator=generator, device=gen_device)
        fine_scores = torch.where(inside, fine_scores, torch.full_like(fine_scores, 2.0))  # outside ranks last
        local_blocks = (_rank(fine_scores) < k_local).view(batch_size, *nfine)
        local = _expand(local_blocks, fine, grid) & masked
        out = MiMMasks(masked, local, size)
        return out.to(device) if device is not None else out
