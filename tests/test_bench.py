import json

from lib import bench


def test_quick_benchmark_writes_machine_and_ceiling(tmp_path):
    assert bench.main(["--quick", "--only", "none", "--out", str(tmp_path)]) == 0
    (record,) = tmp_path.glob("*.json")
    data = json.loads(record.read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    assert set(data["ceiling_gflops"]) == {"float32", "bfloat16"} and min(data["ceiling_gflops"].values()) > 0
    readme = (tmp_path / "README.md").read_text()
    assert "Ceiling GFLOP/s" in readme and "conv3d fwd+bwd" in readme


def test_flop_counter_counts_a_matmul():
    import torch

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert bench.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
