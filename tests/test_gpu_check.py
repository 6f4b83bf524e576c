"""The GPU check (lib/gpu_check) on a CPU: its machinery with a fake clock, its pieces, and a reduced run."""

import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib import paths
from lib.gpu_check import cli, core, install, stages, wheels


class FakeClock:
    """A clock that moves only when a stage says it took time (thread-safe: stages may run side by side)."""

    def __init__(self):
        self.now, self._lock = 1000.0, threading.Lock()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        with self._lock:
            self.now += seconds


def _dummy_wheel(folder, name="medimg_probe"):
    """A real, installable wheel of a tiny package (stands in for monai & co. without the network)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    dist = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n")
    return path


# --------------------------------------------------------------------------- stages, budget, timeouts


def test_a_stage_past_its_timeout_is_killed_with_all_below_it_and_recorded_as_failed(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "  # the grandchild in a process group of its own, as a kernel may be
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    t0 = time.monotonic()
    result = core.run_stage("slow", lambda t: core.run_child([sys.executable, "-c", script], t)[2],
                            core.Budget(100), limit_s=2)
    assert time.monotonic() - t0 < 20
    assert result["status"] == "failed" and result["reason"].startswith("timed out after 2 s")
    assert "started" in result["error_tail"] and result["timeout_s"] == 2
    grandchild = Path(f"/proc/{pid_file.read_text()}/status")
    for _ in range(50):  # killed with its process group (a zombie until init reaps it)
        if not grandchild.exists() or "\nState:\tZ" in grandchild.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage's grandchild outlived the timeout")


def test_failures_and_skips_are_recorded_with_their_reason():
    budget = core.Budget(100, FakeClock())

    def broken(t):
        raise KeyError("gone")

    def skipped(t):
        raise core.Skipped("does not apply")

    failed = core.run_stage("broken", broken, budget, 10)
    assert failed["status"] == "failed" and failed["reason"] == "KeyError: 'gone'" and "KeyError" in failed["error_tail"]
    assert core.run_stage("skip", skipped, budget, 10) | {"seconds": 0} == {
        "name": "skip", "status": "skipped", "reason": "does not apply", "limit_s": 10, "timeout_s": 10, "seconds": 0}
    marked = core.run_stage("marked", lambda t: {"status": "failed", "reason": "2 of 3", "n": 3}, budget, 10)
    assert (marked["status"], marked["reason"], marked["data"]) == ("failed", "2 of 3", {"n": 3})


def test_the_budget_cuts_timeouts_and_skips_what_no_longer_fits():
    clock = FakeClock()
    budget = core.Budget(100, clock)
    seen = []

    def takes(seconds):
        def fn(timeout):
            seen.append(timeout)
            clock.advance(seconds)
            return {}
        return fn

    assert core.run_stage("a", takes(70), budget, limit_s=200, reserve_s=20)["timeout_s"] == 80  # 100 less the reserve
    late = core.run_stage("b", takes(1), budget, limit_s=50, min_s=40)
    assert late["status"] == "skipped" and late["reason"].startswith("out of time budget: 30 s left")
    assert core.run_stage("c", takes(5), budget, limit_s=50, min_s=10)["timeout_s"] == 30
    assert seen == [80, 30] and budget.remaining() == 25


def _opts(tmp_path, *extra):
    return cli.parser().parse_args(["run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                                    "--wheels", str(tmp_path / "none"), *extra])


def _fake_impl(clock, took, calls):
    side_by_side = threading.Barrier(2 if "kaggle" in took else 1, timeout=10)  # both started before time moves

    def stage(name):
        def fn(*args):
            calls.append((name, args[-1] if name != "install" else None))
            if name in ("notebooks", "kaggle"):
                side_by_side.wait()
            clock.advance(took.get(name, 1))
            if name == "environment":
                return {"cuda_available": True, "gpu_count": 1, "gpus": [{"bf16": True}]}
            return {"done": name}
        return fn
    return SimpleNamespace(**{**{n: stage(n) for n in cli.ORDER}, "ddp": stages.ddp})  # the real ddp: 1 GPU, skipped


def test_the_check_runs_its_stages_in_order_within_the_budget_and_writes_the_record(tmp_path):
    clock, calls = FakeClock(), []
    record, path = cli.run_check(_opts(tmp_path), clock, _fake_impl(clock, {"notebooks": 200, "kaggle": 50}, calls))
    names = [n for n, _ in calls]
    assert names[:3] == ["install", "environment", "data"] and set(names[3:5]) == {"notebooks", "kaggle"}
    assert names[5:] == ["steps"]
    assert record["device"] == "cuda" and record["dtypes"] == ["float16", "bfloat16"]
    assert record["stages"]["ddp"]["status"] == "skipped" and "needs 2" in record["stages"]["ddp"]["reason"]
    # notebooks and kaggle side by side, each cut to what is left less the steps' least (60) and ddp's (30)
    assert dict(calls)["notebooks"] == dict(calls)["kaggle"] == min(cli.LIMITS["notebooks"][0], 470 - 3 - 90)
    assert dict(calls)["steps"] == min(cli.LIMITS["steps"][0], 470 - 3 - 250)
    assert json.loads(path.read_text()) == record and path.name.startswith("gpu-") and path.parent == tmp_path / "out"
    assert record["summary"] == {"ok": ["install", "environment", "data", "notebooks", "kaggle", "steps"], "failed": [],
                                 "skipped": ["ddp"]}
    assert record["within_budget"] and record["schema"] == 1


def test_a_check_that_overran_skips_the_last_stages_for_lack_of_time(tmp_path):
    clock, calls = FakeClock(), []
    record, _ = cli.run_check(_opts(tmp_path, "--stages", "notebooks", "steps"), clock,
                              _fake_impl(clock, {"notebooks": 420}, calls))
    assert [n for n, _ in calls] == ["install", "notebooks"]
    assert record["stages"]["steps"]["status"] == "skipped" and "out of time budget" in record["stages"]["steps"]["reason"]
    assert set(record["stages"]) == {"install", "notebooks", "steps"}


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "gpu.json"
    core.write_json_atomic(path, {"a": 1})
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError):
        core.write_json_atomic(path, {"b": loop})  # cannot be serialised: the old file stays, no temporary is left
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["gpu.json"]


def test_result_lines_survive_other_output():
    text = "noise\n" + core.MARK + '{"a": 1}\n' + core.MARK + "{broken\nmore noise\n" + core.MARK + '{"b": [2]}\n'
    assert core.parse_results(text) == [{"a": 1}, {"b": [2]}]


# --------------------------------------------------------------------------- pieces


def test_wheel_tags_decide_what_installs_here():
    assert install.compatible("numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", (3, 12), "x86_64")
    assert not install.compatible("numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl", (3, 11), "x86_64")
    assert install.compatible("wcwidth-0.9.4-cp310-abi3-manylinux2014_x86_64.whl", (3, 12), "x86_64")
    assert not install.compatible("wcwidth-0.9.4-cp310-abi3-manylinux2014_x86_64.whl", (3, 12), "aarch64")
    assert install.compatible("pexpect-4.9.0-py2.py3-none-any.whl", (3, 11), "aarch64")
    assert install.wheel_tags("pydicom_data-1.0.0-py3-none-any.whl")[:2] == ("pydicom-data", "1.0.0")


def test_over_budget_the_check_s_needs_stay_and_what_images_carry_goes():
    sizes = {"simpleitk": 50, "scipy": 34, "numpy": 16, "monai": 2, "papermill": 1, "kaggle": 0.1}
    out = wheels.leave_out(sizes, 20)
    assert list(out) == ["simpleitk", "kaggle", "scipy", "numpy"][: len(out)] and set(out) == {"simpleitk", "kaggle", "scipy"}
    assert "images usually carry" in out["scipy"] and wheels.leave_out(sizes, None) == {}


def test_the_training_notebooks_are_every_family_s_and_09():
    from lib.families import FAMILIES

    assert {f.notebook for f in FAMILIES.values()} | {"09_rsna_aneurysm"} == set(stages.TRAINING_NOTEBOOKS)
    assert all((paths.NOTEBOOKS_DIR / f"{n}.ipynb").is_file() for n in stages.TRAINING_NOTEBOOKS)


def test_offline_install_into_two_folders_and_the_kaggle_kernel_sees_one(tmp_path):
    folder = tmp_path / "wheels"
    base, bundled = _dummy_wheel(folder, "medimg_probe"), _dummy_wheel(folder / "kaggle", "medimg_bundled")
    (folder / install.MANIFEST).write_text(json.dumps({"python_version": "3.11", "wheels": [
        {"file": base.name, "name": "medimg-probe", "version": "1.0"},
        {"file": bundled.name, "name": "medimg-bundled", "version": "1.0", "kaggle": True},
        {"file": "numpy-2.4.6-cp39-cp39-manylinux_2_28_x86_64.whl", "name": "numpy",
         "version": __import__("numpy").__version__}], "left_out": {"scipy": "why"}}))
    record = install.install(folder, tmp_path / "site")
    assert record["installed"] == {"base": [base.name], "kaggle": [bundled.name]} and "status" not in record
    assert record["already_present"] == {"numpy": __import__("numpy").__version__}
    assert (tmp_path / "site" / "base" / "medimg_probe" / "__init__.py").is_file()
    assert (tmp_path / "site" / "kaggle" / "medimg_bundled" / "__init__.py").is_file()
    assert install.install(folder, tmp_path / "site")["reused"] is True
    sites = record["site_dirs"]
    assert install.child_env(sites, paths.ROOT)["PYTHONPATH"].split(os.pathsep)[:3] == [sites["base"], sites["kaggle"], str(paths.ROOT)]
    kernel = install.child_env(sites, paths.ROOT, kaggle_kernel=True)["PYTHONPATH"].split(os.pathsep)
    assert kernel[0] == sites["base"] and sites["kaggle"] not in kernel and str(paths.ROOT) not in kernel


def test_steps_are_paired_with_their_monai_peer_and_the_estimate():
    plan = [{"family": "f", "name": "Ours", "peer": "Theirs"}]
    ours = {"name": "Ours", "asked_dtype": "float16", "ms": 10.0, "gflops": 200.0, "max_memory_allocated_mb": 300.0}
    theirs = {"name": "Theirs", "asked_dtype": "float16", "ms": 20.0, "gflops": 100.0, "max_memory_allocated_mb": 600.0}
    out = stages.pair_steps([{"plan": plan}, {"step": ours}, {"step": theirs},
                             {"estimate": {"name": "Ours", "need_mb": 250.0}}])
    (row,) = out["pairs"]
    assert row["vs_monai"] == {"speed": 2.0, "gflops": 2.0, "memory": 0.5} and row["measured_over_estimate"] == 1.2
    broken = stages.pair_steps([{"plan": plan}, {"step": {**ours, "error": "OOM"}}])
    assert broken["errors"] == ["Ours (float16): OOM"] and "vs_monai" not in broken["pairs"][0]
    assert broken["pairs"][0]["t4_memory_estimate"] == {"unavailable": "not measured"}


def test_ddp_is_skipped_with_the_reason_on_fewer_than_two_gpus(tmp_path):
    ctx = stages.Context(paths.ROOT, tmp_path, tmp_path, tmp_path, device="cuda", gpu_count=1)
    assert core.run_stage("ddp", lambda t: stages.ddp(ctx, t), core.Budget(100), 10)["reason"] == (
        "1 GPU(s) visible: a two-process DDP run needs 2")
    ctx.device = "cpu"
    assert "--ddp-cpu" in core.run_stage("ddp", lambda t: stages.ddp(ctx, t), core.Budget(100), 10)["reason"]


def test_the_entry_point_needs_only_the_standard_library():
    code = ("import sys, lib.gpu_check.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'torch', 'pandas', 'yaml', 'monai', "
            "'papermill', 'nbformat', 'packaging'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=paths.ROOT, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- a reduced check, for real


@pytest.mark.slow
def test_a_quick_check_on_the_cpu(tmp_path):
    """03 at smoke, one family's step beside MONAI, the Kaggle bundle in a simulated /kaggle, the JSON."""
    kaggle_wheels = tmp_path / "kaggle-wheels"
    _dummy_wheel(kaggle_wheels)
    cmd = [sys.executable, "-m", "lib.gpu_check", "run", "--device", "cpu", "--quick", "--budget-s", "400",
           "--wheels", str(tmp_path / "no-wheels"), "--kaggle-wheels", str(kaggle_wheels),
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=paths.ROOT, timeout=420)
    (path,) = (tmp_path / "out").glob("gpu-*.json")
    record = json.loads(path.read_text())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = record["stages"]
    assert record["summary"]["failed"] == [] and record["device"] == "cpu" and record["within_budget"]
    assert s["ddp"]["status"] == "skipped" and s["environment"]["data"]["torch"]
    (nb,) = s["notebooks"]["data"]["runs"]["bfloat16"]
    assert nb["notebook"] == "03_pretrain" and nb["run_status"] == "completed" and nb["autocast_dtype"] == "bfloat16"
    (pair,) = s["steps"]["data"]["pairs"]
    assert pair["network"] == "WaveFormer pretrainer" and pair["peer"] == "MONAI ViT"
    assert pair["ours"]["ms"] > 0 and pair["monai"]["gflops"] > 0 and pair["vs_monai"]["speed"] > 0
    assert "need_mb" in pair["t4_memory_estimate"] or pair["t4_memory_estimate"]["unavailable"].startswith("estimate unavailable")
    k = s["kaggle"]["data"]
    assert k["lib_is_shipped"] and k["bootstrap_installed"] == ["medimg-probe==1.0"] and k["run_status"] == "completed"
    assert "medimg_probe" in k["medimg_site"]
