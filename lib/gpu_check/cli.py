"""``python -m lib.gpu_check run`` (``make gpu-check``) and ``python -m lib.gpu_check wheels`` (``make
gpu-wheels``): see :mod:`lib.gpu_check`. ``run`` imports nothing beyond the standard library itself."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from lib import paths
from lib.gpu_check import install as _install
from lib.gpu_check import stages as _stages
from lib.gpu_check.core import Budget, run_parallel, run_stage, write_json_atomic

ORDER = ("install", "environment", "data", "notebooks", "kaggle", "ddp", "steps")
# stage -> (its own limit, the least it is started with), seconds
LIMITS = {"install": (150, 5), "environment": (60, 5), "data": (90, 5), "notebooks": (240, 30), "kaggle": (240, 30),
          "ddp": (120, 30), "steps": (180, 60)}
DEFAULT_BUDGET_S = 470  # the whole check ends within 8 minutes, the JSON written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the check (make gpu-check)")
    r.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    r.add_argument("--stages", nargs="+", default=list(ORDER), choices=ORDER, metavar="STAGE",
                   help=f"stages to run (default all): {' '.join(ORDER)}; install always runs")
    r.add_argument("--quick", action="store_true", help="03 only, one family's step at smoke, one repeat (a test of "
                                                        "the check itself, e.g. --device cpu)")
    r.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check")
    r.add_argument("--wheels", type=Path, default=paths.ROOT / "build" / "gpu-wheels")
    r.add_argument("--kaggle-wheels", type=Path, default=None, help="the bundle's wheels (default WHEELS/kaggle)")
    r.add_argument("--work", type=Path, default=paths.ROOT / "build" / "gpu-check",
                   help="installed packages (site/) and each check's run folders (<stamp>/)")
    r.add_argument("--out", type=Path, default=paths.ROOT / "results" / "benchmarks", help="where gpu-<stamp>.json goes")
    r.add_argument("--parallel", type=int, default=None, help="notebooks at once per dtype (default 4 on a GPU, 1 else)")
    r.add_argument("--steps-preset", default=None, help="preset of the step measurements (default subset; smoke --quick)")
    r.add_argument("--no-estimate", action="store_true", help="skip the T4 memory estimate beside each step")
    r.add_argument("--ddp-cpu", action="store_true", help="without GPUs, run the DDP stage as two gloo processes")
    w = sub.add_parser("wheels", help="fill build/gpu-wheels here (make gpu-wheels; needs PyPI)")
    w.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                   help="the GPU box's Python, e.g. 3.12 (default: this one's)")
    w.add_argument("--budget-mib", type=float, default=None, help="size limit (default 60; 0: none)")
    w.add_argument("--dest", type=Path, default=paths.ROOT / "build" / "gpu-wheels")
    return p


def context(opts: argparse.Namespace, work: Path) -> _stages.Context:
    quick = opts.quick
    return _stages.Context(
        root=paths.ROOT, work=work, wheels=opts.wheels, kaggle_wheels=opts.kaggle_wheels or opts.wheels / "kaggle",
        device=opts.device, notebooks=["03_pretrain"] if quick else list(_stages.TRAINING_NOTEBOOKS),
        parallel=opts.parallel or (1 if quick or opts.device == "cpu" else 4),
        steps_preset=opts.steps_preset or ("smoke" if quick else "subset"), families=["ssl_pretraining"] if quick else None,
        repeats=1 if quick else 5, estimate=not opts.no_estimate, ddp_cpu=opts.ddp_cpu)


def _resolve_device(ctx: _stages.Context, env: dict) -> None:
    """The device and autocast dtypes, from what the environment stage found (``auto``: CUDA when torch sees it)."""
    info = env.get("data") or {}
    if "cuda_available" not in info:  # the environment stage told nothing: ask torch here (it is there)
        try:
            import torch

            info = {"cuda_available": torch.cuda.is_available(), "gpu_count": torch.cuda.device_count()}
        except Exception:
            info = {}
    if ctx.device == "auto":
        ctx.device = "cuda" if info.get("cuda_available") else "cpu"
    ctx.gpu_count = info.get("gpu_count", 0)
    if ctx.device == "cuda":
        bf16 = all(g.get("bf16") for g in info.get("gpus", [])) and bool(info.get("gpus"))
        ctx.dtypes = ["float16", "bfloat16"] if bf16 else ["float16"]
    else:
        ctx.dtypes = ["bfloat16"]  # a CPU autocasts to bf16 only (lib.device)


def run_check(opts: argparse.Namespace, clock: Callable[[], float] = time.monotonic, impl=None) -> tuple[dict, Path]:
    """Run the stages within ``opts.budget_s`` and write the record after each; returns it and its path.
    ``impl`` (the stage functions, :mod:`lib.gpu_check.stages` and :func:`install`) and ``clock`` are for tests."""
    impl = impl or SimpleNamespace(install=_install.install, **{s: getattr(_stages, s) for s in ORDER[1:]})
    budget = Budget(opts.budget_s, clock)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    ctx = context(opts, opts.work / stamp)
    path = opts.out / f"gpu-{stamp}.json"
    record = {"schema": 1, "kind": "gpu-check", "started": _dt.datetime.now().isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "quick": opts.quick, "budget_s": opts.budget_s, "device": ctx.device,
              "dtypes": None, "work": str(ctx.work), "stages": {}}
    wanted = [s for s in ORDER if s == "install" or s in opts.stages]

    def reserve(after: str) -> float:  # the least the later stages are started with (not those run beside it)
        return sum(LIMITS[s][1] for s in ORDER[ORDER.index(after) + 1:] if s in wanted and s not in ("kaggle", "notebooks"))

    def done(result: dict) -> None:
        record["stages"][result["name"]] = result
        record["elapsed_s"] = round(budget.elapsed(), 1)
        write_json_atomic(path, record)
        print(f"[gpu-check] {result['name']}: {result['status']} after {result.get('seconds', 0):.0f} s "
              f"({record['elapsed_s']:.0f} of {opts.budget_s:.0f} s) {result.get('reason') or ''}"[:400],
              file=sys.stderr, flush=True)

    def one(name: str, fn) -> None:
        done(run_stage(name, fn, budget, *LIMITS[name], reserve_s=reserve(name)))

    one("install", lambda t: impl.install(opts.wheels, opts.work / "site"))
    ctx.sites = (record["stages"]["install"].get("data") or {}).get("site_dirs") or {
        "base": str(opts.work / "site" / "base"), "kaggle": str(opts.work / "site" / "kaggle")}
    for name in ("environment", "data"):
        if name in wanted:
            one(name, lambda t, n=name: getattr(impl, n)(ctx, t))
    ctx.cohort = (record["stages"].get("data", {}).get("data") or {}).get("smoke")
    _resolve_device(ctx, record["stages"].get("environment", {}))
    record.update(device=ctx.device, dtypes=ctx.dtypes)
    group = [(n, lambda t, n=n: getattr(impl, n)(ctx, t), *LIMITS[n], reserve("kaggle"))
             for n in ("notebooks", "kaggle") if n in wanted]
    for result in run_parallel(group, budget):
        done(result)
    for name in ("ddp", "steps"):
        if name in wanted:
            one(name, lambda t, n=name: getattr(impl, n)(ctx, t))
    record["elapsed_s"] = round(budget.elapsed(), 1)
    record["within_budget"] = budget.elapsed() <= opts.budget_s
    record["summary"] = {k: [n for n, r in record["stages"].items() if r["status"] == k] for k in ("ok", "failed", "skipped")}
    write_json_atomic(path, record)
    return record, path


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    if opts.command == "wheels":
        from lib.gpu_check import wheels

        budget = wheels.DEFAULT_BUDGET_MIB if opts.budget_mib is None else (opts.budget_mib or None)
        manifest = wheels.build(opts.dest, opts.python_version, budget)
        print(wheels.report(manifest, opts.dest))
        return 0
    record, path = run_check(opts)
    for name, r in record["stages"].items():
        print(f"{name:12s} {r['status']:8s} {r.get('seconds', 0):6.1f} s  {r.get('reason') or ''}"[:300])
    print(f"\n{record['elapsed_s']:.0f} s of {opts.budget_s:.0f}; written: {path}")
    return 1 if record["summary"]["failed"] else 0
