"""lib.models.attention: the math SDPA kernel for short sequences on a CPU under autocast, nothing elsewhere."""

import torch
import torch.nn.functional as F

from lib.models.attention import SHORT_SEQUENCE, short_sequence_attention


def _qkv(tokens: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 2, tokens, 16, generator=g, dtype=dtype) for _ in range(3)]


def test_math_kernel_only_under_cpu_autocast_and_for_short_sequences():
    q, _, _ = _qkv(8)
    with short_sequence_attention(q, 8):  # float32: torch's own choice, untouched
        assert torch.backends.cuda.flash_sdp_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with short_sequence_attention(q, SHORT_SEQUENCE):
            assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        with short_sequence_attention(q, SHORT_SEQUENCE + 1):
            assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored


def test_float32_results_are_unchanged_and_bf16_ones_as_accurate():
    q, k, v = _qkv(64)
    with short_sequence_attention(q, 64):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    reference = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        default = F.scaled_dot_product_attention(q, k, v)
        with short_sequence_attention(q, 64):
            math = F.scaled_dot_product_attention(q, k, v)
    err_default, err_math = ((o.double() - reference).abs().max().item() for o in (default, math))
    assert err_math < 2e-2 and err_math <= 2 * err_default, (err_math, err_default)
