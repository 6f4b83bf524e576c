"""Sections 2, 6 and 7 of :mod:`lib.bench`: the model families' training steps beside their MONAI peers,
diffusion sampling and VAE throughput, and the largest batch at prod on a 16 GB GPU. The cases (which
networks, which peers, how their sizes match) are :mod:`lib.bench.cases`.

Section 7 (memory at prod) is :mod:`lib.bench.memory` (:func:`memory_estimate`, re-exported here): the
bytes autograd saves in one forward at micro-batch 1 and 2 under CUDA autocast's cast policy (emulated on
this CPU), the optimizer state, EMA and autocast weight cache, against a T4's 15 GiB, per network beside
its prod preset's micro-batch x grad_accum.
"""

from __future__ import annotations

import torch

from lib import config
from lib import device as _device
from lib.bench.cases import (CASES, PAIRS, TRAINING_STEPS, build_case, build_vae, latent_diffusion, sample,
                             translate)
from lib.bench.measure import isolated, measure, train_step
from lib.bench.memory import memory_estimate  # noqa: F401  (section 7, registered under this module)
from lib.bench.memory import targets as _targets_memory

# --------------------------------------------------------------------------- section 2: training steps


def step_case(name: str, preset: str, amp: bool, repeats: int) -> dict:
    """One row of section 2 (run in a child by :func:`lib.bench.measure.isolated`)."""
    case = build_case(name, preset)
    row = train_step(case.model, case.batch, case.loss, amp, repeats,
                     lr=config.resolve(CASES[name][0], preset).lr)
    return {"name": name, "preset": preset, "dtype": row.pop("dtype"), "input": case.input,
            "batch": f"{case.samples} {case.unit}", "params_m": sum(p.numel() for p in case.model.parameters()) / 1e6,
            **row, "samples_per_s": case.samples / row["ms"] * 1e3}


TARGET_PROCESSES = 2  # the cases the targets judge (subset, autocast) run in this many processes; the fastest counts


def steps(quick: bool, ceilings: dict, out=None) -> list[dict]:
    """Section 2: every case of :data:`lib.bench.cases.CASES` at demo and subset (smoke with ``quick``), fp32 and
    autocast, each in its own process (:func:`step_case`; median of 3 steps). Step times of one case differ by up
    to about 5 % from one process to the next, so the subset autocast cases, on which the targets are judged, are
    measured in ``TARGET_PROCESSES`` processes and the fastest is kept (``processes`` in the row)."""
    presets = ("smoke",) if quick else ("demo", "subset")
    rows = []
    for preset in presets:
        for name in CASES:
            for amp in (False, True):
                runs = TARGET_PROCESSES if preset == "subset" and amp else 1
                measured = [isolated(step_case, name, preset, amp, 1 if quick else 3) for _ in range(runs)]
                row, peak = min(measured, key=lambda m: m[0]["ms"])
                cap = ceilings.get(row["dtype"])
                row.update(fraction_of_ceiling=row["gflops"] / cap if cap else None, peak_mb=peak, processes=runs)
                rows.append(row)
                print(f"  {name} {preset} {row['dtype']}: {row['ms']:.0f} ms, {row['gflops']:.0f} GFLOP/s, "
                      f"{peak:.0f} MB", flush=True)
    for row in rows:
        if row["name"] in PAIRS:
            other = next(r for r in rows if r["name"] == PAIRS[row["name"]] and r["preset"] == row["preset"]
                         and r["dtype"] == row["dtype"])
            row["monai_fraction"] = other["fraction_of_ceiling"]
            row["vs_monai"] = row["gflops"] / other["gflops"]
    return rows


def _targets_steps(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["name"] not in TRAINING_STEPS or r["preset"] != "subset" or r["dtype"] == "float32":
            continue
        ours, theirs = r["fraction_of_ceiling"], r["monai_fraction"]
        met = ours >= theirs and (theirs < 0.35 or ours >= 0.35)
        floor = " and >= 35 % since MONAI reaches it" if theirs >= 0.35 else ""
        lines.append(f"{'MET' if met else 'NOT MET'}: {r['name']} {r['dtype']} step at subset reaches {ours:.1%} of the "
                     f"{r['dtype']} ceiling against {theirs:.1%} for {PAIRS[r['name']]} "
                     f"(target: at least MONAI's{floor})")
    return lines


# --------------------------------------------------------------------------- section 6: diffusion sampling

def diffusion_sampling(quick: bool, ceilings: dict | None = None, out=None) -> list[dict]:
    """DDIM translation of one series at the demo size (the notebook's ``ldm.translate`` under autocast), and
    the VAE's encode/decode frames/s at the demo and subset frame sizes (no_grad, fp32 and autocast)."""
    dev = _device.pick_device()
    cfg = config.resolve("04_ct_diffusion", "smoke" if quick else "demo")
    torch.manual_seed(0)
    ldm = latent_diffusion(cfg).to(dev).eval()
    vae = ldm.vae
    baseline = (torch.rand(1, 1, cfg.frames, cfg.frame_size, cfg.frame_size,
                           generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)
    with torch.no_grad():
        cond = vae.encode(baseline)
    rows = []
    for what, fn in (("translate: encode, DDIM, decode", lambda n: translate(ldm, baseline, n, cfg)),
                     ("DDIM sampling in latent space", lambda n: sample(ldm, cond, n, cfg))):
        with _device.autocast(dev), torch.no_grad():
            fn(1)  # warm-up
            t = measure(lambda: fn(cfg.ddim_steps), repeats=1, warmup=0)
        frames = baseline.shape[2]
        rows.append({"name": what, "preset": cfg.preset, "frames": f"1x{frames}x{cfg.frame_size}^2",
                     "ddim_steps": cfg.ddim_steps, "ms_per_frame": t["wall_s"] * 1e3 / frames,
                     "cpu_ms_per_frame": t["cpu_s"] * 1e3 / frames,
                     "ms_per_frame_and_step": t["wall_s"] * 1e3 / frames / cfg.ddim_steps})
    for preset in ("smoke",) if quick else ("demo", "subset"):
        rows += _vae_throughput(preset, quick, dev)
    return rows


def _vae_throughput(preset: str, quick: bool, dev: torch.device) -> list[dict]:
    cfg = config.resolve("04_ct_diffusion", preset)
    torch.manual_seed(0)
    vae = build_vae(config.Config(cfg, scale_factor=1.0)).to(dev).eval()
    n = 8 if quick else 32
    x = torch.rand(1, 1, n, cfg.frame_size, cfg.frame_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = x.to(dev)
    with torch.no_grad():
        z = vae.encode(x)
    chunk = max(8, 2 ** 22 // cfg.frame_size ** 2)  # frames per pass, as the notebook
    rows = []
    for amp in (False, True):
        for what, fn in (("VAE encode", lambda: vae.encode(x, chunk)), ("VAE decode", lambda: vae.decode(z, chunk))):
            with _device.autocast(dev, amp), torch.no_grad():
                t = measure(fn, repeats=1 if quick else 3)
            rows.append({"name": what, "preset": preset, "frames": f"{n}x{cfg.frame_size}^2",
                         "dtype": str(_device.autocast_dtype(dev) if amp else torch.float32).replace("torch.", ""),
                         "frames_per_s": n / t["wall_s"], "cpu_s_per_frame": t["cpu_s"] / n})
    return rows


# --------------------------------------------------------------------------- section 7: memory at prod
# (lib.bench.memory; named here, where lib.bench.report.SECTIONS registers the section)


def targets(rows: list[dict]) -> list[str]:
    sections = {r["section"] for r in rows}
    return (_targets_steps(rows) if "steps" in sections else []) + (_targets_memory(rows) if "memory" in sections else [])
