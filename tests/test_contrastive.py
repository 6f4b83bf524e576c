"""Spatial InfoNCE: the batched loss against the research notes' loop over locations."""

import math

import pytest
import torch

from lib.losses.contrastive import SpatialInfoNCE, sample_locations, spatial_info_nce_reference


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
    assert abs(float(batched) - float(spatial_info_nce_reference(loss, feats, visible))) < 1e-5


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
    assert abs(float(batched) - float(spatial_info_nce_reference(loss, feats, visible, locations))) < 1e-5


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


def test_projection_is_the_1x1x1_convolution_and_any_layout_gives_the_same_loss():
    # the projections are applied as matrix products on channels-last rows of the drawn locations: the same
    # value as the modules' convolutions (the loop reference applies the weights by einsum), in either layout
    torch.manual_seed(0)
    feats, visible = _inputs(batch=2, grid=(4, 4, 4), channels=(8, 8))
    loss = SpatialInfoNCE([8, 8], projection_dim=6, num_samples=64).double()
    feats = [f.double() for f in feats]
    channels_last = [f.contiguous(memory_format=torch.channels_last_3d) for f in feats]
    a = loss(feats, visible, torch.Generator().manual_seed(1))
    b = loss(channels_last, visible, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert abs(float(a) - float(spatial_info_nce_reference(loss, feats, visible))) < 1e-6  # a: float32 logits
