"""DiT's diffusion maths: forward process, learned-range variance, VB term and timestep samplers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from hf_tuning.diffusion.gaussian import (
    GaussianDiffusion,
    TimestepSampler,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(linear_betas())


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False
    )


def test_linear_betas_and_tables_match_diffusers(diffusion: GaussianDiffusion) -> None:
    betas = linear_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    sched = _scheduler()
    torch.testing.assert_close(diffusion.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-6, atol=0)
    assert diffusion.alphas_cumprod_prev[0].item() == 1.0
    # The clipped log posterior variance repeats the t=1 value at t=0, where the true variance is 0.
    assert diffusion.posterior_variance[0].item() == 0.0
    assert diffusion.posterior_log_variance_clipped[0].item() == diffusion.posterior_log_variance_clipped[1].item()
    assert all(v.dtype == torch.float64 for v in (diffusion.posterior_mean_coef1, diffusion.posterior_mean_coef2))


def test_q_sample_equals_diffusers_add_noise(diffusion: GaussianDiffusion) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3, generator=gen)
    noise = torch.randn(6, 4, 3, 3, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    expected = _scheduler().add_noise(x0, noise, t)
    got = diffusion.q_sample(x0, t, noise)
    assert got.dtype == torch.float32
    # diffusers keeps its alphas_cumprod in float32 (1 - abar at t=0 carries ~1e-4 relative error): 1e-5 slack
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_from_scheduler_config_accepts_linear_and_rejects_others() -> None:
    gd = GaussianDiffusion.from_scheduler_config(_scheduler().config)
    torch.testing.assert_close(gd.betas, linear_betas())
    small = GaussianDiffusion.from_scheduler_config({"num_train_timesteps": 10, "beta_start": 0.001, "beta_end": 0.1})
    assert small.num_timesteps == 10 and small.betas[-1].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDiffusion.from_scheduler_config({"beta_schedule": "scaled_linear"})


def test_predict_x0_inverts_q_sample(diffusion: GaussianDiffusion) -> None:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    xt = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(xt, t, noise), x0)


def _setup(diffusion: GaussianDiffusion, t: list[int], seed: int = 2, shape=(2, 3, 4)):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(len(t), *shape, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(len(t), *shape, generator=gen, dtype=torch.float64)
    tt = torch.tensor(t)
    return x0, noise, tt, diffusion.q_sample(x0, tt, noise)


def test_kl_is_zero_for_true_noise_and_posterior_variance(diffusion: GaussianDiffusion) -> None:
    x0, noise, t, xt = _setup(diffusion, [2, 10, 500, 999])
    v = -torch.ones_like(x0)
    vb = diffusion.vb_bits(x0, xt, t, noise, v)
    assert vb.shape == (4,)
    assert vb.abs().max().item() < 1e-6
    # Fixed (None) variance is the same clipped posterior variance as v = -1.
    assert diffusion.vb_bits(x0, xt, t, noise, None).abs().max().item() < 1e-6
    # A wrong mean or a wrong variance costs bits.
    assert (diffusion.vb_bits(x0, xt, t, noise + 0.1, v) > 1e-6).all()
    # beta_t and the posterior variance only differ noticeably at small t
    assert (diffusion.vb_bits(x0, xt, t, noise, torch.ones_like(x0))[:2] > 1e-3).all()


def test_learned_range_interpolates_log_variance(diffusion: GaussianDiffusion) -> None:
    x0, noise, t, xt = _setup(diffusion, [1, 300])
    _, lo = diffusion.p_mean_log_variance(xt, t, noise, -torch.ones_like(x0))
    _, hi = diffusion.p_mean_log_variance(xt, t, noise, torch.ones_like(x0))
    _, mid = diffusion.p_mean_log_variance(xt, t, noise, torch.zeros_like(x0))
    for i, step in enumerate(t.tolist()):
        assert lo[i].flatten()[0].item() == pytest.approx(math.log(diffusion.posterior_variance[step].item()))
        assert hi[i].flatten()[0].item() == pytest.approx(math.log(diffusion.betas[step].item()))
    torch.testing.assert_close(mid, (lo + hi) / 2)


def test_decoder_nll_at_t0_matches_direct_normal_cdf(diffusion: GaussianDiffusion) -> None:
    gen = torch.Generator().manual_seed(3)
    shape = (3, 2, 5, 5)
    x0 = torch.randint(0, 256, shape, generator=gen).double() / 127.5 - 1.0  # 8-bit data, edges included
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    xt = diffusion.q_sample(x0, t, noise)
    eps = noise + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    mean, log_var = diffusion.p_mean_log_variance(xt, t, eps, v)
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    upper = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), x0 + 1 / 255)
    lower = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), x0 - 1 / 255)
    prob = normal.cdf(upper) - normal.cdf(lower)
    assert prob.min().item() > 1e-10  # the 1e-12 floor plays no part in this comparison
    expected = -torch.log(prob).reshape(3, -1).mean(1) / math.log(2)
    torch.testing.assert_close(diffusion.vb_bits(x0, xt, t, eps, v), expected, rtol=1e-9, atol=1e-9)
    # and the log-likelihood helper sums to one over all 256 bins
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    ll = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, 0.1), torch.full_like(bins, math.log(0.3)))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_vb_mixes_nll_at_zero_and_kl_elsewhere(diffusion: GaussianDiffusion) -> None:
    x0, noise, t, xt = _setup(diffusion, [0, 5], seed=4)
    eps = noise + 0.2
    v = torch.zeros_like(x0)
    vb = diffusion.vb_bits(x0, xt, t, eps, v)
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    mean, log_var = diffusion.p_mean_log_variance(xt, t, eps, v)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).reshape(2, -1).mean(1) / math.log(2)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).reshape(2, -1).mean(1) / math.log(2)
    assert vb[0].item() == pytest.approx(nll[0].item()) and vb[0].item() != pytest.approx(kl[0].item())
    assert vb[1].item() == pytest.approx(kl[1].item())


def test_training_losses_shapes_and_channel_error(diffusion: GaussianDiffusion) -> None:
    x0, noise, t, xt = _setup(diffusion, [0, 7, 900], shape=(4, 2, 2))
    eps_only = diffusion.training_losses(noise.clone(), x0, xt, t, noise)
    assert set(eps_only) == {"loss", "mse", "vb"}
    assert eps_only["mse"].abs().max().item() == 0.0 and eps_only["vb"].abs().max().item() == 0.0
    learned = diffusion.training_losses(torch.cat([noise + 0.1, torch.zeros_like(x0)], 1), x0, xt, t, noise)
    assert learned["mse"].shape == (3,)
    torch.testing.assert_close(learned["mse"], torch.full((3,), 0.01, dtype=torch.float64))
    assert (learned["vb"] > 0).all()
    torch.testing.assert_close(learned["loss"], learned["mse"] + learned["vb"])
    with pytest.raises(ValueError, match=r"\(3, 5, 2, 2\).*\(3, 4, 2, 2\)"):
        diffusion.training_losses(torch.zeros(3, 5, 2, 2), x0, xt, t, noise)
    # bf16 model outputs are scored in float32
    half = diffusion.training_losses(noise.float().bfloat16(), x0.float(), xt.float(), t, noise.float())
    assert half["loss"].dtype == torch.float32


def test_vb_trains_only_the_variance_channels(diffusion: GaussianDiffusion) -> None:
    x0, noise, t, xt = _setup(diffusion, [0, 3, 600], shape=(4, 2, 2))
    x0, noise, xt = x0.float(), noise.float(), xt.float()
    gen = torch.Generator().manual_seed(5)
    output = torch.randn(3, 8, 2, 2, generator=gen).requires_grad_(True)
    losses = diffusion.training_losses(output, x0, xt, t, noise)
    assert (losses["vb"] > 0).all()
    losses["loss"].sum().backward()
    mse_grad = 2 * (output.detach()[:, :4] - noise) / (4 * 2 * 2)
    torch.testing.assert_close(output.grad[:, :4], mse_grad, rtol=1e-6, atol=1e-8)
    assert output.grad[:, 4:].abs().min().item() > 0


def test_normal_kl_zero_for_identical() -> None:
    gen = torch.Generator().manual_seed(8)
    m, lv = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-6
    assert (normal_kl(m, lv, m + 1, lv) > 0).all()


def test_timestep_sampler_power_means_and_probabilities() -> None:
    forward = TimestepSampler("power", scale=1.0)
    backward = TimestepSampler("power", scale=1.0, reverse=True)
    steps = torch.arange(1000, dtype=torch.float64)
    p, q = forward.probabilities(), backward.probabilities()
    assert p.dtype == torch.float64
    assert p.sum().item() == pytest.approx(1.0) and q.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(p, (steps + 1) / (steps + 1).sum())
    torch.testing.assert_close(q, (1000 - steps) / (1000 - steps).sum())
    sq = TimestepSampler("power", scale=2.0, num_timesteps=10).probabilities()
    torch.testing.assert_close(sq, torch.arange(1, 11, dtype=torch.float64) ** 2 / 385)
    gen = torch.Generator().manual_seed(6)
    draws_p = forward.sample(200_000, generator=gen)
    draws_q = backward.sample(200_000, generator=gen)
    assert draws_p.dtype == torch.long and draws_p.shape == (200_000,)
    assert int(draws_p.min()) >= 0 and int(draws_p.max()) <= 999
    assert draws_p.double().mean().item() == pytest.approx(666.0, abs=3.0)
    assert draws_q.double().mean().item() == pytest.approx(333.0, abs=3.0)


def test_timestep_sampler_uniform_scale_zero_and_determinism() -> None:
    uniform = TimestepSampler("uniform", num_timesteps=50)
    torch.testing.assert_close(uniform.probabilities(), torch.full((50,), 1 / 50, dtype=torch.float64))
    torch.testing.assert_close(
        TimestepSampler("power", scale=0.0, num_timesteps=50).probabilities(), uniform.probabilities()
    )
    a = uniform.sample(64, generator=torch.Generator().manual_seed(7))
    b = uniform.sample(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and int(a.max()) < 50
    c = TimestepSampler("power").sample(64, generator=torch.Generator().manual_seed(7))
    d = TimestepSampler("power").sample(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(c, d)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "cosine"}, "kind"),
        ({"kind": "power", "scale": -0.5}, "scale"),
        ({"kind": "power", "scale": float("nan")}, "scale"),
        ({"kind": "uniform", "num_timesteps": 0}, "num_timesteps"),
    ],
)
def test_timestep_sampler_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TimestepSampler(**kwargs)
