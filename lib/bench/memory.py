"""Section 7 of :mod:`lib.bench`: the memory of every trained network at prod on a 16 GB T4, an estimate,
and the table the prod presets' micro-batches are chosen from (:data:`TABLE`, written by
``make bench BENCH_ARGS="--only memory"``; ``tests/test_memory_estimate.py`` holds every prod preset to it).

Activations. One forward pass (+ the loss its notebook trains with) at the preset's size, at micro-batch
1 and 2, on this CPU, recording every tensor autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``; each storage once; parameters excluded). A T4 trains under
CUDA autocast (fp16), whose cast policy is not CPU autocast's: CUDA runs the ops of its fp32 list
(layer_norm, group_norm, softmax, log_softmax, exp, log, pow, sum, the losses, upsampling, ...) in
float32, where CPU bf16 autocast leaves them in bf16. So on a T4 a GroupNorm saves its input in fp32, the
SiLU after it runs (and saves) in fp32 too, and the convolution after that saves an fp16 copy beside it.
:func:`cuda_autocast` makes CPU autocast follow CUDA's policy: it registers, at the ``AutocastCPU``
dispatch key (``torch.library``, undone on exit), a kernel for every op of CUDA autocast's lists (copied
below from ``ATen/autocast_mode.h``; the tests check them against the ops torch registers for
``AutocastCUDA``) that casts as CUDA's does, and for every op only CPU autocast lists one that casts
nothing. The half dtype stays bf16 (2 bytes, as fp16); half copies of fp32 weights are cached per
forward as CUDA's autocast caches them, and counted apart (``weight_cache_gb``). While it is active,
:mod:`lib.models.attention` takes its GPU path (SDPA, never the explicit CPU form for short sequences).

Per sample and fixed part: the saved bytes at micro-batch 2 minus those at 1, and what is left of 1.
With activation checkpointing per block (``Case.blocks``), a block call keeps only its inputs, and the
call being recomputed holds its own activations once: saved = total - sum(inside the calls) +
sum(their inputs) + max(inside one call).

Everything else on the GPU: ``STATE_BYTES_PER_PARAM`` (16: fp32 weights, fp32 gradients, AdamW's two fp32
moments; the fused AdamW adds nothing per parameter), an EMA where the network's stage keeps one (an
fp32 copy of the parameters and buffers: ``torch.optim.swa_utils.AveragedModel(use_buffers=True)``), the
autocast weight cache (measured), the CUDA context and cuBLAS/cuDNN workspaces (``RESERVED_BYTES``), and
``HEADROOM`` for allocator fragmentation and the backward pass's temporaries (the gradients of the
activations of the layer being differentiated). DDP adds no copy of the gradients: :mod:`lib.distributed`
wraps the model with ``gradient_as_bucket_view=True``, so the buckets are the gradients. So::

    need(B)  = state + ema + weight cache + fixed + B x per sample
    estimate = need(B) / HEADROOM + RESERVED_BYTES          (<= GPU_BYTES: it fits)
    max micro-batch = (HEADROOM x (GPU_BYTES - RESERVED_BYTES) - state - ema - cache - fixed) // per sample

with the checkpointing numbers where the preset turns activation checkpointing on. The presets keep
micro-batch x grad_accum (the effective batch) and take the micro-batch at most the table's maximum.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lib import config
from lib.atomic import write_json

GPU_BYTES = 15360 * 2 ** 20       # what a T4 ("16 GB") reports as usable
RESERVED_BYTES = 1024 * 2 ** 20   # CUDA context, cuDNN/cuBLAS workspaces
HEADROOM = 0.9                    # allocator fragmentation and backward-pass temporaries
STATE_BYTES_PER_PARAM = 16        # fp32 weights, fp32 gradients, AdamW's two fp32 moments
EMA_BYTES_PER_PARAM = 4           # AveragedModel's fp32 copy (and of the buffers)
TABLE = Path(__file__).with_name("t4_memory.json")  # the estimate at prod, per network: what the presets are chosen from

# --------------------------------------------------------------------------- CUDA autocast's cast policy

# ATen/autocast_mode.h of torch 2.13 (the op lists every backend but the CPU's shares); autocast_mode.cpp adds
# cudnn_convolution(_transpose) to the CUDA lower-precision list and bans binary_cross_entropy.
LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "cudnn_convolution",
    "cudnn_convolution_transpose")
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa")
FP32_SET_OPT_DTYPE = ("prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
                      "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
                      "sum.dim_IntList")
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add")
BANNED = ("binary_cross_entropy",)

_POLICIES = {**dict.fromkeys(LOWER_PRECISION, "lower"), **dict.fromkeys(FP32, "fp32"),
             **dict.fromkeys(FP32_SET_OPT_DTYPE, "set_opt_dtype"), **dict.fromkeys(FP32_APPEND_DTYPE, "append_dtype"),
             **dict.fromkeys(PROMOTE, "promote"), **dict.fromkeys(BANNED, "banned")}
_BELOW_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _op(name: str) -> torch._ops.OpOverload:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _map(fn: Callable[[torch.Tensor], torch.Tensor], args: tuple, kwargs: dict) -> tuple[list, dict]:
    def one(a):
        if isinstance(a, (list, tuple)):
            return type(a)(fn(t) if _eligible(t) else t for t in a)
        return fn(a) if _eligible(a) else a
    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items()}


class _Policy:
    """The kernels :func:`cuda_autocast` registers, and the half copies of weights cached in one forward."""

    def __init__(self, lower: torch.dtype):
        self.lower, self.cache, self.copies = lower, {}, set()  # id(weight) -> (weight, copy); copies' data_ptrs

    def half(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == self.lower:
            return t
        if t.dtype == torch.float32 and t.requires_grad and t.is_leaf and not t._is_view():  # CUDA's cached_cast
            if id(t) not in self.cache:
                self.cache[id(t)] = (t, t.to(self.lower))
                self.copies.add(self.cache[id(t)][1].untyped_storage().data_ptr())
            return self.cache[id(t)][1]
        return t.to(self.lower)

    def kernel(self, name: str, policy: str) -> Callable:
        op = _op(name)
        if policy == "append_dtype":
            target = _op(FP32_APPEND_DTYPE[name])

        def run(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(_BELOW_AUTOCAST):
                return op(*args, **kwargs)

        def kernel(*args, **kwargs):
            if policy == "lower":
                args, kwargs = _map(self.half, args, kwargs)
            elif policy == "fp32":
                args, kwargs = _map(lambda t: t.float(), args, kwargs)
            elif policy == "promote":
                wide = torch.float32 if any(t.dtype == torch.float32 for t in _tensors(args, kwargs)) else self.lower
                args, kwargs = _map(lambda t: t.to(wide), args, kwargs)
            elif policy == "set_opt_dtype" and _eligible(args[0]):
                args, kwargs = _with_dtype(op, list(args), dict(kwargs))
            elif policy == "append_dtype" and _eligible(args[0]):
                with torch._C._ExcludeDispatchKeyGuard(_BELOW_AUTOCAST):
                    return target(*args, **kwargs, dtype=torch.float32)
            elif policy == "banned":
                raise RuntimeError(f"{name} is unsafe to autocast: CUDA autocast refuses it (use the _with_logits form)")
            elif policy == "passthrough":  # CPU autocast lists it, CUDA's does not: no cast, inner ops still autocast
                out = op.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            return run(*args, **kwargs)
        return kernel


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
    return [t for t in flat if _eligible(t)]


def _with_dtype(op: torch._ops.OpOverload, args: list, kwargs: dict) -> tuple[list, dict]:
    """``dtype=float32`` where the call leaves it unset (CUDA's ``fp32_set_opt_dtype``)."""
    names = [a.name for a in op._schema.arguments]
    i = names.index("dtype")
    if i < len(args) and not op._schema.arguments[i].kwarg_only:
        args[i] = torch.float32 if args[i] is None else args[i]
    elif kwargs.get("dtype") is None:
        kwargs["dtype"] = torch.float32
    return args, kwargs


def cpu_only_ops() -> list[str]:
    """The ops CPU autocast casts that CUDA autocast leaves alone (pools, pads, FFTs, linear algebra, ...), as this
    torch registers them. Not cat, stack and index_copy: CPU autocast promotes their inputs to the widest dtype,
    as eager type promotion does for cat and stack on a GPU."""
    names = [n.removeprefix("aten::") for n in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU")]
    return sorted(n for n in names if n not in _POLICIES and n.partition(".")[0] not in ("cat", "stack", "index_copy"))


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[_Policy]:
    """CPU autocast (``dtype``) that casts as CUDA autocast does (see the module docstring); yields the policy,
    whose ``cache`` holds the half copies of the weights made so far. Not re-entrant; one thread."""
    import lib.models.attention as attention

    policy, lib = _Policy(dtype), torch.library.Library("aten", "IMPL")
    on_cpu = attention._on_cpu_under_autocast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
            for name, kind in [*_POLICIES.items(), *((n, "passthrough") for n in cpu_only_ops())]:
                lib.impl(name, policy.kernel(name, kind), "AutocastCPU")
        attention._on_cpu_under_autocast = lambda x: False
        with torch.autocast("cpu", dtype=dtype):
            yield policy
    finally:
        attention._on_cpu_under_autocast = on_cpu
        lib._destroy()
        policy.cache.clear()
        policy.copies.clear()


# --------------------------------------------------------------------------- saved activations

def saved_bytes(model: torch.nn.Module, loss: Callable[[], torch.Tensor], blocks: list | tuple = ()) -> dict:
    """Bytes autograd saves in ``loss()`` (a forward + loss of ``model``) under :func:`cuda_autocast`:
    ``total``, ``checkpointed`` (per block call of ``blocks``, see the module docstring), ``weight_cache``
    (the half copies of the weights), and ``params`` / ``param_bytes`` / ``buffer_bytes`` of ``model``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive: set[int] = set()     # storages counted and still alive (each counted once while it lives)
    saved = [0]
    calls: list[list[int]] = []  # per block call: [bytes saved inside, bytes of its inputs]
    stack: list[int] = []

    def pack(t: torch.Tensor) -> None:
        # Counted, then dropped: the graph keeps nothing, so measuring holds only the forward's working set
        # (never unpacked: no backward runs). A storage freed later and its address reused is another one.
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if s.nbytes() and ptr not in params and ptr not in policy.copies and ptr not in alive:
            alive.add(ptr)
            weakref.finalize(s, alive.discard, ptr)
            saved[0] += s.nbytes()
            if stack:
                calls[stack[-1]][0] += s.nbytes()

    def enter(module, args, kwargs):
        calls.append([0, sum(a.numel() * a.element_size() for a in (*args, *kwargs.values()) if torch.is_tensor(a))])
        stack.append(len(calls) - 1)

    def leave(*_) -> None:
        stack.pop()

    handles = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(leave) for b in blocks]
    try:
        with cuda_autocast() as policy, torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            loss()
            cache = sum(c.untyped_storage().nbytes() for _, c in policy.cache.values())
    finally:
        for h in handles:
            h.remove()
    total = saved[0]
    inside = [c[0] for c in calls]
    return {"total": total, "checkpointed": total - sum(inside) + sum(c[1] for c in calls) + max(inside, default=0),
            "weight_cache": cache, "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers())}


def saved_activations(name: str, preset: str, batch: int) -> dict:
    """:func:`saved_bytes` of the benchmark case ``name`` (:mod:`lib.bench.cases`) at ``preset`` and ``batch``."""
    from lib.bench.cases import build_case

    case = build_case(name, preset, batch=batch)
    model = case.model.train()
    return {**saved_bytes(model, lambda: case.loss(model, case.batch), case.blocks(model)), "unit": case.unit}


# --------------------------------------------------------------------------- the estimate

def usable_bytes() -> float:
    return HEADROOM * (GPU_BYTES - RESERVED_BYTES)


def estimate(one: dict, two: dict, settings: dict) -> dict:
    """The estimate for one network from its :func:`saved_bytes` at micro-batch 1 and 2 and how its preset trains
    it (:func:`preset_settings`): the GB it needs at the preset's micro-batch and the largest micro-batch, with
    and without activation checkpointing (see the module docstring)."""
    ema = (EMA_BYTES_PER_PARAM * one["params"] + one["buffer_bytes"]) if settings["ema"] else 0
    static = STATE_BYTES_PER_PARAM * one["trainable"] + ema + one["weight_cache"]
    parts = {}
    for key, label in (("total", "autocast"), ("checkpointed", "checkpointing")):
        per_sample = max(two[key] - one[key], 1)
        fixed = one[key] - per_sample
        parts[label] = (per_sample, fixed, max(0, int((usable_bytes() - static - fixed) // per_sample)))
    per_sample, fixed, largest = parts["checkpointing" if settings["checkpointing"] else "autocast"]
    gb = ((static + fixed + settings["micro_batch"] * per_sample) / HEADROOM + RESERVED_BYTES) / 1e9
    row = {"preset_batch": settings["micro_batch"], "grad_accum": settings["grad_accum"],
           "effective_batch": settings["micro_batch"] * settings["grad_accum"],
           "checkpointing": settings["checkpointing"], "ema": settings["ema"], "gb_at_preset": gb,
           "gpu_gb": GPU_BYTES / 1e9, "max_batch": largest, "fits": settings["micro_batch"] <= largest,
           "params_m": one["params"] / 1e6, "state_gb": STATE_BYTES_PER_PARAM * one["trainable"] / 1e9,
           "ema_gb": ema / 1e9, "weight_cache_gb": one["weight_cache"] / 1e9}
    for label, (per_sample, fixed, largest) in parts.items():
        row.update({f"act_gb_per_sample_{label}": per_sample / 1e9, f"fixed_gb_{label}": fixed / 1e9,
                    f"max_batch_{label}": largest})
    return row


def preset_settings(name: str, preset: str) -> dict:
    """How the notebook trains network ``name`` at ``preset``: micro-batch, accumulation, EMA, checkpointing."""
    from lib.bench.cases import BENCHMARKED, CASES

    spec, cfg = BENCHMARKED[name], config.resolve(CASES[name][0], preset)
    return {"micro_batch": cfg[spec.batch_setting], "grad_accum": cfg[spec.accum_setting],
            "ema": spec.ema and cfg["ema_decay"] is not None,
            "checkpointing": bool(cfg.get("grad_checkpointing", False))}


def memory_estimate(quick: bool, ceilings: dict | None = None, out=None) -> list[dict]:
    """Section 7: every trained network (:data:`lib.bench.cases.TRAINING_STEPS`) at prod (smoke with
    ``quick``), each measurement in a child process; at prod the rows are also written to :data:`TABLE`."""
    from lib.bench.cases import TRAINING_STEPS
    from lib.bench.measure import isolated

    preset = "smoke" if quick else "prod"
    rows = []
    for name in TRAINING_STEPS:
        one, _ = isolated(saved_activations, name, preset, 1)
        two, _ = isolated(saved_activations, name, preset, 2)
        rows.append({"name": name, "preset": preset, "unit": one["unit"],
                     **estimate(one, two, preset_settings(name, preset)), "measured": {"1": one, "2": two}})
    if not quick:
        write_json(TABLE, {"about": "the estimate at prod on a 16 GB T4 (lib.bench.memory; make bench "
                                    "BENCH_ARGS='--only memory' rewrites it); measured: saved_bytes at micro-batch 1, 2",
                           "torch": torch.__version__, "rows": rows})
    return rows


def load_table() -> dict[str, dict]:
    """:data:`TABLE` by network name."""
    return {r["name"]: r for r in json.loads(TABLE.read_text())["rows"]}


def targets(rows: list[dict]) -> list[str]:
    """One line per network: the estimate at the preset's micro-batch beside micro-batch x grad_accum."""
    return [f"{'MET' if r['fits'] else 'NOT MET'}: {r['name']} at {r['preset']} fits a 16 GB T4: the preset's "
            f"micro-batch {r['preset_batch']} x grad_accum {r['grad_accum']} ({r['unit']}"
            f"{', activation checkpointing' if r['checkpointing'] else ''}{', EMA' if r['ema'] else ''}) needs "
            f"{r['gb_at_preset']:.1f} of {r['gpu_gb']:.1f} GB, largest micro-batch {r['max_batch']} (estimate; "
            f"{r['max_batch_autocast']} without activation checkpointing, {r['max_batch_checkpointing']} with it)"
            for r in rows]
