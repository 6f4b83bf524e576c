"""lib.metrics.rsna_weighted_auc against an independent per-column computation with scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lib.data.convert.rsna2025_aneurysm import LABELS
from lib.metrics import rsna_weighted_auc


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 14)) < 0.3).astype(int)
    y[:2] = 0
    y[2:4] = 1  # every column holds both classes
    return y, rng.random((n, 14))


def _reference(y, s):
    """The competition's formula written out: (13 AUC_present + sum of the 13 location AUCs) / 26."""
    locs = [roc_auc_score(y[:, j], s[:, j]) for j in range(13)]
    return (13 * roc_auc_score(y[:, 13], s[:, 13]) + sum(locs)) / 26


def test_perfect_scores_give_one():
    y, _ = _data()
    out = rsna_weighted_auc(y, y.astype(float) * 0.8 + 0.1, labels=LABELS)
    assert out["score"] == 1.0 and all(v == 1.0 for v in out["auc"].values())
    assert list(out["auc"]) == LABELS and out["skipped"] == []
    assert out["weights"]["Aneurysm Present"] == 13 and out["weights"][LABELS[0]] == 1


def test_random_scores_match_the_formula_numpy_and_torch():
    y, s = _data(seed=3)
    expected = _reference(y, s)
    assert rsna_weighted_auc(y, s)["score"] == pytest.approx(expected, abs=1e-12)
    assert rsna_weighted_auc(torch.tensor(y), torch.tensor(s, dtype=torch.float32))["score"] == pytest.approx(expected, abs=1e-6)
    per = rsna_weighted_auc(y, s, labels=LABELS)["auc"]
    assert per["Basilar Tip"] == pytest.approx(roc_auc_score(y[:, 11], s[:, 11]))


def test_only_aneurysm_present_right():
    y, _ = _data(seed=1)
    s = np.full(y.shape, 0.5)                # every location: AUC 0.5 (constant scores)
    s[:, 13] = y[:, 13]                      # present: perfect
    out = rsna_weighted_auc(y, s, labels=LABELS)
    assert out["auc"]["Aneurysm Present"] == 1.0 and out["auc"][LABELS[0]] == 0.5
    assert out["score"] == pytest.approx((13 * 1.0 + 13 * 0.5) / 26) == pytest.approx(0.75)
    assert out["score"] == pytest.approx(_reference(y, s))


def test_single_class_location_is_skipped_and_weights_renormalised():
    # 4 series, hand-made: present perfect (AUC 1), location 0 inverted (AUC 0), location 1 never
    # positive (undefined: left out), locations 2..12 constant scores (AUC 0.5).
    y = np.zeros((4, 14), int)
    y[:, 13] = [0, 0, 1, 1]
    y[:, 0] = [0, 1, 0, 1]
    y[:, 2:13] = np.array([1, 0, 0, 1])[:, None]
    s = np.full((4, 14), 0.3)
    s[:, 13] = [0.1, 0.2, 0.8, 0.9]
    s[:, 0] = [0.9, 0.1, 0.8, 0.2]           # positives score lower: AUC 0
    out = rsna_weighted_auc(y, s, labels=LABELS)
    # (13 * 1 + 1 * 0 + 11 * 0.5) / (13 + 1 + 11) = 18.5 / 25
    assert out["score"] == pytest.approx(18.5 / 25) == pytest.approx(0.74)
    assert out["skipped"] == [LABELS[1]] and math.isnan(out["auc"][LABELS[1]]) and out["weights"][LABELS[1]] == 0
    assert out["auc"][LABELS[0]] == 0.0 and out["auc"]["Aneurysm Present"] == 1.0
    defined = [j for j in range(14) if j != 1]
    w = np.array([13.0 if j == 13 else 1.0 for j in defined])
    ref = np.array([roc_auc_score(y[:, j], s[:, j]) for j in defined])
    assert out["score"] == pytest.approx(float((w * ref).sum() / w.sum()))


@pytest.mark.parametrize("y_shape,s_shape", [((10, 13), (10, 13)), ((10, 14), (10, 13)), ((14,), (14,)),
                                             ((10, 14, 1), (10, 14, 1))])
def test_bad_shapes_raise(y_shape, s_shape):
    with pytest.raises(ValueError, match=r"shape \[n, 14\]"):
        rsna_weighted_auc(np.zeros(y_shape), np.zeros(s_shape))


def test_bad_inputs_raise():
    y, s = _data()
    with pytest.raises(ValueError, match="14 distinct names"):
        rsna_weighted_auc(y, s, labels=LABELS[:13] + ["Present"])
    with pytest.raises(ValueError, match="only 0 and 1"):
        rsna_weighted_auc(y * 2, s)
    s[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rsna_weighted_auc(y, s)


def test_single_class_aneurysm_present_raises():
    y, s = _data()
    y[:, 13] = 1
    with pytest.raises(ValueError, match="'Aneurysm Present' holds a single class"):
        rsna_weighted_auc(y, s, labels=LABELS)
