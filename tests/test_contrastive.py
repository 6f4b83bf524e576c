"""Spatial InfoNCE: the batched loss against the research notes' loop over locations."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib.losses.contrastive import SpatialInfoNCE, sample_locations


@torch.no_grad()
def _reference(loss: SpatialInfoNCE, features, visible, locations=None):
    """The notes' semantics as plain Python loops: for every sample and every (visible, drawn) location,
    the anchor is the shallow vector there, the positive the deep vector at the same (d, h, w), the
    negatives the deep vectors at the sample's other locations; cross-entropy of the positive."""
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


def _inputs(seed=0, batch=3, grid=(3, 4, 5), channels=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, c, *grid, generator=g) for c in channels]
    visible = torch.rand(batch, *grid, generator=g) < 0.5
    visible[:, 0, 0, 0] = True
    return feats, visible


def test_batched_equals_the_loop_over_all_visible_locations():
    torch.manual_seed(0)
    loss = SpatialInfoNCE([8, 8], projection_dim=6, temperature=0.1, num_samples=10_000)
    feats, visible = _inputs()
    batched = loss(feats, visible).detach()
    assert abs(float(batched) - float(_reference(loss, feats, visible))) < 1e-5


def test_batched_equals_the_loop_with_sampling_and_three_levels_at_two_grids():
    torch.manual_seed(1)
    loss = SpatialInfoNCE([8, 6, 4], projection_dim=5, temperature=0.07, num_samples=7)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 8, 4, 4, 4, generator=g), torch.randn(2, 6, 4, 4, 4, generator=g),
             torch.randn(2, 4, 2, 2, 2, generator=g)]  # the deepest is coarser: aligned by interpolation
    visible = torch.rand(2, 4, 4, 4, generator=g) < 0.6
    visible[1] = False
    visible[1, 0, :, 0] = True  # sample 1 has 4 visible locations only: fewer than num_samples
    batched = loss(feats, visible, generator=torch.Generator().manual_seed(9)).detach()
    index, valid = sample_locations(visible.reshape(2, -1), 7, torch.Generator().manual_seed(9))
    locations = [[tuple(int(v) for v in torch.unravel_index(i, (4, 4, 4))) for i, ok in zip(row, ok_row) if ok]
                 for row, ok_row in zip(index, valid)]
    assert [len(x) for x in locations] == [7, 4]
    assert all(visible[b, d, h, w] for b, locs in enumerate(locations) for d, h, w in locs)
    assert abs(float(batched) - float(_reference(loss, feats, visible, locations))) < 1e-5


@torch.no_grad()
def test_values_at_the_extremes():
    loss = SpatialInfoNCE([4, 4], projection_dim=4, temperature=0.01, num_samples=64)
    with torch.no_grad():
        for conv in loss.projectors:
            conv.weight.copy_(torch.eye(4)[:, :, None, None, None])
    # identical, location-distinct maps: the positive wins by far -> loss near 0
    f = torch.eye(4).reshape(1, 4, 2, 2, 1)  # location l holds the one-hot code l
    assert float(loss([f, f])) < 1e-3
    # collapsed maps (every location the same vector): chance level log(n)
    same = torch.ones(1, 4, 2, 2, 1)
    assert abs(float(loss([same, same])) - math.log(4)) < 1e-5


def test_gradients_reach_the_projections_and_the_features():
    loss = SpatialInfoNCE([8, 8], projection_dim=6)
    feats, visible = _inputs()
    feats = [f.requires_grad_() for f in feats]
    loss(feats, visible).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert all(f.grad.abs().sum() > 0 for f in feats)
    # masked locations are never drawn, so they receive no gradient
    assert torch.all(feats[0].grad.permute(0, 2, 3, 4, 1)[~visible] == 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="channels needs >= 2 levels"):
        SpatialInfoNCE([8])
    loss = SpatialInfoNCE([8, 8])
    feats, visible = _inputs()
    with pytest.raises(ValueError, match="level 1 must be"):
        loss([feats[0], torch.randn(3, 5, 3, 4, 5)], visible)
    with pytest.raises(ValueError, match="visible must be"):
        loss(feats, visible[:, :2])
