"""lib.distributed: the identities of a single process, and two gloo processes started by launch that
agree, gather and sum. fit under DDP against one process: tests/test_train.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from lib import distributed, paths, train

CPU = torch.device("cpu")


def test_in_a_single_process_every_helper_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() == (0, 1) == distributed.rank_and_world()
    assert distributed.agree([True, False], 1, CPU) == [True, False]
    assert distributed.gather({"a": 1}, 1) == [{"a": 1}]
    t = torch.tensor([1.0, 2.0])
    assert distributed.sum_over_ranks(t, CPU) is t
    assert distributed.rank_device(torch.device("cuda", 1), 1) == torch.device("cuda", 1)
    assert (train.launch, train.init_distributed) == (distributed.launch, distributed.init_distributed)
    with pytest.raises(ValueError, match="nprocs must be an int >= 1, got 0"):
        distributed.launch(print, 0)


@pytest.mark.slow
def test_launch_joins_two_gloo_processes_that_agree_gather_and_sum(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import torch
        sys.path.insert(0, {str(paths.ROOT)!r})
        from lib import distributed

        def report(out):
            rank, world = distributed.rank_and_world()
            cpu = torch.device("cpu")
            result = {{"world": world, "agree": distributed.agree([rank == 1, False], world, cpu),
                       "gather": distributed.gather(10 * rank, world),
                       "sum": distributed.sum_over_ranks(torch.tensor([rank + 1.0]), cpu).tolist()}}
            with open(f"{{out}}/rank{{rank}}.json", "w") as f:
                json.dump(result, f)

        if __name__ == "__main__":
            torch.set_num_threads(1)
            distributed.launch(report, 2, args=(sys.argv[1],), backend="gloo")
    """))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"world": 2, "agree": [True, False], "gather": [0, 10], "sum": [3.0]}
