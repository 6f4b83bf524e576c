"""lib.bench: every section runs (``--quick``), writes its rows, figure and README; the extras write their files;
every registered family has a case beside a MONAI peer; the measuring tools work."""

import json
import math

import pytest
import torch

from lib import bench

EXPECTED = {  # section -> keys every row of it has
    "ceiling": {"name", "dtype", "ms", "cpu_ms", "gflops"},
    "steps": {"name", "preset", "dtype", "input", "batch", "ms", "cpu_ms", "samples_per_s", "gflop_per_step", "gflops",
              "fraction_of_ceiling", "peak_mb", "tensor_peak_mb", "params_m"},
    "attention": {"name", "input", "tokens", "attended_tokens", "ms", "cpu_ms", "peak_mb", "tensor_peak_mb",
                  "processes"},
    "infonce": {"preset", "grid", "batched_ms", "loop_ms", "speedup", "max_abs_diff", "loop_timed_on"},
    "data": {"modality", "level", "decode_vol_per_s", "cache_vol_per_s", "step_vol_per_s", "cache_vs_decode",
             "cache_vs_step"},
    "diffusion": {"name", "preset", "frames"},
    "memory": {"name", "params_m", "state_gb", "act_gb_per_sample_autocast", "act_gb_per_sample_checkpointing",
               "max_batch_autocast", "max_batch_checkpointing", "preset_batch", "grad_accum", "gb_at_preset",
               "max_batch", "fits"},
    "convert": {"name", "workers", "series", "files"},
    "submission": {"name", "series", "preset", "seconds"},
    "profile": {"name", "preset", "dtype", "category", "ours_ms", "peer_ms", "ours_vs_peer_ms"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    (record,) = out.glob("*.json")
    return out, json.loads(record.read_text())


@pytest.mark.slow
def test_every_section_yields_rows_with_its_keys_and_the_machine(quick_run):
    _, data = quick_run
    assert data["sections"] == list(bench.SECTIONS) == list(EXPECTED)
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] and data["machine"]["cpu"] is not None
    assert set(data["ceiling_gflops"]) == {"float32", "bfloat16"} and min(data["ceiling_gflops"].values()) > 0
    for section, keys in EXPECTED.items():
        rows = [r for r in data["rows"] if r["section"] == section]
        assert rows, f"section {section} has no rows"
        for r in rows:
            assert keys <= set(r), (section, keys - set(r))
            assert r["machine"].startswith(data["machine"]["cpu"])


@pytest.mark.slow
def test_steps_pair_every_family_with_its_monai_network(quick_run):
    from lib.bench.cases import CASES, PAIRS

    _, data = quick_run
    rows = [r for r in data["rows"] if r["section"] == "steps"]
    assert {r["name"] for r in rows} == set(CASES) and {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["gflop_per_step"] > 0 and r["ms"] > 0 and 0 < r["fraction_of_ceiling"] and r["peak_mb"] > 0
        assert r["tensor_peak_mb"] > 0
        if r["name"] in PAIRS:
            monai = next(m for m in rows if m["name"] == PAIRS[r["name"]] and m["dtype"] == r["dtype"])
            assert r["monai_fraction"] == monai["fraction_of_ceiling"]


@pytest.mark.slow
def test_infonce_agrees_with_the_loop_and_attention_writes_its_figure(quick_run):
    out, data = quick_run
    (nce,) = [r for r in data["rows"] if r["section"] == "infonce"]
    # the ratio is reported, never asserted: on a loaded machine any timing can invert (make bench judges it)
    assert nce["max_abs_diff"] <= 1e-5 and math.isfinite(nce["speedup"])
    png = out / bench.SECTIONS["attention"][3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    attention = [r for r in data["rows"] if r["section"] == "attention"]
    assert {r["name"] for r in attention} == {"wavelet", "full", "full, math kernel"}
    assert all(r["attended_tokens"] < r["tokens"] for r in attention if r["name"] == "wavelet")
    assert all(r["processes"] == 1 for r in attention)  # --quick: one child per case


@pytest.mark.slow
def test_memory_estimate_and_readme(quick_run):
    out, data = quick_run
    for r in (r for r in data["rows"] if r["section"] == "memory"):
        assert 0 < r["act_gb_per_sample_checkpointing"] <= r["act_gb_per_sample_autocast"]
        assert r["max_batch_checkpointing"] >= r["max_batch_autocast"] >= 1
    readme = (out / "README.md").read_text()
    assert "## Targets" in readme and "Ceiling GFLOP/s" in readme
    assert all(title in readme for _, _, title, _ in bench.SECTIONS.values())
    assert "![attention](attention_scaling.png)" in readme
    assert sum(line.startswith(("- MET", "- NOT MET")) for line in readme.splitlines()) >= 6


def test_every_registered_family_has_a_case_beside_a_monai_peer():
    """Adding a family to lib.families without a benchmark case (and its MONAI peer) fails here."""
    from lib.bench.cases import CASES, FAMILY_CASES, PAIRS, PEERS
    from lib.families import FAMILIES

    assert set(FAMILY_CASES) <= set(FAMILIES), set(FAMILY_CASES) - set(FAMILIES)
    for family in FAMILIES:
        peered = [c for c in FAMILY_CASES.get(family, ()) if c.peer]
        assert peered, f"family {family} has no benchmark case with a MONAI peer in lib/bench/cases.py"
        for case in peered:
            assert case.peer in PEERS and case.peer.startswith("MONAI ") and PAIRS[case.name] == case.peer
            assert CASES[case.name][0] == CASES[case.peer][0] == FAMILIES[family].notebook


@pytest.mark.slow
def test_the_extras_write_their_own_files_and_no_report(tmp_path):
    assert bench.main(["--quick", "--only", "pretrain_step", "train_loop", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain_step.json", "train_loop_overhead.json"]
    step = json.loads((tmp_path / "pretrain_step.json").read_text())
    assert [s["preset"] for s in step["steps"]] == ["smoke"] and all(s["loss_finite"] for s in step["steps"])
    assert {"attended_tokens", "attention_entries_per_head", "fwd_bwd_wall_s"} <= set(step["attention"][0])
    loop = json.loads((tmp_path / "train_loop_overhead.json").read_text())
    assert set(loop["pairs"]) == {"plain", "clip+ema"}
    assert all(p["bare_ms_per_step"] > 0 and p["fit_ms_per_step"] > 0 for p in loop["pairs"].values())


def test_an_unknown_section_fails_with_the_valid_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--only", "ceiling", "speed", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "speed" in err and all(name in err for name in bench.SECTIONS)
    assert not list(tmp_path.iterdir())


def _allocate(mb: int) -> int:
    block = torch.ones(mb * 2 ** 20 // 4)  # float32, touched
    return int(block.numel())


def test_isolated_runs_in_a_child_and_reports_its_own_peak():
    result, peak = bench.isolated(_allocate, 200)
    assert result == 200 * 2 ** 20 // 4
    assert 190 < peak < 260, peak
    _, small = bench.isolated(_allocate, 1)
    assert small < 50, small


def test_flop_counter_counts_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert bench.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_flop_counter_counts_grouped_convolution_gradients_as_grouped():
    for groups in (1, 4, 32):  # torch's own formula counts the weight gradient of grouped convolutions as dense
        conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=groups, bias=False)
        x = torch.rand(2, 32, 8, 8, requires_grad=True)
        forward = bench.count_flops(lambda: conv(x))
        assert forward == 2 * 2 * 32 * (32 // groups) * 9 * 8 * 8
        assert bench.count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_peak_tensor_mb_counts_what_the_call_allocates_at_its_peak():
    mb = 2 ** 20
    held = torch.empty(50 * mb, dtype=torch.uint8)  # allocated before: not counted, and not freed by the call

    def fn():
        a = torch.empty(4 * mb, dtype=torch.uint8)
        b = torch.empty(8 * mb, dtype=torch.uint8)  # 12 MB live: the peak
        del a
        c = torch.empty(2 * mb, dtype=torch.uint8)  # 10
        del b, c
        torch.empty(3 * mb, dtype=torch.uint8)

    # the exact peak, plus up to 0.25 MB: the profiler counts every CPU allocation in the process while it
    # runs (about 0.17 MB in this test process once the benchmark fixture has run)
    for _ in range(2):
        assert 12.0 <= bench.peak_tensor_mb(fn) < 12.25
    x = torch.randn(256, 256, requires_grad=True)
    # forward + backward: tanh's output (saved for its backward) and x's gradient live at once, 256 KB each,
    # plus a few scalars
    assert 0.5 <= bench.peak_tensor_mb(lambda: torch.tanh(x).sum().backward()) < 0.75
    assert held.numel() == 50 * mb


def test_profile_categories_and_one_pair_at_smoke():
    from lib.bench.profile import CATEGORIES, category, profile_pair

    assert category("aten::addmm") == category("aten.convolution_backward.default") == "matmul/conv"
    assert category("aten::native_layer_norm_backward") == "norms" and category("aten::_softmax") == "attention"
    assert category("aten::copy_") == "layout (wavelet, reshapes, copies)" and category("aten::gather") == "masking/indexing"
    assert category("aten::mse_loss") == "loss" and category("aten::gelu") == "elementwise"
    assert category("autograd::engine::evaluate_function: MmBackward0") == "autograd/other"
    rows = profile_pair("WaveFormer pretrainer", "smoke", False, 1, 1, 100.0)
    step, cats = rows[0], rows[1:]
    assert step["category"].startswith("step") and step["ours_ms"] > 0 and step["peer_ms"] > 0
    assert step["ours_gflop"] > 0 and step["ours_fraction"] > 0 and isinstance(step["faster_per_sample"], bool)
    assert [r["category"] for r in cats] == list(CATEGORIES)
    for who in ("ours", "peer"):
        assert math.isclose(sum(r[f"{who}_share"] for r in cats), 1.0, rel_tol=1e-6)
        assert sum(r[f"{who}_gflop"] for r in cats) == pytest.approx(step[f"{who}_gflop"])
    assert next(r for r in cats if r["category"] == "optimizer")["ours_ms"] > 0
