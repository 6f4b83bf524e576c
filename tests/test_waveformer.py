"""WaveFormer3D: Haar transform, positional encoding, wavelet attention, dual patch embedding."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib import config
from lib.models import waveformer as wf
from lib.models.waveformer import (WaveFormer3D, WaveletAttention, haar_dwt3d, haar_idwt3d, sincos_position_encoding,
                                  wavelet_attention_reference)


def _small(**kw):
    args = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2)
    return WaveFormer3D(**{**args, **kw})


# --------------------------------------------------------------------------- Haar

def test_haar_is_orthonormal_and_inverts():
    x = torch.randn(2, 3, 6, 4, 8, dtype=torch.float64)
    c = haar_dwt3d(x)
    assert c.shape == (2, 3, 8, 3, 2, 4)
    assert torch.allclose(haar_idwt3d(c), x, atol=1e-12)
    assert torch.allclose((c ** 2).sum(), (x ** 2).sum())  # Parseval


def test_haar_bands_match_pooled_differences():
    # independent of the 8x8 matrix: band (kd, kh, kw) is the 2x2x2 mean of x times a +-1 pattern
    # (-1 on odd offsets along the axes whose bit is 1), times sqrt(8); band index = 4 kd + 2 kh + kw.
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    c = haar_dwt3d(x)
    one, alt = torch.ones(2, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    for band in range(8):
        kd, kh, kw = (band >> 2) & 1, (band >> 1) & 1, band & 1
        sign = ((alt if kd else one).view(2, 1, 1) * (alt if kh else one).view(1, 2, 1)
                * (alt if kw else one).view(1, 1, 2))
        expected = F.avg_pool3d(x * sign.repeat(2, 2, 2), 2) * math.sqrt(8)
        assert torch.allclose(c[:, :, band], expected), band


def test_haar_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        haar_dwt3d(torch.zeros(1, 1, 3, 4, 4))


# --------------------------------------------------------------------------- positional encoding

def test_sincos_equals_monai_when_dim_is_a_multiple_of_6():
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    grid = (3, 4, 5)
    ours = sincos_position_encoding(grid, 24).reshape(24, -1).T
    assert torch.allclose(ours, build_sincos_position_embedding(list(grid), 24)[0].detach(), atol=1e-6)


def test_sincos_pads_other_dims_and_distinguishes_positions():
    pe = sincos_position_encoding((4, 4, 4), 128)
    assert pe.shape == (128, 4, 4, 4)
    assert torch.all(pe[126:] == 0)
    flat = pe.reshape(128, -1).T
    assert torch.cdist(flat, flat).add(torch.eye(64) * 10).min() > 0.1  # every position has its own code


@pytest.mark.parametrize("preset", config.PRESETS)
@pytest.mark.parametrize("kind", ["sincos", "learned"])
def test_positional_encoding_works_at_every_preset_grid(preset, kind):
    cfg = config.resolve("03_pretrain", preset)
    grid = cfg.img_size // cfg.patch_size
    net = WaveFormer3D(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=12, depth=1, num_heads=2,
                       wavelet_levels=cfg.wavelet_levels, pos_embed=kind)
    for g in [(grid,) * 3, (grid + 1, grid, max(grid - 1, 1))]:  # the preset's grid and a non-cubic one
        pos = net.position(g, torch.device("cpu"), torch.float32)
        assert pos.shape == (1, 12, *g) and torch.isfinite(pos).all()
        tokens = torch.randn(1, 12, *g)
        assert net.forward_tokens(tokens).shape == (1, 12, *g)


# --------------------------------------------------------------------------- attention

def test_wavelet_attention_without_levels_is_full_attention():
    torch.manual_seed(0)
    attn = WaveletAttention(16, 4, levels=0)
    x = torch.randn(2, 16, 3, 4, 5)
    tokens = x.flatten(2).transpose(1, 2)
    expected = attn.attend(tokens).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_wavelet_attention_attends_on_the_low_band():
    # For a grid that is constant in every 2x2x2 cell the detail bands vanish, so one level of
    # wavelet attention is full attention on the cell means, repeated over each cell.
    torch.manual_seed(0)
    attn = WaveletAttention(16, 2, levels=1)
    with torch.no_grad():
        attn.detail_gain.fill_(0.7)
    coarse = torch.randn(1, 16, 2, 3, 2)
    x = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    attended = attn.attend(coarse.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(coarse.shape)
    expected = attended.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert torch.allclose(attn(x), expected, atol=1e-5)


@pytest.mark.parametrize("levels, shape", [(1, (2, 16, 4, 6, 8)), (2, (1, 16, 5, 6, 7)), (3, (1, 8, 8, 8, 8))])
def test_wavelet_attention_closed_form_equals_the_transforms(levels, shape):
    # forward pools, attends and upsamples; the reference runs Haar analysis and synthesis explicitly
    torch.manual_seed(0)
    attn = WaveletAttention(shape[1], 2, levels).double()
    with torch.no_grad():
        attn.detail_gain.uniform_(-1.0, 1.0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fast, reference = attn(x), wavelet_attention_reference(attn, x)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-12)
    grads = [torch.autograd.grad(y.square().sum(), [x, *attn.parameters()]) for y in (fast, reference)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_wavelet_attention_keeps_odd_grids_and_uses_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(wf.F, "scaled_dot_product_attention", counting)
    attn = WaveletAttention(8, 2, levels=2)
    out = attn(torch.randn(1, 8, 5, 6, 7))
    assert out.shape == (1, 8, 5, 6, 7)
    # padded to 8 x 8 x 8, two levels: 2 x 2 x 2 = 8 attended tokens per head
    assert calls == [torch.Size([1, 2, 8, 4])]


# --------------------------------------------------------------------------- the backbone

def test_dual_patch_embedding_and_shapes():
    torch.manual_seed(0)
    net = _small()
    assert net(torch.randn(2, 1, 16, 16, 16)).shape == (2, 24, 4, 4, 4)
    assert net(torch.randn(1, 3, 16, 24, 8)).shape == (1, 24, 4, 6, 2)
    # the two embeddings are different weights, chosen by the channel count
    mri, ct = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16).repeat(1, 3, 1, 1, 1)
    assert not torch.allclose(net.embed(mri), net.embed(ct))


@pytest.mark.parametrize("channels", [2, 4])
def test_other_channel_counts_are_refused(channels):
    with pytest.raises(ValueError, match=f"unsupported channel count {channels}"):
        _small()(torch.randn(1, channels, 16, 16, 16))


def test_bad_sizes_and_arguments_are_refused():
    with pytest.raises(ValueError, match="multiples of patch_size 4"):
        _small()(torch.randn(1, 1, 16, 18, 16))
    with pytest.raises(ValueError, match="embed_dim \\(24\\) must be divisible by num_heads \\(5\\)"):
        _small(num_heads=5)
    with pytest.raises(ValueError, match="img_size \\(18\\) must be a multiple of patch_size \\(4\\)"):
        _small(img_size=18)
    with pytest.raises(ValueError, match="pos_embed"):
        _small(pos_embed="rope")


def test_return_intermediate():
    torch.manual_seed(0)
    net = _small(depth=3).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    maps = net(x, return_intermediate=True)
    assert isinstance(maps, list) and len(maps) == 3
    assert all(m.shape == (1, 24, 4, 4, 4) for m in maps)
    assert torch.allclose(maps[-1], net(x))
    assert not torch.allclose(maps[0], maps[1])
    net.return_intermediate = True  # the constructor flag makes it the default
    assert len(net(x)) == 3


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = _small(depth=3)
    b = _small(depth=3, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16, 16)
    for net in (a, b):
        net.train()
        net(x).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if name.startswith("patch_embed_1ch"):  # a CT batch: the MRI embedding is not used
            assert pa.grad is None and pb.grad is None
        else:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_every_parameter_learns_from_mri_and_ct_batches():
    torch.manual_seed(0)
    net = _small(pos_embed="learned")
    loss = net(torch.randn(1, 1, 16, 16, 16)).square().mean() + net(torch.randn(1, 3, 16, 16, 16)).square().mean()
    loss.backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("channels, shape", [(1, (2, 16, 16, 16)), (3, (1, 16, 24, 8))])
def test_patch_embedding_equals_the_strided_convolution(channels, shape):
    # embed computes the kernel = stride convolution as a matrix product on channels-last patches; the
    # convolution module it takes its weights from is the independent formulation (values and gradients)
    torch.manual_seed(0)
    net = _small().double()
    conv = net.patch_embed_1ch if channels == 1 else net.patch_embed_3ch
    x = torch.randn(shape[0], channels, *shape[1:], dtype=torch.float64, requires_grad=True)
    fast, reference = net.embed(x), conv(x)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-12)
    grads = [torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum(),
                                 [x, conv.weight, conv.bias]) for y in (fast, reference)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: bf16, as the convolution gives
        mixed = _small().embed(x.float().detach())
    assert mixed.dtype == torch.bfloat16
