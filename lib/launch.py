"""A notebook's training across processes and machines with torchrun; the notebook then continues from it.

    torchrun --nproc_per_node 2 -m lib.launch 03_pretrain --preset prod                     # one machine, 2 GPUs
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m lib.launch 03_pretrain --preset prod -p epochs 200                               # a cluster

Every rank resolves the notebook's configuration (preset and ``-p`` values as papermill parses them) and
runs the family's process functions (``PROCESSES`` of its module in :mod:`lib.families`: the same code a
notebook cell runs with ``gpus`` > 1, :mod:`lib.multigpu`). Rank 0 opens the run record, so there is one
run folder, ``results/<notebook>/<run id>/``, with ``launch.json`` (world size, status, a weight digest per
rank); only rank 0 writes. Then the notebook continues from that folder, in one process::

    MEDIMG_RUN_ID=<run id> papermill notebooks/03_pretrain.ipynb out.ipynb -p preset prod -p resume True

Its training cell finds the finished checkpoint (a finished run resumes with any number of processes) and goes
on to the evaluation. A run stopped by its time budget resumes with the same torchrun command and ``-p resume
True -p run_id <run id>``, with the same number of processes (another number is refused, naming why).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from lib import config, distributed, families, multigpu, runs
from lib.pipeline import _parse_value  # papermill's -p parsing, as lib.pipeline and lib.kaggle use it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", help="a training notebook: " + ", ".join(f.notebook for f in families.FAMILIES.values()))
    parser.add_argument("--preset", required=True, help=f"one of {', '.join(config.PRESETS)}")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a notebook parameter, as papermill's -p")
    parser.add_argument("--run-id", default=None, help="the run folder to train into (default: "
                        f"${runs.RUN_ID_ENV} or a new one)")
    args = parser.parse_args(argv)
    name = args.notebook.removesuffix(".ipynb").split("/")[-1]
    module = families.load(families.by_notebook(name).name)
    steps = getattr(module, "PROCESSES", None)
    if steps is None and importlib.util.find_spec(module.__name__ + "_processes"):  # kept apart (04)
        steps = importlib.import_module(module.__name__ + "_processes").PROCESSES
    if not steps:
        parser.error(f"{name} has no training that runs across processes")
    params = {k: _parse_value(v) for k, v in args.p}
    cfg = config.resolve(name, args.preset, **params)  # every rank: a bad parameter stops them all alike
    run_id = args.run_id or os.environ.get(runs.RUN_ID_ENV)
    runs.check_resumable(name, cfg, run_id)  # every rank: a run that cannot resume stops them all alike
    rank, world = distributed.init_distributed()
    run = None
    if rank == 0:
        run = runs.Run(name, cfg, params={"preset": args.preset, **params}, run_id=run_id)
        run.record["launch"] = {"world_size": world, "command": " ".join(sys.argv)}
    run_dir = distributed.broadcast_object(str(run.dir) if run else None, world)
    try:
        for fn, sub in steps:
            report = multigpu.run_rank(fn, cfg, os.path.join(run_dir, sub) if sub else run_dir)
    except BaseException as e:
        if run is not None:
            run.fail(e)
        raise
    if run is not None:
        run.finish(trained_by="torchrun", world_size=world, status_of_training=report["status"],
                   weights_sha256=report.get("weights_sha256", [None])[0])
        print(f"trained in {world} processes -> {run.dir}\ncontinue the notebook from it:\n  "
              f"{runs.RUN_ID_ENV}={run.run_id} papermill notebooks/{name}.ipynb {name}-out.ipynb "
              f"-p preset {args.preset} " + " ".join(f"-p {k} {v}" for k, v in args.p) + " -p resume True")
    distributed.barrier(world)
    if distributed.is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
