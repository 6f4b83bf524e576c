"""The stages of :mod:`lib.gpu_check`, as the parent runs them (standard library only): each starts its
children (:mod:`lib.gpu_check.worker`) with the installed packages and returns its record."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lib.gpu_check.core import ChildFailed, Skipped, Timeout, run_child, tail
from lib.gpu_check.install import child_env

TRAINING_NOTEBOOKS = ("03_pretrain", "04_ct_diffusion", "05_cxr_change", "06_xray_to_ct", "09_rsna_aneurysm")
AFTER = {"09_rsna_aneurysm": "03_pretrain"}  # 09 fine-tunes the encoder of the latest 03 run at its preset


@dataclass
class Context:
    root: Path
    work: Path
    wheels: Path
    kaggle_wheels: Path
    device: str = "cuda"
    dtypes: list[str] = field(default_factory=lambda: ["float16", "bfloat16"])
    notebooks: list[str] = field(default_factory=lambda: list(TRAINING_NOTEBOOKS))
    parallel: int = 4
    steps_preset: str = "subset"
    families: list[str] | None = None
    repeats: int = 5
    estimate: bool = True
    ddp_cpu: bool = False
    gpu_count: int = 0
    sites: dict = field(default_factory=dict)
    cohort: str | None = None  # the smoke cohort's folder (the data stage says where)

    def env(self, **extra: str) -> dict:
        return child_env(self.sites, self.root, extra={"MEDIMG_DEVICE": self.device, **extra})

    def worker(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lib.gpu_check.worker", *map(str, args)]


def _one(results: list[dict], what: str) -> dict:
    if not results:
        raise ChildFailed(f"{what} printed no result")
    return results[-1]


def environment(ctx: Context, timeout: float) -> dict:
    _, _, results = run_child(ctx.worker("environment"), timeout, env=ctx.env(), cwd=ctx.root)
    info = _one(results, "environment")
    if info["import_errors"]:
        info.update(status="failed", reason="cannot import: " + ", ".join(sorted(info["import_errors"])))
    if ctx.device == "cuda" and not info["cuda_available"]:
        info.update(status="failed", reason="CUDA is not available to torch here")
    return info


def data(ctx: Context, timeout: float) -> dict:
    rsna = ["--rsna"] if "09_rsna_aneurysm" in ctx.notebooks else []
    _, _, results = run_child(ctx.worker("data", *rsna), timeout, env=ctx.env(), cwd=ctx.root)
    return _one(results, "data")


# --------------------------------------------------------------------------- notebooks


def _notebook(ctx: Context, name: str, dtype: str, deadline: float) -> dict:
    left = deadline - time.monotonic()
    if left < 5:
        return {"notebook": name, "status": "skipped", "reason": "out of time"}
    extra = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(1, len(ctx.dtypes) * ctx.parallel)))}
    if ctx.device == "cuda":
        extra["MEDIMG_AMP_DTYPE"] = dtype
    cmd = ctx.worker("notebook", name, "--preset", "smoke", "--results", ctx.work / "notebooks" / dtype,
                     *(["--dtype", dtype] if ctx.device == "cuda" else []))
    t0 = time.monotonic()
    try:
        _, out, results = run_child(cmd, left, env=ctx.env(**extra), cwd=ctx.root, check=False)
    except Timeout as e:
        return {"notebook": name, "status": "failed", "reason": str(e), "error_tail": e.tail}
    if not results:
        return {"notebook": name, "status": "failed", "reason": "the worker printed no result",
                "error_tail": tail(out), "seconds": round(time.monotonic() - t0, 1)}
    return results[-1]


def _chain(ctx: Context, dtype: str, deadline: float) -> list[dict]:
    """The notebooks for one autocast dtype, ``ctx.parallel`` at a time, each after the one it needs."""
    slots = threading.BoundedSemaphore(max(1, ctx.parallel))
    with ThreadPoolExecutor(max_workers=len(ctx.notebooks)) as pool:
        futures = {}
        for name in ctx.notebooks:
            dep = futures.get(AFTER.get(name, ""))
            futures[name] = pool.submit(_after, dep, slots, lambda n=name: _notebook(ctx, n, dtype, deadline))
        return [f.result() for f in futures.values()]


def _after(dep, slots, fn):
    if dep is not None:
        dep.result()
    with slots:
        return fn()


def notebooks(ctx: Context, timeout: float) -> dict:
    """Every training notebook at smoke, for each autocast dtype at once (fp16 as on a T4, bf16 where the GPU has
    it), each dtype into its own results root."""
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=len(ctx.dtypes)) as pool:
        runs = dict(zip(ctx.dtypes, pool.map(lambda d: _chain(ctx, d, deadline), ctx.dtypes)))
    bad = [f"{r['notebook']} ({d}): {r.get('reason')}" for d, rows in runs.items() for r in rows if r["status"] != "ok"]
    out: dict = {"dtypes": ctx.dtypes, "runs": runs}
    if bad:
        out.update(status="failed", reason=f"{len(bad)} of {sum(map(len, runs.values()))} failed: " + "; ".join(bad))
    return out


# --------------------------------------------------------------------------- DDP


def ddp(ctx: Context, timeout: float) -> dict:
    if ctx.device == "cuda" and ctx.gpu_count < 2:
        raise Skipped(f"{ctx.gpu_count} GPU(s) visible: a two-process DDP run needs 2")
    if ctx.device != "cuda" and not ctx.ddp_cpu:
        raise Skipped("no GPU (--ddp-cpu runs two gloo processes on the CPU instead)")
    if not (ctx.root / "lib" / "launch.py").is_file():
        raise Skipped("lib/launch.py is not there yet: nothing to launch with torchrun")
    results = ctx.work / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lib.launch", "03_pretrain", "--preset", "smoke"]
    t0 = time.monotonic()
    rc, out, _ = run_child(cmd, timeout, env=ctx.env(MEDIMG_RESULTS_DIR=str(results), OMP_NUM_THREADS="2"),
                           cwd=ctx.root, check=False)
    records = sorted((results / "03_pretrain").glob("*/run.json"))
    record = json.loads(records[-1].read_text()) if records else {}
    ranks = {}
    for f in sorted(records[-1].parent.glob("launch-*.json")) if records else []:
        info = json.loads(f.read_text())
        ranks[f.stem] = {k: info.get(k) for k in ("world_size", "status", "weights_sha256", "identical_weights")}
    row = {"command": "torchrun --nproc_per_node 2 -m lib.launch 03_pretrain --preset smoke", "returncode": rc,
           "seconds": round(time.monotonic() - t0, 1), "run_dir": str(records[-1].parent) if records else None,
           "run_status": record.get("status"), "launch": record.get("launch"), "summary": record.get("summary"),
           "processes": ranks}
    digests = [set(r["weights_sha256"] or []) for r in ranks.values()]
    if rc != 0 or record.get("status") != "completed":
        row.update(status="failed", reason=f"exit status {rc}, run.json status {record.get('status')!r}", error_tail=tail(out))
    elif any(len(d) > 1 for d in digests):
        row.update(status="failed", reason="the ranks ended with different weights")
    return row


# --------------------------------------------------------------------------- steps beside MONAI


def steps(ctx: Context, timeout: float) -> dict:
    cmd = ctx.worker("steps", "--preset", ctx.steps_preset, "--repeats", ctx.repeats, "--time-s", timeout, "--dtypes", *ctx.dtypes,
                     *(["--families", *ctx.families] if ctx.families else []), *(["--estimate"] if ctx.estimate else []))
    problem = None
    try:
        _, _, results = run_child(cmd, timeout, env=ctx.env(), cwd=ctx.root)
    except (Timeout, ChildFailed) as e:
        results, problem = e.results, (str(e), e.tail)
    out = pair_steps(results)
    if problem:
        out.update(status="failed", reason=problem[0], error_tail=problem[1])
    elif out["errors"]:
        out.update(status="failed", reason="; ".join(out["errors"]))
    return out


def pair_steps(results: list[dict]) -> dict:
    """Each trained network's step beside its MONAI peer's, per dtype, with the T4 estimates."""
    plan = next((r["plan"] for r in results if "plan" in r), [])
    rows = {(r["step"]["name"], r["step"]["asked_dtype"]): r["step"] for r in results if "step" in r}
    estimates = {r["estimate"]["name"]: r["estimate"] for r in results if "estimate" in r}
    pairs, errors = [], [f"{n} ({d}): {r['error']}" for (n, d), r in rows.items() if "error" in r]
    for p in plan:
        for dtype in dict.fromkeys(d for _, d in rows):
            ours, peer = rows.get((p["name"], dtype)), rows.get((p["peer"], dtype))
            row = {"family": p["family"], "network": p["name"], "peer": p["peer"], "dtype": dtype, "ours": ours,
                   "monai": peer, "t4_memory_estimate": estimates.get(p["name"], {"unavailable": "not measured"})}
            if ours and peer and "error" not in ours and "error" not in peer:
                row["vs_monai"] = {"speed": peer["ms"] / ours["ms"], "gflops": ours["gflops"] / peer["gflops"]}
                if ours.get("max_memory_allocated_mb") and peer.get("max_memory_allocated_mb"):
                    row["vs_monai"]["memory"] = ours["max_memory_allocated_mb"] / peer["max_memory_allocated_mb"]
            est = row["t4_memory_estimate"]
            if ours and ours.get("max_memory_allocated_mb") and est.get("need_mb"):
                row["measured_over_estimate"] = ours["max_memory_allocated_mb"] / est["need_mb"]
            pairs.append(row)
    return {"pairs": pairs, "errors": errors}


# --------------------------------------------------------------------------- the Kaggle bundle


def kaggle(ctx: Context, timeout: float) -> dict:
    if not any(Path(ctx.kaggle_wheels).glob("*.whl")):
        raise Skipped(f"no wheels in {ctx.kaggle_wheels}: run `make gpu-wheels` here and carry build/gpu-wheels")
    cohort = Path(ctx.cohort or ctx.root / "data" / "smoke")
    if not (cohort / "cohort.json").is_file():
        raise Skipped(f"no smoke cohort at {cohort} (the data stage builds it)")
    cmd = ctx.worker("kaggle", "--wheels", ctx.kaggle_wheels, "--work", ctx.work / "kaggle", "--base-site",
                     ctx.sites["base"], "--cohort", cohort, "--timeout", max(timeout - 5, 1))
    _, _, results = run_child(cmd, timeout, env=ctx.env(), cwd=ctx.root)
    return _one(results, "kaggle")
