"""lib.models.attention: matmul-softmax-matmul for short sequences on a CPU under autocast (for the project's
own attention and MONAI's SABlocks), SDPA elsewhere; contiguous outputs of MONAI attention blocks."""

import pytest
import torch
import torch.nn.functional as F

from lib.models.attention import SHORT_SEQUENCE, attention, explicit_attention_wanted, route_short_sequences


def _qkv(tokens: int, dtype=torch.float32, keys: int | None = None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, tokens, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(4, 2, keys or tokens, 16, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def test_explicit_only_under_cpu_autocast_and_for_short_sequences():
    q, _, _ = _qkv(8)
    assert not explicit_attention_wanted(q, 8)  # float32: SDPA, untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert explicit_attention_wanted(q, SHORT_SEQUENCE)
        assert not explicit_attention_wanted(q, SHORT_SEQUENCE + 1)
    assert not explicit_attention_wanted(q.to("meta"), 8)


def test_float32_is_sdpa_bit_for_bit_and_bf16_as_accurate_as_sdpa():
    for tokens, keys in ((64, None), (16, 48)):  # self- and cross-attention (keys of other views)
        q, k, v = _qkv(tokens, keys=keys)
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        reference = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sdpa, ours = F.scaled_dot_product_attention(q, k, v), attention(q, k, v)
        # bf16 attention weights meet v in a bf16 matmul (as in MONAI's einsum path); flash keeps them in
        # float32: about 1.6x the error on average, within bf16's precision
        (mean_sdpa, max_sdpa), (mean_ours, max_ours) = (((o.double() - reference).abs().mean().item(),
                                                         (o.double() - reference).abs().max().item()) for o in (sdpa, ours))
        assert ours.shape == sdpa.shape and max_ours < 3e-2 and mean_ours <= 2 * mean_sdpa, (mean_ours, mean_sdpa, max_ours)


def test_cross_attention_length_counts_the_keys():
    q, k, v = _qkv(8, keys=SHORT_SEQUENCE + 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("amp,tokens,sdpa", [(False, 16, True), (True, 16, False), (True, SHORT_SEQUENCE + 1, True)])
def test_route_short_sequences_picks_monai_sablock_paths(amp, tokens, sdpa):
    from monai.networks.blocks import SABlock

    torch.manual_seed(0)
    block = SABlock(hidden_size=32, num_heads=2, qkv_bias=True, use_flash_attention=True)
    x = torch.randn(2, tokens, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        route_short_sequences([block], x, tokens)
        assert block.use_flash_attention is sdpa
        routed = block(x)
        block.use_flash_attention = True
        flash = block(x)
    if amp:
        torch.testing.assert_close(routed.float(), flash.float(), rtol=0, atol=3e-2)  # bf16, two summation orders
    else:
        assert torch.equal(routed, flash)


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
