"""Training in several processes: torchrun (``python -m lib.launch``) and ``gpus`` > 1 from a notebook, on two
gloo CPU processes, for 03_pretrain and 06_xray_to_ct at smoke; the notebook continuing from the run; resume
across process counts; the loaders' sharding and the parameter's checks.

Equality with a one-process run: the loop's (``tests/test_train.py``: two ranks of batch 4 against one of batch
8, weights within rtol 1e-5). The families cannot be equal to a one-process run by construction: 03 draws its
masks from each rank's own seed, and 06's attention gates hold BatchNorm, which normalises over each rank's batch
on a CPU (``SyncBatchNorm``, used on CUDA, has no CPU kernel). What must hold is tested here: one run folder,
the same weights on every rank, equal to the checkpoint the notebook continues from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lib import checkpoint as ckpt
from lib import config, loaders, multigpu, runs
from lib.data.datasets import AlternatingLoader
from references import execute_notebook, only_run


def _torchrun(tmp_path, notebook, *params):
    env = {**os.environ, "MEDIMG_RESULTS_DIR": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    env.pop(runs.RUN_ID_ENV, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lib.launch",
           notebook, "--preset", "smoke", *params]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _report(run_dir, fn_name="train_process"):
    return json.loads((run_dir / f"launch-{fn_name}.json").read_text())


# --------------------------------------------------------------------------- fast

def test_the_gpus_parameter_is_checked_and_counts_processes():
    cfg = config.resolve("06_xray_to_ct", "smoke", device="cpu")
    assert cfg.gpus == 1 and multigpu.processes(cfg) == 1
    assert multigpu.processes(config.Config(cfg, gpus=0)) == 1  # every visible GPU: none here, so this process
    assert multigpu.processes(config.Config(cfg, gpus=2)) == 2  # gloo processes on a CPU
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="parameter 'gpus' must be an int >= 0"):
            multigpu.processes(config.Config(cfg, gpus=bad))
    assert multigpu.effective_batch({"batch_size": 3, "grad_accum": 2}, 4) == 24


def test_loaders_shard_only_inside_a_process_group_and_alternating_loaders_expose_their_samplers():
    ds = TensorDataset(torch.arange(10.0))
    cfg = {"batch_size": 2, "num_workers": 0, "seed": 3, "device": "cpu"}
    one = loaders.loader(ds, cfg, train=True)
    reference = DataLoader(ds, batch_size=2, shuffle=True, drop_last=True, **runs.loader_seeding(3))
    assert [b[0].tolist() for b in one] == [b[0].tolist() for b in reference]  # one process: as before
    assert not one.pin_memory  # no CUDA here
    shard = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, 2, 0, seed=3))
    alternating = AlternatingLoader({"MRI": shard, "CT": DataLoader(ds, batch_size=2, shuffle=True,
                                                                    **runs.loader_seeding(4))})
    assert loaders.samplers(alternating) == [shard.sampler]  # fit sets its epoch: a new order each epoch
    assert len(loaders.loader_generators(alternating)) == 1  # the CT loader's: saved in checkpoints
    val = loaders.loader(ds, {**cfg, "num_workers": 1}, train=False)
    assert val.persistent_workers and not val.drop_last


def test_deterministic_mode_uses_deterministic_kernels_and_only_warns_where_cuda_has_none():
    try:
        runs.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert any("grid_sampler_2d" in k for k in runs.NONDETERMINISTIC_ON_CUDA)
    finally:
        runs.seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------- two gloo processes

@pytest.mark.slow
def test_torchrun_trains_03_in_one_run_folder_and_the_notebook_code_continues_from_it(tmp_path, monkeypatch):
    proc = _torchrun(tmp_path, "03_pretrain")
    run_dir, record = only_run(tmp_path / "results", "03_pretrain")
    assert record["status"] == "completed" and record["summary"]["world_size"] == 2
    assert "continue the notebook from it" in proc.stdout and run_dir.name in proc.stdout
    report = _report(run_dir)
    assert report["world_size"] == 2 and report["identical_weights"] and len(set(report["weights_sha256"])) == 1
    last = ckpt.load_train_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and last["progress"]["epoch"] == record["config"]["epochs"]
    assert len(last["rng"]) == 2  # every rank's RNG states

    from lib.families import pretrain

    cfg = config.resolve("03_pretrain", "smoke", resume=True)
    model = pretrain.build(cfg)
    model.load_state_dict(last["model"])
    assert multigpu.weights_digest(model) == report["weights_sha256"][0]  # the ranks' weights are the checkpoint's

    # One process continues the finished two-process run (as the notebook does with -p resume True).
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "results"))
    model, result = pretrain.train_process(cfg, run_dir)
    assert result.status == "completed" and result.progress.step == last["progress"]["step"]
    assert multigpu.weights_digest(model) == report["weights_sha256"][0]

    # An unfinished two-process checkpoint is refused in one process, saying why.
    mid = dict(last, progress={**last["progress"], "epoch": 0, "batch": 1})
    ckpt.save(tmp_path / "mid.pt", mid)
    with pytest.raises(ckpt.ConfigMismatchError, match=r"written by 2 process\(es\) at epoch 0 .* this run has 1"):
        ckpt.resume_state(tmp_path / "mid.pt", tmp_path, last["config"], world=1, main=True)


@pytest.mark.slow
def test_torchrun_trains_06_and_the_notebook_continues_from_its_run_folder(tmp_path, monkeypatch):
    _torchrun(tmp_path, "06_xray_to_ct")
    run_dir, record = only_run(tmp_path / "results", "06_xray_to_ct")
    report = _report(run_dir)
    assert report["status"] == "completed" and report["identical_weights"] and report["world_size"] == 2
    trained = ckpt.load_train_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]

    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv(runs.RUN_ID_ENV, run_dir.name)
    execute_notebook("06_xray_to_ct", tmp_path / "06.ipynb", preset="smoke", resume=True)
    again, record = only_run(tmp_path / "results", "06_xray_to_ct")
    assert again == run_dir and record["status"] == "completed"
    assert (run_dir / "heldout_metrics.json").exists()
    after = ckpt.load_train_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(trained[k], after[k]) for k in trained)  # evaluated, not trained again


@pytest.mark.slow
def test_gpus_2_in_a_notebook_trains_in_two_spawned_processes_and_the_notebook_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv(runs.RUN_ID_ENV, raising=False)
    execute_notebook("03_pretrain", tmp_path / "03.ipynb", preset="smoke", gpus=2)
    run_dir, record = only_run(tmp_path / "results", "03_pretrain")
    assert record["status"] == "completed" and record["config"]["gpus"] == 2
    report = _report(run_dir)
    assert report["world_size"] == 2 and report["identical_weights"]
    assert (run_dir / "encoder.pt").exists() and (run_dir / "heldout_metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("notebook, stages", [("04_ct_diffusion", ("vae/launch-vae_process", "denoiser/launch-denoiser_process")),
                                              ("05_cxr_change", ("mim/launch-mim_process", "launch-change_process"))])
def test_torchrun_trains_every_stage_of_04_and_05(tmp_path, notebook, stages):
    # batch 1 per process: the smoke cohort's few pairs, split over two processes, still make full batches
    _torchrun(tmp_path, notebook, "-p", "batch_size", "1")
    run_dir, record = only_run(tmp_path / "results", notebook)
    assert record["status"] == "completed"
    for stage in stages:
        report = json.loads((run_dir / f"{stage}.json").read_text())
        assert report["status"] == "completed" and report["world_size"] == 2 and report["identical_weights"], stage


@pytest.mark.slow
def test_09_spreads_its_arms_over_two_processes_and_builds_the_table_of_one(tmp_path):
    from lib.data import demo_rsna, prepared
    from lib.families import rsna_aneurysm as rsna
    from lib.models.waveformer import WaveFormer3D

    ds = prepared.open_dataset(demo_rsna.prepared("smoke"))  # the mini competition 09 runs on at smoke
    cfg = config.resolve("09_rsna_aneurysm", "smoke", real_data=str(ds.root), device="cpu", amp=False)  # fp32: see below
    torch.manual_seed(0)
    encoder = WaveFormer3D(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2)
    sets = rsna.split_sets(ds, encoder, rsna.DEFAULT_ROI_MM, 95.0)
    one, kept_one = rsna.run_grid(cfg, encoder, sets, tmp_path / "one", torch.device("cpu"), progress=False)
    two, kept_two = rsna.run_grid(config.Config(cfg, gpus=2), encoder, sets, tmp_path / "two", torch.device("cpu"))
    assert len(one) == len(rsna.plan(cfg)) == len(two) and kept_two is not None
    assert one[["arm", "label_fraction", "seed", "n_train"]].equals(two[["arm", "label_fraction", "seed", "n_train"]])
    # each training seeds itself: the same numbers, up to the float rounding of another thread count (bf16 would
    # round those differences up to ~5e-5 in the weights)
    assert two["weighted_auc"].to_numpy() == pytest.approx(one["weighted_auc"].to_numpy(), abs=1e-6, nan_ok=True)
    for k, v in kept_one.state_dict().items():
        torch.testing.assert_close(kept_two.state_dict()[k], v, rtol=1e-4, atol=1e-5)
