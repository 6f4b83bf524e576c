"""lib.families.xray_to_ct: every preset's architecture reaches the model, the step functions pickle, and
evaluate writes the held-out rows, tables and run summary that 06_xray_to_ct wrote before the family existed."""

import lib  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)

import json
import pickle

import pandas as pd
import pytest
import torch

from lib import config  # noqa: I001  (before lib.families: lib.presets and lib.config import each other)
from lib.families import xray_to_ct as fam
from lib.families.results import read_heldout
from lib.metrics import reconstruction_metrics

NB = "06_xray_to_ct"


def test_default_angles():
    assert fam.default_angles(1) == (0.0,)
    assert fam.default_angles(2) == (0.0, 90.0)
    assert fam.default_angles(4) == (0.0, 45.0, 90.0, 135.0)
    with pytest.raises(ValueError, match="views must be an int >= 1"):
        fam.default_angles(0)


# --------------------------------------------------------------------------- the configuration reaches the model

def _architecture(model):
    swin = model.encoders[2].body.globl.layer  # the hybrid block of the mid encoder level
    return {"angles": model.angles, "image_size": model.image_size, "volume_size": model.volume_size,
            "base_channels": model.heads[-1].in_channels, "attention_channels": model.to_tokens.out_channels,
            "attention_heads": model.cross_view[0].heads, "cross_view_layers": len(model.cross_view),
            "swin_heads": swin.blocks[0].num_heads, "window_size": swin.window_size,
            "dense_layers": len(model.encoders[0].body.layers)}


def _expected(cfg):
    return {"angles": fam.default_angles(cfg.views), "image_size": cfg.image_size, "volume_size": cfg.volume_size,
            "base_channels": cfg.base_channels, "attention_channels": cfg.attention_channels,
            "attention_heads": cfg.attention_heads, "cross_view_layers": cfg.cross_view_layers,
            "swin_heads": cfg.attention_heads, "window_size": (cfg.window_size,) * 3,
            "dense_layers": cfg.dense_layers}


@pytest.mark.parametrize("preset", config.PRESETS)
def test_every_preset_reaches_the_model(preset):
    cfg = config.resolve(NB, preset)
    d = cfg.volume_size
    prior = torch.rand(d, d, d)
    if preset == "prod":  # 74M parameters: shapes only
        with torch.device("meta"):
            model = fam.build(cfg, prior=prior)
        assert model.prior.shape == (1, 1, d, d, d) and model.prior.is_meta
    else:
        model = fam.build(cfg, volume_extent=(0.9, 1.1, 0.8), prior=prior)
        assert model.volume_extent == pytest.approx((0.9, 1.1, 0.8))
        assert torch.equal(model.prior[0, 0], prior) == cfg.residual_prior
    assert _architecture(model) == _expected(cfg)


def test_overrides_reach_the_model():
    """Values unlike the constructor's defaults, so that a builder ignoring one of them fails."""
    over = dict(views=4, image_size=16, volume_size=32, base_channels=8, attention_channels=64, attention_heads=4,
                cross_view_layers=2, window_size=2, dense_layers=3)
    cfg = config.resolve(NB, "smoke", **over)
    model = fam.build(cfg)
    assert _architecture(model) == _expected(cfg)
    assert model.angles == (0.0, 45.0, 90.0, 135.0)


def test_residual_prior_off_ignores_the_prior():
    prior = torch.rand(16, 16, 16)
    on = fam.build(config.resolve(NB, "smoke"), prior=prior)
    off = fam.build(config.resolve(NB, "smoke", residual_prior=False), prior=prior)
    assert torch.equal(on.prior[0, 0], prior)
    assert torch.equal(off.prior, torch.zeros(1, 1, 16, 16, 16))


def test_parameter_counts_at_this_preset_and_prod():
    cfg = config.resolve(NB, "smoke")
    model = fam.build(cfg)
    sizes = fam.parameter_counts(cfg, model)
    assert list(sizes.preset) == ["smoke", "prod"]
    assert sizes.parameters[0] == fam.count_parameters(model)
    assert list(sizes.columns) == ["preset", "views", "image", "volume", "parameters"]
    assert (sizes.image[1], sizes.volume[1]) == (512, 128) and 60e6 < sizes.parameters[1] < 100e6  # prod: X2CT-GAN's 128^3


# --------------------------------------------------------------------------- step functions

def test_steps_pickle_and_give_the_same_loss():
    cfg = config.resolve(NB, "smoke", image_size=16)
    torch.manual_seed(0)
    model = fam.build(cfg, prior=torch.rand(16, 16, 16))
    for head in model.heads:  # the heads start at zero: wake them so the loss depends on the network
        torch.nn.init.normal_(head.weight, std=0.1)
    loss_fn = fam.build_loss(cfg)
    batch = {"views": torch.rand(2, 2, 1, 16, 16), "ct": torch.rand(2, 1, 16, 16, 16)}
    step, val = fam.steps(cfg, loss_fn)
    for bound in (step, val):
        again = pickle.loads(pickle.dumps(bound))
        assert again.func is bound.func  # a module-level function, found again by name
        (loss, terms), (loss2, terms2) = bound(model, batch), again(model, batch)
        assert torch.equal(loss, loss2) and terms.keys() == terms2.keys()
        assert all(torch.equal(terms[k], terms2[k]) for k in terms)
    volume, deep = model(batch["views"])
    loss, terms = step(model, batch)
    assert torch.equal(loss, loss_fn(volume, batch["ct"], deep)[0]) and set(terms) == set(loss_fn.active)
    val_loss, values = val(model, batch)
    m = reconstruction_metrics(volume.float().clamp(0, 1), batch["ct"], (cfg.hu_min, cfg.hu_max))
    assert torch.equal(val_loss, loss)
    assert values["psnr"] == pytest.approx(m["psnr"].mean().item()) and values["ssim_3d"] == pytest.approx(
        m["ssim"].mean().item())


# --------------------------------------------------------------------------- held-out results

def _notebook_rows(cfg, table, n):
    """The rows 06_xray_to_ct wrote itself before lib.families (its cell, verbatim)."""
    names = {"psnr": ("PSNR (dB; HU [-1000, 1000] -> [0, 1], data range 1)", True),
             "ssim": ("SSIM (3D, Gaussian window 11)", True), "mae_hu": ("MAE (HU)", False),
             "cosine": ("cosine similarity", True)}
    return [{"task": f"X-ray to CT, {cfg.views} view(s), {cfg.volume_size}^3", "metric": names[k][0],
             "headline": k == "psnr", "higher_is_better": names[k][1],
             "value": table.loc["model", (k, "mean")], "baseline": "mean training volume",
             "baseline_value": table.loc["mean training volume", (k, "mean")], "split": "test",
             "n": n, "seeds": str(cfg.seed)} for k in ["psnr", "ssim", "mae_hu", "cosine"]]


def test_heldout_rows_are_those_06_wrote():
    cfg = config.resolve(NB, "demo", views=4, seed=3)
    g = torch.Generator().manual_seed(0)
    test = {"subject": ["a", "b", "c"], "ct": torch.rand(3, 1, 16, 16, 16, generator=g),
            "pred": torch.rand(3, 1, 16, 16, 16, generator=g)}
    per_patient = fam.score(test, torch.rand(1, 16, 16, 16, generator=g), (-1000.0, 1000.0))
    table = per_patient.groupby("method", sort=False)[list(fam.METRICS)].agg(["mean", "std"])
    rows = fam.heldout_rows(cfg, table, 3)
    old = _notebook_rows(cfg, table, 3)
    # the results contract rounds to 4 decimals (lib.families.results.row); everything else is as written
    assert rows == [{**o, "value": round(float(o["value"]), 4), "baseline_value": round(float(o["baseline_value"]), 4)}
                    for o in old]
    assert rows[0]["task"] == "X-ray to CT, 4 view(s), 32^3" and rows[0]["seeds"] == "3"
    assert rows[0]["value"] != rows[0]["baseline_value"]


def test_evaluate_export_and_summary_on_the_smoke_cohort(smoke_cohort, tmp_path):
    cfg = config.resolve(NB, "smoke")
    data = fam.datasets(cfg, root=smoke_cohort)
    loaders = fam.loaders(cfg, data)
    mean = fam.mean_volume(data["train"])
    model = fam.build(cfg, volume_extent=data["train"].volume_extent(), prior=mean)
    ev = fam.evaluate(cfg, model, loaders["test"], mean, tmp_path, torch.device("cpu"))
    n = len(data["test"])
    rows = read_heldout(tmp_path)
    assert rows == ev.rows == fam.heldout_rows(cfg, ev.table, n)
    assert [r["metric"] for r in rows] == [name.format(lo=cfg.hu_min, hi=cfg.hu_max) for name, _ in fam.METRICS.values()]
    assert [r["headline"] for r in rows] == [True, False, False, False]
    assert all(r["n"] == n and r["baseline"] == "mean training volume" for r in rows)
    # the untrained residual model returns its prior, the mean training volume: the baseline's scores exactly
    assert all(r["value"] == r["baseline_value"] for r in rows)
    per_patient = pd.read_csv(tmp_path / "per_patient.csv")
    assert list(per_patient.method) == ["model"] * n + ["mean training volume"] * n
    assert json.loads((tmp_path / "per_patient.json").read_text()) == ev.per_patient.to_dict("records")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["model", "mean training volume"]
    assert summary["model"]["psnr"]["mean"] == pytest.approx(ev.per_patient.psnr[:n].mean())

    paths, back = fam.export_nifti(cfg, ev.test, data["test"], tmp_path / "predictions")
    assert [p.name for p in paths] == [f"{s}_{k}.nii.gz" for s in ev.test["subject"] for k in ("pred", "target")]
    assert back.array[0].mean() == pytest.approx(float(ev.test["pred"][0, 0].mean()) * 2000 - 1000, abs=1e-2)

    loss_fn = fam.build_loss(cfg)
    out = fam.finish_summary(ev, cfg, fam.parameter_counts(cfg, model), loss_fn, "completed")
    assert list(out) == ["test_psnr_model", "test_psnr_baseline", "test_ssim_model", "test_ssim_baseline",
                         "test_mae_hu_model", "test_mae_hu_baseline", "beats_baseline", "views", "residual_prior",
                         "perceptual", "parameters", "train_status"]
    assert out["test_psnr_model"] == ev.table.loc["model", ("psnr", "mean")]
    assert out["beats_baseline"] is False and out["perceptual"] is False
    assert set(out["parameters"]) == {"smoke", "prod"}
