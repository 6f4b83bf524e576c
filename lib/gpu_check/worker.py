"""The children of :mod:`lib.gpu_check`: each stage's work, run in its own process (``python -m
lib.gpu_check.worker <what> ...``) with the installed packages on ``PYTHONPATH``; results are printed as
result lines (:func:`lib.gpu_check.core.emit`) as soon as each is known, so a timeout keeps them."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from lib.gpu_check.core import ChildFailed, Timeout, emit, run_child
from lib.gpu_check.install import child_env

NEEDED_MODULES = ("numpy", "scipy", "pandas", "matplotlib", "sklearn", "skimage", "PIL", "yaml", "tqdm", "einops",
                  "monai", "nibabel", "pydicom", "nilearn", "papermill", "nbformat", "ipykernel")
VERSIONED = ("torch", "numpy", "scipy", "pandas", "matplotlib", "scikit-learn", "monai", "einops", "nibabel", "pydicom",
             "pydicom-data", "nilearn", "papermill", "nbformat", "ipykernel", "jupyter-client", "pyzmq", "triton")


# --------------------------------------------------------------------------- environment

def environment() -> dict:
    import importlib
    from importlib import metadata

    import torch

    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2 ** 30, 1),
                     "multiprocessors": p.multi_processor_count, "bf16": p.major >= 8})
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    errors = {}
    for module in NEEDED_MODULES:
        try:
            importlib.import_module(module)
        except Exception as e:  # an ImportError, or a broken binary
            errors[module] = f"{type(e).__name__}: {e}"[:300]
    return {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "gpu_count": len(gpus), "gpus": gpus, "versions": versions, "import_errors": errors}


def data(rsna: bool) -> dict:
    from lib.data import demo

    t0 = time.monotonic()
    folder, report = demo.ensure("smoke", progress=False)
    out = {"smoke": str(folder), "built": report["built"]}
    if rsna:
        from lib.data import demo_rsna

        out["smoke_rsna"] = str(demo_rsna.prepared("smoke"))
    return {**out, "seconds": round(time.monotonic() - t0, 1)}


# --------------------------------------------------------------------------- a notebook

def notebook(name: str, preset: str, results: Path, dtype: str | None) -> dict:
    from lib import paths, pipeline

    t0 = time.monotonic()
    try:
        run_dir = pipeline.run_notebook(paths.NOTEBOOKS_DIR / f"{name}.ipynb", preset, None, results)
    except pipeline.NotebookFailed as e:
        return {"notebook": name, "status": "failed", "reason": e.message, "run_dir": str(e.run_dir),
                "seconds": round(time.monotonic() - t0, 1)}
    record = json.loads((run_dir / "run.json").read_text())
    device = record.get("device", {})
    row = {"notebook": name, "status": "ok", "reason": None, "run_dir": str(run_dir), "run_status": record.get("status"),
           "seconds": round(time.monotonic() - t0, 1), "wall_time_s": record.get("wall_time_s"),
           "device": device.get("device"), "gpu": device.get("gpu"), "autocast_dtype": device.get("autocast_dtype")}
    if record.get("status") != "completed":
        row.update(status="failed", reason=f"run.json status {record.get('status')!r}")
    elif dtype and device.get("device", "").startswith("cuda") and device.get("autocast_dtype") != dtype:
        row.update(status="failed", reason=f"autocast ran {device.get('autocast_dtype')}, {dtype} was asked")
    return row


# --------------------------------------------------------------------------- a training step per network

def plan(families: list[str] | None) -> list[dict]:
    """The networks each notebook trains (:data:`lib.bench.cases.TRAINING_STEPS`) beside their MONAI peers."""
    from lib.bench import cases

    out = []
    for family, benched in cases.FAMILY_CASES.items():
        if families and family not in families:
            continue
        out += [{"family": family, "name": b.name, "peer": b.peer} for b in benched if b.name in cases.TRAINING_STEPS]
    return out


def step(name: str, preset: str, repeats: int) -> dict:
    """One optimizer step of benchmark case ``name`` as :func:`lib.bench.measure.train_step` measures it, with
    ``torch.cuda.max_memory_allocated`` over the case (model, optimizer state, inputs, activations)."""
    import torch

    from lib import config
    from lib import device as _device
    from lib.bench import cases, measure

    cuda = _device.pick_device().type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    case = cases.build_case(name, preset)
    r = measure.train_step(case.model, case.batch, case.loss, True, repeats, lr=config.resolve(cases.CASES[name][0], preset).lr)
    row = {"name": name, "preset": preset, "dtype": r["dtype"], "ms": r["ms"], "gflop_per_step": r["gflop_per_step"],
           "gflops": r["gflops"], "tensor_peak_mb": r["tensor_peak_mb"], "samples": case.samples, "unit": case.unit,
           "input": case.input, "params_m": sum(p.numel() for p in case.model.parameters()) / 1e6,
           "max_memory_allocated_mb": (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else None}
    try:
        from lib.families.rsna_aneurysm_submit import T4_EFFECTIVE_FLOPS

        row["t4_ms_estimate"] = r["gflop_per_step"] * 1e9 / T4_EFFECTIVE_FLOPS * 1e3
    except Exception as e:
        row["t4_ms_estimate"] = f"estimate unavailable: {type(e).__name__}: {e}"
    del case
    return row


def t4_memory(name: str, preset: str, micro_batch: int) -> dict:
    """Section 7's estimate of the GPU memory of ``name``'s step at ``preset`` and ``micro_batch`` (no EMA, no
    accumulation, no checkpointing: as measured here), from whichever estimator :mod:`lib.bench` has."""
    try:
        from lib.bench import memory as mem

        one, two = (mem.saved_activations(name, preset, b) for b in (1, 2))
        row = mem.estimate(one, two, {"micro_batch": micro_batch, "grad_accum": 1, "ema": False, "checkpointing": False})
        need = (row["gb_at_preset"] * 1e9 - mem.RESERVED_BYTES) * mem.HEADROOM
        return {"source": "lib.bench.memory.estimate", "need_mb": need / 2 ** 20, "t4_gb": row["gb_at_preset"],
                "fits_t4": row["fits"], "max_batch_t4": row["max_batch_autocast"]}
    except Exception as e:
        first = f"{type(e).__name__}: {e}"
    try:
        from lib.bench import families as bf

        saved = bf.saved_activations(name, preset, micro_batch)
        need = bf.STATE_BYTES_PER_PARAM * saved["params"] + saved["total"]
        return {"source": "lib.bench.families.saved_activations", "need_mb": need / 2 ** 20,
                "t4_gb": (need / bf.HEADROOM + bf.RESERVED_BYTES) / 1e9,
                "fits_t4": need / bf.HEADROOM + bf.RESERVED_BYTES <= bf.GPU_BYTES}
    except Exception as e:
        return {"unavailable": f"estimate unavailable: {first}; {type(e).__name__}: {e}"[:400]}


def steps(preset: str, dtypes: list[str], families: list[str] | None, repeats: int, estimate: bool,
          time_s: float = float("inf")) -> None:
    """Each network's step and its peer's, per dtype (result lines as they come); then, while ``time_s`` lasts,
    the T4 memory estimates (a forward pass each on the CPU)."""
    t0 = time.monotonic()
    todo = plan(families)
    emit({"plan": todo})
    names = list(dict.fromkeys(n for p in todo for n in (p["name"], p["peer"]) if n))
    samples = {}
    for dtype in dtypes:
        os.environ["MEDIMG_AMP_DTYPE"] = dtype  # read by lib.device on a GPU; a CPU autocasts to bf16 whatever it says
        for name in names:
            try:
                row = step(name, preset, repeats)
            except Exception as e:
                row = {"name": name, "preset": preset, "dtype": dtype, "error": f"{type(e).__name__}: {e}"[:600]}
            samples[name] = row.get("samples", samples.get(name))
            emit({"step": {**row, "asked_dtype": dtype}})
    for p in todo if estimate else []:
        if not samples.get(p["name"]):
            continue
        late = time.monotonic() - t0 > 0.8 * time_s
        emit({"estimate": {"name": p["name"], **({"unavailable": "estimate unavailable: out of time"} if late else
                                                 t4_memory(p["name"], preset, samples[p["name"]]))}})


# --------------------------------------------------------------------------- the Kaggle bundle of 03

def kaggle_bundle(wheels: Path, work: Path, base_site: str, cohort: Path, timeout: float) -> dict:
    """Build 03's internet-off bundle from ``wheels``, lay it out as Kaggle mounts it under ``work``, and run it
    in a kernel that sees only ``base_site`` (not the repository, not the bundle's packages)."""
    from lib import kaggle, paths

    t0 = time.monotonic()
    shutil.rmtree(work, ignore_errors=True)
    bundle = kaggle.build(kaggle.Bundle("03_pretrain", "smoke", "gpucheck", gpu="t4x2", internet=False,
                                        wheels_from=wheels), work / "build")
    inputs, working = work / "kaggle" / "input", work / "kaggle" / "working"
    code = inputs / "datasets" / "gpucheck" / "medimg-lib-code"
    shutil.copytree(bundle / "code", code)
    shutil.copytree(cohort, inputs / "medimg-demo-smoke" / "smoke")
    working.mkdir(parents=True)
    env = child_env({"base": base_site}, paths.ROOT, kaggle_kernel=True, extra={
        "KAGGLE_KERNEL_RUN_TYPE": "Batch", "MEDIMG_KAGGLE_INPUT": str(inputs), "MEDIMG_KAGGLE_WORKING": str(working)})
    for var in ("MEDIMG_RESULTS_DIR", "MEDIMG_DATA_DIR", "MEDIMG_CACHE_DIR", "MEDIMG_RUN_ID"):
        env.pop(var, None)
    out = work / "03_pretrain-kaggle.ipynb"
    built = time.monotonic() - t0
    row = {"bundle": str(bundle), "bundle_mib": round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2 ** 20, 1),
           "requirements": (code / "requirements-kaggle.txt").read_text().split(), "build_s": round(built, 1)}
    try:
        run_child([sys.executable, "-m", "papermill", str(bundle / "03_pretrain.ipynb"), str(out), "-k", "python3",
                   "--cwd", str(working), "--no-progress-bar"], timeout - built, env=env, cwd=working)
    except (Timeout, ChildFailed) as e:
        return {**row, "status": "failed", "reason": f"the kernel: {e}", "error_tail": e.tail}
    return {**row, **_kaggle_outcome(out, code, working), "run_s": round(time.monotonic() - t0 - built, 1)}


def _kaggle_outcome(out: Path, code: Path, working: Path) -> dict:
    nb = json.loads(out.read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    lib_from = next((line.split("lib from ", 1)[1].strip() for line in printed.splitlines() if "lib from " in line), None)
    installed = next((line.split("offline: ", 1)[1].split(", ") for line in printed.splitlines()
                      if line.startswith("medimg bootstrap: installing")), [])
    site = working / ".medimg-site"
    runs = sorted((working / "results" / "03_pretrain").glob("*/run.json"))
    status = json.loads(runs[-1].read_text()).get("status") if runs else None
    row = {"lib_from": lib_from, "lib_is_shipped": lib_from == str(code), "bootstrap_installed": installed,
           "medimg_site": sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) if site.is_dir() else [],
           "run_status": status}
    problems = [m for m, bad in (("lib was not imported from the code dataset", not row["lib_is_shipped"]),
                                 (f"run.json status {status!r}", status != "completed")) if bad]
    return {**row, "status": "failed" if problems else "ok", "reason": "; ".join(problems) or None}


# --------------------------------------------------------------------------- the command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.gpu_check.worker")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("environment")
    sub.add_parser("data").add_argument("--rsna", action="store_true")
    nb = sub.add_parser("notebook")
    nb.add_argument("name")
    nb.add_argument("--preset", default="smoke")
    nb.add_argument("--results", type=Path, required=True)
    nb.add_argument("--dtype", default=None)
    st = sub.add_parser("steps")
    st.add_argument("--preset", default="subset")
    st.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    st.add_argument("--families", nargs="*", default=None)
    st.add_argument("--repeats", type=int, default=5)
    st.add_argument("--estimate", action="store_true")
    st.add_argument("--time-s", type=float, default=float("inf"))
    kg = sub.add_parser("kaggle")
    kg.add_argument("--wheels", type=Path, required=True)
    kg.add_argument("--work", type=Path, required=True)
    kg.add_argument("--base-site", required=True)
    kg.add_argument("--cohort", type=Path, required=True)
    kg.add_argument("--timeout", type=float, required=True)
    a = p.parse_args(argv)
    if a.what == "environment":
        emit(environment())
    elif a.what == "data":
        emit(data(a.rsna))
    elif a.what == "notebook":
        emit(notebook(a.name, a.preset, a.results, a.dtype))
    elif a.what == "steps":
        steps(a.preset, a.dtypes, a.families, a.repeats, a.estimate, a.time_s)
    else:
        emit(kaggle_bundle(a.wheels, a.work, a.base_site, a.cohort, a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
