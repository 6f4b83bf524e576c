"""lib.train and lib.checkpoint: the loop against a bare PyTorch loop, exact resume (SIGKILL and time
budget), non-finite steps, unsafe and truncated checkpoints, configuration mismatch, DDP on gloo.

The tiny problem lives in tests/train_worker.py, which is also the entry point of the subprocesses.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_worker as tw
from lib import checkpoint, train

WORKER = Path(tw.__file__)
CFG = {"epochs": 3, "grad_accum": 2, "clip_grad_norm": 0.5, "warmup_steps": 2, "ema_decay": 0.8,
       "log_every": 1, "ckpt_every": 1, "amp": False, "lr": 0.05, "seed": 0}


def _weights(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max().item():.3g}"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _columns(rows: list[dict], *names: str) -> list[tuple]:
    return [tuple(r[n] for n in names) for r in rows]


def _start(mode: str, opts: dict, tmp_path: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp_path / f"{mode}.stdout", tmp_path / f"{mode}.stderr"
    env = {**os.environ, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.Popen([sys.executable, str(WORKER), mode, json.dumps(opts)], stdout=open(out, "w"),
                            stderr=open(err, "w"), env=env, start_new_session=True)
    return proc, out, err


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


class FakeClock:
    """The loop's clock for time-budget tests: one second per training micro-batch, nothing else."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def step(self, model, batch):
        if model.training:
            self.t += 1.0
        return tw.step(model, batch)


# --------------------------------------------------------------------------- settings

def test_settings_come_from_same_named_config_keys_and_bad_values_name_the_parameter():
    s = train.TrainSettings.from_config({"epochs": 4, "grad_accum": 2, "lr": 1e-3, "preset": "demo"}, log_every=5)
    assert (s.epochs, s.grad_accum, s.log_every, s.ema_decay) == (4, 2, 5, None)
    for bad, name in [({"epochs": -1}, "epochs"), ({"epochs": 2.0}, "epochs"), ({"best_mode": "lowest"}, "best_mode"),
                      ({"grad_accum": True}, "grad_accum"), ({"ema_decay": 1.0}, "ema_decay"),
                      ({"clip_grad_norm": 0}, "clip_grad_norm"), ({"amp": 1}, "amp"),
                      ({"time_budget_s": -5}, "time_budget_s")]:
        with pytest.raises(ValueError, match=name):
            train.TrainSettings.from_config(bad)
    with pytest.raises(ValueError, match="warmup_steps.*warmup_epochs"):
        train.TrainSettings(warmup_steps=3, warmup_epochs=1.0)
    with pytest.raises(ValueError, match="unknown training setting.*epcohs"):
        train.TrainSettings.from_config({}, epcohs=3)


# --------------------------------------------------------------------------- the updates themselves

def _bare_loop(opts: dict, cfg: dict, amp: bool):
    """The same training written out in plain PyTorch: the independent reference for fit()."""
    model, loader, val_loader, opt = tw.build(**opts)
    n = len(loader)
    accum, warmup, decay, clip = cfg["grad_accum"], cfg["warmup_steps"], cfg["ema_decay"], cfg["clip_grad_norm"]
    per_epoch = math.ceil(n / accum)
    total, base = cfg["epochs"] * per_epoch, opt.param_groups[0]["lr"]
    ema, t, log = None, 0, []
    for _ in range(cfg["epochs"]):
        batches = iter(loader)
        for g in range(per_epoch):
            size = min(accum, n - g * accum)
            lr = base * (t / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))))
            for group in opt.param_groups:
                group["lr"] = lr
            losses = []
            for _ in range(size):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss, _ = tw.step(model, next(batches))
                (loss / size).backward()
                losses.append(loss.item())
            grads = [p.grad for p in model.parameters()]
            norm = torch.sqrt(sum((g_ ** 2).sum() for g_ in grads))
            finite = math.isfinite(norm) and all(math.isfinite(x) for x in losses)
            if finite:
                for g_ in grads:
                    g_.mul_(min(1.0, clip / (norm.item() + 1e-6)))
                opt.step()
                params = _weights(model)
                ema = params if ema is None else {k: decay * ema[k] + (1 - decay) * params[k] for k in params}
            opt.zero_grad()
            t += 1
            log.append((lr, sum(losses) / size, finite))
    ema_model = tw.make_model()
    ema_model.load_state_dict(ema)
    ema_model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        val = [tw.step(ema_model, b)[0].item() for b in val_loader]
    return model, ema_model, log, sum(val) / len(val)


@pytest.mark.parametrize("amp", [False, True])
def test_fit_makes_the_same_updates_as_a_bare_pytorch_loop(tmp_path, amp):
    # 11 batches with grad_accum 2: the last optimizer step of every epoch averages a single micro-batch.
    opts = {"seed": 1, "n_train": 44, "config": {**CFG, "amp": amp}}
    seen = []

    def step(model, batch):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return tw.step(model, batch)

    model, result = tw.run_fit({**opts, "out_dir": tmp_path}, step_fn=step)
    ref_model, ref_ema, ref_log, ref_val = _bare_loop(opts, CFG, amp)
    assert set(seen) == {torch.bfloat16 if amp else None}
    for k, v in _weights(ref_model).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    for k, v in _weights(ref_ema).items():
        torch.testing.assert_close(result.ema.module.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    steps = _rows(tmp_path / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, len(ref_log) + 1)) == list(range(1, 3 * 6 + 1))
    assert [float(r["lr"]) for r in steps] == pytest.approx([lr for lr, _, _ in ref_log], rel=1e-12, abs=1e-15)
    assert [float(r["loss"]) for r in steps] == pytest.approx([loss for _, loss, _ in ref_log], rel=1e-4)
    # Validation judges the EMA weights.
    assert result.metrics["val_loss"] == pytest.approx(ref_val, rel=1e-4)


def test_outputs_validation_schedule_best_and_periodic_checkpoints(tmp_path):
    cfg = {**CFG, "epochs": 4, "val_every": 2, "ckpt_every": 2, "log_every": 3, "ema_decay": None}
    model, result = tw.run_fit({"seed": 2, "out_dir": tmp_path, "config": cfg})
    epochs = _rows(tmp_path / "epochs.csv")
    assert [r["epoch"] for r in epochs] == ["1", "2", "3", "4"]
    assert [bool(r["val_loss"]) for r in epochs] == [False, True, False, True]
    assert [int(r["step"]) for r in _rows(tmp_path / "steps.csv")] == [3, 6, 9, 12, 15, 18]  # 5 steps/epoch
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch_0002.pt", "epoch_0004.pt", "last.pt"]
    best = checkpoint.load_train_checkpoint(tmp_path / "checkpoints" / "best.pt")
    vals = {int(r["epoch"]): float(r["val_loss"]) for r in epochs if r["val_loss"]}
    assert best["progress"]["best"] == pytest.approx(min(vals.values()))
    assert best["progress"]["epoch"] == best["progress"]["best_epoch"] == min(vals, key=vals.get)
    last = checkpoint.load_train_checkpoint(result.checkpoint)
    assert set(last) == {"format", "model", "optimizer", "scheduler", "scaler", "ema", "progress", "rng", "config",
                         "world_size"}
    assert last["config"]["lr"] == 0.05 and last["config"]["epochs"] == 4  # the resolved configuration
    _assert_equal(last["model"], _weights(model))
    fresh = tw.make_model()
    train.load_weights(fresh, result.checkpoint)
    _assert_equal(_weights(fresh), _weights(model))


def test_frozen_submodules_stay_in_eval_mode_while_the_rest_trains(tmp_path):
    # A linear probe: the encoder (with dropout) is frozen, only the head learns. net.train() would turn
    # the encoder's dropout back on, in every training step and after validation.
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(tw.DIM, 16), torch.nn.Dropout(0.5), torch.nn.Tanh())
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))  # its dropout has no parameters
    model = torch.nn.Sequential(encoder.requires_grad_(False), head)
    _, loader, val_loader, _ = tw.build(seed=11)
    modes = []

    def step(model, batch):
        modes.append((model.training, encoder.training, encoder[1].training, head.training, head[0].training))
        return tw.step(model, batch)

    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05)
    cfg = {**CFG, "epochs": 2, "ema_decay": None}
    train.fit(model, step, loader, optimizer, out_dir=tmp_path, config=cfg, val_loader=val_loader)
    n, v = len(loader), len(val_loader)  # per epoch: n training steps, then v validation steps
    assert len(modes) == 2 * (n + v)
    assert set(modes[:n] + modes[n + v: 2 * n + v]) == {(True, False, False, True, True)}
    assert set(modes[n: n + v] + modes[2 * n + v:]) == {(False,) * 5}
    assert (model.training, encoder[1].training, head.training, head[0].training) == (True, False, True, True)
    assert train.train_mode(torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2))).training


# --------------------------------------------------------------------------- exact resume

@pytest.mark.slow
def test_sigkill_in_the_middle_of_an_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    opts = {"seed": 3, "dropout": 0.2, "augment": True, "config": {**CFG, "amp": True},
            "threads": torch.get_num_threads()}
    ref_model, ref = tw.run_fit({**opts, "out_dir": str(tmp_path / "ref")})
    out = tmp_path / "killed"
    # 10 micro-batches per epoch: the 15th is the middle of epoch 2, after last.pt of epoch 1.
    proc, _, err = _start("fit", {**opts, "out_dir": str(out), "pause_at": 15}, tmp_path, env={"TQDM_DISABLE": None})
    try:
        deadline = time.monotonic() + 90
        while not (out / "paused").exists():
            assert proc.poll() is None, f"worker exited early:\n{err.read_text()}"
            assert time.monotonic() < deadline, f"worker never reached the pause:\n{err.read_text()}"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert "/15" in err.read_text()  # its progress bar (15 optimizer steps), TQDM_DISABLE unset
    killed = checkpoint.load_train_checkpoint(out / "checkpoints" / "last.pt")["progress"]
    assert (killed["epoch"], killed["batch"], killed["step"]) == (1, 0, 5)
    assert int(_rows(out / "steps.csv")[-1]["step"]) == 7  # logged past the checkpoint before dying

    model, result = tw.run_fit({**opts, "out_dir": str(out)}, resume=True)
    assert result.status == "completed"
    _assert_equal(_weights(model), _weights(ref_model))
    _assert_equal(_weights(result.ema), _weights(ref.ema))
    names = ("epoch", "step", "lr", "loss", "mae", "skipped")
    assert _columns(_rows(out / "steps.csv"), *names) == _columns(_rows(tmp_path / "ref" / "steps.csv"), *names)
    names = ("epoch", "step", "loss", "val_loss")
    assert _columns(_rows(out / "epochs.csv"), *names) == _columns(_rows(tmp_path / "ref" / "epochs.csv"), *names)


@pytest.mark.parametrize("budget, where", [(11, "before validation"), (15, "mid-epoch")])
def test_time_budget_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, budget, where):
    # Two loader workers, random augmentation and dropout: the resumed epoch must replay all of them.
    opts = {"seed": 4, "dropout": 0.2, "augment": True, "workers": 2, "config": {**CFG, "time_budget_s": budget}}
    ref_model, ref = tw.run_fit({**opts, "out_dir": tmp_path / "ref"})
    clock = FakeClock()
    monkeypatch.setattr(train, "_clock", clock)
    _, stopped = tw.run_fit({**opts, "out_dir": tmp_path / "cut"}, step_fn=clock.step)
    assert stopped.status == "time_budget"
    assert clock.t <= budget
    saved = checkpoint.load_train_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["progress"]
    if where == "mid-epoch":
        assert saved["epoch"] == 1 and 0 < saved["batch"] < 10
    else:  # every batch of epoch 1 trained, its validation not done yet
        assert (saved["epoch"], saved["batch"]) == (0, 10)
    monkeypatch.setattr(train, "_clock", FakeClock())  # a new session, a new budget
    resume_cfg = {**opts["config"], "time_budget_s": 1e6}  # the budget may change on resume
    model, result = tw.run_fit({**opts, "config": resume_cfg, "out_dir": tmp_path / "cut"}, resume=True)
    assert result.status == "completed"
    _assert_equal(_weights(model), _weights(ref_model))
    _assert_equal(_weights(result.ema), _weights(ref.ema))
    for log, names in [("steps.csv", ("epoch", "step", "lr", "loss", "mae")),
                       ("epochs.csv", ("epoch", "step", "lr", "loss", "val_loss", "val_mae"))]:
        assert _columns(_rows(tmp_path / "cut" / log), *names) == _columns(_rows(tmp_path / "ref" / log), *names)


# --------------------------------------------------------------------------- non-finite

def test_a_nan_batch_skips_its_step_and_matches_a_loop_that_skips_it(tmp_path):
    opts = {"seed": 5, "n_train": 44, "nan_at": 7, "config": {**CFG, "epochs": 1}}
    model, result = tw.run_fit({**opts, "out_dir": tmp_path})
    ref_model, _, ref_log, _ = _bare_loop(opts, {**CFG, "epochs": 1}, amp=False)
    assert result.progress.skipped == 1 == sum(not ok for _, _, ok in ref_log)
    for k, v in _weights(ref_model).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert checkpoint.first_nonfinite(model) is None
    assert [int(r["skipped"]) for r in _rows(tmp_path / "steps.csv")][-1] == 1
    assert checkpoint.first_nonfinite(result.ema.module) is None


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_message(tmp_path, capsys):
    calls = 0

    def poisoned(model, batch):  # from the 13th micro-batch on (epoch 2) every loss is NaN
        nonlocal calls
        calls += model.training
        loss, metrics = tw.step(model, batch)
        return (loss * float("nan") if calls > 12 else loss), metrics

    cfg = {**CFG, "max_nonfinite": 3}
    with pytest.raises(train.NonFiniteError, match=r"3 optimizer steps in a row.*epoch 2.*last good checkpoint"):
        tw.run_fit({"seed": 6, "out_dir": tmp_path, "config": cfg}, step_fn=poisoned)
    assert capsys.readouterr().out.count("update skipped") == 3
    last = checkpoint.load_train_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_a_nonfinite_model_is_never_checkpointed(tmp_path):
    calls = 0

    def corrupting(model, batch):  # a buffer turns NaN in epoch 2 while the loss stays finite
        nonlocal calls
        calls += model.training
        if calls == 15:
            model.get_buffer("stats").fill_(float("nan"))
        return tw.step(model, batch)

    model, loader, val_loader, opt = tw.build(seed=7)
    model.register_buffer("stats", torch.zeros(3))
    with pytest.raises(train.NonFiniteError, match=r"not checkpointing: 'stats' holds NaN.*last good checkpoint"):
        train.fit(model, corrupting, loader, opt, out_dir=tmp_path, config={**CFG, "ema_decay": None},
                  val_loader=val_loader)
    last = checkpoint.load_train_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["progress"]["epoch"] == 1 and torch.equal(last["model"]["stats"], torch.zeros(3))


# --------------------------------------------------------------------------- unsafe, truncated, mismatched

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "run" / "checkpoints" / "last.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"format": checkpoint.FORMAT, "model": _Payload(marker)}, evil)
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    for path in (evil, bare):
        with pytest.raises(checkpoint.UnsafeCheckpointError, match=rf"{path.name}: refused.*posix.system"):
            checkpoint.load(path)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="refused"):
        tw.run_fit({"seed": 0, "out_dir": tmp_path / "run", "config": CFG}, resume=True)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_reported_and_the_previous_good_one_offered(tmp_path):
    calls = 0

    def crashing(model, batch):  # the session dies in epoch 3
        nonlocal calls
        calls += model.training
        if calls == 25:
            raise KeyboardInterrupt
        return tw.step(model, batch)

    ref_model, _ = tw.run_fit({"seed": 8, "out_dir": tmp_path / "ref", "config": CFG})
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tw.run_fit({"seed": 8, "out_dir": out, "config": CFG}, step_fn=crashing)
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(checkpoint.CorruptCheckpointError) as info:
        tw.run_fit({"seed": 8, "out_dir": out, "config": CFG}, resume=True)
    message = str(info.value)
    assert "last.pt: damaged or truncated" in message and "epoch_0002.pt (epoch 2, step 10)" in message
    assert info.value.fallback == out / "checkpoints" / "epoch_0002.pt"
    model, result = tw.run_fit({"seed": 8, "out_dir": out, "config": CFG}, resume=info.value.fallback)
    assert result.status == "completed"
    _assert_equal(_weights(model), _weights(ref_model))


def test_resume_with_a_different_configuration_is_refused_naming_the_keys(tmp_path):
    tw.run_fit({"seed": 9, "out_dir": tmp_path, "config": {**CFG, "epochs": 1}})
    changed = {**CFG, "epochs": 1, "lr": 0.01, "grad_accum": 1, "augment_p": 0.5}
    with pytest.raises(checkpoint.ConfigMismatchError) as info:
        tw.run_fit({"seed": 9, "out_dir": tmp_path, "config": changed}, resume=True)
    message = str(info.value)
    assert "refusing to resume" in message and "3 key(s)" in message
    for line in ["lr: checkpoint 0.05, now 0.01", "grad_accum: checkpoint 2, now 1", "augment_p: checkpoint (absent), now 0.5"]:
        assert line in message
    # A fresh start over another run's checkpoints is refused too (nothing is silently overwritten).
    with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
        tw.run_fit({"seed": 9, "out_dir": tmp_path, "config": {**CFG, "epochs": 1}})


def test_bad_step_output_and_empty_loader_get_clear_errors(tmp_path):
    model, loader, _, opt = tw.build()
    with pytest.raises(TypeError, match="step function must return a scalar loss"):
        train.fit(model, lambda m, b: {"loss": 1.0}, loader, opt, out_dir=tmp_path, config=CFG)
    with pytest.raises(ValueError, match="metric name.*'lr'"):
        train.fit(model, lambda m, b: (tw.step(m, b)[0], {"lr": 1.0}), loader, opt, out_dir=tmp_path, config=CFG)
    empty = torch.utils.data.DataLoader(tw.Regression(3, 0), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="train_loader yields no batches"):
        train.fit(model, tw.step, empty, opt, out_dir=tmp_path, config=CFG)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        train.fit(model, tw.step, loader, opt, out_dir=tmp_path, config=CFG, resume=tmp_path / "nowhere.pt")


# --------------------------------------------------------------------------- processes

@pytest.mark.slow
def test_tqdm_disable_silences_the_bar(tmp_path):
    opts = {"seed": 0, "out_dir": str(tmp_path / "run"), "config": {**CFG, "epochs": 1}, "scheduler": "constant"}
    proc, out, err = _start("fit", opts, tmp_path, env={"TQDM_DISABLE": "1"})
    try:
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err.read_text()
    assert "/5" not in err.read_text() and "step/s" not in err.read_text()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_two_gloo_processes_with_the_same_global_batch_equal_one_process(tmp_path):
    cfg = {**CFG, "epochs": 2}
    opts = {"seed": 10, "n_train": 48, "n_val": 16, "config": cfg}
    one_model, one = tw.run_fit({**opts, "batch": 8, "distributed": (0, 1), "out_dir": tmp_path / "one"})
    proc, _, err = _start("ddp", {**opts, "batch": 4, "world": 2, "out_dir": str(tmp_path / "two")}, tmp_path)
    try:
        proc.wait(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err.read_text()
    ranks = [torch.load(tmp_path / "two" / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    _assert_equal(ranks[0]["model"], ranks[1]["model"])  # DDP keeps the replicas identical
    for k, v in _weights(one_model).items():
        torch.testing.assert_close(ranks[0]["model"][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[0]["ema"][k], one.ema.module.state_dict()[k], rtol=1e-5, atol=1e-6)
    two_epochs = _rows(tmp_path / "two" / "rank0" / "epochs.csv")
    assert [float(r["val_loss"]) for r in two_epochs] == pytest.approx(
        [float(r["val_loss"]) for r in _rows(tmp_path / "one" / "epochs.csv")], rel=1e-5)
    assert not (tmp_path / "two" / "rank1").exists() or not any((tmp_path / "two" / "rank1").rglob("*"))


def test_adamw_is_fused_and_updates_as_the_loop_implementation():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    b = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())
    start = a[0].weight.detach().clone()
    fused = train.adamw(a.parameters(), lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"] and not loop.param_groups[0]["fused"]
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for _ in range(20):
        for model, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert moved < 1e-5
    assert (a[0].weight - start).abs().max() > 1e-2  # it did train


def test_adamw_falls_back_where_torch_has_no_fused_kernel(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = train.adamw((p for p in torch.nn.Linear(2, 2).parameters()), lr=1e-3, weight_decay=0.0)
    assert not opt.param_groups[0]["fused"] and len(opt.param_groups[0]["params"]) == 2


def test_resume_true_without_a_checkpoint_is_refused_and_auto_starts_the_stage(tmp_path, capsys):
    with pytest.raises(train.CheckpointError, match=r"resume=True but .*checkpoints holds no checkpoint to continue"):
        tw.run_fit({"seed": 0, "out_dir": tmp_path / "none", "config": CFG}, resume=True)
    assert not (tmp_path / "none" / "checkpoints").exists() or not any((tmp_path / "none" / "checkpoints").iterdir())
    _, result = tw.run_fit({"seed": 0, "out_dir": tmp_path / "stage", "config": CFG}, resume="auto")
    assert result.status == "completed" and "a stage the run had not reached" in capsys.readouterr().out
