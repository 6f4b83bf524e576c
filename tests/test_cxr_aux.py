"""lib.families.cxr_change_aux: each auxiliary loss moves only its own network, the classification head shares
the change model's encoder, augmentation keeps findings with their images, and the external ordering scores."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from lib import config
from lib.data.paired import FINDINGS, CXRPairs, finding_vector
from lib.families import cxr_change as fam
from lib.families import cxr_change_aux as aux
from lib.losses.cxr_change import change_loss, change_target

NOTEBOOK = "05_cxr_change"


@pytest.fixture(scope="module")
def batch(smoke_cohort):
    data = CXRPairs(smoke_cohort, "train", 32)
    items = [data[i] for i in range(4)]
    return {k: torch.stack([it[k] for it in items]) for k in
            ("baseline", "followup", "change", "findings_baseline", "findings_followup")}


def _net(**overrides):
    cfg = config.resolve(NOTEBOOK, "smoke", image_size=32, augment=False, **overrides)
    torch.manual_seed(0)
    return cfg, aux.wrap(cfg, fam.build(cfg))


def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_without_weights_the_model_is_not_wrapped():
    cfg = config.resolve(NOTEBOOK, "smoke", adv_weight=0.0, classify_weight=0.0)
    model = fam.build(cfg)
    assert aux.wrap(cfg, model) is model


def _adversarial_step(batch):
    """A training step with the adversarial term only: the net (gradients filled) and the step's terms."""
    cfg, net = _net(adv_weight=0.5, classify_weight=0.0)
    net.train()
    loss, terms = aux.aux_step(net, batch, augment=False, dice_weight=1.0, adv_weight=0.5, classify_weight=0.0)
    loss.backward()
    return net, terms


def test_the_discriminator_learns_only_from_its_own_loss(batch):
    """The generator's adversarial term must not train the discriminator to be fooled: D's gradient from the
    whole step equals the gradient of the discriminator loss alone."""
    net, terms = _adversarial_step(batch)
    whole = _grads(net.discriminator)
    net.zero_grad()
    b, f, c = batch["baseline"], batch["followup"], batch["change"]
    pred = net(b, f).detach()
    d = net.discriminator
    real, fake = d(b, f, change_target(c)), d(b, f, pred)
    d_loss = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                    + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    d_loss.backward()
    for g_whole, g_alone in zip(whole, _grads(d)):
        torch.testing.assert_close(g_whole, g_alone, rtol=1e-5, atol=1e-7)
    assert terms["adv_d"] == pytest.approx(float(d_loss.detach()), rel=1e-5)


def test_the_adversarial_term_reaches_the_change_model(batch):
    net, _ = _adversarial_step(batch)
    with_adv = _grads(net.change)
    net.zero_grad()
    plain, _ = change_loss(net(batch["baseline"], batch["followup"]), batch["change"], 1.0)
    plain.backward()
    assert any(not torch.allclose(a, b) for a, b in zip(with_adv, _grads(net.change)))


def test_the_classifier_shares_the_encoder_and_validation_is_the_change_loss(batch):
    cfg, net = _net(adv_weight=0.0, classify_weight=0.3)
    assert net.classifier.encoder is net.change.encoder is net.encoder
    assert len({id(p) for p in net.parameters()}) == sum(1 for _ in net.parameters())  # shared once
    net.train()
    loss, terms = aux.aux_step(net, batch, augment=False, dice_weight=1.0, adv_weight=0.0, classify_weight=0.3)
    logits = net.classifier(torch.cat([batch["baseline"], batch["followup"]]))
    target = torch.cat([batch["findings_baseline"], batch["findings_followup"]])
    assert terms["classify"] == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, target).detach()), rel=1e-5)
    net.eval()
    val_loss, val_terms = aux.aux_step(net, batch, augment=False, dice_weight=1.0, adv_weight=0.0, classify_weight=0.3)
    ref, _ = change_loss(net(batch["baseline"], batch["followup"]), batch["change"], 1.0)
    assert set(val_terms) == {"mse", "soft_dice"} and torch.allclose(val_loss, ref)


def test_augmentation_swaps_findings_with_their_images():
    n = 64
    b, f = torch.zeros(n, 1, 4, 4), torch.ones(n, 1, 4, 4)
    fb, ff = torch.zeros(n, len(FINDINGS)), torch.ones(n, len(FINDINGS))
    b2, f2, c2, (fb2, ff2) = fam.augment_pairs(b, f, torch.ones(n, 1, 4, 4), torch.Generator().manual_seed(1),
                                               findings=(fb, ff))
    swapped = b2.flatten(1)[:, 0] == 1
    assert 0 < int(swapped.sum()) < n  # some pairs swapped, some not
    assert torch.equal(fb2[:, 0] == 1, swapped) and torch.equal(ff2[:, 0] == 0, swapped)
    assert torch.equal(c2.flatten(1)[:, 0] < 0, swapped)  # the change map flips sign with the swap


def test_finding_vectors_and_unknown_findings():
    v = finding_vector("nodule;effusion", "", float("nan"))
    assert v.tolist() == [float(k in ("nodule", "effusion")) for k in FINDINGS]
    with pytest.raises(ValueError, match="unknown finding"):
        finding_vector("tumour")


def test_change_area_and_the_progression_ordering():
    signed = torch.zeros(3, 1, 4, 4)
    signed[0, 0, :2] = 0.9     # half the image appeared
    signed[1, 0, 0, :2] = -0.9  # 2 of 16 pixels resolved
    area = aux.change_area(signed, 0.5)
    assert area.tolist() == pytest.approx([0.5, -2 / 16, 0.0])
    pairs = pd.DataFrame({"pair": list("abcd"), "a": list("abcd"), "b": list("abcd"),
                          "edema_progression": ["worsening", "stable", "improving", ""],
                          "note": ["x", "y", "z", ""]})
    assert aux.progression_columns(pairs) == ["edema_progression"]
    scores, labels = [0.3, -0.1, 0.2, -0.4], [1, 0, 0, 1]
    from lib import metrics
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
