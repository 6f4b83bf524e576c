"""lib.models.diffusion: the series denoiser and the stage-2 model; with the family's MONAI cosine/v-prediction/DDIM
schedules (against the closed forms) and sampling loop (lib.families.ct_diffusion: reproducible), the training loss
(lib.losses.diffusion), the stage-2 model through lib.train.fit, and a grayscale float32 path from the data set to
the generated series."""

from functools import partial

import numpy as np
import pytest
import torch

from lib.families import ct_diffusion as F
from lib.losses import diffusion as L
from lib.models import diffusion as D
from lib.models.vae import FrameVAE

TINY = dict(latent_channels=4, cond_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            num_head_channels=8, norm_num_groups=8)


def tiny_denoiser(**kw):
    torch.manual_seed(0)
    return D.SeriesDenoiser(**{**TINY, **kw})


def tiny_vae():
    torch.manual_seed(0)
    return FrameVAE(channels=(8, 8, 8), num_res_blocks=1, norm_num_groups=8, scale_factor=1.0)


class Oracle(torch.nn.Module):
    """A stand-in denoiser: a fixed function of (z_t, t, cond), so samplers can be checked exactly."""

    def forward(self, z, t, cond):
        return 0.5 * z - 0.3 * cond + 1e-3 * t.float().reshape(-1, 1, 1, 1, 1)


def test_shapes_and_checks():
    m = tiny_denoiser()
    x, c = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    out = m(x, torch.tensor([1, 999]), c)
    assert out.shape == x.shape and out.dtype == torch.float32
    with pytest.raises(ValueError, match="cond"):
        m(x, torch.tensor([1, 2]), torch.randn(2, 4, 2, 8, 8))            # T differs
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 3, 3, 8, 8), torch.tensor([1, 2]), c)            # 3 channels
    with pytest.raises(ValueError, match="divisible by 2"):
        m(torch.randn(2, 4, 3, 7, 7), torch.tensor([1, 2]), torch.randn(2, 4, 3, 7, 7))
    with pytest.raises(ValueError, match="timesteps"):
        m(x, torch.tensor([1]), c)
    with pytest.raises(ValueError, match="offending"):
        D.SeriesDenoiser(**{**TINY, "model_channels": 12})
    with pytest.raises(ValueError, match="one entry per level"):
        D.SeriesDenoiser(**{**TINY, "attention_levels": (True,)})


def _perturb(m):
    """Temporal attention starts as the identity (zero output projection); give it weights."""
    torch.manual_seed(1)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def test_frames_attend_to_each_other_only_through_temporal_attention():
    x, c = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 4, 8, 8)
    t = torch.tensor([500])
    changed = x.clone()
    changed[:, :, 0] += 1.0  # change the first frame only
    for temporal, mixes in ((None, True), ((False, False), False)):
        m = _perturb(tiny_denoiser(temporal_levels=temporal)).eval()
        if temporal is not None:
            m.mid[0].temporal = None  # the middle block's temporal attention too
        delta = (m(changed, t, c) - m(x, t, c)).abs().amax(dim=(0, 1, 3, 4))
        assert delta[0] > 1e-4
        assert bool((delta[1:] > 1e-6).all()) is mixes


def test_temporal_attention_computes_what_monai_sablock_computes():
    # forward uses SABlock's projections around its own matmul-softmax-matmul; SABlock.forward is the reference
    torch.manual_seed(0)
    layer = D.TemporalAttention(32, num_head_channels=8, norm_num_groups=8)
    torch.nn.init.normal_(layer.attn.out_proj.weight, std=0.1)  # zero at initialisation
    batch, frames = 2, 5
    x = torch.randn(batch * frames, 32, 3, 4, requires_grad=True)
    y = layer.norm(x).reshape(batch, frames, 32, 12).permute(0, 3, 1, 2).reshape(batch * 12, frames, 32)
    y = layer.attn(y + D.get_timestep_embedding(torch.arange(frames), 32))
    reference = x + y.reshape(batch, 12, frames, 32).permute(0, 2, 3, 1).reshape(x.shape)
    out = layer(x, batch)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    g_out, g_ref = (torch.autograd.grad(v.square().sum(), [x, layer.attn.qkv.weight]) for v in (out, reference))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, x)  # the attention contributes


def test_prod_configuration():
    m = D.SeriesDenoiser()  # model channels 128, multipliers 1, 2, 4, 4, attention at levels 1 and 2
    assert [len(blocks) for blocks in m.down] == [2, 2, 2, 2]
    assert [blocks[0].attn is not None for blocks in m.down] == [False, True, True, False]
    assert all(blocks[0].temporal is not None for blocks in m.down)
    assert m.down[3][0].res.out_channels == 512
    assert 100e6 < sum(p.numel() for p in m.parameters()) < 130e6


def test_cosine_schedule_matches_the_closed_form():
    sched = F.noise_scheduler()
    T, s = 1000, 8e-3
    t = np.arange(T + 1)
    f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)  # Nichol & Dhariwal clip the betas at 0.999
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-4, atol=1e-9)
    assert float(sched.alphas_cumprod[-1]) < 1e-8  # SNR ~ 0 at the end: why v-prediction
    assert sched.prediction_type == "v_prediction"
    ddim = F.ddim_scheduler()
    assert ddim.clip_sample is False and len(ddim.timesteps) == 50 and int(ddim.timesteps[0]) == 999
    torch.testing.assert_close(ddim.alphas_cumprod, sched.alphas_cumprod)


def test_ddim_sampling_matches_a_reference_loop_and_does_not_clip():
    ldm = D.LatentDiffusion(tiny_vae(), tiny_denoiser())
    ldm.denoiser = Oracle()
    cond = torch.randn(2, 4, 3, 4, 4) * 3  # latents well outside [-1, 1]
    got = F.sample(ldm, cond, num_inference_steps=10, seed=7)

    # DDIM (Song et al. 2021, eq. 12, eta = 0) with v-prediction, written from the formulas
    a = F.noise_scheduler().alphas_cumprod.double()
    z = torch.randn(cond.shape, generator=torch.Generator().manual_seed(7)).double()
    steps = torch.linspace(999, 0, 10).round().long()
    for t in steps.tolist():
        prev = t - 1000 // 10
        a_t, a_prev = a[t], (a[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        v = Oracle()(z.float(), torch.tensor([t, t]), cond).double()
        x0 = a_t.sqrt() * z - (1 - a_t).sqrt() * v
        eps = a_t.sqrt() * v + (1 - a_t).sqrt() * z
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got, z.float(), rtol=1e-4, atol=1e-4)
    assert float(got.abs().max()) > 1.5  # no clipping of the predicted x0 to [-1, 1]


def test_sampling_is_reproducible():
    ldm = D.LatentDiffusion(tiny_vae(), _perturb(tiny_denoiser())).eval()
    baseline = torch.rand(1, 1, 3, 16, 16) * 2 - 1
    a = F.translate(ldm, baseline, num_inference_steps=4, seed=3)
    b = F.translate(ldm, baseline, num_inference_steps=4, seed=3)
    c = F.translate(ldm, baseline, num_inference_steps=4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == baseline.shape and a.dtype == torch.float32
    d = F.translate(ldm, baseline, num_inference_steps=4, seed=3, eta=1.0)
    assert torch.equal(d, F.translate(ldm, baseline, num_inference_steps=4, seed=3, eta=1.0)) and not torch.equal(a, d)
    with pytest.raises(ValueError, match="num_inference_steps"):
        F.sample(ldm, torch.zeros(1, 4, 1, 4, 4), num_inference_steps=0)


def test_diffusion_loss_targets_the_velocity():
    seen = {}

    class Zero(torch.nn.Module):
        def forward(self, zt, t, cond):
            seen.update(zt=zt, t=t)
            return torch.zeros_like(zt)

    sched = F.noise_scheduler()
    z0 = torch.randn(3, 4, 2, 4, 4)
    loss, parts = L.diffusion_loss(Zero(), z0, torch.zeros_like(z0), sched)
    a = sched.alphas_cumprod[seen["t"]].reshape(-1, 1, 1, 1, 1)
    eps = (seen["zt"] - a.sqrt() * z0) / (1 - a).sqrt()
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    torch.testing.assert_close(loss, (v ** 2).mean(), rtol=1e-3, atol=1e-5)
    assert set(parts) == {"mse_latent"}


def test_stage_two_model_freezes_the_vae_and_checkpoints_its_scale(tmp_path):
    from lib.train import fit, load_weights

    vae = tiny_vae()
    ldm = D.LatentDiffusion(vae, tiny_denoiser())
    assert not any(p.requires_grad for p in ldm.vae.parameters())
    assert all(p.requires_grad for p in ldm.denoiser.parameters())
    ldm.train()
    assert not ldm.vae.training and ldm.denoiser.training
    frozen = {k: v.clone() for k, v in ldm.vae.state_dict().items()}
    torch.manual_seed(0)
    z = torch.randn(4, 4, 2, 4, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(z, z.flip(2)), batch_size=2)
    opt = torch.optim.AdamW(ldm.denoiser.parameters(), lr=1e-3)
    config = {"epochs": 1, "best_metric": None, "amp": False, "log_every": 1}
    result = fit(ldm, partial(F.denoiser_step, scheduler=F.noise_scheduler()), loader, opt,
                 out_dir=tmp_path, config=config, device=torch.device("cpu"))
    assert result.status == "completed"
    for k, v in ldm.vae.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    fresh = D.LatentDiffusion(FrameVAE(channels=(8, 8, 8), num_res_blocks=1, norm_num_groups=8), tiny_denoiser())
    load_weights(fresh, result.checkpoint)
    assert float(fresh.vae.scale_factor) == 1.0  # the latent scale travels in the stage-2 checkpoint
    for a, b in zip(fresh.denoiser.parameters(), ldm.denoiser.parameters()):
        assert torch.equal(a, b)


def test_grayscale_float32_end_to_end(smoke_cohort):
    """Data set → VAE → denoiser → DDIM → decoded series: no tensor on the path is uint8 or has 3 channels,
    and every floating tensor is float32 (no quantisation, no RGB replication, no half precision)."""
    from lib.data.datasets import SeriesPairs

    seen = []

    def record(module, inputs, output):
        for t in [*inputs, *(output if isinstance(output, (tuple, list)) else [output])]:
            if torch.is_tensor(t):
                seen.append((type(module).__name__, t.dtype, tuple(t.shape)))

    item = SeriesPairs(smoke_cohort, "test", frames=2, size=32)[0]
    seen += [("SeriesPairs", item[k].dtype, (1, *item[k].shape)) for k in ("baseline", "target")]
    vae = FrameVAE(channels=(8, 8, 8, 8), num_res_blocks=1, norm_num_groups=8, scale_factor=1.0)
    ldm = D.LatentDiffusion(vae, tiny_denoiser()).eval()
    handles = [m.register_forward_hook(record) for m in ldm.modules()]
    out = F.translate(ldm, item["baseline"][None], num_inference_steps=2, seed=0)
    for h in handles:
        h.remove()
    seen.append(("generated", out.dtype, tuple(out.shape)))
    assert out.shape == (1, 1, 2, 32, 32)
    assert len(seen) > 100
    bad = [s for s in seen if s[1] == torch.uint8 or (s[1].is_floating_point and s[1] != torch.float32)
           or (len(s[2]) >= 4 and s[2][1] == 3)]
    assert not bad, bad[:5]
    assert all(s[2][1] == 1 for s in seen if s[0] in ("SeriesPairs", "generated"))


@pytest.mark.slow
def test_a_tiny_denoiser_learns_a_conditional_translation():
    """Target latents = cond + 2 in a square that moves from frame to frame ("enhancement"); after a short
    training the DDIM samples get that change right, far closer to the target there than the identity."""
    torch.manual_seed(0)
    n, t = 64, 3
    cond = torch.randn(n, 4, t, 4, 4) * 0.5
    mask = torch.zeros(1, 1, t, 4, 4)
    for f in range(t):
        mask[..., f, f:f + 2, 1:3] = 1
    target = cond + 2 * mask
    m = D.LatentDiffusion(tiny_vae(), tiny_denoiser())
    sched = F.noise_scheduler()
    opt = torch.optim.AdamW(m.denoiser.parameters(), lr=3e-3)
    for step in range(200):
        idx = torch.randint(0, n, (16,))
        loss, _ = L.diffusion_loss(m, target[idx], cond[idx], sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    out = F.sample(m, cond[:8], num_inference_steps=20, seed=0)
    inside = mask.expand_as(out) > 0
    err = (out - target[:8])[inside].abs().mean()
    identity = (cond[:8] - target[:8])[inside].abs().mean()  # = 2
    assert float(err) < 0.25 * float(identity), (float(err), float(identity))


def test_series_affine_places_generated_frames_where_they_came_from(smoke_cohort):
    """NIfTI export of a frame stack: every (frame, row, column) maps back onto the source voxel it came from."""
    from lib.data.datasets import SeriesPairs
    from lib.data.io import load_volume
    from lib.data.transforms import WINDOWS, window

    ds = SeriesPairs(smoke_cohort, "test", frames=4, size=48)  # the smoke grid is 48 x 48 in-plane: no resize
    item = ds[0]
    v = load_volume(smoke_cohort / "chest_ct" / item["subject"] / "noncontrast.nii.gz", channels=(1,))
    assert v.spatial_shape[:2] == (48, 48)
    affine = ds.series_affine(item["subject"], item["start"])
    source = window(v.array[0], *WINDOWS["diffusion"], out_range=(-1.0, 1.0))
    rng = np.random.default_rng(0)
    for f, r, c in zip(rng.integers(0, 4, 20), rng.integers(0, 48, 20), rng.integers(0, 48, 20)):
        voxel = np.linalg.solve(v.affine, affine @ np.array([f, r, c, 1.0]))[:3]
        np.testing.assert_allclose(voxel, np.round(voxel), atol=1e-6)
        i, j, k = np.round(voxel).astype(int)
        assert source[i, j, k] == pytest.approx(float(item["baseline"][0, f, r, c]), abs=1e-6)
    # resized frames keep the field of view: the in-plane centre maps onto the same world point
    small = SeriesPairs(smoke_cohort, "test", frames=4, size=16)
    a16 = small.series_affine(item["subject"], item["start"])
    np.testing.assert_allclose(a16 @ np.array([0, 7.5, 7.5, 1]), affine @ np.array([0, 23.5, 23.5, 1]), atol=1e-6)
