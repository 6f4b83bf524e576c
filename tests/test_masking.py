"""MiM hierarchical masking at the research notes' grid sizes (2^3, 4^3, 8^3) and prod's 16^3."""

import math

import pytest
import torch

from lib.losses.masking import MiMHierarchicalMasking, adaptive_block_size


def _draw(grid, batch=64, seed=0, **kw):
    return MiMHierarchicalMasking(**kw)(batch, grid, generator=torch.Generator().manual_seed(seed))


def test_adaptive_block_size_table():
    assert [adaptive_block_size((s, s, s)) for s in (1, 2, 3, 4, 5, 8, 9, 16, 64)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert adaptive_block_size((16, 3, 16)) == 2  # the smallest side decides


# grid, block edge, blocks, masked blocks, exact visible fraction (None: depends on which edge blocks)
CASES = [
    ((2, 2, 2), 1, 8, 4, 0.5),        # notes: 50 % unmasked
    ((4, 4, 4), 2, 8, 4, 0.5),        # notes: 50 %
    ((8, 8, 8), 3, 27, 16, None),     # notes: 41.2 % in their one draw; expected 1 - 16/27 = 40.7 %
    ((16, 16, 16), 4, 64, 38, 1 - 38 / 64),
]


@pytest.mark.parametrize("grid,size,blocks,masked_blocks,visible", CASES, ids=lambda v: str(v))
def test_notes_grid_sizes(grid, size, blocks, masked_blocks, visible):
    masking = MiMHierarchicalMasking()
    assert masking.counts(grid) == (size, blocks, masked_blocks)
    m = _draw(grid)
    assert m.masked.shape == m.local.shape == (64, *grid) and m.masked.dtype == torch.bool
    assert m.block_size == size
    per_sample = m.masked.flatten(1).float().mean(1)
    # both kinds in every sample, and the ratio where the notes put it (30-70 % masked at any size)
    assert (m.masked.flatten(1).any(1) & m.visible.flatten(1).any(1)).all()
    assert per_sample.min() >= 0.3 and per_sample.max() <= 0.7
    if visible is not None:
        assert torch.allclose(1 - per_sample, torch.full_like(per_sample, visible))
    else:
        expected = 1 - masked_blocks / blocks  # every block equally likely: E[visible] = 1 - k / n
        assert abs(float(1 - per_sample.mean()) - expected) < 0.02
    # masks are unions of whole blocks: constant inside every block
    nb = [math.ceil(s / size) for s in grid]
    padded = torch.nn.functional.pad(m.masked.float(), [0, nb[2] * size - grid[2], 0, nb[1] * size - grid[1], 0, nb[0] * size - grid[0]],
                                     value=float("nan"))
    cells = padded.reshape(64, nb[0], size, nb[1], size, nb[2], size)
    lo = torch.nan_to_num(cells, nan=2.0).amin(dim=(2, 4, 6))
    hi = torch.nan_to_num(cells, nan=-1.0).amax(dim=(2, 4, 6))
    assert torch.equal(lo, hi)
    assert (hi.flatten(1).sum(1) == masked_blocks).all()


@pytest.mark.parametrize("grid", [(2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)], ids=str)
def test_local_mask_is_nested_and_takes_80_percent(grid):
    m = _draw(grid)
    assert not (m.local & ~m.masked).any()  # local lies inside the global mask
    assert m.local.flatten(1).any(1).all()
    share = m.local.flatten(1).sum(1).float() / m.masked.flatten(1).sum(1).float()
    # floor(0.8 n) of n fine blocks: between 0.8 - 1/n and 0.8 (2^3: 3 of 4 voxels -> 0.75)
    assert share.max() <= 0.8 + 1e-6 and share.min() >= 0.75 - 1e-6
    # the notes' split of the grid: about 12 % global-only ("easy") and 48 % local ("hard")
    if grid == (16, 16, 16):
        assert abs(float(m.local.float().mean()) - 0.48) < 0.02
        assert abs(float((m.masked & ~m.local).float().mean()) - 0.12) < 0.02


def test_guaranteed_unmasked_minimum():
    masking = MiMHierarchicalMasking(mask_ratio=0.99, min_unmasked_blocks=2)
    for grid in [(2, 2, 2), (4, 4, 4), (8, 8, 8)]:
        size, blocks, k = masking.counts(grid)
        assert k == blocks - 2
        m = masking(16, grid, generator=torch.Generator().manual_seed(1))
        assert m.visible.flatten(1).any(1).all()
    assert MiMHierarchicalMasking(mask_ratio=0.01).counts((8, 8, 8))[2] == 1  # at least one masked block


def test_small_grids_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"grid \(1, 1, 1\) has 1 block"):
        MiMHierarchicalMasking()(2, (1, 1, 1))
    with pytest.raises(ValueError, match="mask_ratio"):
        MiMHierarchicalMasking(mask_ratio=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        MiMHierarchicalMasking()(0, (4, 4, 4))


def test_seeded_and_different_per_sample():
    a, b, c = _draw((8, 8, 8), seed=3), _draw((8, 8, 8), seed=3), _draw((8, 8, 8), seed=4)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.local, b.local)
    assert not torch.equal(a.masked, c.masked)
    assert len({tuple(x.flatten().tolist()) for x in a.masked}) > 32  # samples get their own masks


def test_non_cubic_grid():
    m = _draw((5, 8, 12), batch=8)
    assert m.block_size == 3 and m.masked.shape == (8, 5, 8, 12)
    assert (m.masked.flatten(1).any(1) & m.visible.flatten(1).any(1)).all()
