"""Several processes for :func:`lib.train.fit`: joining a process group, and the few collectives the loop needs.

Start the processes with torchrun (each calls :func:`init_distributed`) or, from a notebook, with
:func:`launch`. ``fit`` then wraps the model in DDP, and its ranks agree on skips and stops
(:func:`agree`) and gather their RNG states for the checkpoint (:func:`gather`). Every helper is a
no-op, or the identity, in a single process. ``lib.train`` re-exports ``init_distributed`` and ``launch``.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that torchrun or :func:`launch` describe in the environment.

    Returns ``(rank, world_size)``; ``(0, 1)`` in a single process. Backend: nccl with CUDA, else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def launch(fn: Callable, nprocs: int, args: tuple = (), backend: str | None = None,
           start_method: str | None = None) -> None:
    """Run ``fn(*args)`` in ``nprocs`` processes joined in a process group (Kaggle's T4 x2 from a notebook).

    ``fork`` (the default where it exists, while this process has not touched CUDA) also runs functions
    defined in a notebook; once CUDA is initialised, ``spawn`` (a forked child cannot use CUDA), which needs
    ``fn`` importable from a module (the families' training uses :mod:`lib.multigpu`, which always spawns).
    Results travel through files: rank 0 writes them.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    import torch.multiprocessing as mp

    forkable = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    start_method = start_method or ("fork" if forkable else "spawn")
    if start_method == "fork" and torch.cuda.is_initialized():
        raise RuntimeError("launch: CUDA is already initialised in this process, so it cannot fork workers; "
                           "use start_method='spawn' with a function importable from a module")
    interactive = not getattr(sys.modules.get("__main__"), "__file__", None)  # a notebook or a REPL
    if start_method == "spawn" and getattr(fn, "__module__", None) == "__main__" and interactive:
        raise RuntimeError(f"launch: {getattr(fn, '__name__', fn)!r} is defined in __main__ (a notebook), which "
                           f"spawned processes cannot import; move it into a module, or restart the kernel and "
                           f"launch before anything touches the GPU (then fork runs it)")
    mp.start_processes(_launched, args=(fn, args, nprocs, _free_port(), backend), nprocs=nprocs,
                       start_method=start_method)


def _free_port() -> int:
    """A free port on the loopback interface for the rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launched(rank: int, fn: Callable, args: tuple, world: int, port: int, backend: str | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(backend)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the joined process group; ``(0, 1)`` without one."""
    return (dist.get_rank(), dist.get_world_size()) if is_initialized() else (0, 1)


def rank_device(device: torch.device, world: int) -> torch.device:
    """With several processes on CUDA, this process's GPU (``LOCAL_RANK``); ``device`` otherwise."""
    if world > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def process_device(requested: str | None = None) -> torch.device:
    """The device this process trains on: :func:`lib.device.pick_device`'s, on this rank's GPU in a process group."""
    from lib.device import pick_device

    return rank_device(pick_device(requested), rank_and_world()[1])


def share_cores(processes: int) -> None:
    """Torch threads for one of ``processes`` processes on this machine's CPU: its share of the cores."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


def wrap(model: torch.nn.Module, device: torch.device, **options: Any) -> DDP:
    """``model`` in DDP (on ``device``'s GPU with CUDA). ``gradient_as_bucket_view=True`` unless ``options``
    say otherwise: the gradients live in DDP's communication buckets, so no second copy of them is held
    (the T4 memory estimate counts none). ``options``: the family's (e.g. ``find_unused_parameters=True``
    for a model whose batches use one of several heads), and ``sync_batchnorm=True``: BatchNorm layers
    normalise over the batches of all ranks (``SyncBatchNorm``, on CUDA only: on CPU every rank normalises
    over its own batch). DDP gives every rank rank 0's weights and buffers here."""
    options = {"gradient_as_bucket_view": True, **options}
    if options.pop("sync_batchnorm", False) and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **options)


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP does before each forward: after the last
    step, so that every rank ends with the same state."""
    if world > 1:
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``: rank 0 keeps ``seed`` (a one-process run is unchanged), the others draw apart,
    so that augmentations, masks and dropout differ between ranks."""
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63


def sampler(dataset: Any, shuffle: bool, seed: int, drop_last: bool = False) -> Any:
    """This rank's shard of ``dataset`` (``DistributedSampler``, shuffled by ``seed`` and the epoch that
    :func:`lib.train.fit` sets) inside a process group, even of one process; None outside one."""
    if not is_initialized():
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=shuffle,
                              seed=seed, drop_last=drop_last)


def broadcast_object(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def comm_device(device: torch.device) -> torch.device:
    """Where tensors for a collective live: the GPU with nccl, the CPU with gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(flags: list[bool], world: int, device: torch.device) -> list[bool]:
    """True where any rank says True."""
    if world == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.float32, device=comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def gather(obj: Any, world: int) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` summed over all ranks (``t`` itself without a process group)."""
    if not is_initialized():
        return t
    t = t.to(comm_device(device))
    dist.all_reduce(t)
    return t


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
