"""lib.families.ct_diffusion: the preset reaches both networks, the step functions pickle and compute the losses,
data preparation (crops, windows), the scores at the notebook's data range (2 on the [-1, 1] window), the
changed-voxel MAE (lib.metrics) against a reference loop, and the held-out rows as lib.summary built them before
the family layer."""

import math
import pickle

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from lib import config, metrics, paths
from lib.families import ct_diffusion as F
from lib.families.results import read_heldout
from lib.losses import diffusion as L
from lib.models.vae import FrameVAE
from lib.runs import Run

NOTEBOOK = "04_ct_diffusion"


# --------------------------------------------------------------------------- networks from the preset

def test_builders_follow_the_preset():
    for preset in ("smoke", "demo"):
        c = config.resolve(NOTEBOOK, preset)
        v = F.build_vae(c)
        assert v.channels == tuple(c.vae_channels) and v.latent_channels == c.latent_channels
        assert (v.discriminator is not None) == (c.adv_weight > 0)
        d = F.build_denoiser(c)
        assert d.model_channels == c.model_channels and d.factor == 2 ** (len(c.channel_mult) - 1)
        assert sum(b.temporal is not None for level in d.down for b in level) == c.num_res_blocks * len(c.channel_mult)
    c = config.resolve(NOTEBOOK, "smoke", disc_layers=2, temporal_attention=False)
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(F.build_vae(c).discriminator) == convs(F.build_vae(config.Config(c, disc_layers=3)).discriminator) - 1
    assert all(b.temporal is None for level in F.build_denoiser(c).down for b in level)
    assert F.build_vae(config.Config(c, adv_weight=0.0)).discriminator is None


def test_the_notebook_quotes_the_prod_parameter_counts():
    c = config.resolve(NOTEBOOK, "prod")
    with torch.device("meta"):  # no memory, no initialisation
        counts = F.parameter_counts(F.build_vae(c), F.build_denoiser(c))
    text = f"{counts['vae'] / 1e6:.1f}M (VAE) and {counts['denoiser'] / 1e6:.1f}M (denoiser)"
    assert text == "18.2M (VAE) and 115.7M (denoiser)"
    nb = nbformat.read(paths.ROOT / "notebooks" / f"{NOTEBOOK}.ipynb", as_version=4)
    assert any(text in cell.source for cell in nb.cells if cell.cell_type == "markdown")


def test_the_schedule_comes_from_the_preset():
    step, val_step = F.denoiser_steps(config.resolve(NOTEBOOK, "smoke"))
    sched = step.keywords["scheduler"]
    assert (sched.num_train_timesteps, sched.prediction_type) == (1000, "v_prediction") and val_step is step
    c = config.resolve(NOTEBOOK, "smoke", num_train_timesteps=200, prediction_type="epsilon",
                       noise_schedule="linear_beta")
    sched = F.denoiser_steps(c)[0].keywords["scheduler"]
    assert (sched.num_train_timesteps, sched.prediction_type) == (200, "epsilon")
    torch.testing.assert_close(sched.alphas_cumprod, F.noise_scheduler(200, "linear_beta", "epsilon").alphas_cumprod)
    assert not torch.allclose(sched.alphas_cumprod, F.noise_scheduler(200).alphas_cumprod)
    assert F.schedule_of(c) == {"num_train_timesteps": 200, "schedule": "linear_beta", "prediction_type": "epsilon"}


# --------------------------------------------------------------------------- step functions

def test_steps_pickle_and_compute_the_losses_of_the_preset():
    c = config.Config(config.resolve(NOTEBOOK, "smoke"), vae_crop=16, kl_weight=1e-3, ms_ssim_weight=0.0)
    train_step, val_step = pickle.loads(pickle.dumps(F.vae_steps(c)))
    assert train_step.keywords == {"crop": 16, "kl_weight": 1e-3, "ms_ssim_weight": 0.0, "adv_weight": 0.1}
    assert val_step.keywords == {"kl_weight": 1e-3}
    torch.manual_seed(0)
    vae = FrameVAE(channels=(8, 8, 8), num_res_blocks=1, norm_num_groups=8, discriminator_channels=8,
                   discriminator_layers=2)
    x = torch.rand(4, 1, 1, 32, 32) * 2 - 1
    torch.manual_seed(1)
    loss, parts = train_step(vae, (x,))
    torch.manual_seed(1)
    crop = F.random_crop(x, 16)
    ref, _ = L.vae_loss(vae, crop, 1e-3, 0.0, 0.1)
    torch.testing.assert_close(loss, ref)
    assert set(parts) == {"rec", "kl", "adv_g", "adv_d"}
    torch.manual_seed(2)
    loss, parts = val_step(vae, (x,))
    torch.manual_seed(2)
    torch.testing.assert_close(loss, L.vae_loss(vae, x, 1e-3)[0])
    assert set(parts) == {"rec", "kl"}  # validation: L1 + KL only

    step, _ = pickle.loads(pickle.dumps(F.denoiser_steps(c)))
    zero = lambda z, t, cond: torch.zeros_like(z)  # noqa: E731
    z0, cond = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    torch.manual_seed(3)
    loss, _ = step(zero, (z0, cond))
    torch.manual_seed(3)
    torch.testing.assert_close(loss, L.diffusion_loss(zero, z0, cond, F.noise_scheduler())[0])


# --------------------------------------------------------------------------- data preparation

def test_random_crop_is_seeded_and_checked():
    x = torch.arange(2 * 1 * 1 * 16 * 16, dtype=torch.float32).reshape(2, 1, 1, 16, 16)
    torch.manual_seed(5)
    a = F.random_crop(x, 8)
    torch.manual_seed(5)
    b = F.random_crop(x, 8)
    assert a.shape == (2, 1, 1, 8, 8) and torch.equal(a, b)
    assert F.random_crop(x, 0) is x and F.random_crop(x, 16) is x
    with pytest.raises(ValueError, match="crop"):
        F.random_crop(x, 20)


def test_series_windows():
    x = torch.arange(2 * 1 * 5 * 1 * 1, dtype=torch.float32).reshape(2, 1, 5, 1, 1)
    w = F.series_windows(x, 3, stride=2)
    assert w.shape == (4, 1, 3, 1, 1)
    expected = [x[b, :, s:s + 3] for b in range(2) for s in (0, 2)]
    assert torch.equal(w, torch.stack(expected))
    with pytest.raises(ValueError, match="frames"):
        F.series_windows(x, 6)


def test_frames_of_and_the_encoder_chunk():
    pair = {"baseline": torch.rand(2, 1, 3, 8, 8), "target": torch.rand(2, 1, 3, 8, 8)}
    frames = F.frames_of(pair)
    assert frames.shape == (12, 1, 1, 8, 8)
    assert torch.equal(frames[4, 0, 0], pair["baseline"][1, 0, 1]) and torch.equal(frames[6, 0, 0], pair["target"][0, 0, 0])
    assert [F.encode_chunk(s) for s in (32, 256, 4096)] == [4096, 64, 8]


# --------------------------------------------------------------------------- scores

def test_scores_use_data_range_2_on_the_window():
    """PSNR and SSIM of the family are those of the [-1, 1] window (data range 2), checked against the
    formula and scikit-image; at data range 1 the PSNR would read 20 log10(2) = 6.02 dB lower."""
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (2, 1, 3, 16, 16)).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.2, target.shape), -1, 1).astype(np.float32)
    got = F.scores(torch.from_numpy(pred), torch.from_numpy(target))
    for b in range(2):
        mse = np.mean((pred[b].astype(np.float64) - target[b]) ** 2)
        assert float(got["psnr"][b]) == pytest.approx(10 * math.log10(2.0 ** 2 / mse), abs=1e-4)
        assert float(got["psnr"][b]) == pytest.approx(
            skimage_metrics.peak_signal_noise_ratio(target[b], pred[b], data_range=2.0), abs=1e-4)
        ssim = np.mean([skimage_metrics.structural_similarity(target[b, 0, t], pred[b, 0, t], data_range=2.0,
                                                              gaussian_weights=True, sigma=1.5,
                                                              use_sample_covariance=False) for t in range(3)])
        assert float(got["ssim"][b]) == pytest.approx(ssim, abs=1e-4)
    at_1 = metrics.psnr(torch.from_numpy(pred), torch.from_numpy(target), data_range=1.0)
    torch.testing.assert_close(got["psnr"] - at_1, torch.full((2,), 20 * math.log10(2.0)), rtol=0, atol=1e-4)
    assert F.DATA_RANGE == 2.0 and F.HU_PER_UNIT == 900.0


def test_changed_voxel_mae():
    baseline = torch.zeros(2, 1, 1, 2, 2)
    target = torch.tensor([[0.5, 0.0], [0.05, 0.2]]).reshape(1, 1, 1, 2, 2).repeat(2, 1, 1, 1, 1)
    target[1] = 0.0  # nothing changed in the second sample
    pred = target + 0.1
    mae, n = metrics.changed_voxel_mae(pred, target, baseline, threshold=100, scale=900)
    # |target - baseline| * 900 = 450, 0, 45, 180 HU: two voxels changed by more than 100 HU
    assert n.tolist() == [2, 0]
    assert float(mae[0]) == pytest.approx(90.0) and math.isnan(float(mae[1]))
    mae_id, _ = metrics.changed_voxel_mae(baseline, target, baseline, threshold=100, scale=900)
    assert float(mae_id[0]) == pytest.approx((450 + 180) / 2)


def test_changed_voxel_mae_matches_a_reference_loop():
    rng = np.random.default_rng(1)
    baseline = rng.uniform(-1, 1, (3, 1, 2, 5, 5))
    target = baseline + rng.normal(0, 0.15, baseline.shape) * (rng.random(baseline.shape) < 0.4)
    target[2] = baseline[2]  # a series without change
    pred = target + rng.normal(0, 0.05, baseline.shape)
    mae, n = metrics.changed_voxel_mae(*(torch.tensor(a, dtype=torch.float32) for a in (pred, target, baseline)),
                                       threshold=50.0, scale=900.0)
    for b in range(3):
        errors = [abs(p - t) * 900.0 for p, t, s in zip(pred[b].ravel(), target[b].ravel(), baseline[b].ravel())
                  if abs(t - s) * 900.0 > 50.0]
        assert int(n[b]) == len(errors)
        if errors:
            assert float(mae[b]) == pytest.approx(sum(errors) / len(errors), rel=1e-4)
        else:
            assert math.isnan(float(mae[b]))
    assert n[0] > 0 and n[1] > 0 and n[2] == 0


# --------------------------------------------------------------------------- held-out rows

def _per_series():
    values = {"translation": ((20, 22, 24), (0.5, 0.6, 0.7), (40, 60, np.nan)),
              "identity": ((18, 18, 18), (0.9, 0.9, 0.9), (250, 250, np.nan)),
              "vae_ceiling": ((30, 31, 32), (0.95, 0.95, 0.95), (20, 10, np.nan))}
    return pd.DataFrame([{"comparison": c, "subject": f"s{i}", "psnr_db": p[i], "ssim": s[i], "mae_changed_hu": m[i],
                          "changed_voxels": (100, 300, 0)[i]} for c, (p, s, m) in values.items() for i in range(3)])


def test_heldout_rows_are_those_lib_summary_built():
    task, copied, ceiling = ("non-contrast -> contrast chest CT series", "identity (input copied)",
                             "VAE round trip of the target (ceiling)")
    mae, psnr = "MAE (HU) over voxels the contrast changes by > 100 HU", "PSNR (dB), diffusion window [-1, 1], data range 2"

    def r(metric, value, baseline, baseline_value, higher, headline=False):
        return {"task": task, "metric": metric, "headline": headline, "higher_is_better": higher, "value": value,
                "baseline": baseline, "baseline_value": baseline_value, "split": "test", "n": 3, "seeds": ""}

    # pooled over changed voxels: (40*100 + 60*300) / 400 = 55; the series without change counts for nothing
    assert F.heldout_rows(_per_series(), 100.0) == [
        r(mae, 55.0, copied, 250.0, False, headline=True), r(mae, 55.0, ceiling, 12.5, False),
        r(psnr, 22.0, copied, 18.0, True), r("SSIM (2D per frame, averaged)", 0.6, copied, 0.9, True),
        r(psnr, 22.0, ceiling, 31.0, True)]


def test_evaluate_writes_the_run_files_and_reads_back_the_closing_numbers(tmp_path):
    run = Run(NOTEBOOK, config.resolve(NOTEBOOK, "smoke"), results_root=tmp_path)
    torch.manual_seed(0)
    baseline = torch.rand(2, 1, 2, 16, 16) * 2 - 1
    target = (baseline + 0.3 * (torch.rand_like(baseline) > 0.7)).clamp(-1, 1)
    predictions = {"vae_ceiling": target + 0.01, "translation": (baseline + target) / 2, "identity": baseline}
    items = [{"subject": "a", "start": 0}, {"subject": "b", "start": 3}]
    rows = F.evaluate(run.config, run, predictions, {"baseline": baseline, "target": target}, items)
    assert read_heldout(run.dir) == rows and sum(r["headline"] for r in rows) == 1
    per_series, pooled = F.score_series(predictions, {"baseline": baseline, "target": target}, items, 100.0)
    saved = pd.read_csv(run.dir / "scores_per_series.csv")
    assert list(saved["comparison"]) == ["vae_ceiling"] * 2 + ["translation"] * 2 + ["identity"] * 2
    pd.testing.assert_frame_equal(saved, per_series)
    table = pd.read_csv(run.dir / "scores.csv", index_col="comparison")
    assert table["mae_changed_hu"].to_dict() == pytest.approx({k: round(v, 4) for k, v in pooled.items()})
    out = F.outcome(run.dir)
    assert (out["mae_changed_hu"], out["identity_mae_changed_hu"], out["vae_ceiling_mae_changed_hu"]) == (
        pooled["translation"], pooled["identity"], pooled["vae_ceiling"])  # exactly: the same float32 pooling
    assert out["translation_psnr"] == per_series[per_series.comparison == "translation"]["psnr_db"].mean()
    note = F.closing_note(run.dir, 100.0)
    assert f"translation {pooled['translation']:.1f} HU" in note and "wins on 2 of 2 series" in note


def test_nifti_export_in_hu(smoke_cohort, tmp_path):
    import nibabel as nib

    from lib.data.datasets import SeriesPairs

    assert F.to_hu(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [-700.0, 200.0, 1100.0]
    ds = SeriesPairs(smoke_cohort, "test", frames=2, size=16)
    items = [ds[i] for i in range(len(ds))]
    series = torch.stack([it["baseline"] for it in items])
    run = Run(NOTEBOOK, config.resolve(NOTEBOOK, "smoke"), results_root=tmp_path)
    written = F.export_nifti(run, ds, items, {"input": series}, count=1)
    assert [p.name for p in written] == [f"{items[0]['subject']}_input.nii.gz"]
    image = nib.load(written[0])  # as written: frame, row, column
    np.testing.assert_allclose(image.get_fdata(), F.to_hu(series[0, 0]), atol=1e-3)
    np.testing.assert_allclose(image.affine, ds.series_affine(items[0]["subject"], items[0]["start"]), atol=1e-5)
