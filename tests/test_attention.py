"""lib.models.attention: the math SDPA kernel for short sequences on a CPU under autocast, nothing elsewhere;
contiguous outputs of MONAI attention blocks."""

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


def test_contiguous_outputs_changes_the_layout_not_the_result():
    from monai.networks.blocks import SpatialAttentionBlock
    from monai.networks.nets import AutoencoderKL

    from lib.models.attention import contiguous_outputs

    def net():
        torch.manual_seed(0)
        return AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                             num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False))

    hooked, plain = net(), net()
    assert contiguous_outputs(hooked, SpatialAttentionBlock) == 2  # the encoder's and the decoder's mid attention
    layouts = []
    norm = hooked.decoder.blocks[1].norm1  # the decoder's first GroupNorm after its mid attention
    norm.register_forward_pre_hook(lambda _m, args: layouts.append(args[0].is_contiguous()))
    x = torch.randn(2, 1, 16, 16)
    assert not hooked.encoder(x).is_contiguous()  # float32: the layout stays
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after, before = hooked.encoder(x), plain.encoder(x)
        hooked.decoder(after)
    assert after.is_contiguous() and not before.is_contiguous() and layouts == [True]
    torch.testing.assert_close(after.float(), before.float(), rtol=0, atol=0.02)  # bf16, another summation order
