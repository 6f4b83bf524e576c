"""Measured speed and memory: ``make bench`` (``python -m lib.bench``).

Prints a table and writes ``results/benchmarks/<timestamp>.json`` plus ``results/benchmarks/README.md``
(the latest table). Every figure carries the machine description, and every ratio is measured side by
side in the same run. Sections:

- ``ceiling``: dense matmul and Conv3d forward+backward GFLOP/s in fp32 and bf16; the ceiling of a
  dtype is the best of them (oneDNN convolutions can beat MKL's fp32 matmul on some CPUs).
- ``steps``: one training step (forward, backward, optimizer) per model at the demo and subset sizes,
  fp32 and bf16 autocast, with FLOPs from ``torch.utils.flop_counter``, achieved fraction of the
  ceiling, samples/s and peak memory; beside each, the MONAI network of the nearest kind.
- family-specific comparisons registered by the model modules (see :data:`EXTRA`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lib import paths
from lib.runs import versions, write_json, write_text

EXTRA: dict[str, Callable[[bool, dict], list[dict]]] = {}  # section -> fn(quick, ceilings) -> rows (below)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, **versions()}


def timed(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ceiling(quick: bool = False) -> list[dict]:
    n = 1024 if quick else 2048
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = timed(lambda: a @ b, repeats=3 if quick else 5)
        rows.append({"section": "ceiling", "name": f"matmul {n}x{n}", "dtype": str(dtype)[6:], "ms": t * 1e3,
                     "gflops": 2 * n ** 3 / t / 1e9})
        conv = torch.nn.Conv3d(32, 32, 3, padding=1).to(dtype)
        x = torch.randn(2, 32, 24 if quick else 32, 24 if quick else 32, 24 if quick else 32, dtype=dtype, requires_grad=True)

        def step():
            conv(x).sum().backward()

        flops = count_flops(step)
        t = timed(step, repeats=3 if quick else 5)
        rows.append({"section": "ceiling", "name": f"conv3d fwd+bwd {tuple(x.shape)}", "dtype": str(dtype)[6:],
                     "ms": t * 1e3, "gflops": flops / t / 1e9})
    return rows


def ceilings(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        if r["section"] == "ceiling":
            out[r["dtype"]] = max(out.get(r["dtype"], 0.0), r["gflops"])
    return out


def train_step_row(name: str, model: torch.nn.Module, make_batch: Callable[[], tuple], loss_fn: Callable,
                   dtype: torch.dtype, ceiling_gflops: dict[str, float], repeats: int = 3, **info) -> dict:
    """Time one optimizer step of ``model`` under autocast ``dtype`` (fp32 = no autocast)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()

    flops = count_flops(step)
    t = timed(step, repeats=repeats)
    key = str(dtype)[6:]
    samples = int(batch[0].shape[0]) if isinstance(batch, (tuple, list)) else 1
    return {"section": "steps", "name": name, "dtype": key, "ms": t * 1e3, "samples_per_s": samples / t,
            "gflop_per_step": flops / 1e9, "gflops": flops / t / 1e9,
            "fraction_of_ceiling": flops / t / 1e9 / ceiling_gflops[key] if ceiling_gflops.get(key) else None,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "peak_rss_mb": peak_rss_mb(), **info}


def table(rows: list[dict]) -> str:
    cols = ["section", "name", "dtype", "ms", "gflops", "fraction_of_ceiling", "samples_per_s", "params_m", "peak_rss_mb"]
    present = [c for c in cols if any(c in r for r in rows)]
    extra = sorted({k for r in rows for k in r} - set(cols))
    present += [c for c in extra if c not in ("section",)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in present) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke test)")
    parser.add_argument("--only", nargs="*", help=f"sections: ceiling {' '.join(EXTRA)}")
    parser.add_argument("--out", type=Path, default=None, help="folder (default results/benchmarks)")
    args = parser.parse_args(argv)
    out = args.out or paths.results_dir() / "benchmarks"
    rows = ceiling(args.quick)
    cap = ceilings(rows)
    for name, fn in EXTRA.items():
        if args.only and name not in args.only:
            continue
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows += fn(args.quick, cap)
    record = {"machine": machine(), "date": _dt.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
              "ceiling_gflops": cap, "rows": rows}
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_json(out / f"{stamp}.json", record)
    text = table(rows)
    m = record["machine"]
    write_text(out / "README.md", f"# Benchmarks\n\nLatest run `{stamp}.json`{' (quick)' if args.quick else ''}: "
               f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}.\n"
               f"Ceiling GFLOP/s: {', '.join(f'{k} {v:.0f}' for k, v in cap.items())}.\n\n{text}\n")
    print(text)
    print(f"\nwritten: {out / (stamp + '.json')} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
