"""Run records that no later fault can downgrade: a failed resume over a completed run, a kernel killed by
SIGKILL (no exit hook runs), and the liveness mark that tells a dead run from a live one."""

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from lib import paths, runs
from lib.checkpoint import ConfigMismatchError


def _record(run):
    return json.loads((run.dir / "run.json").read_text())


def _completed(results, monkeypatch):
    monkeypatch.setenv(runs.RUN_ID_ENV, "done-1")
    run = runs.start_run("01_explore_data", "smoke", seed=1)
    run.finish(answer=42)
    return run


def test_a_refused_resume_never_downgrades_a_completed_run(results, monkeypatch):
    done = _completed(results, monkeypatch)
    before = _record(done)
    with pytest.raises(ConfigMismatchError):
        with runs.start_run("01_explore_data", "smoke", seed=2) as again:  # same folder, changed parameter
            assert again.status == "running" and _record(again)["status"] == "completed"
            raise ConfigMismatchError("refusing to resume: seed differs")
    rec = _record(done)
    assert rec["status"] == "completed" and rec["summary"] == {"answer": 42}
    assert rec["config"] == before["config"] and rec["end_time"] == before["end_time"] and rec["errors"] == []
    assert [(r["run_id"], r["status"]) for r in runs.read_index(results)] == [("done-1", "completed")]
    (attempt,) = rec["attempts"]
    assert attempt["status"] == "failed" and attempt["config"]["seed"] == 2
    assert "refusing to resume" in attempt["errors"][0]["error"]
    assert attempt["process"]["pid"] == os.getpid()
    # the notebook runner's mark_failed afterwards changes nothing: the attempt already holds its error
    runs.mark_failed(done.dir, "01_explore_data", "smoke", "cell 3: ConfigMismatchError", results_root=results)
    assert _record(done) == rec


def test_mark_failed_on_a_completed_run_records_a_failed_attempt(results, monkeypatch):
    done = _completed(results, monkeypatch)
    runs.mark_failed(done.dir, "01_explore_data", "smoke", "kernel died", results_root=results)
    rec = _record(done)
    assert rec["status"] == "completed" and rec["summary"] == {"answer": 42}
    assert runs.read_index(results)[0]["status"] == "completed"
    assert rec["attempts"][-1]["status"] == "failed" and rec["attempts"][-1]["errors"][0]["error"] == "kernel died"
    # an attempt that is still open is the one marked failed
    again = runs.start_run("01_explore_data", "smoke", seed=2)
    runs.mark_failed(done.dir, "01_explore_data", "smoke", "cell 2: boom", results_root=results)
    rec = _record(again)
    assert rec["status"] == "completed" and len(rec["attempts"]) == 2
    assert rec["attempts"][1]["status"] == "failed" and rec["attempts"][1]["errors"][0]["error"] == "cell 2: boom"


def test_a_later_session_that_completes_replaces_the_record(results, monkeypatch):
    _completed(results, monkeypatch)
    again = runs.start_run("01_explore_data", "smoke", seed=2)
    again._mark_incomplete()  # left open: the completed record stands
    assert _record(again)["status"] == "completed" and _record(again)["attempts"][0]["status"] == "incomplete"
    third = runs.start_run("01_explore_data", "smoke", seed=3)
    third.finish(answer=7)
    rec = _record(third)
    assert rec["status"] == "completed" and rec["summary"] == {"answer": 7} and rec["config"]["seed"] == 3
    assert [a["status"] for a in rec["attempts"]] == ["incomplete", "completed"]
    assert runs.read_index(results)[0]["end_time"] == rec["end_time"]


_CHILD = """
import sys, time
from lib import runs
run = runs.start_run("01_explore_data", "smoke")
open(sys.argv[1] + ".part", "w").write(run.run_id)
import os; os.replace(sys.argv[1] + ".part", sys.argv[1])
time.sleep(3600)
"""


def test_a_killed_kernel_is_marked_incomplete_and_a_live_run_stays_running(results, tmp_path):
    marker = tmp_path / "started"
    env = {**os.environ, "MEDIMG_RESULTS_DIR": str(results)}
    env.pop(runs.RUN_ID_ENV, None)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(marker)], cwd=paths.ROOT, env=env)
    try:
        deadline = time.monotonic() + 300  # a generous bound for the child's start-up, not a timing assumption
        while not marker.exists():
            assert child.poll() is None, "the child process died before opening its run"
            assert time.monotonic() < deadline, "the child never opened its run"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    dead_id = marker.read_text()
    live = runs.start_run("02_prepare_data", "smoke")  # starting a run already sweeps: the dead one is marked
    rows = {r["run_id"]: r["status"] for r in runs.read_index(results)}
    assert rows == {dead_id: "incomplete", live.run_id: "running"}
    dead = json.loads((results / "01_explore_data" / dead_id / "run.json").read_text())
    assert dead["status"] == "incomplete" and "is gone" in dead["errors"][-1]["error"]
    assert dead["process"]["pid"] == child.pid
    assert runs.mark_dead_runs(results) == [] and _record(live)["status"] == "running"


def _fake_running(results, name, **process):
    folder = results / "01_explore_data" / name
    folder.mkdir(parents=True)
    rec = {"run_id": name, "notebook": "01_explore_data", "preset": "smoke", "status": "running",
           "path": f"01_explore_data/{name}", "errors": [], "process": process}
    (folder / "run.json").write_text(json.dumps(rec))
    return folder / "run.json"


def test_other_hosts_are_left_alone_and_a_reused_pid_is_not_the_run(results, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    elsewhere = _fake_running(results, "elsewhere", host=platform.node() + "-other", pid=gone.pid, start_ticks=1)
    reused = _fake_running(results, "reused", host=platform.node(), pid=os.getpid(),
                           start_ticks=(runs.process_start_ticks(os.getpid()) or 0) + 12345)
    assert runs.main([str(results)]) == 0
    assert "01_explore_data/reused" in capsys.readouterr().out
    assert json.loads(elsewhere.read_text())["status"] == "running"
    if runs.process_start_ticks(os.getpid()) is not None:  # Linux: the start time tells a reused pid
        assert json.loads(reused.read_text())["status"] == "incomplete"
