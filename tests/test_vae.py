"""lib.models.vae (per-frame KL autoencoder, latent scale factor) and its losses in lib.losses.diffusion
(cross-checked against MONAI and torch)."""

import pytest
import torch
from monai.losses import PatchAdversarialLoss
from monai.metrics import MultiScaleSSIMMetric

from lib.losses import diffusion as L
from lib.models import vae as V

TINY = dict(channels=(8, 8, 16), num_res_blocks=1, norm_num_groups=8)


def tiny(**kw):
    torch.manual_seed(0)
    return V.FrameVAE(**{**TINY, **kw})


def test_shapes_and_compression():
    m = V.FrameVAE(channels=(8, 8, 8, 8), num_res_blocks=1, norm_num_groups=8, latent_channels=4)
    x = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    recon, mu, sigma = m(x)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert mu.shape == sigma.shape == (2, 4, 3, 4, 4)  # 8x spatial compression with four levels
    assert m.latent_shape(3, 32, 32) == (4, 3, 4, 4)
    assert (sigma > 0).all()


def test_frames_are_encoded_independently_like_autoencoderkl():
    m = tiny().eval()
    x = torch.rand(2, 1, 3, 16, 16) * 2 - 1
    mu = m.encode_unscaled(x)
    for b in range(2):
        for t in range(3):
            ref = m.autoencoder.encode(x[b, :, t][None])[0][0]
            torch.testing.assert_close(mu[b, :, t], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.encode_unscaled(x, chunk=2), mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x,message", [
    (torch.zeros(1, 3, 2, 16, 16), "1 channel"),                        # RGB replication is refused
    (torch.zeros(1, 1, 2, 16, 16, dtype=torch.uint8), "float"),        # quantised input is refused
    (torch.zeros(1, 1, 16, 16), "series"),                             # a frame, not a series
    (torch.zeros(1, 1, 2, 18, 16), "divisible by 4"),
])
def test_bad_input_is_refused(x, message):
    with pytest.raises(ValueError, match=message):
        tiny()(x)


@pytest.mark.parametrize("kw,message", [
    ({"channels": (8,)}, "at least 2 levels"),
    ({"channels": (8, 12)}, "offending: \\[12\\]"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"scale_factor": -1.0}, "scale_factor"),
    ({"attention_levels": (False,)}, "one entry per level"),
])
def test_bad_construction_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        V.FrameVAE(**{**TINY, **kw})


def test_scale_factor_is_computed_stored_and_applied():
    m = tiny().eval()
    x = torch.rand(2, 1, 2, 16, 16) * 2 - 1
    with pytest.raises(RuntimeError, match="scale factor is not set"):
        m.encode(x)
    z = m.encode_unscaled(x)
    scale = m.fit_scale_factor([z[:1], z[1:]])
    assert scale == pytest.approx(1 / float(z.detach().std()), rel=1e-5)
    zs = m.encode(x)
    torch.testing.assert_close(zs, z * scale)
    assert float(zs.detach().std()) == pytest.approx(1.0, rel=1e-4)
    # decode undoes the scale: decode(encode(x)) is the autoencoder's decoding of the posterior mean
    ref = m.autoencoder.decode(V.to_frames(z))
    torch.testing.assert_close(V.to_frames(m.decode(zs)), ref, rtol=1e-4, atol=1e-5)
    # the factor travels with the weights (a buffer in the state dict, so in every checkpoint)
    fresh = tiny()
    assert not fresh.has_scale_factor
    fresh.load_state_dict(m.state_dict())
    assert float(fresh.scale_factor) == pytest.approx(scale)


def test_a_fixed_scale_factor_is_kept():
    m = tiny(scale_factor=0.18215)
    assert m.has_scale_factor and float(m.scale_factor) == pytest.approx(0.18215)


def test_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mu, sigma = torch.randn(2, 4, 3, 5, 5), torch.rand(2, 4, 3, 5, 5) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0, 1))
    expected = ref.sum(dim=(1, 3, 4)).mean()  # per frame, averaged over frames and series
    torch.testing.assert_close(L.kl_divergence(mu, sigma), expected)
    assert float(L.kl_divergence(torch.zeros(1, 4, 1, 2, 2), torch.ones(1, 4, 1, 2, 2))) == 0.0


def test_ms_ssim_loss_matches_monai_metric():
    torch.manual_seed(2)
    x = torch.rand(1, 1, 2, 64, 64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    weights, k = L.ms_ssim_weights(64)
    assert (len(weights), k) == (4, 7) and sum(weights) == pytest.approx(1.0)
    assert len(L.ms_ssim_weights(32)[0]) == 3
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=2.0, kernel_size=k, weights=weights)
    expected = 1 - metric(V.to_frames(y), V.to_frames(x)).mean()
    torch.testing.assert_close(L.ms_ssim_loss(y, x), expected)
    assert float(L.ms_ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert L.ms_ssim_weights(256)[0] == pytest.approx(L.MS_SSIM_WEIGHTS, rel=1e-2)  # 5 scales at 256²


def test_vae_loss_parts_and_weights():
    m = tiny()
    x = torch.rand(1, 1, 2, 32, 32) * 2 - 1
    torch.manual_seed(3)
    loss, parts = L.vae_loss(m, x, kl_weight=1e-3, ms_ssim_weight=0.5)
    assert set(parts) == {"rec", "kl", "ms_ssim"}
    expected = parts["rec"] + 1e-3 * parts["kl"] + 0.5 * (1 - parts["ms_ssim"])
    torch.testing.assert_close(loss.detach(), expected)
    with pytest.raises(ValueError, match="discriminator_channels"):
        L.vae_loss(m, x, adv_weight=0.1)


def test_adversarial_terms_reach_only_their_own_parameters():
    """One backward of the total trains both players correctly: the autoencoder's gradient is that of
    rec + kl + w * adv_g, the discriminator's that of adv_d (computed here independently)."""
    m = tiny(discriminator_channels=8, discriminator_layers=2)
    x = torch.rand(2, 1, 2, 32, 32) * 2 - 1
    ae, disc = list(m.autoencoder.parameters()), list(m.discriminator.parameters())
    torch.manual_seed(4)
    loss, parts = L.vae_loss(m, x, kl_weight=1e-4, adv_weight=0.5)
    assert {"adv_g", "adv_d"} <= set(parts)
    g_ae = torch.autograd.grad(loss, ae, retain_graph=True)
    g_disc = torch.autograd.grad(loss, disc)

    adv = PatchAdversarialLoss(criterion="least_squares")
    torch.manual_seed(4)  # the same latent sample
    recon, mu, sigma = m(x)
    fake, real = V.to_frames(recon), V.to_frames(x)
    disc_loss = 0.5 * (adv(m.discriminator(fake.detach())[-1], target_is_real=False, for_discriminator=True)
                       + adv(m.discriminator(real)[-1], target_is_real=True, for_discriminator=True))
    gen_loss = (torch.nn.functional.l1_loss(recon, x) + 1e-4 * L.kl_divergence(mu, sigma)
                + 0.5 * adv(m.discriminator(fake)[-1], target_is_real=True, for_discriminator=False))
    for got, ref in zip(g_ae, torch.autograd.grad(gen_loss, ae, retain_graph=True)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    for got, ref in zip(g_disc, torch.autograd.grad(disc_loss, disc)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_weights_load_with_or_without_a_discriminator():
    with_d = tiny(discriminator_channels=8, discriminator_layers=2, scale_factor=0.5)
    plain = tiny()
    plain.load_state_dict(with_d.state_dict())
    assert float(plain.scale_factor) == 0.5
    for a, b in zip(plain.autoencoder.parameters(), with_d.autoencoder.parameters()):
        assert torch.equal(a, b)
    again = tiny(discriminator_channels=8, discriminator_layers=2)
    again.load_state_dict(plain.state_dict())  # the discriminator keeps its fresh weights
    with pytest.raises(RuntimeError, match="Missing key"):
        plain.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "scale_factor"})


def test_parameter_groups():
    m = tiny(discriminator_channels=8, discriminator_layers=2)
    groups = m.parameter_groups(1e-3, 5e-3)
    assert [g["lr"] for g in groups] == [1e-3, 5e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_a_tiny_vae_learns_to_reconstruct():
    torch.manual_seed(6)
    m = tiny()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x = torch.stack([((xx - c) ** 2 + yy ** 2 < 0.3).float() * 1.5 - 0.75 for c in (-0.4, 0.0, 0.4, 0.2)])
    x = x.reshape(1, 1, 4, 16, 16)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, parts = L.vae_loss(m, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(parts["rec"]) if first is None else first
    assert float(parts["rec"]) < 0.5 * first
