"""Device and mixed-precision choice, made in this one place.

Order: an explicit request (a notebook's ``device`` parameter) beats ``$MEDIMG_DEVICE``, which beats
auto-detection (cuda, then mps, then cpu). Code elsewhere takes the resulting ``torch.device`` and
never calls ``.cuda()``.

Autocast dtype: bf16 on CPU (fp16 matmul on CPUs without AVX512-FP16 runs ~1000x slower than bf16)
and on CUDA GPUs that support it natively (Ampere and newer); fp16 with a gradient scaler on older
GPUs such as Kaggle's T4 (sm_75); fp16 on Apple MPS. ``$MEDIMG_AMP_DTYPE`` (``float16`` or ``bfloat16``)
overrides the choice on a GPU, so that one Ampere+ machine can check the T4's fp16 path too
(``make gpu-check``); a CPU never takes fp16.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

ENV_VAR = "MEDIMG_DEVICE"
AMP_ENV_VAR = "MEDIMG_AMP_DTYPE"
_AMP_CHOICES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
CHOICES = "auto | cpu | cuda | cuda:N | mps"
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on. ``requested`` is ``None``/``"auto"`` or one of :data:`CHOICES`."""
    origin = "device parameter"
    choice = (requested or "auto").strip().lower()
    if choice == "auto" and os.environ.get(ENV_VAR):
        choice, origin = os.environ[ENV_VAR].strip().lower(), f"${ENV_VAR}"
    if not _PATTERN.match(choice):
        raise ValueError(f"{origin}: unknown device {choice!r}; valid choices: {CHOICES}")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{origin}: {choice!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
        index = int(choice.split(":")[1]) if ":" in choice else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{origin}: {choice!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if choice == "mps" and not _mps_available():
        raise ValueError(f"{origin}: 'mps' requested but Apple MPS is not available here; use 'auto' or 'cpu'")
    return torch.device(choice)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The mixed-precision dtype that fits ``device`` (never fp16 on a CPU); ``$MEDIMG_AMP_DTYPE`` overrides
    it on a GPU."""
    forced = os.environ.get(AMP_ENV_VAR, "").strip().lower()
    if forced and forced not in _AMP_CHOICES:
        raise ValueError(f"${AMP_ENV_VAR}: unknown autocast dtype {forced!r}; valid choices: float16, bfloat16")
    if forced and device.type in ("cuda", "mps"):
        return _AMP_CHOICES[forced]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def needs_grad_scaler(device: torch.device) -> bool:
    """fp16 autocast needs loss scaling against gradient underflow; bf16 does not."""
    return autocast_dtype(device) == torch.float16


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """``torch.autocast`` for ``device`` with :func:`autocast_dtype`."""
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device), enabled=enabled)


def describe(device: torch.device) -> dict:
    """What the device is, for run records."""
    info = {"device": str(device), "autocast_dtype": str(autocast_dtype(device)).replace("torch.", "")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or a dict, list, tuple or named tuple of them) with every tensor moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
