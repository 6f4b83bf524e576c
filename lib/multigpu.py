"""Training in several processes, one per GPU (DDP), from a notebook cell or from torchrun.

A family's training function (``pretrain.train_model``, ``xray_to_ct.train``, ...) asks :func:`processes`
how many processes the configuration wants (the ``gpus`` parameter: 1 this process, 0 every visible GPU,
N > 1 that many). With more than one it calls :func:`fit_in_processes`, which

1. moves the notebook's model off the GPU (the parent keeps no GPU memory while the ranks train);
2. spawns the processes (``spawn``, so it works after the notebook touched CUDA, under papermill and in
   JupyterLab alike): each joins the process group, seeds itself (:func:`lib.distributed.rank_seed`), and
   calls the family's importable process function ``fn(cfg, out_dir)``, which builds its data (sharded by
   ``DistributedSampler``, :mod:`lib.loaders`) and its model from the configuration and calls the same
   training function, which then trains in that process (:func:`processes` is 1 inside a process group);
3. gathers every rank's weight digest: rank 0 writes ``launch.json`` in the run folder (world size, status,
   progress, the digests; a rank whose weights differ from rank 0's is an error), and only rank 0 writes
   anything else (:func:`lib.train.fit`);
4. loads the trained weights (and the EMA) back into the notebook's model and returns a ``FitResult``, so
   the notebook goes on as after a one-process run.

``python -m lib.launch`` (torchrun, several machines) runs the same process functions: :func:`run_rank`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lib import checkpoint as ckpt
from lib import distributed
from lib.atomic import write_json
from lib.config import Config
from lib.device import pick_device
from lib.runs import seed_everything
from lib.train import FitResult
from lib.train_log import Progress



def report_path(run_dir: str | os.PathLike, fn: Callable) -> Path:
    """Where rank 0 reports on ``fn``'s training: ``<run dir>/launch-<fn name>.json``."""
    return Path(run_dir) / f"launch-{fn.__name__}.json"


def processes(cfg: Mapping[str, Any]) -> int:
    """How many processes train under ``cfg``: 1 inside a process group (this is one of them), else the
    ``gpus`` parameter (0: every visible GPU). More processes than GPUs is refused; on a CPU-only machine
    N processes use gloo (for tests, and CPU clusters)."""
    if distributed.is_initialized():
        return 1
    n = cfg.get("gpus", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"parameter 'gpus' must be an int >= 0 (1: this process, 0: every visible GPU, N: N "
                         f"processes), got {n!r}")
    device = pick_device(cfg.get("device"))
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if n == 0:
        n = max(visible, 1)
    if device.type == "cuda" and n > visible:
        raise ValueError(f"parameter 'gpus' is {n} but {visible} GPU(s) are visible; use gpus=0 for all of them")
    if device.type == "mps" and n > 1:
        raise ValueError(f"parameter 'gpus' is {n}: Apple MPS runs one process; use gpus=1")
    return n


def effective_batch(cfg: Mapping[str, Any], world: int, batch_key: str = "batch_size") -> int:
    """Samples per optimizer step: processes x micro-batch x ``grad_accum``."""
    return world * cfg[batch_key] * cfg.get("grad_accum", 1)


def fit_in_processes(fn: Callable, cfg: Mapping[str, Any], run_dir: str | os.PathLike, model: torch.nn.Module,
                     device: torch.device | None, n: int) -> FitResult:
    """Train with ``fn(cfg, run_dir)`` (importable, module level; it trains into the run folder or a folder of
    it) in ``n`` processes, then load the result into ``model`` on ``device`` (see the module docstring)."""
    import torch.multiprocessing as mp

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report_path(run_dir, fn).unlink(missing_ok=True)
    model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"training in {n} processes ({'one per GPU' if pick_device(cfg.get('device')).type == 'cuda' else 'gloo'}"
          f", DDP); batches of {cfg.get('batch_size')} per process")
    mp.start_processes(_spawned, args=(fn, dict(cfg), str(run_dir), n, distributed._free_port()), nprocs=n,
                       start_method="spawn")
    return load_result(report_path(run_dir, fn), model, device or pick_device(cfg.get("device")))


def _spawned(rank: int, fn: Callable, cfg: dict, run_dir: str, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        run_rank(fn, cfg, run_dir)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_rank(fn: Callable, cfg: Mapping[str, Any], run_dir: str | os.PathLike) -> dict:
    """One rank: join the group, seed apart, ``fn(cfg, run_dir) -> (model, FitResult)``, check that every
    rank holds the same weights; rank 0 writes :func:`report_path`. Returns the report."""
    rank, world = distributed.init_distributed()
    cfg = Config(cfg)
    if distributed.process_device(cfg.get("device")).type == "cpu":  # the ranks share the cores
        distributed.share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    seed_everything(distributed.rank_seed(cfg["seed"], rank), deterministic=bool(cfg.get("deterministic", False)))
    model, result = fn(cfg, Path(run_dir))
    if result is None:  # a stage the configuration turns off (e.g. mim_epochs=0)
        return {"world_size": world, "status": "skipped"}
    digests = distributed.gather(weights_digest(model), world)
    report = {"world_size": world, "status": result.status, "progress": vars(result.progress),
              "metrics": result.metrics, "timings": result.timings,
              "checkpoint": str(result.checkpoint) if result.checkpoint else None,
              "effective_batch": effective_batch(cfg, world) if "batch_size" in cfg else None,
              "weights_sha256": digests, "identical_weights": len(set(digests)) == 1}
    if rank == 0:
        write_json(report_path(run_dir, fn), report)
    distributed.barrier(world)
    if not report["identical_weights"]:
        raise RuntimeError(f"the {world} ranks ended with different weights (sha256 per rank: {digests}); "
                           f"see {report_path(run_dir, fn)}")
    return report


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in order (the same bytes on every rank after DDP)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_result(report_file: str | os.PathLike, model: torch.nn.Module, device: torch.device) -> FitResult:
    """The ``FitResult`` that a report of :func:`run_rank` describes: the last weights (and EMA) of its
    checkpoint loaded into ``model`` on ``device``."""
    from torch.optim.swa_utils import AveragedModel

    report_file = Path(report_file)
    if not report_file.exists():
        raise RuntimeError(f"{report_file} is missing: the training processes did not finish (see their output above)")
    report = json.loads(report_file.read_text())
    last = Path(report["checkpoint"])
    state = ckpt.load_train_checkpoint(last)
    model.load_state_dict(state["model"])
    model.to(device)
    ema = None
    if state.get("ema") is not None:
        ema = AveragedModel(model, use_buffers=True)
        ema.load_state_dict(state["ema"])
    best = last.with_name("best.pt")
    return FitResult(status=report["status"], progress=Progress(**state["progress"]), metrics=report["metrics"],
                     checkpoint=last, best_checkpoint=best if best.exists() else None, ema=ema,
                     timings=report["timings"])
