"""Which ``F.scaled_dot_product_attention`` kernel runs attention over short sequences on a CPU.

On a CPU under bf16 autocast, torch 2.13's flash-attention kernel (what SDPA picks there) is several
times slower than the plain "math" kernel (matmul, softmax, matmul) for short sequences: forward +
backward of [64 frames, 8 heads, 16 tokens, 32] took 19 ms against 3.5 ms, and it stays behind up to
about 128 tokens; from 256 tokens on, flash is faster (``lib.bench``, section 2, and its notes). The
families' attention over pooled token grids, small spatial maps and patch tokens is of that kind (the
denoiser's temporal attention, over a few frames, computes matmul-softmax-matmul itself).

:func:`short_sequence_attention` is the context for such a call (also around MONAI blocks, whose SDPA
calls it reaches). It changes nothing in float32 or on a GPU: the same kernel runs, bit for bit.

:func:`contiguous_outputs` keeps MONAI attention blocks from handing channels-last tensors to the
GroupNorms after them (a slow path on a CPU).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SHORT_SEQUENCE = 128  # tokens; up to here the math kernel beats flash in bf16 on the CPU (measured)


def short_sequence_attention(x: torch.Tensor, tokens: int) -> contextlib.AbstractContextManager:
    """The math SDPA kernel when ``x`` is on a CPU under autocast and the attention spans at most
    :data:`SHORT_SEQUENCE` tokens; otherwise nothing (torch's own choice)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and tokens <= SHORT_SEQUENCE:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


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
    return x.contiguous() if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else x


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
