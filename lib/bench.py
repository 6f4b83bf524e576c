"""Measured speed and memory: ``make bench`` (``python -m lib.bench [--quick] [--only SECTION ...] [--out DIR]``).

Prints one table per section and writes ``results/benchmarks/<timestamp>.json`` (every row carries the
machine description) and ``results/benchmarks/README.md`` (the tables, and which targets of the
benchmark issue are met, with the numbers). Every ratio is measured side by side in the same run.
The sections, registered once in :data:`SECTIONS`:

1. ``ceiling``: dense matmul and Conv3d forward+backward GFLOP/s in fp32 and bf16; the ceiling of a
   dtype is the best of them. Always measured: the other sections' fractions need it.
2. ``steps``: one training step of every model family at the demo and subset presets, fp32 and bf16
   autocast, beside the MONAI network of the nearest kind (:mod:`lib.bench_families`).
3. ``attention``: wavelet against full attention at 32^3 ... 128^3, plus a PNG (:mod:`lib.bench_pretrain`).
4. ``infonce``: batched spatial InfoNCE against the loop reference (:mod:`lib.bench_pretrain`).
5. ``data``: ``.nii.gz`` decoding, the array cache and the 03_pretrain step's consumption (:mod:`lib.bench_data`).
6. ``diffusion``: DDIM time per frame at the demo size; VAE encode/decode frames/s (:mod:`lib.bench_families`).
7. ``memory``: the largest batch per family at prod on a 16 GB GPU, estimated from activation sizes
   measured on this CPU (:mod:`lib.bench_families`).

``--quick`` runs every section at tiny sizes with one repeat (well under a minute; what the unit test
runs): its numbers say that the code works, not how fast anything is.

Threads: torch's default (one per core), with ``OMP_WAIT_POLICY=PASSIVE`` as in the notebooks (``lib`` sets
it): idle OpenMP threads sleep, which on an idle machine makes steps of many small operations slower than
OpenMP's default spinning would (about 15 % for the diffusion denoiser), the same for both sides of every
comparison.

Peak memory: every case that reports one runs in a child process forked from a server process that
imported torch and MONAI once (:func:`isolated`), so that no earlier case's memory is counted. Its
peak is the child's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
when the case starts) above its resident set at that moment: model, optimizer state, inputs and
activations, not the imports, but also thread pools, allocator arenas and library scratch space, which
move it by 20-30 MB from run to run. So sections 2 and 3 also report ``tensor_peak_mb``
(:func:`peak_tensor_mb`): the peak of the tensor memory one step allocates, what
``torch.cuda.max_memory_allocated`` counts on a GPU, the same in every run; section 3's memory target
compares it. Times are medians of wall-clock seconds; CPU seconds (all threads of the process) are
reported beside them, since a shared machine makes wall times pessimistic.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from lib import paths
from lib.runs import versions, write_json, write_text

# A child of :func:`isolated` imports the main module (``python -m lib.bench``) again as ``__mp_main__``,
# which runpy warns about, harmlessly, once per child; the forkserver hands this filter down to them.
warnings.filterwarnings("ignore", message="'lib.bench' found in sys.modules", category=RuntimeWarning)

# name -> (module, function, title, figure the function writes into ``out`` or None);
# function(quick, ceilings, out) -> rows. A section's module may define ``targets(rows) -> list[str]``:
# lines of the README's targets paragraph, from that section's rows.
SECTIONS: dict[str, tuple[str, str, str, str | None]] = {
    "ceiling": ("lib.bench", "ceiling", "1. Ceiling: dense matmul and Conv3d forward+backward", None),
    "steps": ("lib.bench_families", "steps", "2. One training step per family beside its MONAI counterpart", None),
    "attention": ("lib.bench_pretrain", "attention_scaling", "3. Wavelet attention against full attention",
                  "attention_scaling.png"),
    "infonce": ("lib.bench_pretrain", "infonce", "4. Spatial InfoNCE: batched against the loop reference", None),
    "data": ("lib.bench_data", "data_path", "5. Data path: decoding, cache, consumption", None),
    "diffusion": ("lib.bench_families", "diffusion_sampling", "6. Diffusion: DDIM sampling and VAE throughput", None),
    "memory": ("lib.bench_families", "memory_estimate", "7. Memory estimate at prod on a 16 GB GPU (T4)", None),
}


# --------------------------------------------------------------------------- machine and measurement

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
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **versions()}


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    return (f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m.get('torch')}, "
            f"device {m['gpu'] or m['device']}, OMP_WAIT_POLICY {m.get('omp_wait_policy')}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median wall and CPU seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"wall_s": sorted(walls)[len(walls) // 2], "cpu_s": sorted(cpus)[len(cpus) // 2]}


def _conv_backward_flop(*args, **kwargs) -> int:
    """torch's formula for ``aten.convolution_backward``, with the weight gradient of a grouped convolution
    divided by its groups: torch 2.13 counts it as if the convolution were dense (32x too much for a
    depthwise 3x3 convolution over 64 channels; ``tests/test_bench.py`` checks the correction)."""
    from torch.utils.flop_counter import conv_backward_flop  # registered shape-wrapped: takes tensors and out_val

    groups, mask = args[9], args[10]
    total = conv_backward_flop(*args, **kwargs)
    if groups == 1 or not mask[1]:
        return total
    weight = conv_backward_flop(*args[:10], [False, True, False], *args[11:], **kwargs)
    return total - weight + weight // groups


_conv_backward_flop._get_raw = True  # FlopCounterMode passes the raw arguments (see above)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn`` by ``torch.utils.flop_counter`` (matmuls, convolutions, attention; not elementwise)."""
    from torch.utils.flop_counter import FlopCounterMode

    grouped = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=grouped) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_tensor_mb(fn: Callable[[], object]) -> float:
    """Peak of the tensor memory that ``fn`` allocates (MB above what was allocated when it started): what
    ``torch.cuda.max_memory_allocated`` counts on a GPU, and what it uses there. On a CPU, from the
    allocation events of torch's profiler (``profile_memory``: every CPU tensor allocation and free
    with the running total of the bytes allocated since profiling began). Unlike a process's peak
    resident memory, it holds no thread pools, allocator arenas or library scratch space, so it is
    the same from one run to the next; it includes what kernels allocate as tensors internally (flash
    attention's blocks, for one)."""
    if _device_is_cuda():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2 ** 20
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    totals, stack = [0], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if isinstance(node.extra_fields, _ExtraFields_Allocation) and node.extra_fields.device.type == "cpu":
            totals.append(node.extra_fields.total_allocated)
        stack.extend(node.children)
    return max(totals) / 2 ** 20


def _device_is_cuda() -> bool:
    from lib import device as _device

    return _device.pick_device().type == "cuda"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def _in_child(fn: Callable, args: tuple, kwargs: dict, conn) -> None:
    try:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            reset = True
        except OSError:
            reset = False  # then the child's lifetime peak: an over-estimate
        base = status_mb("VmRSS")
        result = fn(*args, **kwargs)
        peak = status_mb("VmHWM") if reset else peak_rss_mb()
        conn.send(("ok", (result, round(peak - base, 1))))
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# Imported by the forkserver once, not by every child: torch._dynamo (with sympy) is what the first
# optimizer step and FlopCounterMode import lazily, about 1 s per process.
_PRELOAD = ["lib.bench", "torch._dynamo", "torch.onnx", "torch.utils.flop_counter", "monai.networks.nets"]


def isolated(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` in a fresh child process; returns ``(result, peak MB above its start)``.

    ``fn`` must be a module-level function (it is pickled by name). Children are forked from a
    forkserver that imported torch, MONAI and the benchmark modules before any computation (forking a
    process that already ran OpenMP code is not safe), so a child starts in milliseconds.
    """
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD + sorted({module for module, *_ in SECTIONS.values()}))
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_in_child, args=(fn, args, kwargs, send), daemon=True)
    child.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"{fn.__name__}{args} died in its child process (exit code {child.exitcode})") from None
    child.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__}{args} failed in its child process:\n{payload}")
    return payload


def train_step(model: torch.nn.Module, batch: Any, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
               amp: bool, repeats: int = 3, lr: float = 1e-4) -> dict:
    """Measure one optimizer step (zero_grad, forward + loss under autocast, backward, :func:`lib.train.adamw` step).

    Runs on :func:`lib.device.pick_device` with its autocast dtype when ``amp`` (bf16 on a CPU). The
    FLOPs come from one step under ``FlopCounterMode`` (which is also the first warm-up step).
    Returns ``dtype``, ``ms`` (median wall), ``cpu_ms``, ``gflop_per_step``, ``gflops`` and ``tensor_peak_mb``
    (:func:`peak_tensor_mb` of one more step).
    """
    from lib import device as _device
    from lib import train

    dev = _device.pick_device()
    model = model.to(dev).train()
    batch = _to(batch, dev)
    opt = train.adamw([p for p in model.parameters() if p.requires_grad], lr=lr)  # what the notebooks run

    def step():
        opt.zero_grad(set_to_none=True)
        with _device.autocast(dev, amp):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()

    flops = count_flops(step)
    t = measure(step, repeats=repeats, warmup=1)
    dtype = str(_device.autocast_dtype(dev) if amp else torch.float32).replace("torch.", "")
    return {"dtype": dtype, "ms": t["wall_s"] * 1e3, "cpu_ms": t["cpu_s"] * 1e3,
            "gflop_per_step": flops / 1e9, "gflops": flops / t["wall_s"] / 1e9, "tensor_peak_mb": peak_tensor_mb(step)}


def _to(batch: Any, dev: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(dev)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, dev) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, dev) for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------- section 1: the ceiling

def ceiling(quick: bool = False, ceilings: dict | None = None, out: Path | None = None) -> list[dict]:
    n, conv_sizes = (512, [(16, 16)]) if quick else (2048, [(32, 32), (64, 24)])  # (channels, edge)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        key = str(dtype).replace("torch.", "")
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = measure(lambda: a @ b, repeats=3 if quick else 5)
        rows.append({"section": "ceiling", "name": f"matmul {n}x{n}", "dtype": key, "ms": t["wall_s"] * 1e3,
                     "cpu_ms": t["cpu_s"] * 1e3, "gflops": 2 * n ** 3 / t["wall_s"] / 1e9})
        for channels, edge in conv_sizes:
            conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(dtype)
            x = torch.randn(2, channels, edge, edge, edge, dtype=dtype, requires_grad=True)

            def step():
                conv(x).sum().backward()

            flops = count_flops(step)
            t = measure(step, repeats=3 if quick else 5)
            rows.append({"section": "ceiling", "name": f"conv3d fwd+bwd {tuple(x.shape)}", "dtype": key,
                         "ms": t["wall_s"] * 1e3, "cpu_ms": t["cpu_s"] * 1e3, "gflops": flops / t["wall_s"] / 1e9})
    return rows


def ceilings(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        if r["section"] == "ceiling":
            out[r["dtype"]] = max(out.get(r["dtype"], 0.0), r["gflops"])
    return out


# --------------------------------------------------------------------------- report

def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.0f}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> str:
    """A markdown table of ``rows``: columns in first-seen order (not ``section``, ``machine``, nested values)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and k not in ("section", "machine")
                 and not isinstance(v, (dict, list))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _section_module(name: str):
    return importlib.import_module(SECTIONS[name][0])


def targets(rows: list[dict], sections: list[str]) -> list[str]:
    lines = []
    for name in sections:
        fn = getattr(_section_module(name), "targets", None) if name != "ceiling" else None
        if fn is not None:
            lines += fn([r for r in rows if r["section"] == name])
    return lines


def report(record: dict, stamp: str) -> str:
    m, rows = record["machine"], record["rows"]
    quick = " (--quick: tiny sizes, not representative)" if record["quick"] else ""
    parts = [f"# Benchmarks\n\nWritten by `make bench` (`python -m lib.bench`; its docstring and those of the modules "
             f"it names say what is measured and how). Latest run: `{stamp}.json`{quick}, {record['date']}.\n\n"
             f"Machine: {machine_line(m)}. Ceiling GFLOP/s: "
             + ", ".join(f"{k} {v:.0f}" for k, v in record["ceiling_gflops"].items()) + ".\n"]
    if record["targets"]:
        parts.append("## Targets\n\n" + "\n".join(f"- {t}" for t in record["targets"]) + "\n")
    for name in record["sections"]:
        section_rows = [r for r in rows if r["section"] == name]
        if section_rows:
            parts.append(f"## {SECTIONS[name][2]}\n\n{table(section_rows)}\n")
        if SECTIONS[name][3]:
            parts.append(f"![{name}]({SECTIONS[name][3]})\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke test of every section)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help=f"sections to run: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=None, help="folder (default results/benchmarks)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.only or [] if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; valid choices: {', '.join(SECTIONS)}")
    out = args.out or paths.results_dir() / "benchmarks"
    chosen = [s for s in SECTIONS if not args.only or s in args.only or s == "ceiling"]
    m = machine()
    rows: list[dict] = []
    cap: dict[str, float] = {}
    for name in chosen:
        module, fn_name, title, _ = SECTIONS[name]
        print(f"[bench] {title} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        new = getattr(importlib.import_module(module), fn_name)(args.quick, cap, out)
        for r in new:
            r.setdefault("section", name)
            r["machine"] = machine_line(m)
        rows += new
        if name == "ceiling":
            cap = ceilings(rows)
        print(table(new) + f"\n[bench] {name}: {time.perf_counter() - t0:.0f} s\n", flush=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"machine": m, "date": _dt.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
              "sections": chosen, "ceiling_gflops": cap, "targets": targets(rows, chosen),
              "figures": [str(out / SECTIONS[s][3]) for s in chosen if SECTIONS[s][3]], "rows": rows}
    write_json(out / f"{stamp}.json", record)
    write_text(out / "README.md", report(record, stamp))
    print("\n".join(record["targets"]))
    print(f"\nwritten: {out / (stamp + '.json')} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
