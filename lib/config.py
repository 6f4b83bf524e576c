"""Presets: the named configurations of every notebook, defined once, here.

Each notebook declares its parameters (name, type, default, meaning) and four presets, nnU-Net style:

- ``smoke``:  CI on a CPU, seconds. Exercises every code path, learns nothing.
- ``demo``:   a laptop CPU, minutes, on the built-in demo cohort; learns something measurable.
- ``subset``: the validated small GPU configuration of the research notes.
- ``prod``:   the full configuration of the research notes (GPU, hours to days).

A preset is a small dictionary that only names what differs from the parameter defaults.
:func:`resolve` merges defaults, preset and explicit overrides, and checks every key and type, so a
typo or a wrong type fails loudly with the valid choices instead of silently training the wrong model.

In a notebook, the cell tagged ``parameters`` sets ``preset`` (default ``$PRESET`` or ``demo``) and
any override (``None`` means "the preset's value"); the next cell passes them to
:func:`lib.runs.start_notebook`, which calls :func:`params_from_namespace` and :func:`resolve`.
Papermill only warns about unknown ``-p`` names; the check here turns them into errors.
"""

from __future__ import annotations

import types
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

PRESETS = ("smoke", "demo", "subset", "prod")


@dataclass(frozen=True)
class Param:
    """One notebook parameter: its default, the accepted type(s), and what it means."""

    default: Any
    type: type | tuple[type, ...]
    help: str
    choices: tuple | None = None  # the allowed values, when the parameter is categorical
    range: str | None = None      # the allowed numbers: ">=1", ">0", ">=0", "(0,1)", "[0,1)", "[0,1]", "(0,0.5]"

    def __post_init__(self) -> None:
        if self.range is not None:
            _bounds(self.range)  # a malformed range fails where it is declared


def _bounds(spec: str) -> tuple[float, bool, float, bool]:
    """``(low, low inclusive, high, high inclusive)`` of a range such as ``">=1"``, ``">0"`` or ``"[0,1)"``."""
    s = spec.replace(" ", "")
    try:
        if s.startswith(">="):
            return float(s[2:]), True, math.inf, False
        if s.startswith(">"):
            return float(s[1:]), False, math.inf, False
        if s[0] in "([" and s[-1] in ")]":
            low, high = s[1:-1].split(",")
            return float(low), s[0] == "[", float(high), s[-1] == "]"
    except (ValueError, IndexError):
        pass
    raise ValueError(f"parameter range {spec!r}: write '>=N', '>N' or an interval such as '(0,1)' or '[0,1)'")


def in_range(value: Any, spec: str) -> bool:
    low, low_in, high, high_in = _bounds(spec)
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


@dataclass(frozen=True)
class NotebookSpec:
    params: dict[str, Param]
    presets: dict[str, dict[str, Any]]
    about: str = ""


@dataclass(frozen=True)
class Family:
    """A model family (:mod:`lib.families`), declared beside its notebook's presets."""

    name: str       # the family's key in results (summary rows, heldout_metrics.json)
    module: str     # lib.families.<module> holds its code
    notebook: str   # the notebook that trains it
    question: str   # what its headline row answers


class Config(dict):
    """A resolved configuration: a plain, JSON-serialisable dict that also allows ``cfg.key``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"configuration has no key {key!r}; keys: {sorted(self)}") from None


# Parameters every notebook has.
COMMON: dict[str, Param] = {
    "seed": Param(0, int, "seeds python, numpy, torch and data-loader workers (lib.runs.seed_everything)", range=">=0"),
    "device": Param("auto", str, "auto | cpu | cuda | cuda:N | mps; 'auto' honours $MEDIMG_DEVICE (lib.device)"),
    "deterministic": Param(False, bool, "torch.use_deterministic_algorithms: bit-exact reruns, slower"),
}


# Parameters of every training notebook (03-06). The names are those of lib.train.TrainSettings
# (which reads them from the resolved configuration) plus the optimiser and loader basics.
_OPT_FLOAT = (float, type(None))
TRAINING: dict[str, Param] = {
    "epochs": Param(1, int, "passes over the training data", range=">=0"),
    "batch_size": Param(2, int, "samples per micro-batch", range=">=1"),
    "lr": Param(1e-4, float, "peak learning rate (AdamW)", range=">0"),
    "weight_decay": Param(1e-4, float, "AdamW weight decay", range=">=0"),
    "grad_accum": Param(1, int, "micro-batches per optimizer step", range=">=1"),
    "clip_grad_norm": Param(1.0, _OPT_FLOAT, "clip the gradient norm to this; None: no clipping", range=">0"),
    "warmup_epochs": Param(0.0, float, "linear warm-up before the cosine decay, in epochs", range=">=0"),
    "ema_decay": Param(None, _OPT_FLOAT, "EMA of the weights (e.g. 0.999); None: off", range="(0,1)"),
    "val_every": Param(1, int, "validate every N epochs", range=">=1"),
    "ckpt_every": Param(0, int, "keep a checkpoint every N epochs besides last and best; 0: off", range=">=0"),
    "time_budget_s": Param(None, _OPT_FLOAT, "stop cleanly with a checkpoint before this many seconds (Kaggle: ~11.5 h)", range=">0"),
    "amp": Param(True, bool, "mixed precision (bf16 on CPU and Ampere+, fp16 + loss scaling on older GPUs)"),
    "num_workers": Param(0, int, "data-loader worker processes (per training process)", range=">=0"),
    "gpus": Param(1, int, "training processes, one per GPU (DDP; lib.multigpu): 1 this process, 0 every visible GPU "
                  "(Kaggle T4 x2: 0 or 2); batch_size is per process", range=">=0"),
    "resume": Param(False, bool, "continue the run whose folder is given by $MEDIMG_RUN_ID from its last checkpoint"),
}


def _spec(about: str, params: dict[str, Param] | None = None, training: bool = False,
          **presets: dict[str, Any]) -> NotebookSpec:
    missing = [p for p in PRESETS if p not in presets]
    if missing:
        raise ValueError(f"notebook spec {about!r} lacks presets {missing}")
    return NotebookSpec(params={**COMMON, **(TRAINING if training else {}), **(params or {})},
                        presets=presets, about=about)




def _spec_of(notebook: str) -> NotebookSpec:
    from lib.presets import NOTEBOOKS

    if notebook not in NOTEBOOKS:
        raise ValueError(f"unknown notebook {notebook!r}; valid notebooks: {', '.join(NOTEBOOKS)}")
    return NOTEBOOKS[notebook]


def _type_name(t: type | tuple[type, ...]) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("None" if x is type(None) else x.__name__ for x in ts)


def _check(notebook: str, key: str, value: Any, param: Param, origin: str) -> Any:
    accepted = param.type if isinstance(param.type, tuple) else (param.type,)
    # bool is an int in Python; a flag given as 1 or a count given as True is a mistake, not a cast.
    if isinstance(value, bool) and bool not in accepted:
        ok = False
    elif float in accepted and type(value) is int:
        return float(value)
    elif tuple in accepted and isinstance(value, list):
        return tuple(value)
    else:
        ok = isinstance(value, accepted)
    if not ok:
        raise ValueError(
            f"{notebook}: parameter {key!r} ({origin}) must be {_type_name(param.type)}, "
            f"got {type(value).__name__} {value!r}. {param.help}"
        )
    if param.choices is not None and value not in param.choices:
        raise ValueError(f"{notebook}: parameter {key!r} ({origin}) is {value!r}; valid choices: "
                         f"{', '.join(map(str, param.choices))}")
    if param.range is not None and value is not None and not in_range(value, param.range):
        raise ValueError(f"{notebook}: parameter {key!r} ({origin}) is {value!r}, outside its range {param.range}. "
                         f"{param.help}")
    return value


def resolve(notebook: str, preset: str, **overrides: Any) -> Config:
    """The complete, validated configuration of ``notebook`` under ``preset``.

    Defaults are overlaid by the preset, then by ``overrides``; an override of ``None`` keeps the
    preset's value (that is how the notebooks' parameters cells say "not set").
    Raises ``ValueError`` naming the valid choices for an unknown notebook, preset or key, and the
    expected type for a value of the wrong type.
    """
    spec = _spec_of(notebook)
    if not isinstance(preset, str) or preset not in spec.presets:
        raise ValueError(f"{notebook}: unknown preset {preset!r}; valid presets: {', '.join(spec.presets)}")
    unknown = sorted(set(overrides) - set(spec.params))
    if unknown:
        raise ValueError(
            f"{notebook}: unknown parameter(s) {', '.join(unknown)}; valid parameters: "
            f"preset, {', '.join(spec.params)}"
        )
    cfg = Config(notebook=notebook, preset=preset)
    for key, param in spec.params.items():
        value, origin = param.default, "default"
        if key in spec.presets[preset]:
            value, origin = spec.presets[preset][key], f"preset {preset}"
        if overrides.get(key) is not None:
            value, origin = overrides[key], "override"
        cfg[key] = _check(notebook, key, value, param, origin)
    return cfg


def describe(notebook: str) -> str:
    """A readable table of a notebook's parameters and presets (for docs and error messages)."""
    spec = _spec_of(notebook)
    lines = [f"{notebook}: {spec.about}", ""]
    for key, p in spec.params.items():
        per_preset = ", ".join(f"{name}={pre[key]!r}" for name, pre in spec.presets.items() if key in pre)
        lines.append(f"  {key} ({_type_name(p.type)}, default {p.default!r}) {p.help}"
                     + (f" [{per_preset}]" if per_preset else ""))
    return "\n".join(lines)


def args_for(cls: type, config: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """The keys of ``config`` that ``cls``'s constructor takes (by name; others are ignored)."""
    import inspect

    names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", *skip)]
    return {n: config[n] for n in names if n in config}


# Names IPython puts into a notebook's namespace by itself.
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def params_from_namespace(namespace: dict[str, Any]) -> dict[str, Any]:
    """The parameters a notebook defined (its ``parameters`` cell plus what papermill injected).

    Everything that is not private, an IPython built-in, a module, a function or a class counts, so
    a mistyped ``papermill -p epcohs 3`` reaches :func:`resolve` and fails there.
    """
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES:
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)):
            continue
        out[name] = value
    return out



def __getattr__(name: str) -> Any:
    # ``config.NOTEBOOKS``: the declarations of lib.presets, imported on first use (they import this module).
    if name == "NOTEBOOKS":
        from lib.presets import NOTEBOOKS

        return NOTEBOOKS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
