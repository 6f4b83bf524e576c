"""Data loaders: the one way the families build them, and what :func:`lib.train.fit` reads from them.

:func:`loader` builds every training and evaluation ``DataLoader`` of the families:

- seeded: the same seed gives the same batches and augmentations (:func:`lib.runs.loader_seeding`);
- sharded inside a process group (several GPUs, or torchrun): a ``DistributedSampler`` per loader, shuffled
  by the seed and the epoch (``fit`` calls ``set_epoch``), and each rank's workers seeded apart
  (:func:`lib.distributed.rank_seed`). ``batch_size`` is then per process: the effective batch of a step is
  processes x ``batch_size`` x ``grad_accum`` (:func:`lib.launch.effective_batch`);
- ``pin_memory`` when batches go to a CUDA GPU (page-locked host memory: the copy overlaps the step, as
  :func:`lib.device.to_device` copies with ``non_blocking=True``);
- ``persistent_workers`` for evaluation loaders with workers (they are iterated every epoch; keeping their
  workers saves starting them again). Training loaders start theirs each epoch on purpose: their worker seeds
  then follow the loader's generator, which is what lets a resumed run replay an epoch exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from lib import distributed
from lib.runs import loader_seeding


def pin_memory(cfg: Mapping[str, Any]) -> bool:
    """Whether batches will be copied to a CUDA GPU (the configuration's device, or auto with one present)."""
    choice = str(cfg.get("device") or "auto").lower()
    return torch.cuda.is_available() and (choice.startswith("cuda") or choice == "auto")


def loader(dataset: Dataset, cfg: Mapping[str, Any], *, train: bool, batch_size: int | None = None,
           seed_offset: int = 0, drop_last: bool | None = None, workers: bool = True) -> DataLoader:
    """A loader over ``dataset`` for ``cfg`` (``batch_size``, ``num_workers``, ``seed``, ``device``).

    ``train``: shuffled by ``cfg.seed + seed_offset`` and full batches only (unless ``drop_last`` says
    otherwise); else in order. ``workers=False``: in this process (tensors already in memory)."""
    batch_size = batch_size or cfg["batch_size"]
    seed = cfg["seed"] + seed_offset
    rank, _ = distributed.rank_and_world()
    drop_last = train if drop_last is None else drop_last
    shard = distributed.sampler(dataset, shuffle=train, seed=seed, drop_last=drop_last and train)
    workers_n = cfg.get("num_workers", 0) if workers else 0
    options: dict[str, Any] = {"batch_size": batch_size, "num_workers": workers_n, "pin_memory": pin_memory(cfg),
                               "drop_last": drop_last}
    if shard is not None:
        options["sampler"] = shard
    else:
        options["shuffle"] = train
    if train or workers_n:
        options.update(loader_seeding(distributed.rank_seed(seed, rank)))
    if workers_n and not train:
        options["persistent_workers"] = True
    return DataLoader(dataset, **options)


# --------------------------------------------------------------------------- what fit reads from a loader

def length(loader: Any, name: str) -> int:
    try:
        n = len(loader)
    except TypeError:
        raise ValueError(f"{name} must have a length (a DataLoader over a map-style dataset); "
                         f"got {type(loader).__name__} without len()") from None
    if n == 0:
        shards = getattr(next((s for s in samplers(loader)), None), "num_replicas", 1)
        split = f"; each of the {shards} processes sees 1/{shards} of the data" if shards > 1 else ""
        raise ValueError(f"{name} yields no batches (empty dataset, or drop_last with fewer samples than a batch"
                         f"{split}): lower batch_size or add data")
    return n


def parts(loader: Any) -> list:
    """``loader`` and the loaders it is made of (:class:`lib.data.datasets.AlternatingLoader`'s ``loaders``)."""
    inner = getattr(loader, "loaders", None)
    return [loader, *(x for one in inner.values() for x in parts(one))] if isinstance(inner, Mapping) else [loader]


def samplers(loader: Any) -> list:
    """The samplers whose order depends on the epoch (``set_epoch``), each once."""
    found = [x for one in parts(loader) for x in (getattr(one, "sampler", None),
                                                  getattr(getattr(one, "batch_sampler", None), "sampler", None))]
    return list({id(x): x for x in found if hasattr(x, "set_epoch")}.values())


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The loader's generators (shuffle order, worker seeds): part of a checkpoint's RNG state."""
    found = [g for one in parts(loader)
             for g in (getattr(one, "generator", None), getattr(getattr(one, "sampler", None), "generator", None))]
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())
