"""The CXR change-map family's layers: the networks (lib.models.cxr_change), losses (lib.losses.cxr_change),
change-map metrics (lib.metrics) and the family's augmentation, baseline, freezing and predict
(lib.families.cxr_change): shapes, shared weights, signed output, loss, baseline and metrics.

Numbers are checked against independent computations: scikit-learn (Dice as F1, ROC AUC), scipy
(Gaussian smoothing), hand-written reference formulas, and MONAI where the module delegates to it.
"""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from lib import metrics
from lib.families import cxr_change as fam
from lib.losses import cxr_change as losses
from lib.models import cxr_change as cc

TINY = dict(image_size=32, channels=(8, 8, 16, 16, 32), blocks=(1, 1, 1, 2), expand_ratio=2, hidden_size=32,
            transformer_layers=1, num_heads=2, mlp_dim=64, patch_size=1, inter_channels=16, norm_groups=8)
DEC = dict(decoder_channels=(16, 16, 8, 8))


def tiny(cls=cc.LongitudinalMIMModelBig, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(cc.ChangeModelConfig(**{**TINY, **DEC, **kw}))


def pair(n=2, s=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, s, s, generator=g), torch.rand(n, 1, s, s, generator=g)


# --------------------------------------------------------------------------- the change models

@pytest.mark.parametrize("cls", [cc.LongitudinalMIMModelBig, cc.LongitudinalMIMModel])
def test_change_models_give_a_signed_map_of_the_input_size(cls):
    model = tiny(cls)
    b, f = pair(3)
    y = model(b, f)
    assert y.shape == (3, 1, 32, 32) and y.dtype == torch.float32
    assert y.abs().max() <= 1 and (y > 0).any() and (y < 0).any()  # tanh: both signs representable
    assert not torch.allclose(model(f, b), y)  # the order of the visits matters


def test_the_small_model_has_no_skips_and_fewer_decoder_weights():
    big, small = tiny(cc.LongitudinalMIMModelBig), tiny(cc.LongitudinalMIMModel)
    assert fam.count_parameters(big.encoder) == fam.count_parameters(small.encoder)
    assert fam.count_parameters(small.decoder) < fam.count_parameters(big.decoder)


def test_one_encoder_serves_both_images_and_pairs_do_not_mix():
    model = tiny()
    b, f = pair(2)
    # The pair's forward sends [baseline; followup] through the encoder in one batch: GroupNorm keeps
    # the samples independent, so each image's features equal those of the image alone.
    both = model.encoder(torch.cat([b, f]))
    alone = model.encoder(b[:1])
    for level_both, level_alone in zip(both, alone):
        torch.testing.assert_close(level_both[:1], level_alone, rtol=1e-4, atol=1e-5)
    # one encoder: the model's weights are encoder + fusion + decoder + head, nothing duplicated
    parts = sum(fam.count_parameters(m) for m in (model.encoder, model.fusion, model.decoder, model.head))
    assert fam.count_parameters(model) == parts
    # and the batch of pairs is independent too
    torch.testing.assert_close(model(b, f)[1:], model(b[1:], f[1:]), rtol=1e-4, atol=1e-5)


def test_every_parameter_receives_a_gradient():
    model = tiny()
    b, f = pair(2)
    change = torch.zeros(2, 1, 32, 32)
    change[0, 0, 8:16, 8:16], change[1, 0, 20:24, 4:12] = 0.05, -0.03
    loss, _ = losses.change_loss(model(b, f), change)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_encoder_levels_have_the_documented_shapes():
    enc = tiny().encoder
    feats = enc(torch.rand(2, 1, 32, 32))
    assert [tuple(x.shape) for x in feats] == [(2, 8, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]


def test_the_notes_constants_are_the_defaults_and_give_640x32x32_at_512():
    with torch.device("meta"):
        model = cc.LongitudinalMIMModelBig()  # ChangeModelConfig's defaults: the note's constants
        feats = model.encoder(torch.empty(1, 1, 512, 512))
        y = model(torch.empty(1, 1, 512, 512), torch.empty(1, 1, 512, 512))
    assert tuple(feats[-1].shape) == (1, 640, 32, 32) and tuple(y.shape) == (1, 1, 512, 512)
    t = model.encoder.bottleneck.transformer
    assert t.grid ** 2 == 256 and t.norm.normalized_shape == (768,)  # the note's PATCHES_NUM, HIDDEN_CHANNELS
    assert model.encoder.bottleneck.conv[0][0].out_channels == 704  # INTER_CHANNELS
    assert [b.conv[1][0].out_channels for b in model.decoder] == [320, 160, 80, 40]
    assert sum(len(level) for level in model.encoder.features.levels) == 8  # the note's 8 selected blocks
    assert model.encoder.bottleneck.merge[1].num_groups == 32  # GROUP_NORM_GROUPS
    assert 100e6 < fam.count_parameters(model) < 200e6


def test_initialisation_follows_the_note():
    model = tiny()
    conv = model.fusion.full
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() - math.sqrt(2 / fan_in)) < 0.15 * math.sqrt(2 / fan_in)  # Kaiming, fan-in
    lin = model.encoder.bottleneck.transformer.blocks[0].mlp.linear1
    # truncated at two std: std of the truncated normal is 0.88 sigma
    assert lin.weight.abs().max() <= 2 * cc.INIT_STD + 1e-6 and abs(lin.weight.std().item() - 0.88 * cc.INIT_STD) < 0.002


def test_same_seed_same_model_same_numbers():
    b, f = pair(1)
    torch.testing.assert_close(tiny(seed=3)(b, f), tiny(seed=3)(b, f), rtol=0, atol=0)


@pytest.mark.parametrize("kw,message", [
    ({"image_size": 40}, "image_size 40 must be divisible by 2\\*\\*4 = 16"),
    ({"decoder_channels": (16, 8)}, "decoder_channels must give 4 positive widths"),
    ({"blocks": (1, 1)}, "blocks must give one count >= 1 per level"),
    ({"patch_size": 3}, "patch_size 3 must divide the feature map size 2"),
    ({"hidden_size": 33}, "hidden_size 33 must be divisible by num_heads 2"),
    ({"kernel_size": 4}, "kernel_size must be 3, 5 or 7"),
    ({"channels": (8,)}, "channels must list >= 2 positive widths"),
    ({"norm_groups": 0}, "norm_groups must be an int >= 1"),
])
def test_impossible_configurations_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        cc.LongitudinalMIMModelBig(cc.ChangeModelConfig(**{**TINY, **DEC, **kw}))


def test_wrong_inputs_are_refused_with_the_expected_shape():
    model = tiny()
    b, f = pair(2)
    with pytest.raises(ValueError, match=r"baseline must be \[B, 1, 32, 32\].*got \(2, 1, 64, 64\)"):
        model(torch.rand(2, 1, 64, 64), f)
    with pytest.raises(ValueError, match=r"followup must be \[B, 1, 32, 32\].*got \(2, 3, 32, 32\)"):
        model(b, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="differ in shape"):
        model(b, f[:1])


def test_freeze_encoder_stops_its_gradients_only():
    model = tiny()
    n = fam.freeze_encoder(model)
    assert n == fam.count_parameters(model.encoder) and fam.count_parameters(model, trainable_only=True) == \
        fam.count_parameters(model) - n
    b, f = pair(2)
    model(b, f).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert fam.freeze_encoder(model, frozen=False) == n and fam.count_parameters(model, trainable_only=True) == fam.count_parameters(model)
    with pytest.raises(ValueError, match="Discriminator has no encoder"):
        fam.freeze_encoder(cc.Discriminator(channels=8))


# --------------------------------------------------------------------------- auxiliary models

def test_masked_reconstruction_pretrains_the_same_encoder():
    mim = tiny(cc.MaskedReconstructionModel)
    x = torch.rand(2, 1, 32, 32)
    mask = losses.random_patch_mask(2, 32, 8, 0.5, generator=torch.Generator().manual_seed(0))
    rec = mim(x, mask)
    assert rec.shape == x.shape
    # the encoder sees nothing of the hidden pixels: changing them leaves the reconstruction unchanged
    x2 = torch.where(mask.bool(), torch.rand_like(x), x)
    torch.testing.assert_close(mim(x2, mask), rec)
    change_model = tiny()
    change_model.encoder.load_state_dict(mim.encoder.state_dict())  # strict: same architecture
    with pytest.raises(ValueError, match="mask must be"):
        mim(x, mask[:, :, :16])


def test_random_patch_mask_hides_exactly_the_ratio_in_whole_patches():
    m = losses.random_patch_mask(4, 32, 8, 0.6, generator=torch.Generator().manual_seed(0))
    assert m.shape == (4, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    patches = m.reshape(4, 4, 8, 4, 8)
    assert torch.all(patches.amin(dim=(2, 4)) == patches.amax(dim=(2, 4)))  # constant inside each patch
    assert torch.all(patches[:, :, 0, :, 0].sum(dim=(1, 2)) == round(0.6 * 16))
    assert not torch.equal(m[0], m[1])
    with pytest.raises(ValueError, match="must divide"):
        losses.random_patch_mask(1, 32, 5, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        losses.random_patch_mask(1, 32, 8, 1.0)


def test_masked_loss_is_the_mean_absolute_error_on_hidden_pixels():
    g = torch.Generator().manual_seed(0)
    pred, img = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    mask = losses.random_patch_mask(2, 16, 4, 0.5, generator=g)
    ref = np.abs(pred.numpy() - img.numpy())[mask.numpy() > 0].mean()
    assert losses.masked_reconstruction_loss(pred, img, mask).item() == pytest.approx(ref, rel=1e-6)
    visible_changed = torch.where(mask.bool(), pred, pred + 5)
    assert losses.masked_reconstruction_loss(visible_changed, img, mask).item() == pytest.approx(ref, rel=1e-6)


def test_classification_model_gives_14_logits():
    model = tiny(cc.ClassificationModel)
    assert model(torch.rand(3, 1, 32, 32)).shape == (3, 14)  # the note's LABELS_NUM, the default
    with pytest.raises(ValueError, match="labels_num"):
        cc.ClassificationModel(cc.ChangeModelConfig(**TINY), labels_num=0)


def test_patchgan_discriminator_on_the_triplet():
    d = cc.Discriminator(channels=8)
    x = torch.rand(2, 1, 64, 64)
    out = d(x, x, x)
    assert out.shape == (2, 1, 64 // 8 - 2, 64 // 8 - 2)  # pix2pix: 30 x 30 patches at 256
    with pytest.raises(ValueError, match="share one shape"):
        d(x, x, x[:, :, :32])


# --------------------------------------------------------------------------- loss and augmentation

def blobs(n=2, s=32):
    c = torch.zeros(n, 1, s, s)
    c[0, 0, 4:12, 4:12] = 0.04      # appeared
    c[0, 0, 20:26, 18:30] = -0.02   # resolved
    if n > 1:
        c[1, 0, 10:14, 10:20] = 0.1
    return c


def test_change_loss_is_zero_for_the_sign_map_and_punishes_the_wrong_sign():
    c = blobs()
    perfect, _ = losses.change_loss(losses.change_target(c), c)
    wrong, _ = losses.change_loss(-losses.change_target(c), c)
    silent, _ = losses.change_loss(torch.zeros_like(c), c)
    assert perfect.item() == pytest.approx(0, abs=1e-5)
    assert wrong.item() > silent.item() > 0.5
    empty, _ = losses.change_loss(torch.zeros_like(c), torch.zeros_like(c))  # nuisance-only: nothing to find
    assert empty.item() == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 1, S, S\]"):
        losses.change_loss(torch.zeros(2, 2, 32, 32), torch.zeros(2, 2, 32, 32))


def test_change_loss_matches_a_reference_formula():
    c = blobs()
    y = torch.tanh(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    loss, parts = losses.change_loss(y, c, dice_weight=0.5)
    t = np.sign(c.numpy())
    yn = y.numpy()
    mse = np.mean((yn - t) ** 2)
    dices = []
    for p, g in ((np.clip(yn, 0, None), t > 0), (np.clip(-yn, 0, None), t < 0)):
        dices.append((2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5))
    ref = mse + 0.5 * (1 - np.mean(dices))
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-5)


def test_augment_pairs_keeps_every_pair_consistent():
    b, f = pair(16)
    c = torch.randn(16, 1, 32, 32)
    ab, af, ac = fam.augment_pairs(b, f, c, generator=torch.Generator().manual_seed(0))
    seen = set()
    for i in range(16):
        for swapped in (False, True):
            for flipped in (False, True):
                eb, ef, ec = (f[i], b[i], -c[i]) if swapped else (b[i], f[i], c[i])
                if flipped:
                    eb, ef, ec = eb.flip(-1), ef.flip(-1), ec.flip(-1)
                if torch.equal(ab[i], eb) and torch.equal(af[i], ef) and torch.equal(ac[i], ec):
                    seen.add((swapped, flipped))
                    break
            else:
                continue
            break
        else:
            pytest.fail(f"pair {i} is not a swap/flip of the original")
    assert len(seen) >= 3  # the four variants occur


# --------------------------------------------------------------------------- baseline and metrics

def test_subtraction_baseline_ignores_exposure_and_keeps_the_sign():
    b = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    assert fam.subtraction_baseline(b, 1.04 * b).abs().max() < 1e-5  # a gain change is no change
    f = b.clone()
    f[0, 0, 5:10, 5:10] += 0.2
    f[0, 0, 20:25, 20:25] -= 0.1
    d = fam.subtraction_baseline(b, 0.97 * f)
    assert d[0, 0, 7, 7] > 0.15 and d[0, 0, 22, 22] < -0.07 and d[0, 0, 15, 28].abs() < 0.02


def test_smoothed_baseline_matches_scipy_inside_the_image():
    g = torch.Generator().manual_seed(0)
    b, f = torch.rand(1, 1, 48, 48, generator=g) + 0.5, torch.rand(1, 1, 48, 48, generator=g) + 0.5
    raw = fam.subtraction_baseline(b, f)[0, 0].numpy()
    smooth = fam.subtraction_baseline(b, f, sigma=1.5)[0, 0].numpy()
    ref = ndimage.gaussian_filter(raw.astype(np.float64), 1.5, truncate=4.0)
    np.testing.assert_allclose(smooth[8:-8, 8:-8], ref[8:-8, 8:-8], atol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        fam.subtraction_baseline(b, f, sigma=-1)


def test_change_metrics_against_scikit_learn():
    g = torch.Generator().manual_seed(0)
    change = torch.cat([blobs(2), torch.zeros(1, 1, 32, 32)])
    signed = 0.8 * torch.sign(change) + 0.3 * torch.randn(3, 1, 32, 32, generator=g)
    per = metrics.change_metrics(signed, change, 0.5)
    for i in range(2):
        ref = f1_score((change[i] != 0).flatten().numpy(), (signed[i].abs() > 0.5).flatten().numpy())
        assert per["dice"][i].item() == pytest.approx(ref, rel=1e-5)
    assert math.isnan(per["dice"][2]) and math.isnan(per["fp_area"][0])
    assert per["fp_area"][2].item() == pytest.approx((signed[2].abs() > 0.5).float().mean().item())
    s = metrics.change_summary(signed, change, 0.5)
    assert s["pixel_auc"] == pytest.approx(roc_auc_score((change != 0).flatten().numpy(), signed.abs().flatten().numpy()))
    assert s["dice"] == pytest.approx(per["dice"][:2].mean().item())


def test_signed_dice_only_counts_the_right_sign():
    change = blobs(1)
    right = metrics.change_metrics(torch.sign(change), change, 0.5)
    wrong = metrics.change_metrics(-torch.sign(change), change, 0.5)
    assert right["dice"].item() == right["signed_dice"].item() == 1.0
    assert wrong["dice"].item() == 1.0 and wrong["signed_dice"].item() == 0.0


def test_choose_threshold_separates_change_from_noise():
    g = torch.Generator().manual_seed(0)
    change = blobs(2)
    scores = (change != 0).float() * 0.5 + 0.2 * torch.rand(2, 1, 32, 32, generator=g)
    t = metrics.choose_threshold(scores, change)
    assert 0.15 < t < 0.5  # a grid of 200 quantiles: the threshold sits at (or next to) the gap
    assert metrics.change_summary(scores, change, t)["dice"] > 0.99
    assert metrics.change_summary(scores, change, 0.1)["dice"] < 0.5
    with pytest.raises(ValueError, match="no pair has changed pixels"):
        metrics.choose_threshold(scores, torch.zeros_like(change))


def test_predict_over_the_smoke_cohort(smoke_cohort):
    from torch.utils.data import DataLoader

    from lib.data.datasets import CXRPairs

    model = tiny()
    ds = CXRPairs(smoke_cohort, "test", 32)
    out = fam.predict(model, DataLoader(ds, batch_size=2), torch.device("cpu"), amp=False)
    n = len(ds)
    assert out["pred"].shape == out["change"].shape == (n, 1, 32, 32) and len(out["pair"]) == n
    assert out["nuisance_only"].dtype == torch.bool
    assert model.training  # predict restores the mode


def test_masked_reconstruction_loss_counts_hidden_pixels_in_float32_under_fp16():
    # a T4 batch: 16 x 128^2 with 155,648 hidden pixels, more than float16 holds (65,504)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(16, 1, 128, 128, generator=g)
    pred = (img + 0.1 * torch.randn(16, 1, 128, 128, generator=g)).half()
    mask = losses.random_patch_mask(16, 128, 16, 0.6, generator=torch.Generator().manual_seed(1))
    ref = ((pred.double() - img.double()).abs() * mask.double()).sum() / mask.double().sum()
    assert mask.sum() > 65504
    assert losses.masked_reconstruction_loss(pred, img, mask).item() == pytest.approx(ref.item(), rel=1e-5)
