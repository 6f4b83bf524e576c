"""lib.metrics against independent implementations (scikit-image, scikit-learn, MONAI, direct formulas)."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import f1_score, roc_auc_score

from lib import metrics

g = torch.Generator().manual_seed(0)


def _pair(shape, noise=0.1):
    target = torch.rand(shape, generator=g)
    return (target + noise * torch.randn(shape, generator=g)).clamp(0, 1), target


def test_psnr_matches_scikit_image_per_sample():
    pred, target = _pair((3, 1, 20, 24))
    ours = metrics.psnr(pred, target, data_range=1.0)
    for i in range(3):
        ref = peak_signal_noise_ratio(target[i].numpy(), pred[i].numpy(), data_range=1.0)
        assert float(ours[i]) == pytest.approx(ref, rel=1e-5)
    assert torch.isinf(metrics.psnr(target, target, 1.0)).all()


@pytest.mark.parametrize("shape", [(2, 1, 32, 40), (2, 1, 24, 24, 24)])
def test_ssim_matches_scikit_image_gaussian_ssim(shape):
    pred, target = _pair(shape, noise=0.2)
    ours = metrics.ssim(pred, target, data_range=1.0)
    for i in range(shape[0]):
        ref = structural_similarity(target[i, 0].numpy(), pred[i, 0].numpy(), data_range=1.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(ref, abs=2e-3)
    assert float(metrics.ssim(target, target, 1.0).min()) == pytest.approx(1.0, abs=1e-5)


def test_ssim_on_a_real_volume_degrades_with_noise():
    import nibabel as nib
    from pathlib import Path

    vol = nib.load(Path(nib.__file__).parent / "tests/data/anatomical.nii").get_fdata().astype(np.float32)
    vol = torch.from_numpy(vol / vol.max())[None, None, :, :, :20]
    s = [float(metrics.ssim((vol + n * torch.randn(vol.shape, generator=g)).clamp(0, 1), vol, 1.0)[0]) for n in (0.01, 0.05, 0.2)]
    assert s[0] > s[1] > s[2]


def test_mae_cosine_direct_formulas():
    pred, target = _pair((2, 1, 8, 8))
    np.testing.assert_allclose(metrics.mae(pred, target, scale=2000.0).numpy(),
                               (pred - target).abs().reshape(2, -1).mean(1).numpy() * 2000, rtol=1e-6)
    a, b = pred[0].flatten().numpy(), target[0].flatten().numpy()
    assert float(metrics.cosine_similarity(pred, target)[0]) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)


def test_dice_matches_f1_and_monai():
    from monai.metrics import DiceMetric

    pred = (torch.rand(4, 1, 16, 16, generator=g) > 0.6).float()
    target = (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()
    ours = metrics.dice(pred, target)
    for i in range(4):
        assert float(ours[i]) == pytest.approx(f1_score(target[i].flatten(), pred[i].flatten()), rel=1e-6)
    ref = DiceMetric(include_background=True, reduction="none")(pred, target).flatten()
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6)
    empty = torch.zeros(1, 1, 4, 4)
    assert float(metrics.dice(empty, empty)[0]) == 1.0 and float(metrics.dice(empty, empty, empty=0.0)[0]) == 0.0


def test_auc_matches_scikit_learn_and_rejects_one_class():
    scores, labels = torch.rand(200, generator=g), (torch.rand(200, generator=g) > 0.7)
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    with pytest.raises(ValueError, match="single class"):
        metrics.auc(scores, torch.zeros(200))


def test_shape_mismatch_and_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"psnr: prediction \(1, 1, 4, 4\) and target \(1, 1, 4, 5\)"):
        metrics.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), 1.0)
    with pytest.raises(ValueError, match="data_range must be > 0"):
        metrics.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 0)
    with pytest.raises(ValueError, match="too small"):
        metrics.ssim(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 1.0)
