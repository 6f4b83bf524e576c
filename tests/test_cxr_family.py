"""lib.families.cxr_change: every preset's architecture reaches the built networks, the step functions are
picklable, and the held-out rows are those that lib.summary derived from 05's files before the family layer."""

import math
import pickle
from dataclasses import fields

import pandas as pd
import pytest
import torch

from lib import config
from lib.families import cxr_change as fam
from lib.families.results import read_heldout
from lib.models import cxr_change as cc

NOTEBOOK = "05_cxr_change"
FIELDS = [f.name for f in fields(cc.ChangeModelConfig)]


def architecture(model) -> dict:
    """The architecture read back from the built modules (not from the config they were given)."""
    enc, levels = model.encoder, model.encoder.features.levels
    t = enc.bottleneck.transformer
    expanding = levels[1][0]._expand_conv  # levels after the first expand by expand_ratio
    return {"image_size": model.image_size,
            "channels": (enc.features.stem[0][0].out_channels, *(level[-1]._project_conv.out_channels for level in levels)),
            "blocks": tuple(len(level) for level in levels),
            "expand_ratio": expanding.out_channels // expanding.in_channels,
            "kernel_size": levels[0][0]._depthwise_conv.kernel_size[0],
            "hidden_size": t.norm.normalized_shape[0],
            "transformer_layers": len(t.blocks),
            "num_heads": t.blocks[0].attn.num_heads,
            "mlp_dim": t.blocks[0].mlp.linear1.out_features,
            "patch_size": t.unpatch.kernel_size[0],
            "inter_channels": enc.bottleneck.conv[0][0].out_channels,
            "norm_groups": max(m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)),
            "decoder_channels": tuple(block.conv[1][0].out_channels for block in model.decoder),
            "grad_checkpointing": enc.features.grad_checkpointing and t.grad_checkpointing}


@pytest.mark.parametrize("preset", ["smoke", "demo", "subset", "prod"])
def test_every_presets_architecture_reaches_the_built_model(preset):
    cfg = config.resolve(NOTEBOOK, preset)
    assert set(FIELDS) <= set(cfg)  # no field falls back to a default the preset cannot change
    mc = fam.model_config(cfg)
    assert {name: getattr(mc, name) for name in FIELDS} == {name: cfg[name] for name in FIELDS}
    with torch.device("meta" if preset in ("subset", "prod") else "cpu"):  # the large ones: shapes only
        for variant, cls in (("big", cc.LongitudinalMIMModelBig), ("small", cc.LongitudinalMIMModel)):
            model = fam.build(config.Config(cfg, variant=variant))
            assert type(model) is cls and model.config == mc
            assert architecture(model) == {name: cfg[name] for name in FIELDS}
        mim = fam.build_mim(cfg)
    assert mim.config == mc and mim.encoder.channels == cfg.channels
    if preset == "prod":
        # prod is the note's architecture, the networks' defaults, recomputing its blocks to fit a T4
        assert mc == cc.ChangeModelConfig(grad_checkpointing=True)


def test_an_override_changes_the_built_model():
    smoke = config.resolve(NOTEBOOK, "smoke")
    changed = dict(image_size=96, channels=(8, 16, 16, 24, 48), blocks=(1, 2, 1, 1), expand_ratio=3, kernel_size=5,
                   hidden_size=48, transformer_layers=2, num_heads=4, mlp_dim=96, patch_size=2, inter_channels=24,
                   norm_groups=4, decoder_channels=(12, 12, 8, 4), grad_checkpointing=True)
    assert all(smoke[k] != v for k, v in changed.items())  # every value differs from the preset's
    cfg = config.resolve(NOTEBOOK, "smoke", **changed)
    model = fam.build(cfg)
    assert architecture(model) == changed
    assert architecture(fam.build(smoke)) == {k: smoke[k] for k in FIELDS}
    y = model(torch.rand(1, 1, 96, 96), torch.rand(1, 1, 96, 96))
    assert y.shape == (1, 1, 96, 96)


def test_the_variant_picks_the_class_and_an_unknown_one_is_refused():
    cfg = config.resolve(NOTEBOOK, "smoke", variant="small")
    assert type(fam.build(cfg)) is cc.LongitudinalMIMModel
    with pytest.raises(ValueError, match="variant"):
        fam.build(config.Config(cfg, variant="medium"))


def test_the_mim_encoder_fits_the_change_model():
    cfg = config.resolve(NOTEBOOK, "smoke")
    fam.build(cfg).encoder.load_state_dict(fam.build_mim(cfg).encoder.state_dict())  # strict: same architecture


def _batch(n=2, s=64):
    g = torch.Generator().manual_seed(0)
    change = torch.zeros(n, 1, s, s)
    change[:, :, 8:20, 10:30] = 0.05
    return {"baseline": torch.rand(n, 1, s, s, generator=g), "followup": torch.rand(n, 1, s, s, generator=g),
            "change": change}


@pytest.mark.parametrize("stage", ["mim", "change"])
def test_steps_are_picklable_and_bound_to_the_config(stage):
    cfg = config.resolve(NOTEBOOK, "smoke", dice_weight=0.5, mim_mask_ratio=0.4)
    train_step, val_step = fam.steps(cfg, stage)
    assert train_step.keywords == ({"augment": True, "dice_weight": 0.5} if stage == "change"
                                   else {"image_size": 64, "patch": 8, "ratio": 0.4})
    again, _ = pickle.loads(pickle.dumps((train_step, val_step)))
    net = (fam.build if stage == "change" else fam.build_mim)(cfg).eval()  # eval: no augmentation
    batch = _batch()
    torch.manual_seed(1)
    a = train_step(net, batch)
    torch.manual_seed(1)
    b = again(net, batch)
    a, b = (x[0] if isinstance(x, tuple) else x for x in (a, b))
    assert torch.isfinite(a) and a.item() == b.item()
    with pytest.raises(ValueError, match="stage"):
        fam.steps(cfg, "vae")


def test_the_change_step_augments_only_while_training():
    cfg = config.resolve(NOTEBOOK, "smoke")
    step, _ = fam.steps(cfg)
    net = fam.build(cfg)
    batch = _batch(8)
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(step(net.eval(), batch)[0].item())
    assert losses[0] == losses[1]  # evaluation: no random swap or mirror
    torch.manual_seed(0)
    trained = step(net.train(), batch)[0].item()
    torch.manual_seed(3)
    assert step(net.train(), batch)[0].item() != trained


# --------------------------------------------------------------------------- the held-out rows

def _cxr_rows(run_dir):
    """lib.summary._cxr_rows (and its _row) as they were before the family layer (a70919f~1): the oracle."""
    def _row(task, metric, value, baseline, baseline_value, higher_is_better, n, headline=False, split="test"):
        return {"task": task, "metric": metric, "headline": headline, "higher_is_better": higher_is_better,
                "value": round(float(value), 4), "baseline": baseline,
                "baseline_value": "" if baseline_value == "" else round(float(baseline_value), 4),
                "split": split, "n": "" if n == "" or pd.isna(n) else int(n), "seeds": ""}

    t = pd.read_csv(run_dir / "test_scores.csv").set_index("method")
    task, m, b = "signed change map of a radiograph pair", t.loc["model"], t.loc["subtraction"]
    base = "naive subtraction (threshold chosen on val)"
    pairs = pd.read_csv(run_dir / "test_pairs.csv")
    n_all, n_nuisance = len(pairs), int(pairs["nuisance_only"].astype(bool).sum())
    n_changed = n_all - n_nuisance
    return [_row(task, "Dice on changed pixels (mean over pairs with change)", m["dice"], base, b["dice"], True,
                 n_changed, headline=True),
            _row(task, "pixel AUC of |change| (all pixels of all pairs)", m["pixel_auc"], base, b["pixel_auc"],
                 True, n_all),
            _row(task, "false-positive area on nuisance-only pairs (fraction of pixels)", m["fp_area"], base,
                 b["fp_area"], False, n_nuisance)]


SCORES = pd.DataFrame({"method": ["model", "subtraction", "subtraction, smoothed 2 px"],
                       "dice": [0.812345, 0.70449, 0.75], "signed_dice": [0.8, 0.7, 0.75],
                       "pixel_auc": [0.99871, 0.92551, 0.95], "fp_area": [0.00012, 0.01737, 0.01],
                       "threshold": [0.2, 0.03, 0.02]}).set_index("method")
PAIRS = pd.DataFrame({"pair": [f"pair-{i}" for i in range(5)], "appeared": ["nodule", "", "effusion", "", ""],
                      "resolved": ["", "", "", "consolidation", ""], "nuisance_only": [0, 1, 0, 0, 1],
                      "changed_px": [40, 0, 300, 120, 0]})


def test_rows_keep_the_meaning_of_the_summary_before(tmp_path):
    rows = fam.heldout_rows(SCORES, PAIRS)
    base = {"task": "signed change map of a radiograph pair", "baseline": "naive subtraction (threshold chosen on val)",
            "split": "test", "seeds": ""}
    assert rows == [
        {**base, "metric": "Dice on changed pixels (mean over pairs with change)", "headline": True,
         "higher_is_better": True, "value": 0.8123, "baseline_value": 0.7045, "n": 3},  # n: the pairs with change
        {**base, "metric": "pixel AUC of |change| (all pixels of all pairs)", "headline": False,
         "higher_is_better": True, "value": 0.9987, "baseline_value": 0.9255, "n": 5},
        {**base, "metric": "false-positive area on nuisance-only pairs (fraction of pixels)", "headline": False,
         "higher_is_better": False, "value": 0.0001, "baseline_value": 0.0174, "n": 2}]
    SCORES.reset_index().to_csv(tmp_path / "test_scores.csv", index=False)
    PAIRS.to_csv(tmp_path / "test_pairs.csv", index=False)
    assert rows == _cxr_rows(tmp_path)
    # without nuisance-only pairs the false-positive area is undefined (NaN): no such row
    quiet = fam.heldout_rows(SCORES.assign(fp_area=math.nan), PAIRS.assign(nuisance_only=0))
    assert [r["metric"] for r in quiet] == [r["metric"] for r in rows[:2]] and quiet[0]["n"] == 5


def test_evaluate_writes_the_files_the_summary_read_and_the_same_rows(smoke_cohort, tmp_path):
    cfg = config.resolve(NOTEBOOK, "smoke", image_size=32)
    torch.manual_seed(0)
    model = fam.build(cfg)
    data_loaders = fam.loaders(cfg, fam.datasets(cfg, root=smoke_cohort))
    ev = fam.evaluate(cfg, model, data_loaders, tmp_path, torch.device("cpu"))
    scores = pd.read_csv(tmp_path / "test_scores.csv")
    assert list(scores.columns) == ["method", "dice", "signed_dice", "pixel_auc", "fp_area", "threshold"]
    assert list(scores["method"]) == ["model", "subtraction", "subtraction, smoothed 2 px"]
    assert list(pd.read_csv(tmp_path / "test_pairs.csv").columns) == [
        "pair", "appeared", "resolved", "nuisance_only", "changed_px", "model dice", "model fp_area",
        "subtraction dice", "subtraction fp_area"]
    assert read_heldout(tmp_path) == ev.rows == _cxr_rows(tmp_path)
    assert set(fam.finish_summary(ev, cfg, fam.parameter_counts(cfg, model), 0.1)) == {
        "test_dice_model", "test_dice_subtraction", "test_dice_subtraction_smoothed", "test_scores", "parameters",
        "mim_epochs", "freeze_encoder", "real_radiograph_flagged"}
