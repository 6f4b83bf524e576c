"""MedicalGradeLoss: each term against an independent computation (scipy, numpy, MONAI, scikit-image),
the weighting and logging of the six terms, the perceptual term on and off, bad input; and the family's
evaluation metrics (lib.metrics.reconstruction_metrics) against independent implementations."""

import lib  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.losses.medical import (DEFAULT_WEIGHTS, TERMS, MedicalGradeLoss, filter3, high_frequency_l1,
                                sobel_magnitude, ssim_3d)
from lib.metrics import reconstruction_metrics


def volumes(seed=0, shape=(2, 1, 16, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    pred = (target + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return pred, target


class StandIn(torch.nn.Module):
    """A small 3D feature network with the 03_pretrain encoder's interface: [B, C, D, H, W] -> list of maps."""

    def __init__(self, channels=1):
        super().__init__()
        self.a = torch.nn.Conv3d(channels, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, 8, 3, stride=2, padding=1)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach()
        f1 = torch.relu(self.a(x))
        return [f1, torch.relu(self.b(f1))]


def test_the_research_weights_are_the_defaults():
    assert DEFAULT_WEIGHTS == {"l1": 1.0, "ssim": 0.3, "perceptual": 0.2, "edge": 0.2, "deep_supervision": 0.2,
                               "frequency": 0.3}
    assert TERMS == tuple(DEFAULT_WEIGHTS)


def test_sobel_magnitude_against_scipy():
    x = torch.rand(1, 1, 10, 12, 9, dtype=torch.float64)
    a = x[0, 0].numpy()
    # scipy's kernels are [-1, 0, 1] and [1, 2, 1] (factor 2 * 4 * 4 = 32); its 'mirror' is torch's 'reflect'
    ref = np.sqrt(sum((ndimage.sobel(a, axis=k, mode="mirror") / 32) ** 2 for k in range(3)))
    np.testing.assert_allclose(sobel_magnitude(x)[0, 0].numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_filter3_matches_monai_separable_filtering(dim):
    from monai.networks.layers import separable_filtering

    x = torch.rand(2, 3, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    taps = (-0.3, 0.9, 0.45)  # asymmetric: correlation, not convolution
    kernels = [torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype)] * 3
    kernels[dim - 2] = torch.tensor(taps, dtype=x.dtype)
    ours, ref = filter3(x, taps, dim), separable_filtering(x, kernels, mode="reflect")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    w = torch.rand_like(ref)
    g_ours, = torch.autograd.grad((ours * w).sum(), x)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


def test_filter3_rejects_a_single_voxel_axis():
    with pytest.raises(ValueError, match="at least 2 voxels along dim 3"):
        filter3(torch.rand(1, 1, 4, 1, 4), (0.25, 0.5, 0.25), 3)


def test_high_frequency_l1_against_numpy():
    pred, target = volumes(1, (1, 1, 8, 10, 12))
    d = (pred - target)[0, 0].double().numpy()
    spectrum = np.fft.fftn(d, norm="ortho")
    fz, fy, fx = np.meshgrid(*(np.fft.fftfreq(n) for n in d.shape), indexing="ij")
    mask = np.sqrt(fz ** 2 + fy ** 2 + fx ** 2) > 0.25
    assert high_frequency_l1(pred, target, 0.25).item() == pytest.approx(np.abs(spectrum[mask]).mean(), rel=1e-5)


def test_high_frequency_l1_ignores_smooth_differences():
    target = torch.rand(1, 1, 16, 16, 16)
    assert high_frequency_l1(target + 0.3, target).item() < 1e-6           # a constant offset: frequency 0
    checker = torch.from_numpy(np.indices((16, 16, 16)).sum(0) % 2).float()[None, None] * 0.1
    # a checkerboard of +-0.05 around 0.05 is one Nyquist bin of magnitude 0.05 * sqrt(16^3) = 3.2 (ortho FFT)
    f = np.fft.fftfreq(16)
    n_high = (np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2) > 0.25).sum()
    assert high_frequency_l1(target + checker, target).item() == pytest.approx(3.2 / n_high, rel=1e-4)
    with pytest.raises(ValueError, match="high_freq_cutoff"):
        high_frequency_l1(target, target, cutoff=0.9)


def test_ssim_3d_is_monais_ssim():
    from monai.metrics import SSIMMetric

    from lib import metrics

    pred, target = volumes(2, (2, 1, 14, 16, 18))
    ref = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, reduction="none")(pred, target).flatten(1).mean(1)
    assert torch.allclose(ssim_3d(pred, target), ref, atol=1e-5)
    assert torch.allclose(ssim_3d(pred, target), metrics.ssim(pred, target, data_range=1.0), atol=1e-5)


def test_ssim_3d_against_scikit_image():
    from skimage.metrics import structural_similarity

    pred, target = volumes(3, (1, 1, 20, 20, 20))
    ref = structural_similarity(pred[0, 0].double().numpy(), target[0, 0].double().numpy(), data_range=1.0,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, win_size=11)
    # scikit-image averages over the image minus a border of 5 (= the valid positions of an 11-window)
    assert ssim_3d(pred.double(), target.double()).item() == pytest.approx(ref, abs=1e-6)


def test_perfect_prediction_scores_zero_on_every_term():
    _, target = volumes()
    deep = [torch.nn.functional.adaptive_avg_pool3d(target, s) for s in (2, 4, 8)]
    loss = MedicalGradeLoss(feature_net=StandIn())
    total, terms = loss(target.clone(), target, deep)
    assert set(terms) == set(TERMS)
    for name, value in terms.items():
        assert abs(value.item()) < 1e-5, name
    assert abs(total.item()) < 1e-5


def test_terms_against_direct_computations():
    pred, target = volumes(4)
    deep = [torch.rand(2, 1, s, s, s) for s in (2, 4, 8)]
    _, terms = MedicalGradeLoss()(pred, target, deep)
    assert terms["l1"].item() == pytest.approx((pred - target).abs().mean().item(), rel=1e-6)
    assert terms["ssim"].item() == pytest.approx(1 - ssim_3d(pred, target).mean().item(), rel=1e-6)
    assert terms["edge"].item() == pytest.approx(
        (sobel_magnitude(pred) - sobel_magnitude(target)).abs().mean().item(), rel=1e-6)
    pooled = [target.reshape(2, 1, s, 16 // s, s, 16 // s, s, 16 // s).mean((3, 5, 7)) for s in (2, 4, 8)]
    assert terms["deep_supervision"].item() == pytest.approx(
        np.mean([(d - p).abs().mean().item() for d, p in zip(deep, pooled)]), rel=1e-5)
    assert terms["frequency"].item() == pytest.approx(high_frequency_l1(pred, target).item(), rel=1e-6)


def test_each_term_is_weighted_from_the_config():
    pred, target = volumes(5)
    deep = [torch.rand(2, 1, 4, 4, 4)]
    weights = {"l1": 0.7, "ssim": 0.11, "perceptual": 0.5, "edge": 0.05, "deep_supervision": 0.3, "frequency": 2.0}
    total, terms = MedicalGradeLoss(weights, feature_net=StandIn())(pred, target, deep)
    assert total.item() == pytest.approx(sum(weights[k] * terms[k].item() for k in TERMS), rel=1e-6)
    for name in TERMS:  # a zero weight turns a term off, and only that term
        _, fewer = MedicalGradeLoss({**weights, name: 0.0}, feature_net=StandIn())(pred, target, deep)
        assert set(fewer) == set(TERMS) - {name}


def test_perceptual_off_without_a_feature_network_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="lib.losses.medical"):
        loss = MedicalGradeLoss()
    assert "perceptual term off" in caplog.text and loss.notice and "perceptual" not in loss.active
    _, terms = loss(*volumes())
    assert "perceptual" not in terms
    with caplog.at_level(logging.WARNING, logger="lib.losses.medical"):
        caplog.clear()
        assert MedicalGradeLoss({"perceptual": 0.0}).notice is None  # off by choice: nothing to report
    assert caplog.text == ""


def test_perceptual_term_with_a_stand_in_encoder():
    torch.manual_seed(0)
    net = StandIn()
    loss = MedicalGradeLoss(feature_net=net)
    assert all(not p.requires_grad for p in net.parameters()) and not net.training
    pred, target = volumes(6)
    pred.requires_grad_(True)
    _, terms = loss(pred, target)
    fp, ft = net(pred.detach()), net(target)
    expected = np.mean([(a - b).abs().mean().item() for a, b in zip(fp, ft)])
    assert terms["perceptual"].item() == pytest.approx(expected, rel=1e-5)
    terms["perceptual"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # frozen
    loss.train()
    assert not net.training  # stays in eval mode


def test_perceptual_windows_make_the_encoders_channels():
    net = StandIn(channels=3)
    loss = MedicalGradeLoss(feature_net=net, feature_windows=[(40, 80), (80, 200), (600, 2800)], hu_range=(-1000, 1000))
    x = torch.full((1, 1, 8, 8, 8), (40 + 1000) / 2000)  # 40 HU everywhere
    loss.perceptual(x, x)
    assert net.seen.shape == (1, 3, 8, 8, 8)
    expected = [0.5, (40 - (80 - 100)) / 200, (40 - (600 - 1400)) / 2800]
    assert torch.allclose(net.seen[0, :, 0, 0, 0], torch.tensor(expected), atol=1e-6)


def test_runs_in_float32_under_autocast():
    pred, target = volumes(7)
    deep = [torch.rand(2, 1, 8, 8, 8)]
    ref, _ = MedicalGradeLoss()(pred, target, deep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = MedicalGradeLoss()(pred.bfloat16(), target, deep)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    assert total.item() == pytest.approx(ref.item(), rel=0.05)  # only the bf16 rounding of pred differs


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": {"l2": 1.0}}, "unknown loss term"),
    ({"weights": {"l1": -1.0}}, "weight of 'l1' must be a number >= 0"),
    ({"weights": {k: 0.0 for k in TERMS}}, "every term is off"),
    ({"high_freq_cutoff": 2.0}, "high_freq_cutoff"),
    ({"feature_windows": [(40, 0)]}, "feature_windows"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedicalGradeLoss(**kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        MedicalGradeLoss()(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 4))
    with pytest.raises(ValueError, match="too small for SSIM"):
        MedicalGradeLoss()(torch.rand(1, 1, 2, 2, 2), torch.rand(1, 1, 2, 2, 2))


def test_reconstruction_metrics_against_independent_implementations():
    from skimage.metrics import peak_signal_noise_ratio

    pred, target = volumes(8)
    m = reconstruction_metrics(pred, target, hu_range=(-1000, 1000))
    for i in range(2):
        p, t = pred[i, 0].double().numpy(), target[i, 0].double().numpy()
        assert m["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), rel=1e-5)
        assert m["mae_hu"][i].item() == pytest.approx(np.abs(p - t).mean() * 2000, rel=1e-5)
        assert m["cosine"][i].item() == pytest.approx((p * t).sum() / np.linalg.norm(p) / np.linalg.norm(t), rel=1e-5)
        assert m["ssim"][i].item() == pytest.approx(ssim_3d(pred[i:i + 1], target[i:i + 1]).item(), abs=1e-5)


def test_reconstruction_metrics_are_float32_under_autocast():
    pred, target = volumes(9)
    ref = reconstruction_metrics(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reconstruction_metrics(pred, target)
    for name in ref:
        assert inside[name].dtype == torch.float32
        assert torch.allclose(inside[name], ref[name], rtol=1e-6), name
