import json
import random
import subprocess

import numpy as np
import pytest
import torch

from lib import config, runs


def test_run_folder_record_and_index(results):
    run = runs.start_run("01_explore_data", "smoke", seed=3)
    rec = json.loads((run.dir / "run.json").read_text())
    assert run.dir.parent == results / "01_explore_data"
    assert rec["status"] == "running" and rec["preset"] == "smoke" and rec["seed"] == 3
    assert rec["config"]["seed"] == 3 and rec["config"]["max_files"] == config.NOTEBOOKS["01_explore_data"].presets["smoke"]["max_files"]
    assert rec["params"] == {"preset": "smoke", "seed": 3}
    assert rec["versions"]["torch"] and rec["versions"]["monai"] and rec["versions"]["python"]
    assert rec["device"]["device"] == "cpu" and rec["device"]["autocast_dtype"] == "bfloat16"
    assert set(rec["git"]) == {"commit", "dirty"}
    run.save_json("metrics.json", {"a": np.float32(1.5), "n": np.int64(2)})
    run.finish(answer=42)
    rec = json.loads((run.dir / "run.json").read_text())
    assert rec["status"] == "completed" and rec["summary"] == {"answer": 42}
    assert rec["wall_time_s"] >= 0 and rec["end_time"] >= rec["start_time"]
    assert json.loads((run.dir / "metrics.json").read_text()) == {"a": 1.5, "n": 2}
    index = runs.read_index(results)
    assert [(r["run_id"], r["status"]) for r in index] == [(run.run_id, "completed")]


def test_an_exception_marks_the_run_failed_never_complete(results):
    with pytest.raises(RuntimeError):
        with runs.start_run("01_explore_data", "smoke") as run:
            raise RuntimeError("disk on fire")
    rec = json.loads((run.dir / "run.json").read_text())
    assert rec["status"] == "failed"
    assert "disk on fire" in rec["errors"][0]["error"] and "Traceback" in rec["errors"][0]["traceback"]
    assert runs.read_index(results)[0]["status"] == "failed"


def test_a_run_left_open_is_marked_incomplete(results):
    run = runs.start_run("01_explore_data", "smoke")
    run._mark_incomplete()  # what the atexit hook does when the kernel exits before finish()
    assert json.loads((run.dir / "run.json").read_text())["status"] == "incomplete"


def test_index_keeps_one_row_per_run(results):
    a = runs.start_run("01_explore_data", "smoke")
    b = runs.start_run("02_prepare_data", "demo")
    a.finish()
    rows = runs.read_index(results)
    assert sorted(r["run_id"] for r in rows) == sorted([a.run_id, b.run_id])
    assert {r["run_id"]: r["status"] for r in rows} == {a.run_id: "completed", b.run_id: "running"}


def test_start_notebook_validates_the_namespace(results):
    ns = {"preset": "smoke", "seed": None, "device": None, "max_files": 2}
    run = runs.start_notebook("01_explore_data", ns)
    assert run.config.max_files == 2 and run.config.seed == 0
    with pytest.raises(ValueError, match="unknown parameter.*epcohs"):
        runs.start_notebook("01_explore_data", {"preset": "smoke", "epcohs": 3})
    with pytest.raises(ValueError, match="must define 'preset'"):
        runs.start_notebook("01_explore_data", {"seed": 1})
    with pytest.raises(ValueError, match="valid presets: smoke, demo, subset, prod"):
        runs.start_notebook("01_explore_data", {"preset": "bogus"})


def test_run_id_from_environment_reuses_the_runner_folder(results, monkeypatch):
    monkeypatch.setenv(runs.RUN_ID_ENV, "given-id")
    run = runs.start_run("01_explore_data", "smoke")
    assert run.dir == results / "01_explore_data" / "given-id"


def test_mark_failed_from_outside_creates_or_updates_the_record(results):
    run_dir = results / "03_pretrain" / "x1"
    run_dir.mkdir(parents=True)
    runs.mark_failed(run_dir, "03_pretrain", "smoke", "cell 2: ValueError: bad", results_root=results)
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "failed" and rec["errors"][0]["error"] == "cell 2: ValueError: bad"
    assert runs.read_index(results)[0]["status"] == "failed"


def test_git_info_commit_and_dirty_flag(tmp_path):
    assert runs.git_info(tmp_path) == {"commit": None, "dirty": None}
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runs.git_info(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("b")
    assert runs.git_info(tmp_path) == {"commit": head, "dirty": True}


def _draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_repeats_python_numpy_and_torch():
    runs.seed_everything(7)
    a = _draw()
    runs.seed_everything(7)
    assert _draw() == a
    runs.seed_everything(8)
    assert _draw() != a
    with pytest.raises(ValueError, match="seed must be an int"):
        runs.seed_everything("7")


def test_deterministic_mode_is_switched_on_and_off():
    runs.seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    runs.seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


class _Augmented(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([i, random.random(), float(np.random.rand()), float(torch.rand(1))])


def _epoch(seed):
    loader = torch.utils.data.DataLoader(_Augmented(), batch_size=2, shuffle=True, num_workers=2,
                                         **runs.loader_seeding(seed))
    return torch.cat(list(loader))


def test_loader_workers_are_seeded_from_the_loader_generator():
    a, b, c = _epoch(5), _epoch(5), _epoch(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the workers' python and numpy streams differ between workers, not just the torch one
    assert len(set(a[:, 2].tolist())) == len(a)


def test_a_notebook_resuming_a_run_without_checkpoint_stops_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv(runs.RUN_ID_ENV, raising=False)
    with pytest.raises(ValueError, match=r"parameter 'resume' is True but \$MEDIMG_RUN_ID does not name the run"):
        runs.start_run("06_xray_to_ct", "smoke", resume=True)
    monkeypatch.setenv(runs.RUN_ID_ENV, "20260101-000000-smoke-abcd")
    with pytest.raises(ValueError, match=r"run '20260101-000000-smoke-abcd' \(.*\) holds no checkpoint to continue"):
        runs.start_run("06_xray_to_ct", "smoke", resume=True)
    assert not any(tmp_path.rglob("run.json")) and not (tmp_path / "runs.csv").exists()
