"""How :mod:`lib.bench` measures: the machine, wall and CPU time, FLOPs, peak memory, a case in a child
process, one optimizer step, and section 1 (the ceiling every fraction is taken of).

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

import os
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lib.runs import versions

# --------------------------------------------------------------------------- the machine


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


# --------------------------------------------------------------------------- time and FLOPs

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


# --------------------------------------------------------------------------- memory

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


# --------------------------------------------------------------------------- a case in a child process

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

    from lib.bench.report import SECTIONS

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


# --------------------------------------------------------------------------- one optimizer step

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
