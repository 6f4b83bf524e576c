"""Checkpoints of :mod:`lib.train`: written atomically, loaded safely, compared before a resume.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` accepts: tensors, dicts,
lists and primitive values only (numpy and python RNG states are converted), so loading one can
never run code. Keys::

    format      FORMAT
    model       state_dict of the (unwrapped) model
    optimizer   scheduler   scaler   ema (None when EMA is off)
    progress    epoch, batch, step, skipped, in_a_row, lr, best, best_epoch, meters
    rng         one entry per process: {"now": states, "epoch_start": states or None}
    config      the resolved configuration (the caller's dict plus the training settings)
    world_size  number of processes that wrote it

Loading refuses a file whose pickle would import anything outside torch's weights-only allow-list
(a pickle can run code while it loads, e.g. ``os.system``), naming the file and the imports, and
reports a damaged or truncated one as such; :func:`newest_loadable` finds
the previous good checkpoint to offer instead.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from lib.atomic import atomic_path, remove_orphans

FORMAT = "lib.train/1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle would import code; it is refused, never loaded."""


class CorruptCheckpointError(CheckpointError):
    """The file is damaged or truncated. ``fallback`` is the newest checkpoint beside it that loads."""

    def __init__(self, message: str, fallback: Path | None = None):
        super().__init__(message)
        self.fallback = fallback


class ConfigMismatchError(CheckpointError, ValueError):
    """A resume was asked with a configuration other than the checkpoint's."""


# What torch.load raises on damaged files varies with where the damage is (seen: OSError EINVAL,
# RuntimeError "unexpected EOF", EOFError, IndexError, UnpicklingError); all of them mean "damaged".
_READ_ERRORS = (OSError, RuntimeError, EOFError, IndexError, KeyError, ValueError, zipfile.BadZipFile,
                pickle.UnpicklingError)


def save(path: str | Path, obj: dict) -> Path:
    """``torch.save`` to a temporary file beside ``path``, renamed into place when complete; the leftover
    temporary files of writers killed mid-save in that folder are removed (never a live writer's)."""
    remove_orphans(Path(path).parent)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def copy(src: str | Path, dst: str | Path) -> Path:
    """Atomic copy (best.pt and epoch_NNNN.pt are copies of last.pt: no second serialisation)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``.

    Raises :class:`UnsafeCheckpointError` (naming the file and what its pickle would import) for a
    file that could run code, :class:`CorruptCheckpointError` for a damaged or truncated one, and
    ``FileNotFoundError`` for a missing one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, str(e))
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: its pickle would import {', '.join(unsafe)}, and a pickle that "
                f"imports code can run it while loading (weights-only loading accepts tensors, dicts, lists "
                f"and plain values only; lib.train never writes anything else). Delete the file unless you "
                f"know exactly who wrote it and why.") from None
        raise CorruptCheckpointError(f"{path}: damaged or truncated, cannot be read ({_short(e)})") from e
    except _READ_ERRORS as e:
        raise CorruptCheckpointError(f"{path}: damaged or truncated, cannot be read ({_short(e)})") from e


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip()


def _unsafe_globals(path: Path, message: str) -> list[str]:
    found = set(re.findall(r"GLOBAL ([\w.]+)", message))
    try:
        if zipfile.is_zipfile(path):
            found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        else:  # a bare pickle: torch may stop at an opcode before it reaches the import
            found |= _globals_in_pickle(path.read_bytes()) - _allowed_globals()
    except Exception:  # damaged beyond reading: no evidence of imports
        pass
    return sorted(found)


def _globals_in_pickle(data: bytes) -> set[str]:
    """Every ``module.name`` a pickle would import, read from its opcodes (nothing is executed)."""
    found, strings = set(), []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # truncated: keep what was read
        pass
    return found


def _allowed_globals() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return set(_get_allowed_globals())
    except (ImportError, AttributeError):  # a private helper: without it, trust only torch's own names
        return set()


def load_train_checkpoint(path: str | Path) -> dict:
    """:func:`load`, then check that the file is a :mod:`lib.train` checkpoint."""
    ckpt = load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lib.train checkpoint (expected a dict with format={FORMAT!r})")
    return ckpt


def best_or_last(folder: str | Path) -> Path:
    """``best.pt`` of a checkpoints folder if there is one, else ``last.pt`` (what a finished fit leaves to load)."""
    folder = Path(folder)
    return folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"


def newest_loadable(folder: str | Path, exclude: Iterable[str | Path] = ()) -> tuple[Path, dict] | None:
    """The checkpoint in ``folder`` with the most training steps that loads, and its progress."""
    skip = {Path(p).resolve() for p in exclude}
    best: tuple[Path, dict] | None = None
    for path in sorted(Path(folder).glob("*.pt")):
        if path.resolve() in skip:
            continue
        try:
            progress = load_train_checkpoint(path)["progress"]
        except (CheckpointError, OSError):
            continue
        if best is None or (progress["step"], progress["epoch"]) > (best[1]["step"], best[1]["epoch"]):
            best = (path, progress)
    return best


# --------------------------------------------------------------------------- configuration

def plain(config: Mapping) -> dict:
    """A configuration as plain JSON values (tuples become lists, devices and paths strings)."""
    return json.loads(json.dumps(dict(config), default=str))


def config_diff(saved: Mapping, current: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """Lines ``key: checkpoint X, now Y`` for every key whose value differs (``ignore`` excepted)."""
    missing = object()
    saved, current, ignore = plain(saved), plain(current), set(ignore)
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if key in ignore or a == b:
            continue
        show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
        lines.append(f"{key}: checkpoint {show(a)}, now {show(b)}")
    return lines


# --------------------------------------------------------------------------- RNG states

def first_nonfinite(module: torch.nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN or Inf, else None (one device sync)."""
    named = [(k, v) for k, v in module.state_dict().items() if v.is_floating_point() or v.is_complex()]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()
    return None if bool(ok.all()) else named[int((~ok).nonzero()[0])][0]


def get_rng(generators: Iterable[torch.Generator] = ()) -> dict:
    """Python, numpy, torch (CPU and CUDA) and the given generators' states, as weights-only types."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's GPU only: a checkpoint from two GPUs then resumes on a machine with one.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng(state: dict, generators: Iterable[torch.Generator] = ()) -> None:
    """Restore what :func:`get_rng` returned."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        raise CheckpointError(f"the checkpoint holds {len(state['generators'])} data-loader generator state(s), "
                              f"the loader has {len(generators)}: build it as the interrupted run did")
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-12: every visible GPU's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


# --------------------------------------------------------------------------- resuming and loading lib.train checkpoints

def load_weights(model: torch.nn.Module, path: str | os.PathLike, ema: bool = True) -> torch.nn.Module:
    """Load a lib.train checkpoint's weights into ``model`` (its EMA weights if it has them and ``ema``)."""
    state = load_train_checkpoint(path)
    if ema and state["ema"] is not None:
        weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    return model


def resume_state(resume: Any, ckpt_dir: Path, resolved: dict, world: int, main: bool,
                 may_differ: Iterable[str] = ()) -> dict | None:
    """The checkpoint state that ``fit(resume=...)`` continues from (None: start afresh), checked against this
    run's configuration (but ``may_differ``) and process count; a damaged checkpoint names the previous good one."""
    if resume is False or resume is None:
        return None
    auto = resume == "auto"
    resume = True if auto else resume
    path = ckpt_dir / "last.pt" if resume is True else Path(resume)
    if resume is True and not path.exists():
        if not any(ckpt_dir.glob("*.pt")):
            if not auto:
                raise CheckpointError(f"resume=True but {ckpt_dir} holds no checkpoint to continue: name the run with "
                                      f"$MEDIMG_RUN_ID (its folder under results/), or train without resume")
            if main:
                print(f"resume: no checkpoint under {ckpt_dir} yet (a stage the run had not reached): starting it")
            return None
    try:
        state = load_train_checkpoint(path)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e}. {_offer(ckpt_dir, path)}", _fallback(ckpt_dir, path)) from None
    except FileNotFoundError:
        if resume is True:
            raise CorruptCheckpointError(f"{path} is missing. {_offer(ckpt_dir, path)}", _fallback(ckpt_dir, path)) from None
        raise
    diff = config_diff(state["config"], resolved, ignore=may_differ)
    if diff:
        raise ConfigMismatchError(f"{path}: refusing to resume: this run's configuration differs from the "
                                  f"checkpoint's in {len(diff)} key(s):\n  " + "\n  ".join(diff) +
                                  "\nResume with the original values, or start a new run in a new out_dir.")
    if state["world_size"] != world and not finished(state):
        p = state["progress"]
        raise ConfigMismatchError(
            f"{path}: refusing to resume: written by {state['world_size']} process(es) at epoch {p['epoch']} of "
            f"{state['config'].get('epochs')}, this run has {world}: the batches of a step, the steps of an epoch "
            f"(hence the learning-rate schedule) and every rank's RNG stream would differ. Resume with "
            f"{state['world_size']} process(es) (gpus={state['world_size']}, or torchrun --nproc_per_node), or start "
            f"a new run from these weights. A finished run resumes with any number (nothing is left to train).")
    if main:
        p = state["progress"]
        print(f"resume: {path} (epoch {p['epoch']}, step {p['step']}, {p['batch']} batches into the next epoch)")
    return state


def finished(state: dict) -> bool:
    """Whether a checkpoint's run trained all its epochs (then its process count no longer matters)."""
    p, epochs = state["progress"], state["config"].get("epochs")
    return isinstance(epochs, int) and p["epoch"] >= epochs and p["batch"] == 0


def _fallback(ckpt_dir: Path, bad: Path) -> Path | None:
    found = newest_loadable(ckpt_dir, exclude=[bad])
    return found[0] if found else None


def _offer(ckpt_dir: Path, bad: Path) -> str:
    found = newest_loadable(ckpt_dir, exclude=[bad])
    if found is None:
        return f"No other checkpoint under {ckpt_dir} loads: start again with resume=False in a new out_dir"
    path, p = found
    return (f"The previous good checkpoint is {path} (epoch {p['epoch']}, step {p['step']}): continue from it "
            f"with resume={str(path)!r}")


# --------------------------------------------------------------------------- the 03_pretrain encoder
# ``<run>/encoder.pt``: {"format": ENCODER_FORMAT, "config": WaveFormer3D's constructor arguments,
# "state_dict": its weights, "meta": free-form (notebook, run id, preset, epoch, ...)}.

ENCODER_FORMAT = "lib.models.pretrainer/encoder-1"  # the name stays: encoder.pt files of earlier runs carry it


def save_encoder(encoder: torch.nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    """Write ``{"format", "config", "state_dict", "meta"}`` (see the module docstring) atomically."""
    from lib.models.waveformer import WaveFormer3D

    if not isinstance(encoder, WaveFormer3D):
        raise ValueError(f"save_encoder: expected a WaveFormer3D, got {type(encoder).__name__}")
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    return save(path, {"format": ENCODER_FORMAT, "config": dict(encoder.config), "state_dict": state,
                            "meta": plain(meta)})


def _encoder_args(config: Mapping[str, Any]) -> dict[str, Any]:
    from lib.config import args_for
    from lib.models.waveformer import WaveFormer3D

    return args_for(WaveFormer3D, config)


def load_encoder(path: str | os.PathLike, map_location: Any = "cpu") -> torch.nn.Module:
    """The pre-trained WaveFormer3D of a 03_pretrain run, frozen, for feature extraction.

    ``path``: a run folder (reads its ``encoder.pt``), an ``encoder.pt``, or a ``lib.train`` checkpoint of
    the pretrainer (``checkpoints/last.pt`` / ``best.pt``: its EMA weights if it has them, and the
    constructor arguments from its stored configuration). Loaded with ``weights_only=True``.

    Returns the encoder in eval mode with ``requires_grad_(False)``; ``encoder(x)`` with ``x``
    [B, 1 or 3, D, H, W] (multiples of ``encoder.patch_size``) returns the list of the ``depth`` block
    feature maps [B, E, D/p, H/p, W/p] (the last one layer-normalised).
    """
    from lib.models.waveformer import WaveFormer3D

    path = Path(path)
    if path.is_dir():
        path = path / "encoder.pt"
    obj = load(path, map_location=map_location)
    kind = obj.get("format") if isinstance(obj, dict) else None
    if kind == ENCODER_FORMAT:
        config, state = obj["config"], obj["state_dict"]
    elif kind == FORMAT:
        prefix = "module.encoder." if obj.get("ema") is not None else "encoder."
        weights = obj["ema"] if obj.get("ema") is not None else obj["model"]
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        config = _encoder_args(obj["config"])
        if not state:
            raise CheckpointError(f"{path}: a lib.train checkpoint without encoder weights (not a 03_pretrain run)")
    else:
        raise CheckpointError(f"{path}: not an encoder checkpoint (format {kind!r}); expected "
                                   f"{ENCODER_FORMAT!r} or a lib.train checkpoint of 03_pretrain")
    config = {**_encoder_args(config), "return_intermediate": True, "grad_checkpointing": False}
    encoder = WaveFormer3D(**config)
    encoder.load_state_dict(state)
    encoder.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return encoder.eval().requires_grad_(False)
