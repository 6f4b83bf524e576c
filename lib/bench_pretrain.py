"""Cost of the 03_pretrain configurations on this machine: one training step at subset and prod size, and
wavelet attention against full attention.

    python -m lib.bench_pretrain [--cases subset,prod] [--attention-repeats 3]

- **Step** (each case in a fresh process, so that its peak memory is its own): builds the pretrainer of
  the preset (``lib.config``), counts parameters (encoder alone and with the pre-training head), and
  runs forward + backward + an AdamW step at the preset's input size under the same bf16 autocast
  and activation checkpointing as training, on one MRI batch and one CT batch (batch 1 each for prod,
  the preset's batch sizes for subset). Reported: wall and CPU seconds per step (prod: its first
  step, nothing to warm up with at this cost; subset: the mean of 3 after one untimed), and the
  process's peak resident memory above what it held after the imports.
- **Attention** (in this process): one attention layer at the subset grid (8³ tokens, 128 wide) and
  the prod grid (16³ tokens, 768 wide), forward + backward, with the preset's Haar levels against
  ``levels=0`` (full attention on every token): median wall seconds and the number of attention-
  matrix entries per head.

Results go to stdout and ``results/benchmarks/pretrain_step.json``. The CPU is shared with other
work here, so wall times are pessimistic; CPU times and the load average at the start are recorded.
``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (as in the notebook): with OpenMP's default spinning, two
threads on two busy cores ran a demo step 5x slower.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("benchmarks") / "pretrain_step.json"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_case(preset: str) -> dict:
    """One case, in this process (the parent runs it in a child): see the module docstring."""
    import torch

    from lib import config
    from lib.device import autocast
    from lib.models import pretrainer as pt

    import monai.networks.blocks  # noqa: F401  (imported by the model: part of the baseline, not of the step)

    cfg = config.resolve("03_pretrain", preset)
    torch.manual_seed(0)
    base = _rss_mb()
    model = pt.build_pretrainer(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
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
        "peak_rss_above_imports_mb": round(_peak_mb() - base, 1), "torch_threads": torch.get_num_threads(),
    }


def attention_cases(repeats: int) -> list[dict]:
    import torch

    from lib import config
    from lib.models.waveformer import WaveletAttention

    rows = []
    for preset, batch in (("subset", 2), ("prod", 1)):
        cfg = config.resolve("03_pretrain", preset)
        grid = cfg.img_size // cfg.patch_size
        for levels in (cfg.wavelet_levels, 0):
            torch.manual_seed(0)
            attn = WaveletAttention(cfg.embed_dim, cfg.num_heads, levels)
            x = torch.randn(batch, cfg.embed_dim, grid, grid, grid, requires_grad=True)

            def run() -> float:
                t = time.perf_counter()
                attn(x).square().mean().backward()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.bench_pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="subset,prod", help="comma-separated presets of 03_pretrain")
    parser.add_argument("--attention-repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case and print its JSON
    args = parser.parse_args(argv)
    # Before torch loads OpenMP (children inherit it): on a shared CPU, idle threads sleep instead of spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.worker:
        print(json.dumps(step_case(args.worker)))
        return 0

    from lib import paths
    from lib.runs import write_json

    started = _dt.datetime.now().isoformat(timespec="seconds")
    load = os.getloadavg()
    steps = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        print(f"step at {case} size (a fresh process) ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "lib.bench_pretrain", "--worker", case], capture_output=True,
                              text=True, cwd=str(paths.ROOT))
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        steps.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(steps[-1], indent=1), flush=True)
    print("attention: wavelet against full ...", flush=True)
    attention = attention_cases(args.attention_repeats)
    for row in attention:
        print(row)
    import torch

    result = {"started": started, "load_average_at_start": [round(x, 2) for x in load],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
              "steps": steps, "attention": attention}
    path = write_json(paths.results_dir() / OUT, result)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
