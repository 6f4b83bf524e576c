"""The SSL family: the pretrainer (masked input, SparK-style sparse levels, voxel-patch targets, gradients,
non-collapse), its family module (build from a preset, steps, held-out rows), the encoder checkpoint,
and the prod preset's refusal to run without its data."""

import ast
import functools
import json
import math

import einops
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lib import checkpoint as ckpt
from lib import config, metrics, paths, summary
from lib.families import pretrain
from lib.losses.contrastive import SpatialInfoNCE
from lib.losses.masking import MiMHierarchicalMasking, MiMMasks
from lib.models import pretrainer as pt
from lib.models.waveformer import WaveFormer3D

SMALL = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2)
HEAD = dict(spark_dim=16, decoder_dim=16)
NCE = dict(projection_dim=16, num_samples=32)


def _model(seed=0, encoder=None, **kw):
    torch.manual_seed(seed)
    return pt.WaveFormerSparKMiMPretrainer(WaveFormer3D(**{**SMALL, **(encoder or {})}),
                                           masking=MiMHierarchicalMasking(),
                                           contrastive=functools.partial(SpatialInfoNCE, **NCE), **{**HEAD, **kw})


def _volumes(n, seed, channels=1, size=16):
    """Smooth random volumes with a little noise: structure a model can learn, different per seed."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 4, size // 4, size // 4, generator=g)
    x = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)
    return x + 0.05 * torch.randn(x.shape, generator=g)


# --------------------------------------------------------------------------- patches and targets

def test_patchify_matches_einops_and_inverts():
    x = torch.randn(2, 3, 8, 12, 4)
    p = pt.patchify(x, 4)
    assert torch.equal(p, einops.rearrange(x, "b c (d p1) (h p2) (w p3) -> b (d h w) (c p1 p2 p3)", p1=4, p2=4, p3=4))
    assert torch.equal(pt.unpatchify(p, 3, 4, (2, 3, 1)), x)
    with pytest.raises(ValueError, match="multiple of patch_size 4"):
        pt.patchify(torch.zeros(1, 1, 6, 8, 8), 4)


def test_patch_normalisation():
    t, mean, std = pt.normalise_patches(torch.randn(2, 5, 64) * 3 + 7)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-4)
    flat, _, _ = pt.normalise_patches(torch.full((1, 1, 8), 0.3))
    assert flat.abs().max() < 1e-3  # a constant patch has a (near) zero target, not a division by zero


# --------------------------------------------------------------------------- SparK-style levels

def test_masked_group_norm_uses_visible_positions_only():
    torch.manual_seed(0)
    norm = pt.MaskedGroupNorm(2, 6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 6, 4, 4, 4)
    visible = (torch.rand(3, 1, 4, 4, 4) < 0.4).float()
    y = norm(x, visible)
    for b in range(3):  # reference: torch's group_norm over the visible vectors alone
        keep = visible[b, 0].bool()
        ref = F.group_norm(x[b][:, keep][None], 2, norm.weight, norm.bias, norm.eps)[0]
        assert torch.allclose(y[b][:, keep], ref, atol=1e-5)
        assert torch.all(y[b][:, ~keep] == 0)


def test_sparse_levels_ignore_masked_positions():
    torch.manual_seed(0)
    enc = pt.SparseEncoder3D(8, 16, levels=2)
    x = torch.randn(2, 8, 8, 8, 8)
    visible = (torch.rand(2, 1, 8, 8, 8) < 0.4).float()
    levels = enc(x, visible)
    noisy = enc(x + 100 * torch.randn_like(x) * (1 - visible), visible)  # change only the masked positions
    assert [f.shape[2:] for f, _ in levels] == [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    for (f, v), (g, _) in zip(levels, noisy):
        assert torch.allclose(f, g, atol=1e-5)
        assert torch.all(f * (1 - v) == 0)
    # a coarse position is visible when any of its children is (a strided sparse convolution)
    assert torch.equal(levels[1][1], F.max_pool3d(visible, 2))


# --------------------------------------------------------------------------- the pretrainer

def test_encoder_never_sees_masked_voxels():
    model = _model().eval()
    x = _volumes(2, 0)
    masks = model.draw_masks(x, torch.Generator().manual_seed(0))
    voxel_mask = pt.unpatchify(masks.masked.float().reshape(2, -1, 1).expand(-1, -1, 64), 1, 4, (4, 4, 4))
    changed = x + voxel_mask * torch.randn_like(x) * 10  # new content inside every masked patch only
    a, b = model(x, masks=masks), model(changed, masks=masks)
    for fa, fb in zip(a.features, b.features):
        assert torch.allclose(fa, fb, atol=1e-5)
    assert torch.allclose(a.pred, b.pred, atol=1e-5)
    assert not torch.allclose(a.target, b.target)  # ... while the targets are the masked voxels


def test_losses_follow_their_definitions():
    model = _model()
    x = _volumes(2, 1, channels=3)
    out = model(x, generator=torch.Generator().manual_seed(0))
    target = einops.rearrange(x, "b c (d p1) (h p2) (w p3) -> b (d h w) (c p1 p2 p3)", p1=4, p2=4, p3=4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(out.target, target, atol=1e-5)
    err = ((out.pred - target) ** 2).mean(-1)
    m, local = out.masks.masked.reshape(2, -1), out.masks.local.reshape(2, -1)
    assert torch.allclose(out.recon, err[m].mean(), atol=1e-6)
    assert torch.allclose(out.recon_local, err[local].mean(), atol=1e-6)
    assert torch.allclose(out.recon_easy, err[m & ~local].mean(), atol=1e-6)
    assert torch.allclose(out.loss, out.recon + 0.5 * out.contrast)
    assert out.pred.shape == (2, 64, 3 * 64) and out.masks.masked.shape == (2, 4, 4, 4)


@pytest.mark.parametrize("grid,levels", [(4, 1), (8, 1)], ids=["smoke-grid-4", "demo-grid-8"])
def test_every_parameter_receives_gradients(grid, levels):
    model = _model(encoder={"img_size": grid * 4}, spark_levels=levels)
    mri, ct = _volumes(2, 0, 1, grid * 4), _volumes(1, 1, 3, grid * 4)
    (model(mri).loss + model(ct).loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_masks_are_checked_and_steps_work():
    model = _model()
    x = _volumes(2, 0)
    bad = MiMMasks(torch.zeros(2, 3, 4, 4, dtype=torch.bool), torch.zeros(2, 3, 4, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="masks must be"):
        model(x, masks=bad)
    loss, logged = pretrain.train_step(model, ("MRI", x))
    assert loss.ndim == 0 and set(logged) == {"recon", "contrast", "recon_local", "recon_easy"}
    a, _ = pretrain.val_step(model, ("MRI", x))
    b, _ = pretrain.val_step(model, x)
    assert torch.equal(a, b)  # validation masks are fixed
    with pytest.raises(ValueError, match="contrastive_levels"):
        _model(contrastive_levels=(0, 5))
    with pytest.raises(ValueError, match="masking and contrastive must be callables"):
        pt.WaveFormerSparKMiMPretrainer(WaveFormer3D(**SMALL), masking=None, contrastive=SpatialInfoNCE)


def test_features_do_not_collapse_in_a_short_run():
    """Collapse = the encoder's features stop depending on where (and on what) they are computed.

    Measured on held-out volumes, unmasked, for the final (layer-normalised) map: the share of its
    variance that lies across the locations of a sample (:func:`lib.metrics.location_variance_ratio`), and
    the share that lies across inputs at the same location (content). A constant map gives 0 and 0;
    a map of the position alone gives 0 content. The randomly initialised encoder is a random, not
    collapsed, function of content and position (about 0.99 and 0.2 here): the floor is half of each
    initial value. The research notes' own target (the encoder's features of the unmasked input) is
    met by making the features predictable; reproduced here, it reaches a loss near 0 while
    the content share falls by ~40 % within 150 steps. Voxel targets and InfoNCE negatives at other
    locations pay nothing for that.
    """
    model = _model(seed=3)
    held = _volumes(8, 99)

    def shares():
        model.eval()
        with torch.no_grad():
            f = model.encoder(held)
        model.train()
        return metrics.location_variance_ratio(f), metrics.content_variance_ratio(f)

    loc0, content0 = shares()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(40):
        out = model(_volumes(4, step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.recon.detach()))
    loc, content = shares()
    assert sum(losses[-5:]) < sum(losses[:5])  # it learned something meanwhile
    assert loc > 0.5 * loc0 and content > 0.5 * content0, (loc0, loc, content0, content)


def test_variance_shares():
    position_only = torch.randn(1, 4, 3, 3, 3).expand(5, -1, -1, -1, -1)
    assert metrics.location_variance_ratio(position_only) == pytest.approx(1.0)
    assert metrics.content_variance_ratio(position_only) == pytest.approx(0.0, abs=1e-6)
    content_only = torch.randn(5, 4, 1, 1, 1).expand(-1, -1, 3, 3, 3)
    assert metrics.location_variance_ratio(content_only) == pytest.approx(0.0, abs=1e-6)
    assert metrics.content_variance_ratio(content_only) == pytest.approx(1.0)
    constant = torch.ones(5, 4, 3, 3, 3)
    assert metrics.location_variance_ratio(constant) == 0.0 and metrics.content_variance_ratio(constant) == 0.0


def test_heldout_reconstruction_against_the_mean_patch():
    model = _model()
    train, test = _volumes(6, 0), _volumes(3, 1)
    mean = pretrain.mean_patch([train[:3], train[3:]], 4)
    normed, _, _ = pt.normalise_patches(pt.patchify(train, 4))
    assert torch.allclose(mean, normed.reshape(-1, 64).mean(0), atol=1e-6)
    res = pretrain.heldout_reconstruction(model, [test], mean, repeats=2, seed=0)
    # reference: the same masks, drawn again from the same seed
    g = torch.Generator().manual_seed(0)
    model.eval()
    model_err, base_err, n = 0.0, 0.0, 0
    with torch.no_grad():
        for _ in range(2):
            out = model(test, generator=g)
            m = out.masks.masked.reshape(3, -1)
            model_err += float(((out.pred - out.target) ** 2).mean(-1)[m].sum())
            base_err += float(((mean - out.target) ** 2).mean(-1)[m].sum())
            n += int(m.sum())
    assert res["masked_patches"] == n and res["volumes"] == test.shape[0]
    assert res["model"] == pytest.approx(model_err / n) and res["mean_patch"] == pytest.approx(base_err / n)


def test_reconstruction_example_keeps_visible_voxels():
    model = _model()
    x = _volumes(1, 0, channels=3)
    ex = pretrain.reconstruction_example(model, x, torch.Generator().manual_seed(0))
    visible = ex["mask"] == 0
    assert torch.equal(ex["reconstruction"][visible], x[visible])
    assert ex["mask"].shape == x.shape and 0.3 < float(ex["mask"].mean()) < 0.7


# --------------------------------------------------------------------------- the encoder checkpoint

def test_save_and_load_encoder(tmp_path):
    model = _model()
    ckpt.save_encoder(model.encoder, tmp_path / "encoder.pt", notebook="03_pretrain")
    raw = ckpt.load(tmp_path / "encoder.pt")
    assert raw["format"] == ckpt.ENCODER_FORMAT and raw["config"]["embed_dim"] == 24
    for source in (tmp_path / "encoder.pt", tmp_path):  # the file, or the run folder holding it
        enc = ckpt.load_encoder(source)
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
        x = torch.randn(2, 3, 16, 16, 16)
        maps = enc(x)
        model.encoder.eval()
        expected = model.encoder(x, return_intermediate=True)
        assert isinstance(maps, list) and len(maps) == 2
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, expected))
        assert maps[-1].shape == (2, 24, 4, 4, 4)
    # a perceptual loss needs gradients with respect to the input, through the frozen encoder
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    enc(x)[1].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_load_encoder_from_a_training_checkpoint(tmp_path):
    from lib import train

    cfg = dict(config.resolve("03_pretrain", "smoke"))
    model = pretrain.build(cfg)
    data = [("MRI", _volumes(2, i)) for i in range(2)]
    settings = train.TrainSettings(epochs=1, amp=False, best_metric=None, log_every=1)
    train.fit(model, pretrain.train_step, data, torch.optim.AdamW(model.parameters(), lr=1e-3), out_dir=tmp_path,
              config=cfg, settings=settings, device=torch.device("cpu"))
    enc = ckpt.load_encoder(tmp_path / "checkpoints" / "last.pt")
    x = torch.randn(1, 1, 16, 16, 16)
    model.encoder.eval()
    assert torch.allclose(enc(x)[-1], model.encoder(x), atol=1e-6)


def test_load_encoder_refuses_other_files(tmp_path):
    ckpt.save(tmp_path / "other.pt", {"format": "something else", "weights": torch.zeros(2)})
    with pytest.raises(ckpt.CheckpointError, match="not an encoder checkpoint"):
        ckpt.load_encoder(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        ckpt.load_encoder(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- presets

def test_prod_preset_stops_without_its_real_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "input"))
    cfg = config.resolve("03_pretrain", "prod")
    with pytest.raises(FileNotFoundError) as e:
        pretrain.find_data(cfg)
    message = str(e.value)
    for name in ("openmind", "rsna2025_aneurysm"):
        assert f"python -m lib.data.manifest fetch {name}" in message
        assert f"python -m lib.data.convert {name} --src {tmp_path / 'data' / 'raw' / name}" in message
    assert not (tmp_path / "data").exists()  # nothing was built or written


@pytest.mark.parametrize("preset", config.PRESETS)
def test_every_preset_builds(preset):
    cfg = config.resolve("03_pretrain", preset)
    with torch.device("meta"):  # shapes only: prod's 94M parameters cost nothing here
        model = pretrain.build(cfg)
    assert model.encoder.config["embed_dim"] == cfg.embed_dim
    grid = cfg.img_size // cfg.patch_size
    size, _, _ = model.masking.counts((grid,) * 3)
    # every sparse level holds fully masked cells, so every level's mask token learns at every step
    assert 2 ** cfg.spark_levels <= size


@pytest.mark.slow
def test_subset_forward_backward():
    cfg = config.resolve("03_pretrain", "subset")
    torch.manual_seed(0)
    model = pretrain.build(cfg)
    for channels, batch in ((1, cfg.batch_size), (3, cfg.ct_batch_size)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.rand(batch, channels, cfg.img_size, cfg.img_size, cfg.img_size))
        out.loss.backward()
        assert math.isfinite(out.loss.item())
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- the family: every research value reaches the model

REACHES = {  # 03_pretrain parameter -> where the built pretrainer holds it
    "mask_ratio": lambda m: m.masking.mask_ratio,
    "local_ratio": lambda m: m.masking.local_ratio,
    "min_unmasked_blocks": lambda m: m.masking.min_unmasked_blocks,
    "contrastive_weight": lambda m: m.contrastive_weight,
    "contrastive_levels": lambda m: tuple(m.contrastive_levels),
    "temperature": lambda m: m.contrastive.temperature,
    "projection_dim": lambda m: m.contrastive.projectors[0].out_channels,
    "num_samples": lambda m: m.contrastive.num_samples,
    "spark_dim": lambda m: m.sparse_encoder.channels[-1],
    "spark_levels": lambda m: len(m.sparse_encoder.stages),
    "decoder_dim": lambda m: m.decoder.densify[0].out_channels,
    **{k: (lambda key: lambda m: m.encoder.config[key])(k)
       for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "wavelet_levels", "pos_embed",
                 "drop_path", "grad_checkpointing")},
}
NOT_THE_MODEL = {"notebook", "preset", "cohort", "real_data", "spacing", "prep_size", "ct_batch_size", "eval_repeats",
                 *config.COMMON, *config.TRAINING}
OVERRIDES = {"mask_ratio": 0.5, "local_ratio": 0.5, "min_unmasked_blocks": 3, "contrastive_weight": 0.25,
             "contrastive_levels": (0, 1, -1), "temperature": 0.2, "projection_dim": 8, "num_samples": 16,
             "spark_dim": 8, "spark_levels": 0, "decoder_dim": 8, "embed_dim": 12, "depth": 3, "num_heads": 3,
             "wavelet_levels": 0, "pos_embed": "learned", "drop_path": 0.1, "grad_checkpointing": True,
             "img_size": 24, "patch_size": 2}


def test_every_parameter_of_03_is_checked_below():
    params = set(config.resolve("03_pretrain", "smoke"))
    assert params - NOT_THE_MODEL == set(REACHES), "a new model parameter needs a REACHES entry (and an override)"
    assert set(OVERRIDES) == set(REACHES)


@pytest.mark.parametrize("preset", config.PRESETS)
def test_each_preset_value_reaches_the_model(preset):
    cfg = config.resolve("03_pretrain", preset)
    with torch.device("meta"):
        model = pretrain.build(cfg)
    for key, held in REACHES.items():
        assert held(model) == cfg[key], (preset, key, held(model), cfg[key])
    assert len(model.contrastive.projectors) == len(cfg.contrastive_levels)


@pytest.mark.parametrize("key", sorted(OVERRIDES))
def test_an_override_changes_the_model(key):
    base = pretrain.build(config.resolve("03_pretrain", "smoke"))
    model = pretrain.build(config.resolve("03_pretrain", "smoke", **{key: OVERRIDES[key]}))
    assert REACHES[key](model) == OVERRIDES[key] != REACHES[key](base)


def test_the_research_values():
    for preset in ("subset", "prod"):
        cfg = config.resolve("03_pretrain", preset)
        assert {k: cfg[k] for k in ("mask_ratio", "local_ratio", "min_unmasked_blocks", "contrastive_weight",
                                    "temperature", "projection_dim", "num_samples", "contrastive_levels")} == {
            "mask_ratio": 0.6, "local_ratio": 0.8, "min_unmasked_blocks": 2, "contrastive_weight": 0.5,
            "temperature": 0.1, "projection_dim": 128, "num_samples": 256, "contrastive_levels": (0, -1)}, preset
    # the loss uses the configured weight, not a constant
    model = pretrain.build(config.resolve("03_pretrain", "smoke", contrastive_weight=0.25))
    out = model(_volumes(2, 0), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.loss, out.recon + 0.25 * out.contrast)


def test_parameter_counts_of_subset_and_prod():
    """The sizes the closing note of 03 prints (the notes quote ~7.6 M and ~136 M with their heavier head)."""
    assert pretrain.preset_parameter_counts(("subset", "prod")) == {
        "subset": {"encoder (WaveFormer3D)": 826_880, "pretrainer (all)": 1_721_792},
        "prod": {"encoder (WaveFormer3D)": 86_639_616, "pretrainer (all)": 94_496_512}}


def test_the_network_module_imports_no_loss_and_no_config():
    tree = ast.parse((paths.ROOT / "lib" / "models" / "pretrainer.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {n for n in names if n.startswith("lib")} == {"lib.models.waveformer"}


# --------------------------------------------------------------------------- the family: held-out rows

def test_heldout_rows_and_files(tmp_path):
    scores = {"MRI": {"model": 0.4, "mean_patch": 1.0, "masked_patches": 96, "volumes": 7},
              "CT": {"model": 0.61234567, "mean_patch": 0.5, "masked_patches": 32, "volumes": 1}}
    rows = pretrain.evaluate(scores, tmp_path)
    assert rows == [
        {"task": "masked-patch reconstruction", "metric": "per-patch-normalised MSE on masked patches, MRI",
         "headline": False, "higher_is_better": False, "value": 0.4, "baseline": "predicting the mean patch",
         "baseline_value": 1.0, "split": "test", "n": 7, "seeds": ""},
        {"task": "masked-patch reconstruction", "metric": "per-patch-normalised MSE on masked patches, CT",
         "headline": False, "higher_is_better": False, "value": 0.6123, "baseline": "predicting the mean patch",
         "baseline_value": 0.5, "split": "test", "n": 1, "seeds": ""}]
    assert json.loads((tmp_path / "heldout_metrics.json").read_text()) == rows
    table = pd.read_csv(tmp_path / "heldout_reconstruction.csv")  # 08 and older readers take this table
    assert list(table.columns) == ["modality", "pretrained", "mean patch", "masked_patches", "volumes", "reduction"]
    assert table["reduction"].tolist() == pytest.approx([0.6, 1 - 0.61234567 / 0.5])
    (row, _) = summary.run_rows("ssl_pretraining", tmp_path, "demo")
    assert row["value"] == 0.4 and row["higher_is_better"] is False and row["n"] == 7 and row["run_id"] == tmp_path.name


def test_real_data_of_one_modality_trains_on_that_modality(tmp_path):
    """OpenMind alone is MRI only: find_data keeps the MRI splits, the loaders yield MRI batches."""
    from lib.data import convert, fixtures

    fixtures.write("openmind", tmp_path / "raw")
    convert.run("openmind", tmp_path / "raw", tmp_path / "openmind", progress=False)
    cfg = config.resolve("03_pretrain", "smoke", real_data=str(tmp_path / "openmind"))
    files, counts = pretrain.find_data(cfg)
    assert {m for m, _ in files} == {"MRI"} and counts.loc["CT"].sum() == 0 and (counts.loc["MRI"] > 0).all()
    data = pretrain.Volumes(cfg, files)
    train_loader, _, first = pretrain.loaders(data)
    assert data.modalities == ["MRI"] and first.shape[1] == 1
    assert {name for name, _ in train_loader} == {"MRI"}
