"""HybridCNNViTUNet3D: shapes for 1, 2 and 4 views, the residual start, the view geometry against
lib.data.drr, cross-view attention against a reference computation, gradients, bad input."""

import lib  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)

import math

import numpy as np
import pytest
import torch

from lib import config  # noqa: F401  (before lib.families: lib.presets and lib.config import each other)
from lib.families.xray_to_ct import count_parameters, default_angles
from lib.models.xray2ct import (CrossViewAttention, HybridCNNViTUNet3D, ResidualDenseBlock3D, SwinTransformerBlock3D,
                                backproject, view_grid)

TINY = dict(image_size=16, volume_size=16, base_channels=4, attention_channels=32, attention_heads=8)
S = TINY["image_size"]


def tiny(angles=(0.0, 90.0), **kw):
    torch.manual_seed(0)
    return HybridCNNViTUNet3D(angles, **{**TINY, **kw})


def _wake_heads(model):
    for head in model.heads:  # the heads start at zero (the model starts at its prior)
        torch.nn.init.normal_(head.weight, std=0.1)


@pytest.mark.parametrize("views", [1, 2, 4])
def test_shapes_for_n_views(views):
    model = tiny(default_angles(views))
    volume, deep = model(torch.rand(2, views, 1, S, S))
    assert volume.shape == (2, 1, 16, 16, 16)
    assert [tuple(d.shape) for d in deep] == [(2, 1, 2, 2, 2), (2, 1, 4, 4, 4), (2, 1, 8, 8, 8)]
    assert torch.isfinite(volume).all()


def test_untrained_model_returns_its_prior_and_learns_a_residual():
    prior = torch.rand(16, 16, 16)
    model = tiny(prior=prior)
    volume, deep = model(torch.rand(2, 2, 1, S, S))
    assert torch.equal(volume, prior.expand(2, 1, 16, 16, 16))
    assert torch.allclose(deep[0], torch.nn.functional.adaptive_avg_pool3d(prior[None, None], 2).expand(2, 1, 2, 2, 2))
    assert torch.equal(model.state_dict()["prior"][0, 0], prior)  # travels with the weights
    _wake_heads(model)
    assert not torch.equal(model(torch.rand(2, 2, 1, S, S))[0], prior.expand(2, 1, 16, 16, 16))


def test_output_depends_on_every_view():
    model = tiny(default_angles(4))
    _wake_heads(model)
    model.eval()
    x = torch.rand(1, 4, 1, S, S)
    base = model(x)[0]
    for v in range(4):
        y = x.clone()
        y[:, v] = torch.rand(1, 1, S, S)
        assert not torch.allclose(model(y)[0], base), f"view {v} has no effect"


def test_every_parameter_gets_a_gradient():
    model = tiny()
    _wake_heads(model)
    volume, deep = model(torch.rand(2, 2, 1, S, S))
    (volume.mean() + sum(d.mean() for d in deep)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_same_seed_same_numbers():
    x = torch.rand(1, 2, 1, S, S)
    a, b = tiny(), tiny()
    for m in (a, b):
        torch.manual_seed(1)
        _wake_heads(m)
    assert torch.equal(a(x)[0], b(x)[0])
    torch.manual_seed(2)
    _wake_heads(b)
    assert not torch.equal(a(x)[0], b(x)[0])


@pytest.mark.parametrize("size", [16, pytest.param(32, marks=pytest.mark.slow)])
def test_bf16_training_steps_have_finite_gradients(size):
    """Regression: U-Net blocks at 2^3 voxels under CPU bf16 autocast got Inf/NaN weight gradients now and
    then (oneDNN); the model runs them in float32."""
    torch.manual_seed(0)
    model = HybridCNNViTUNet3D((0.0, 90.0), image_size=16, volume_size=size, base_channels=4, attention_channels=32,
                               prior=torch.rand(size, size, size))
    for _ in range(5):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            volume, deep = model(torch.rand(2, 2, 1, S, S))
            loss = (volume.float() - torch.rand_like(volume.float())).abs().mean()
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert bad == []


def test_parameter_count_of_the_research_configuration():
    # the note says "about 85M" at base 32 (the count does not depend on the volume or image size)
    with torch.device("meta"):
        model = HybridCNNViTUNet3D(image_size=512, volume_size=64, base_channels=32, attention_channels=512)
        small = HybridCNNViTUNet3D(image_size=64, volume_size=32, base_channels=32, attention_channels=512)
    n = count_parameters(model)
    assert 60e6 < n < 100e6 and count_parameters(small) == n


# --------------------------------------------------------------------------- geometry

def test_view_geometry_matches_the_cohort_drrs(smoke_cohort):
    """A dense blob rendered by lib.data.drr lands where the model's geometry (view_grid's formula, with
    DRRVolumes.volume_extent) says its voxel is seen, for four angles."""
    from lib.data import drr
    from lib.data.datasets import DRRVolumes
    from lib.data.io import load_volume

    data = DRRVolumes(smoke_cohort, "train")
    extent = data.volume_extent()
    ct = load_volume(data.ct_path(data.subjects[0]), channels=(1,))
    shape, size = ct.spatial_shape, np.load(smoke_cohort / "drr" / data.subjects[0] / "frontal.npy").shape[0]
    for i, j, k in [(33, 24, 24), (14, 38, 6)]:
        hu = np.full(shape, -1000.0, np.float32)
        hu[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = 3000.0
        for angle in (0.0, 45.0, 90.0, 135.0):
            image = drr.radiograph(hu, ct.spacing, angle, size=size)
            w = image - image.min()
            rows, cols = np.indices(w.shape)
            u = (2 * (w * cols).sum() / w.sum() + 1) / size - 1
            v = (2 * (w * rows).sum() / w.sum() + 1) / size - 1
            xn, yn, zn = ((2 * q + 1) / n - 1 for q, n in zip((i, j, k), shape))
            r = math.radians(angle)
            expected = (-(extent[0] * xn * math.cos(r) + extent[1] * yn * math.sin(r)), -extent[2] * zn)
            assert abs(u - expected[0]) < 1.5 / size and abs(v - expected[1]) < 1.5 / size, (angle, (u, v), expected)


def test_volume_affine_spans_the_ct_field_of_view(smoke_cohort):
    from lib.data.datasets import DRRVolumes
    from lib.data.io import load_volume

    data = DRRVolumes(smoke_cohort, "test", volume_size=16)
    subject = data.subjects[0]
    ct = load_volume(data.ct_path(subject), channels=(1,))
    a = data.volume_affine(subject)
    n = np.asarray(ct.spatial_shape, float)
    for corner_new, corner_old in (([-0.5] * 3, [-0.5] * 3), ([15.5] * 3, n - 0.5)):  # outer voxel faces
        assert np.allclose(a @ [*corner_new, 1], ct.affine @ [*corner_old, 1])
    assert np.allclose(np.abs(np.diag(a)[:3]), np.asarray(ct.spacing) * n / 16)


def test_view_grid_formula_at_a_voxel():
    g = view_grid([30.0], 4, (1.0, 0.5, 0.8))[0].reshape(4, 4, 4, 2)
    x, y, z = 0.75, -0.25, 0.25  # voxel (3, 1, 2) of 4: centres at (2i + 1) / 4 - 1
    r = math.radians(30)
    assert torch.allclose(g[3, 1, 2], torch.tensor([-(x * math.cos(r) + 0.5 * y * math.sin(r)), -0.8 * z]))


def test_backprojection_is_constant_along_the_rays():
    planes = torch.rand(1, 2, 3, 8, 8)
    vol = backproject(planes, view_grid((0.0, 90.0), 8, (1.0, 1.0, 1.0)))
    assert vol.shape == (1, 2, 3, 8, 8, 8)
    frontal, lateral = vol[0, 0], vol[0, 1]
    assert torch.allclose(frontal, frontal[:, :, :1].expand_as(frontal))  # rays along A (axis y)
    assert torch.allclose(lateral, lateral[:, :1].expand_as(lateral))     # rays along R (axis x)
    # frontal: column = patient right (x high) on the image's left, row 0 = superior (z high)
    assert torch.allclose(frontal[:, 7, 0, 7], planes[0, 0, :, 0, 0])


# --------------------------------------------------------------------------- blocks

def test_cross_view_attention_against_a_reference():
    torch.manual_seed(0)
    layer = CrossViewAttention(16, heads=2)
    t = torch.randn(2, 3, 5, 16)
    out = layer(t)
    q, kv = layer.q(layer.norm_q(t)), layer.kv(layer.norm_kv(t))
    k, v = kv[..., :16], kv[..., 16:]
    ref = []
    for i in range(3):
        others = [j for j in range(3) if j != i]
        kk, vv = k[:, others].reshape(2, -1, 16), v[:, others].reshape(2, -1, 16)
        heads = []
        for h in range(2):
            s = slice(8 * h, 8 * h + 8)
            w = torch.softmax(q[:, i, :, s] @ kk[..., s].transpose(1, 2) / math.sqrt(8), dim=-1)
            heads.append(w @ vv[..., s])
        ref.append(torch.cat(heads, dim=-1))
    x = t + layer.proj(torch.stack(ref, dim=1))
    ref_out = x + layer.mlp(layer.norm_mlp(x))
    assert torch.allclose(out, ref_out, atol=1e-5)
    # a view's queries do not read its own keys when there are others
    t2 = t.clone()
    t2[:, 1] = torch.randn(2, 5, 16)  # changes view 1 only: view 0's output changes, through view 1's keys
    assert not torch.allclose(layer(t2)[:, 0], out[:, 0])


def test_cross_view_attention_with_one_view_is_self_attention():
    layer = CrossViewAttention(16, heads=2)
    t = torch.randn(1, 1, 4, 16)
    assert layer(t).shape == t.shape
    with pytest.raises(ValueError, match="divisible by heads"):
        CrossViewAttention(10, heads=4)


def test_residual_dense_block():
    block = ResidualDenseBlock3D(8, growth=4, layers=4)
    assert [layer.conv.in_channels for layer in block.layers] == [8, 12, 16, 20]
    x = torch.randn(1, 8, 4, 4, 4)
    assert block(x).shape == x.shape
    torch.nn.init.zeros_(block.fuse.weight)
    torch.nn.init.zeros_(block.fuse.bias)
    assert torch.equal(block(x), x)  # the dense path is added to the input


@pytest.mark.parametrize("size", [8, 2])
def test_swin_block_keeps_the_shape(size):
    block = SwinTransformerBlock3D(16, heads=8, window=4)
    x = torch.randn(1, 16, size, size, size)
    assert block(x).shape == x.shape


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(volume_size=24), "volume_size must be a positive multiple of 16"),
    (dict(image_size=36), "image_size must be a positive multiple of 8"),
    (dict(attention_channels=36), "attention_channels"),
    (dict(swin_heads=3), "swin_heads"),
    (dict(prior=torch.zeros(8, 8, 8)), r"prior must be \[16, 16, 16\]"),
    (dict(volume_extent=(1.0, 1.0)), "volume_extent"),
    (dict(angles=()), "angles"),
])
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HybridCNNViTUNet3D(**{**TINY, **kwargs})


def test_bad_views():
    model = tiny()
    with pytest.raises(ValueError, match=r"views must be \[B, 2, 1, 16, 16\].*got \(2, 1, 1, 16, 16\)"):
        model(torch.rand(2, 1, 1, 16, 16))
    with pytest.raises(ValueError, match="views must be"):
        model(torch.rand(2, 2, 1, 32, 32))
