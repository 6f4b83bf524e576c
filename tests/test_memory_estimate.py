"""lib.bench.memory: the saved bytes under CUDA autocast's cast policy on hand-made modules (counted by hand
below), its op lists against torch's AutocastCUDA registrations, the estimate's arithmetic, every prod preset
against the committed table (lib/bench/t4_memory.json), and the activation checkpointing of 05 and 06."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import config
from lib.bench import memory


def _saved(model: nn.Module, x: torch.Tensor, blocks=()) -> dict:
    return memory.saved_bytes(model, lambda: model(x).sum(), blocks)  # sum saves nothing


def test_a_layer_norm_saves_its_input_in_float32_and_the_next_linear_a_half_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    r = _saved(model, torch.randn(4, 8))
    expected = (4 * 8 * 2          # Linear 1: its input cast to half
                + 4 * 16 * 4       # LayerNorm: its input in fp32 (CPU bf16 autocast: 2 bytes)
                + 2 * 4 * 1 * 4    # LayerNorm: mean and rstd, fp32
                + 4 * 16 * 2)      # Linear 2: a half copy of the LayerNorm's fp32 output
    assert r["total"] == expected == 480
    assert r["weight_cache"] == 2 * (16 * 8 + 16 + 4 * 16 + 4)  # half copies of the Linear weights and biases
    assert r["params"] == r["trainable"] == 16 * 8 + 16 + 2 * 16 + 4 * 16 + 4


def test_float32_spreads_from_a_group_norm_through_the_silu_after_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 2, 1))
    r = _saved(model, torch.randn(1, 1, 8, 8))
    n = 4 * 8 * 8
    expected = (64 * 2             # Conv 1: its input cast to half
                + n * 4 + 2 * 2 * 4  # GroupNorm: its input in fp32, mean and rstd [1, 2]
                + n * 4            # SiLU: its input, the GroupNorm's fp32 output (CPU: bf16)
                + n * 2)           # Conv 2: a half copy of the SiLU's fp32 output
    assert r["total"] == expected


def test_softmax_keeps_float32_and_the_matmul_after_it_a_half_copy():
    class Attention(nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x

    x = torch.randn(2, 6, 4).bfloat16().requires_grad_()  # already half: the matmuls cast nothing
    r = _saved(Attention(), x)
    # x @ xT: x (the transpose is a view of it); softmax: its fp32 output; @ x: a half copy of that output
    # (CPU bf16 autocast: x and one bf16 softmax output, saved by both: 2 * 6 * 4 * 2 + 2 * 6 * 6 * 2)
    assert r["total"] == 2 * 6 * 4 * 2 + 2 * 6 * 6 * 4 + 2 * 6 * 6 * 2


def test_checkpointed_blocks_keep_their_inputs_and_one_block():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(3)]
    model = nn.Sequential(*blocks)
    r = _saved(model, torch.randn(4, 8), blocks)
    first = 4 * 8 * 2 + 4 * 8 * 4 + 2 * 4 * 4        # half input of the Linear, fp32 LayerNorm input, mean, rstd
    later = 4 * 8 * 2 + 4 * 8 * 4 + 2 * 4 * 4        # the same: the half copy of the previous fp32 output
    assert r["total"] == first + 2 * later
    inputs = 4 * 8 * 4 * 3                            # every block's fp32 input
    assert r["checkpointed"] == r["total"] - (first + 2 * later) + inputs + max(first, later)


def test_the_emulation_is_undone_on_exit():
    import lib.models.attention as attention

    before = attention._on_cpu_under_autocast
    with memory.cuda_autocast():
        assert F.layer_norm(torch.randn(2, 4).bfloat16(), (4,)).dtype == torch.float32
        assert attention._on_cpu_under_autocast(torch.zeros(1)) is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(torch.randn(2, 4).bfloat16(), (4,)).dtype == torch.bfloat16
    assert attention._on_cpu_under_autocast is before


def test_the_op_lists_are_those_torch_registers_for_cuda_autocast():
    registered = {n.removeprefix("aten::") for n in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")}
    ours = {*memory.LOWER_PRECISION, *memory.FP32, *memory.FP32_SET_OPT_DTYPE, *memory.FP32_APPEND_DTYPE,
            *memory.PROMOTE, *memory.BANNED}
    assert ours == registered, (ours - registered, registered - ours)
    assert "native_group_norm" not in ours and "group_norm" in memory.FP32 and "softmax.int" in memory.FP32_SET_OPT_DTYPE
    assert {"avg_pool3d", "max_pool3d", "fft_rfftn"} <= set(memory.cpu_only_ops())


def test_the_estimate_counts_state_ema_and_weight_cache():
    gb = 10 ** 9
    one = {"total": 3 * gb, "checkpointed": gb, "weight_cache": gb // 10, "params": 50_000_000,
           "trainable": 50_000_000, "buffer_bytes": 0}
    two = {**one, "total": 5 * gb, "checkpointed": int(1.5 * gb)}
    plain = memory.estimate(one, two, {"micro_batch": 2, "grad_accum": 4, "ema": False, "checkpointing": False})
    with_ema = memory.estimate(one, two, {"micro_batch": 2, "grad_accum": 4, "ema": True, "checkpointing": True})
    static = 16 * 50_000_000 + gb // 10
    assert plain["act_gb_per_sample_autocast"] == 2 and plain["fixed_gb_autocast"] == 1
    assert plain["max_batch"] == int((memory.usable_bytes() - static - gb) // (2 * gb))
    assert plain["gb_at_preset"] == pytest.approx(((static + 5 * gb) / memory.HEADROOM + memory.RESERVED_BYTES) / gb)
    assert plain["effective_batch"] == 8 and plain["fits"]
    assert with_ema["ema_gb"] == pytest.approx(0.2)
    assert with_ema["max_batch"] == with_ema["max_batch_checkpointing"] == int(
        (memory.usable_bytes() - static - 4 * 50_000_000 - gb // 2) // (gb // 2))


def test_every_prod_preset_fits_a_t4_by_the_committed_table():
    """Every trained network's prod micro-batch is at most the largest the table's measurements allow under the
    preset's current settings (accumulation, EMA, checkpointing). After changing a model or a prod preset:
    make bench BENCH_ARGS="--only memory" rewrites the table."""
    from lib.bench.cases import TRAINING_STEPS

    table = memory.load_table()
    assert set(table) == set(TRAINING_STEPS)
    for name in TRAINING_STEPS:
        settings = memory.preset_settings(name, "prod")
        m = table[name]["measured"]
        row = memory.estimate(m["1"], m["2"], settings)
        assert settings["micro_batch"] <= row["max_batch"], (name, settings, row["max_batch"])
        assert row["gb_at_preset"] <= memory.GPU_BYTES / 1e9, (name, row["gb_at_preset"])


def test_prod_keeps_the_effective_batches():
    """micro-batch x grad_accum at prod: what the presets meant before their micro-batches were fitted to a T4."""
    effective = {"03_pretrain": 8, "04_ct_diffusion": 32, "05_cxr_change": 16, "06_xray_to_ct": 2}
    for notebook, n in effective.items():
        cfg = config.resolve(notebook, "prod")
        assert cfg["batch_size"] * cfg["grad_accum"] == n, notebook
    vae = config.resolve("04_ct_diffusion", "prod")
    assert vae["vae_batch_size"] * vae["vae_grad_accum"] == 16  # its stage's own accumulation


@pytest.mark.parametrize("notebook", ["05_cxr_change", "06_xray_to_ct"])
def test_activation_checkpointing_changes_no_gradient(notebook, monkeypatch):
    import importlib

    from lib.bench.cases import build_case

    name, module = {"05_cxr_change": ("LongitudinalMIMModelBig", "lib.models.cxr_change"),
                    "06_xray_to_ct": ("HybridCNNViTUNet3D", "lib.models.xray2ct")}[notebook]
    module, calls = importlib.import_module(module), []
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(k) or torch.utils.checkpoint.checkpoint(*a, **k))
    grads = []
    for on in (False, True):
        case = build_case(name, "smoke")
        net = getattr(case.model, "change", case.model)
        for m in net.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = on
        if hasattr(net, "config"):
            object.__setattr__(net.config, "grad_checkpointing", on)
        torch.manual_seed(1)
        case.loss(case.model.train(), case.batch).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert len(calls) >= 5 and all(k["use_reentrant"] is False for k in calls)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_families_build_checkpointing_from_the_preset():
    from lib.families.cxr_change import build as build_change
    from lib.families.xray_to_ct import build as build_xray

    change = build_change(config.resolve("05_cxr_change", "smoke", grad_checkpointing=True))
    assert change.config.grad_checkpointing and change.encoder.features.grad_checkpointing
    assert change.encoder.bottleneck.transformer.grad_checkpointing
    assert build_xray(config.resolve("06_xray_to_ct", "smoke", grad_checkpointing=True)).grad_checkpointing
    assert not build_xray(config.resolve("06_xray_to_ct", "smoke")).grad_checkpointing


@pytest.mark.slow
def test_section_7_measures_every_network_at_smoke_and_leaves_the_table_alone():
    before = memory.TABLE.read_bytes()
    rows = memory.memory_estimate(quick=True)
    from lib.bench.cases import TRAINING_STEPS

    assert [r["name"] for r in rows] == TRAINING_STEPS and memory.TABLE.read_bytes() == before
    for r in rows:
        assert r["preset"] == "smoke" and r["max_batch"] >= r["preset_batch"] and r["fits"]
        assert 0 < r["act_gb_per_sample_checkpointing"] <= r["act_gb_per_sample_autocast"]
        assert r["weight_cache_gb"] > 0 and r["measured"]["2"]["total"] > r["measured"]["1"]["total"]
    lines = memory.targets(rows)
    assert len(lines) == len(rows) and all(line.startswith("MET") for line in lines)
