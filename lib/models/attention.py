"""How attention over short sequences runs on a CPU under autocast, and layouts after MONAI attention blocks.

On a CPU under bf16 autocast, torch 2.13's ``F.scaled_dot_product_attention`` is slow for short
sequences with either kernel it has there: flash attention (its choice), and the math kernel, which
computes in float32 and guards its softmax against fully masked rows. Plain matmul-softmax-matmul in
bf16 beats both up to about 128 tokens; from 256 tokens on, flash is fastest. Forward + backward,
bf16, heads of 32 channels, measured side by side::

    [batch, heads, tokens]   flash     math   explicit
    [64, 4, 16]              11.0 ms   3.5 ms   2.3 ms
    [64, 4, 64]              25.7     13.3      5.3
    [64, 4, 256]             88.5    181.8    118.5
    [4, 4, 1024]             56.5    169.4    102.9

The families' attention over pooled token grids, small spatial maps and patch tokens is of the short
kind. :func:`attention` is SDPA with that choice made (:func:`explicit_attention` is the explicit form,
which the denoiser's temporal attention, always over a few frames, uses on every device), for the
project's own attention code;
:func:`route_short_sequences` makes the same choice for MONAI ``SABlock`` s (their einsum path or their
SDPA call). Either changes nothing in float32 or on a GPU: SDPA runs, as before.

:func:`contiguous_outputs` keeps MONAI attention blocks from handing channels-last tensors to the
GroupNorms after them (a slow path on a CPU).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

SHORT_SEQUENCE = 128  # tokens; up to here matmul-softmax-matmul beats SDPA in bf16 on the CPU (measured)


def _on_cpu_under_autocast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def explicit_attention_wanted(x: torch.Tensor, tokens: int) -> bool:
    """True when ``x`` is on a CPU under autocast and the attention spans at most :data:`SHORT_SEQUENCE` tokens."""
    return _on_cpu_under_autocast(x) and tokens <= SHORT_SEQUENCE


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(channels)) v as matmul-softmax-matmul (``[..., tokens, channels]``)."""
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout; ``[..., tokens, channels]``), computed
    as matmul-softmax-matmul in the autocast dtype where :func:`explicit_attention_wanted` says so for the
    longer of the query and key sequences."""
    if explicit_attention_wanted(q, max(q.shape[-2], k.shape[-2])):
        return explicit_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def route_short_sequences(blocks: Iterable[torch.nn.Module], x: torch.Tensor, tokens: int) -> None:
    """Point MONAI ``SABlock`` s (built with ``use_flash_attention=True``) at their explicit einsum path
    where :func:`explicit_attention_wanted` says so, at SDPA otherwise. Call it in the forward that runs
    them, every time: activation checkpointing recomputes that forward under the same autocast state,
    so the recomputation takes the same path."""
    sdpa = not explicit_attention_wanted(x, tokens)
    for block in blocks:
        block.use_flash_attention = sdpa


def contiguous_under_cpu_autocast(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()`` on a CPU under autocast, ``x`` otherwise.

    MONAI's ``SpatialAttentionBlock`` returns its result with channels-last strides. Convolutions and
    additions keep that layout, so every later ``GroupNorm`` gets channels-last input, on which torch
    2.13's CPU kernels run 6-13x slower in bf16, forward and backward (``[16, 32, 128, 128]``: 148 against
    24 ms); in the FrameVAE at the subset preset that was a third of the training step. In float32 the
    channels-last convolutions gain more than the norms lose (the FrameVAE step was 20 % slower made
    contiguous), and on a GPU nothing is known to be slow: there the layout stays. Values are those of
    the other layout up to float rounding (the layers after it sum in another order).
    """
    return x.contiguous() if _on_cpu_under_autocast(x) else x


def contiguous_outputs(model: torch.nn.Module, block_type: type) -> int:
    """Pass the output of every ``block_type`` submodule of ``model`` through
    :func:`contiguous_under_cpu_autocast` (a forward hook; the state dict is unchanged). Returns how many
    blocks were hooked."""
    hooked = 0
    for module in model.modules():
        if isinstance(module, block_type):
            module.register_forward_hook(lambda _m, _args, out: contiguous_under_cpu_autocast(out))
            hooked += 1
    return hooked
