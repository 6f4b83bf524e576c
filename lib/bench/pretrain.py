"""Sections 3 and 4 of :mod:`lib.bench` (wavelet against full attention, with a PNG; batched spatial InfoNCE
against the loop reference), and the ``pretrain_step`` extra: the cost of the 03_pretrain configurations.

``python -m lib.bench --only pretrain_step [--pretrain-presets subset,prod] [--attention-repeats 3]``:

- **Step** (each case in a fresh process, so that its peak memory is its own): builds the pretrainer of
  the preset (``lib.config``), counts parameters (encoder alone and with the pre-training head), and
  runs forward + backward + an AdamW step (lib.train.adamw) at the preset's input size under the same bf16 autocast
  and activation checkpointing as training, on one MRI batch and one CT batch (batch 1 each for prod,
  the preset's batch sizes for subset). Reported: wall and CPU seconds per step (prod: its first
  step, nothing to warm up with at this cost; subset: the mean of 3 after one untimed), and the
  process's peak resident memory above what it held after the imports.
- **Attention** (in this process): one attention layer at the subset grid (8³ tokens, 128 wide) and
  the prod grid (16³ tokens, 768 wide), forward + backward, with the preset's Haar levels against
  ``levels=0`` (full attention on every token): median wall seconds and the number of attention-
  matrix entries per head.

Results go to stdout and ``pretrain_step.json`` in the output folder (``results/benchmarks/``; ``--quick``:
the smoke preset, one repeat). The CPU is shared with other work here, so wall times are pessimistic;
CPU times and the load average at the start are recorded. ``OMP_WAIT_POLICY`` is ``PASSIVE`` (``lib``
sets it, as in the notebook): with OpenMP's default spinning, two threads on two busy cores ran a demo
step 5x slower.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lib import config, paths, train
from lib.atomic import atomic_path, write_json
from lib.bench.cases import SpatialInfoNCE, WaveletAttention, pretrain, sample_locations, spatial_info_nce_reference
from lib.bench.measure import isolated, measure, peak_rss_mb, peak_tensor_mb, status_mb
from lib.bench.report import SECTIONS
from lib.device import autocast

ATTENTION_SIZES = (32, 64, 96, 128)
LOOP_SAMPLES = 2  # section 4 at prod: samples of the batch the InfoNCE loop is timed on (then scaled)
# The variants of section 3: name -> (Haar levels: None = the prod preset's, SDPA kernel: None = torch's choice).
ATTENTION_VARIANTS = {"wavelet": (None, None), "full": (0, None), "full, math kernel": (0, "math")}
ATTENTION_PROCESSES = 2  # each case runs in this many children; the lowest time and the lowest peak count


def attention_step(dim: int, heads: int, levels: int, grid: int, batch: int, amp: bool = False):
    """Forward + backward of one :class:`WaveletAttention` layer (``levels=0``: full attention on every
    token) on a random token grid [batch, dim, grid, grid, grid]: returns the step as a function."""
    torch.manual_seed(0)
    attn = WaveletAttention(dim, heads, levels)
    x = torch.randn(batch, dim, grid, grid, grid, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = attn(x)
        y.float().square().mean().backward()

    return step


# --------------------------------------------------------------------------- section 3: attention scaling

def attention_case(dim: int, heads: int, levels: int, grid: int, batch: int, repeats: int,
                   kernel: str | None = None) -> dict:
    """Median wall and CPU ms of one attention step under bf16 autocast, and the peak of the tensor memory
    it allocates (:func:`lib.bench.measure.peak_tensor_mb`; run in a child: its peak resident memory too).
    ``kernel="math"``: SDPA's math kernel, which materialises the attention matrix (textbook attention);
    None: torch's choice (flash attention for long sequences, O(tokens) memory)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    step = attention_step(dim, heads, levels, grid, batch, amp=True)
    with sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext():
        t = measure(step, repeats=repeats, warmup=1)
        tensor_peak = peak_tensor_mb(step)
    return {"ms": t["wall_s"] * 1e3, "cpu_ms": t["cpu_s"] * 1e3, "tensor_peak_mb": tensor_peak}


def attention_scaling(quick: bool, ceilings: dict | None = None, out: Path | None = None) -> list[dict]:
    """Section 3: wavelet attention (the prod preset's Haar levels) against full attention (``levels=0``; with
    torch's kernel choice, and with the math kernel that materialises the attention matrix), one layer of the
    prod width and heads, forward + backward under bf16 autocast, at inputs 32^3 ... 128^3 with the prod patch
    size (tokens = (size / patch)^3), batch 1; each case in its own process (its peak memory).

    Memory is the peak of the tensor memory the step allocates (``tensor_peak_mb``,
    :func:`lib.bench.measure.peak_tensor_mb`: what ``torch.cuda.max_memory_allocated`` counts on a GPU; the same
    in every run), which the target
    compares, and beside it the child's peak resident memory above its start (``peak_mb``). The latter
    holds more than the layer (thread pools, allocator arenas, oneDNN: a per-channel scale on the 128^3
    input alone peaked at 171 to 232 MB in different runs) and moved by 20-30 MB from run to run, enough
    to flip the comparison with flash attention. Times of one case differ by up to about 10 % from one
    child to the next, so every case runs in ``ATTENTION_PROCESSES`` children and the lowest time and the
    lowest resident peak count. Writes the curves into ``out`` (the file :data:`lib.bench.report.SECTIONS` names)."""
    cfg = config.resolve("03_pretrain", "prod")
    dim, heads, sizes = (48, 4, (16, 32)) if quick else (cfg.embed_dim, cfg.num_heads, ATTENTION_SIZES)
    runs, repeats = (1, 1) if quick else (ATTENTION_PROCESSES, 3)

    def lowest(fn, *args) -> tuple[dict, float]:
        measured = [isolated(fn, *args) for _ in range(runs)]
        return min((m[0] for m in measured), key=lambda r: r["ms"]), min(m[1] for m in measured)

    rows = []
    for size in sizes:
        grid = size // cfg.patch_size
        variants = {}
        for name, (levels, kernel) in ATTENTION_VARIANTS.items():
            levels = cfg.wavelet_levels if levels is None else levels
            result, peak = lowest(attention_case, dim, heads, levels, grid, 1, repeats, kernel)
            variants[name] = {"name": name, "input": f"{size}^3", "tokens": grid ** 3,
                              "attended_tokens": (-(-grid // 2 ** levels)) ** 3, "levels": levels, "width": dim,
                              "heads": heads, **result, "peak_mb": peak, "processes": runs}
        wavelet = variants["wavelet"]
        for name in ("full", "full, math kernel"):
            key = "vs_full" if name == "full" else "vs_full_math"
            wavelet[f"speedup_{key}"] = variants[name]["ms"] / wavelet["ms"]
            wavelet[f"memory_{key}"] = wavelet["peak_mb"] / max(variants[name]["peak_mb"], 1e-3)
        rows += list(variants.values())
    if out is not None:
        _plot_attention(rows, Path(out) / SECTIONS["attention"][3])
    return rows


def _plot_attention(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, style in zip(ATTENTION_VARIANTS, ("o-", "s--", "^:")):
        rs = [r for r in rows if r["name"] == name]
        sizes = [int(r["input"].split("^")[0]) for r in rs]
        axes[0].plot(sizes, [r["ms"] for r in rs], style, label=name)
        axes[1].plot(sizes, [r["tensor_peak_mb"] for r in rs], style, label=name)
    for ax, label in zip(axes, ("ms per forward + backward", "peak tensor memory (MB)")):
        ax.set(xlabel="input edge (voxels; tokens = (edge / patch)^3)", ylabel=label, yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"one attention layer, width {rows[0]['width']}, {rows[0]['heads']} heads, bf16 autocast", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- section 4: InfoNCE

def infonce(quick: bool, ceilings: dict | None = None, out: Path | None = None) -> list[dict]:
    """Section 4: :class:`SpatialInfoNCE` (batched) against :func:`spatial_info_nce_reference` (the notes' loop)
    at the subset and prod grids: the preset's batch, width, projection, temperature and num_samples, 40 %
    of the locations visible (mask_ratio 0.6), forward only (a value each). The loop runs on the same drawn
    locations; at prod it runs on the first ``LOOP_SAMPLES`` samples of the batch and its time is scaled to
    the whole batch (the loop's cost is linear in the samples), and the values compared are those of that
    sub-batch (the batched loss recomputed on it with the same draws)."""
    rows = []
    for preset in ("smoke",) if quick else ("subset", "prod"):
        cfg = config.resolve("03_pretrain", preset)
        grid, b = cfg.img_size // cfg.patch_size, cfg.batch_size
        torch.manual_seed(0)
        loss = SpatialInfoNCE([cfg.embed_dim] * 2, cfg.projection_dim, cfg.temperature, cfg.num_samples)
        g = torch.Generator().manual_seed(0)
        feats = [torch.randn(b, cfg.embed_dim, grid, grid, grid, generator=g) for _ in range(2)]
        visible = torch.rand(b, grid, grid, grid, generator=g) >= cfg.mask_ratio
        seed = 1

        def batched(n=b):
            with torch.no_grad():
                return loss([f[:n] for f in feats], visible[:n], torch.Generator().manual_seed(seed))

        t_batched = measure(batched, repeats=3 if quick else 5)
        n = b if preset != "prod" else min(b, LOOP_SAMPLES)
        index, valid = sample_locations(visible[:n].reshape(n, -1), cfg.num_samples, torch.Generator().manual_seed(seed))
        locations = [[tuple(int(v) for v in torch.unravel_index(i, (grid,) * 3)) for i, ok in zip(row, ok_row) if ok]
                     for row, ok_row in zip(index, valid)]
        t0, c0 = time.perf_counter(), time.process_time()
        value_loop = spatial_info_nce_reference(loss, [f[:n] for f in feats], visible[:n], locations)
        t_loop, c_loop = (time.perf_counter() - t0) * b / n, (time.process_time() - c0) * b / n
        rows.append({"name": "spatial InfoNCE", "preset": preset, "grid": f"{grid}^3", "batch": b,
                     "anchors_per_sample": cfg.num_samples, "batched_ms": t_batched["wall_s"] * 1e3,
                     "loop_ms": t_loop * 1e3, "loop_cpu_ms": c_loop * 1e3,
                     "loop_timed_on": f"{n} of {b} samples" + (", scaled" if n < b else ""),
                     "speedup": t_loop / t_batched["wall_s"],
                     "max_abs_diff": abs(float(batched(n)) - float(value_loop))})
    return rows


def targets(rows: list[dict]) -> list[str]:
    lines = []
    attention = [r for r in rows if r["section"] == "attention"]
    if attention:
        r = max((w for w in attention if w["name"] == "wavelet"), key=lambda w: w["tokens"])
        full, math = (next(f for f in attention if f["name"] == n and f["input"] == r["input"])
                      for n in ("full", "full, math kernel"))
        met = r["speedup_vs_full"] >= 4 and r["tensor_peak_mb"] < full["tensor_peak_mb"]
        lines.append(f"{'MET' if met else 'NOT MET'}: wavelet attention at {r['input']} is "
                     f"{r['speedup_vs_full']:.1f}x faster than full attention ({r['ms']:.0f} against {full['ms']:.0f} ms), "
                     f"peak tensor memory {r['tensor_peak_mb']:.0f} against {full['tensor_peak_mb']:.0f} MB with torch's "
                     f"(flash) kernel, which never holds the attention matrix (peak resident memory of the process "
                     f"above its start, noisy: {r['peak_mb']:.0f} against {full['peak_mb']:.0f} MB); against the math "
                     f"kernel, which does: {r['speedup_vs_full_math']:.1f}x faster, {r['tensor_peak_mb']:.0f} against "
                     f"{math['tensor_peak_mb']:.0f} MB (target: >= 4x faster, lower peak memory)")
    for r in rows:
        if r["section"] == "infonce":
            met = r["speedup"] >= 100 and r["max_abs_diff"] <= 1e-5
            lines.append(f"{'MET' if met else 'NOT MET'}: batched InfoNCE at {r['preset']} ({r['grid']} grid) is "
                         f"{r['speedup']:.0f}x faster than the loop, values differ by {r['max_abs_diff']:.1e} "
                         f"(target: >= 100x, <= 1e-5)")
    return lines


# --------------------------------------------------------------------------- extra: pretrain_step

def step_case(preset: str) -> dict:
    """One step case, in this process (``pretrain_step`` runs it in a child): see the module docstring."""
    import monai.networks.blocks  # noqa: F401  (imported by the model: part of the baseline, not of the step)

    cfg = config.resolve("03_pretrain", preset)
    torch.manual_seed(0)
    base = status_mb("VmRSS")
    model = pretrain.build(cfg)
    model.train()
    optimizer = train.adamw(model.parameters(), lr=cfg.lr)
    device = torch.device("cpu")
    batches = {"MRI": 1 if preset == "prod" else cfg.batch_size,
               "CT": 1 if preset == "prod" else (cfg.ct_batch_size or max(1, cfg.batch_size // 2))}
    inputs = [torch.rand(b, 1 if m == "MRI" else 3, *(cfg.img_size,) * 3) for m, b in batches.items()]

    def one_step() -> tuple[float, float, float]:
        t, c = time.perf_counter(), time.process_time()
        losses = []
        for x in inputs:
            with autocast(device, cfg.amp):
                out = model(x)
            out.loss.backward()
            losses.append(float(out.loss.detach()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t, time.process_time() - c, sum(losses) / len(losses)

    repeats = 1 if preset == "prod" else 3
    if preset != "prod":
        one_step()
    timed = [one_step() for _ in range(repeats)]
    return {
        "preset": preset, "img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
        "depth": cfg.depth, "num_heads": cfg.num_heads, "wavelet_levels": cfg.wavelet_levels,
        "grad_checkpointing": cfg.grad_checkpointing, "autocast": str(torch.bfloat16) if cfg.amp else "off",
        "batch": batches, "params_encoder": sum(p.numel() for p in model.encoder.parameters()),
        "params_pretrainer": sum(p.numel() for p in model.parameters()),
        "step_wall_s": round(statistics.mean(t[0] for t in timed), 3),
        "step_cpu_s": round(statistics.mean(t[1] for t in timed), 3), "steps_timed": repeats,
        "loss": round(timed[-1][2], 4), "loss_finite": all(t[2] == t[2] and abs(t[2]) < float("inf") for t in timed),
        "peak_rss_above_imports_mb": round(peak_rss_mb() - base, 1), "torch_threads": torch.get_num_threads(),
    }


def attention_cases(repeats: int, presets: tuple[tuple[str, int], ...] = (("subset", 2), ("prod", 1))) -> list[dict]:
    rows = []
    for preset, batch in presets:
        cfg = config.resolve("03_pretrain", preset)
        grid = cfg.img_size // cfg.patch_size
        for levels in (cfg.wavelet_levels, 0):
            step = attention_step(cfg.embed_dim, cfg.num_heads, levels, grid, batch)

            def run() -> float:
                t = time.perf_counter()
                step()
                return time.perf_counter() - t

            run()
            times = [run() for _ in range(repeats)]
            tokens = (-(-grid // 2 ** levels)) ** 3
            rows.append({"grid": f"{preset} ({grid}^3 tokens, {cfg.embed_dim} wide, batch {batch})",
                         "attention": f"wavelet, {levels} level(s)" if levels else "full",
                         "attended_tokens": tokens, "attention_entries_per_head": tokens ** 2,
                         "fwd_bwd_wall_s": round(statistics.median(times), 4)})
    for a, b in zip(rows[0::2], rows[1::2]):
        a["speed-up_vs_full"] = round(b["fwd_bwd_wall_s"] / a["fwd_bwd_wall_s"], 1)
    return rows


def pretrain_step(quick: bool, out: Path, presets: str = "subset,prod", attention_repeats: int = 3) -> Path:
    """The ``pretrain_step`` extra: every preset's step in a fresh ``python -m lib.bench --pretrain-worker``
    process, then :func:`attention_cases`; writes ``out / "pretrain_step.json"``."""
    started = _dt.datetime.now().isoformat(timespec="seconds")
    load = os.getloadavg()
    steps = []
    for case in ["smoke"] if quick else [c.strip() for c in presets.split(",") if c.strip()]:
        print(f"step at {case} size (a fresh process) ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "lib.bench", "--pretrain-worker", case], capture_output=True,
                              text=True, cwd=str(paths.ROOT))
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(proc.returncode)
        steps.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(steps[-1], indent=1), flush=True)
    print("attention: wavelet against full ...", flush=True)
    attention = attention_cases(1, (("smoke", 1),)) if quick else attention_cases(attention_repeats)
    for row in attention:
        print(row)
    result = {"started": started, "load_average_at_start": [round(x, 2) for x in load],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
              "steps": steps, "attention": attention}
    return write_json(Path(out) / "pretrain_step.json", result)
