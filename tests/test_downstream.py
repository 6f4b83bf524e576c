"""The SSL downstream comparison (lib.families.downstream, run by 07_evaluate through the family's hook):
the task's patches, the three arms and the summary rows."""

import numpy as np
import pandas as pd
import pytest
import torch

from lib import config
from lib.data.io import load_volume
from lib.families import downstream, pretrain
from lib.models.waveformer import WaveFormer3D


def test_positive_patches_hold_the_blob_and_negatives_do_not(smoke_cohort):
    data = downstream.blob_patches(smoke_cohort, "train", 16, per_subject=3, with_centres=True)
    subjects = pd.read_csv(smoke_cohort / "subjects.csv", dtype={"subject": str}).query("split == 'train'")
    x, y, where = data["CT"]
    assert x.shape[1:] == (3, 16, 16, 16) and data["MRI"][0].shape[1:] == (1, 16, 16, 16)
    ct = subjects[subjects["dataset"] == "head_ct"]
    assert int(y.sum()) == 3 * int(ct["aneurysm"].sum()) and len(y) == 3 * (len(ct) + int(ct["aneurysm"].sum()))
    for label, (subject, centre) in zip(y.tolist(), where):
        mask = load_volume(smoke_cohort / "head_ct" / subject / "aneurysm.nii.gz").array[0]
        lo = np.array(centre) - 8
        inside = mask[lo[0]:lo[0] + 16, lo[1]:lo[1] + 16, lo[2]:lo[2] + 16].sum()
        assert (inside > 0) == bool(label), (subject, centre, label)


def test_patches_are_deterministic(smoke_cohort):
    a = downstream.blob_patches(smoke_cohort, "test", 16)
    b = downstream.blob_patches(smoke_cohort, "test", 16)
    assert all(np.array_equal(a[m][0], b[m][0]) for m in a)


# --------------------------------------------------------------------------- the arms

def _pretrained(seed=1):
    """A stand-in for lib.checkpoint.load_encoder's result: frozen, eval mode, every block's map."""
    torch.manual_seed(seed)
    encoder = WaveFormer3D(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, return_intermediate=True)
    return encoder.eval().requires_grad_(False)


def _patches(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    return {"CT": (torch.randn(n, 3, 16, 16, 16, generator=g), y.float()),
            "MRI": (torch.randn(n, 1, 16, 16, 16, generator=g), y.float())}


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit(model, tmp_path, arm):
    cfg = config.resolve("07_evaluate", "smoke", downstream_batch_size=4, downstream_lr=1e-2)
    return downstream.train_arm(model, _patches(4, 0), _patches(2, 1), tmp_path / arm, cfg, seed=0,
                                device=torch.device("cpu"))


def test_finetune_starts_from_the_pretrained_weights_and_trains_them(tmp_path):
    pre = _pretrained()
    model = downstream.make_model("finetune", pre, seed=0)
    assert _same(_state(model.encoder), _state(pre))
    assert all(p.requires_grad for p in model.encoder.parameters())
    _fit(model, tmp_path, "finetune")
    assert not _same(_state(model.encoder), _state(pre))


def test_scratch_does_not_start_from_the_pretrained_weights():
    pre = _pretrained()
    model = downstream.make_model("scratch", pre, seed=0)
    assert _state(model.encoder).keys() == _state(pre).keys()
    fresh, pretrained = _state(model.encoder), _state(pre)
    assert not any(torch.equal(fresh[k], pretrained[k]) for k in fresh if fresh[k].ndim > 1)  # every weight matrix redrawn
    assert model.encoder.config == {**pre.config, "return_intermediate": False}


def test_probe_trains_the_head_only(tmp_path):
    pre = _pretrained()
    model = downstream.make_model("probe", pre, seed=0)
    encoder_before, head_before = _state(model.encoder), _state(model.head)
    assert _same(encoder_before, _state(pre))
    _fit(model, tmp_path, "probe")
    assert _same(_state(model.encoder), encoder_before)  # bit-identical
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not _same(_state(model.head), head_before)
    assert _same(_state(pre), encoder_before)  # the pretrained encoder itself is never touched
    with pytest.raises(ValueError, match="unknown arm 'linear'"):
        downstream.make_model("linear", pre, seed=0)


def test_hyperparameters_are_07_parameters_with_todays_values():
    cfg = config.resolve("07_evaluate", "demo")
    assert {k: cfg[k] for k in ("downstream_lr", "downstream_weight_decay", "downstream_batch_size",
                                "downstream_per_subject", "downstream_seeds", "downstream_epochs",
                                "downstream_size")} == {
        "downstream_lr": 3e-4, "downstream_weight_decay": 1e-4, "downstream_batch_size": 8,
        "downstream_per_subject": 4, "downstream_seeds": 3, "downstream_epochs": 8, "downstream_size": 32}


def test_summary_rows_put_finetune_and_probe_beside_scratch():
    results = pd.DataFrame([{"arm": arm, "seed": s, "test_auc": auc, "n_test": 12}
                            for arm, aucs in (("scratch", (0.5, 0.6)), ("finetune", (0.7, 0.9)), ("probe", (0.6, 0.6)))
                            for s, auc in enumerate(aucs)])
    fine, probe = downstream.summary_rows(results)
    assert fine["headline"] is True and probe["headline"] is False
    assert fine["metric"] == "test AUC, finetune: mean over seeds (std 0.141; scratch std 0.071)"
    assert (fine["value"], fine["baseline_value"], probe["value"]) == (0.8, 0.55, 0.6)
    assert fine["baseline"] == "same encoder from scratch" and fine["n"] == 12 and fine["seeds"] == "0,1"


def test_the_family_hook_runs_every_arm_and_writes_its_table(smoke_cohort, tmp_path, monkeypatch):
    from lib import checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint.save_encoder(_pretrained(), run_dir / "encoder.pt")
    monkeypatch.setattr(pretrain.demo, "ensure", lambda size: (smoke_cohort, {}))
    cfg = config.resolve("07_evaluate", "smoke", downstream_seeds=1)
    rows = pretrain.downstream_rows(run_dir, cfg, tmp_path / "out", torch.device("cpu"))
    table = pd.read_csv(tmp_path / "out" / "downstream.csv")
    assert sorted(table["arm"]) == sorted(downstream.ARMS) and (table["seed"] == 0).all()
    assert all((tmp_path / "out" / "downstream" / f"{arm}-seed0" / "epochs.csv").exists() for arm in downstream.ARMS)
    assert [r["headline"] for r in rows] == [True, False]
    assert {r["family"] for r in rows} == {"ssl_pretraining"} and {r["run_id"] for r in rows} == {"run"}
    assert all(r["preset"] == "smoke" and r["seeds"] == "0" for r in rows)
