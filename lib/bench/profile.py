"""Section 10 of :mod:`lib.bench` (``--only profile``): where the training step's time goes, per category of
operation, for the families whose step trails its MONAI peer in section 2, each beside that peer.

For each pair (:data:`PROFILED`, each with its peer from :data:`lib.bench.cases.PAIRS`) at the subset preset,
in float32 and under autocast, in one child process (:func:`lib.bench.measure.isolated`):

- **wall time**: the two steps timed side by side, interleaved (ours, peer, ours, ...; medians), without
  the profiler; per step and per sample, with the FLOPs per step and the fraction of the dtype's ceiling
  (section 1) that section 2 reports. That fraction rewards FLOPs: a step that does fewer FLOPs for the
  same samples can be faster per sample and still lower in the fraction; ``faster_per_sample`` says which.
- **per category**: ``torch.profiler`` over a few more steps, the *self* CPU time of every operation (time
  in the operation itself, not in those it calls; on the thread that runs the step), summed into
  :data:`CATEGORIES` by operation name (:func:`category`); every operation under the optimizer's step is
  ``optimizer``. FLOPs per category from ``torch.utils.flop_counter`` (forward and backward; matmuls,
  convolutions and attention only), with the GFLOP/s that category reaches. ``ours_top`` / ``peer_top``:
  the category's costliest operations. ``ms`` columns are per step, with the profiler's own overhead
  (a few microseconds per operation) included, so they add up to a little more than the wall time.

The table goes to the README and the run's JSON with the other sections; :func:`profile` also writes it
to ``profile.md`` in the output folder, so that the last profile stays readable after other ``--only`` runs.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from lib import config
from lib import device as _device
from lib.atomic import write_text
from lib.bench.cases import CASES, PAIRS, build_case
from lib.bench.measure import _sync, isolated

PROFILED = ("WaveFormer pretrainer", "SeriesDenoiser")  # section 2: below their MONAI peers' fraction at subset

CATEGORIES = ("matmul/conv", "attention", "norms", "elementwise", "layout (wavelet, reshapes, copies)",
              "dtype casts", "masking/indexing", "loss", "optimizer", "autograd/other")

# category -> operation names (aten names without the ``aten::`` prefix; a name may end in ``*``: a prefix).
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("_scaled_dot_product*", "scaled_dot_product*", "softmax", "_softmax", "_softmax_backward_data",
                   "_efficient_attention*", "_flash_attention*")),
    ("loss", ("mse_loss*", "l1_loss*", "cross_entropy*", "nll_loss*", "log_softmax", "_log_softmax*",
              "binary_cross_entropy*", "smooth_l1_loss*")),
    ("matmul/conv", ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum", "conv*", "_conv*",
                     "mkldnn_conv*", "_mkldnn_conv*", "convolution*", "_convolution*", "slow_conv*",
                     "mkldnn_linear*", "_addmm_activation", "addbmm")),
    ("norms", ("layer_norm", "native_layer_norm*", "group_norm", "native_group_norm*", "batch_norm",
               "native_batch_norm*", "_batch_norm*", "instance_norm", "norm", "linalg_vector_norm", "normalize")),
    ("dtype casts", ("_to_copy", "to", "type_as", "_autocast_to_reduced_precision", "_autocast_to_full_precision")),
    ("masking/indexing", ("where", "masked_fill*", "gather", "scatter*", "index*", "_index*", "topk", "sort",
                          "argsort", "rand", "randn", "randint", "uniform_", "normal_", "max_pool*", "eq", "ne",
                          "lt", "le", "gt", "ge", "bitwise_*", "logical_*", "nonzero", "masked_select", "take*",
                          "arange", "eye", "full", "full_like", "repeat_interleave", "_unsafe_index*")),
    ("layout (wavelet, reshapes, copies)", (
        "copy_", "clone", "contiguous", "permute", "transpose", "t", "reshape", "_reshape_alias", "view", "_unsafe_view",
        "expand", "flatten", "unflatten", "squeeze", "unsqueeze", "select", "slice", "narrow", "split*", "chunk",
        "unbind", "cat", "stack", "pad", "constant_pad_nd", "replication_pad*", "reflection_pad*", "avg_pool*",
        "adaptive_avg_pool*", "upsample*", "_upsample*", "interpolate", "repeat", "as_strided*", "slice_backward",
        "select_backward", "new_empty_strided", "empty_strided", "alias", "detach", "lift_fresh", "movedim",
        "_unsafe_split*", "im2col", "col2im", "pixel_shuffle", "pixel_unshuffle")),
    ("elementwise", ("add*", "sub*", "mul*", "div*", "rsub", "neg", "gelu*", "silu*", "relu*", "sigmoid*", "tanh*",
                     "exp*", "log", "log_", "pow*", "sqrt*", "rsqrt*", "sin", "cos", "abs", "clamp*", "mean", "sum*",
                     "var*", "std*", "addcmul*", "addcdiv*", "lerp*", "fill_", "zero_", "zeros*", "ones*", "empty*",
                     "_foreach*", "threshold_backward", "sgn", "sign", "reciprocal", "max", "min", "amax", "amin",
                     "prod", "floor", "ceil", "round", "square", "lgamma", "fmod", "remainder", "erf*", "maximum",
                     "minimum", "native_dropout*", "dropout", "resize_", "result_type", "scalar_tensor", "item",
                     "_local_scalar_dense", "is_nonzero", "isfinite", "isnan", "nan_to_num*")),
)


def category(op: str) -> str:
    """The :data:`CATEGORIES` entry of an operation's profiler name (``aten::mm``, ``aten.mm.default``, ...)."""
    name = op.split("::", 1)[1] if "::" in op else op
    if name.startswith("aten."):
        name = name[5:].split(".", 1)[0]
    for cat, names in _RULES:
        for n in names:
            if name == n or (n.endswith("*") and name.startswith(n[:-1])):
                return cat
    return "autograd/other"


# --------------------------------------------------------------------------- one case


def _prepare(name: str, preset: str, amp: bool):
    """The case's model, batch and one optimizer step (what :func:`lib.bench.measure.train_step` times), with
    the optimizer's part under a ``bench::optimizer`` scope of the profiler."""
    from lib import train

    case = build_case(name, preset)
    dev = _device.pick_device()
    model = case.model.to(dev).train()
    batch = case.batch.to(dev) if torch.is_tensor(case.batch) else type(case.batch)(b.to(dev) for b in case.batch)
    lr = config.resolve(CASES[name][0], preset).lr
    opt = train.adamw([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        with _device.autocast(dev, amp):
            loss = case.loss(model, batch)
        loss.backward()
        with torch.profiler.record_function("bench::optimizer"):
            opt.step()

    return case, step


def _under_optimizer(event) -> bool:
    while event is not None:
        if event.name == "bench::optimizer":
            return True
        event = event.cpu_parent
    return False


def _profile_step(step, steps: int) -> tuple[dict, dict]:
    """Self CPU ms per step by category, and by operation, of ``steps`` profiled calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        _sync()
    by_cat: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith("ProfilerStep") or ev.name == "bench::optimizer":
            continue
        cat = "optimizer" if _under_optimizer(ev) else category(ev.name)
        ms = ev.self_cpu_time_total / 1e3 / steps
        by_cat[cat] += ms
        by_op[(cat, ev.name)] += ms
    return dict(by_cat), {k: v for k, v in by_op.items() if v > 0}


def _flops_by_category(step) -> dict[str, float]:
    """GFLOP per step by category (``torch.utils.flop_counter``: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lib.bench.measure import _conv_backward_flop

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) as c:
        step()
    out: dict[str, float] = defaultdict(float)
    for op, n in c.get_flop_counts().get("Global", {}).items():
        out[category(str(op))] += n / 1e9
    return dict(out)


def _side_by_side(steps: dict, repeats: int) -> dict[str, float]:
    """Median wall ms per step of every entry of ``steps``, called in turn (interleaved) ``repeats`` times."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            _sync()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- one pair, in a child


def profile_pair(name: str, preset: str, amp: bool, repeats: int, steps: int, ceiling: float | None) -> list[dict]:
    """The rows of one pair and dtype: the side-by-side step, then one per category (see the module docstring)."""
    peer = PAIRS[name]
    cases, fns = {}, {}
    for who, case_name in (("ours", name), ("peer", peer)):
        cases[who], fns[who] = _prepare(case_name, preset, amp)
    gflop = {who: _flops_by_category(fn) for who, fn in fns.items()}  # also the first warm-up step
    for fn in fns.values():
        fn()
    wall = _side_by_side(fns, repeats)
    prof = {who: _profile_step(fn, steps) for who, fn in fns.items()}
    dtype = str(_device.autocast_dtype(_device.pick_device()) if amp else torch.float32).replace("torch.", "")
    total = {who: sum(g.values()) for who, g in gflop.items()}
    frac = {who: total[who] / wall[who] * 1e3 / ceiling if ceiling else None for who in fns}
    per_sample = {who: wall[who] / cases[who].samples for who in fns}
    rows = [{"name": f"{name} vs {peer}", "preset": preset, "dtype": dtype, "category": "step (wall, no profiler)",
             "ours_ms": wall["ours"], "peer_ms": wall["peer"], "ours_vs_peer_ms": wall["ours"] / wall["peer"],
             "ours_ms_per_sample": per_sample["ours"], "peer_ms_per_sample": per_sample["peer"],
             "ours_gflop": total["ours"], "peer_gflop": total["peer"], "ours_fraction": frac["ours"],
             "peer_fraction": frac["peer"],
             "faster_per_sample": per_sample["ours"] < per_sample["peer"]}]
    profiled = {who: sum(p[0].values()) for who, p in prof.items()}
    for cat in CATEGORIES:
        row = {"name": f"{name} vs {peer}", "preset": preset, "dtype": dtype, "category": cat}
        for who in ("ours", "peer"):
            ms, g = prof[who][0].get(cat, 0.0), gflop[who].get(cat, 0.0)
            row.update({f"{who}_ms": ms, f"{who}_share": ms / profiled[who] if profiled[who] else None,
                        f"{who}_gflop": g, f"{who}_gflops": g / ms * 1e3 if ms and g else None})
        row["ours_vs_peer_ms"] = row["ours_ms"] / row["peer_ms"] if row["peer_ms"] else None
        for who in ("ours", "peer"):
            top = sorted(((ms, op) for (c, op), ms in prof[who][1].items() if c == cat), reverse=True)[:3]
            row[f"{who}_top"] = ", ".join(f"{op.replace('aten::', '')} {ms:.1f}" for ms, op in top)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the section


def profile(quick: bool, ceilings: dict, out: Path | None = None) -> list[dict]:
    """Section 10: every pair of :data:`PROFILED` at subset (smoke with ``quick``), float32 and autocast, each in
    its own child process; writes ``profile.md`` into ``out``."""
    from lib.bench.report import table

    preset = "smoke" if quick else "subset"
    repeats, steps = (1, 1) if quick else (7, 3)
    rows = []
    for name in PROFILED:
        for amp in (False, True):
            dtype = str(_device.autocast_dtype(_device.pick_device()) if amp else torch.float32).replace("torch.", "")
            new, _ = isolated(profile_pair, name, preset, amp, repeats, steps, ceilings.get(dtype))
            rows += new
            step = new[0]
            print(f"  {step['name']} {preset} {dtype}: {step['ours_ms']:.0f} against {step['peer_ms']:.0f} ms per step, "
                  f"{step['ours_ms_per_sample']:.1f} against {step['peer_ms_per_sample']:.1f} ms per sample", flush=True)
    if out is not None:
        write_text(Path(out) / "profile.md", "# Training-step profile, ours beside the MONAI peer\n\n"
                   + (__doc__ or "").split("\n\n", 1)[1] + "\n" + table(rows) + "\n")
    return rows


def targets(rows: list[dict]) -> list[str]:
    """One line per pair and dtype: time per sample side by side and the fractions of the ceiling."""
    lines = []
    for r in rows:
        if r["category"].startswith("step"):
            frac = (f"; {r['ours_fraction']:.1%} against {r['peer_fraction']:.1%} of the ceiling"
                    if r["ours_fraction"] is not None else "")
            lines.append(f"INFO: profile {r['name']} {r['preset']} {r['dtype']}: {r['ours_ms_per_sample']:.1f} against "
                         f"{r['peer_ms_per_sample']:.1f} ms per sample ({'faster' if r['faster_per_sample'] else 'slower'} "
                         f"per sample), {r['ours_gflop']:.2f} against {r['peer_gflop']:.2f} GFLOP per step{frac}")
    return lines
