"""DiT-faithful sampling: respaced DDPM equals DiT's maths, guidance as in DiT, deterministic images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from PIL import Image
from torch import nn

from hf_tuning.diffusion.gaussian import GaussianDiffusion, linear_betas
from hf_tuning.diffusion.sampling import (
    dit_scheduler,
    draw_class_labels,
    guided_model_output,
    sample_dit,
    save_image_grid,
)
from tests.helpers.tiny_dit import tiny_dit, tiny_vae

NULL = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run ~10x faster on one thread than on contended intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dit(in_channels: int = 4, out_channels: int = 8, seed: int = 0) -> DiTTransformer2DModel:
    return tiny_dit(in_channels, classes=10, layers=2, out_channels=out_channels, head_dim=16, seed=seed).eval()


@pytest.fixture(scope="module")
def latent_dit() -> DiTTransformer2DModel:
    return _dit()


@pytest.fixture(scope="module")
def pixel_dit() -> DiTTransformer2DModel:
    return _dit(in_channels=1, out_channels=2, seed=1)


def _dit_respaced_timesteps(num_steps: int, total: int = 1000) -> list[int]:
    """DiT's space_timesteps(total, str(num_steps)): an evenly strided walk from 0 to total - 1, rounded."""
    if num_steps == 1:
        return [0]
    stride = (total - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


def _step_error(sched, num_steps: int, indices: list[int]) -> float:
    """Largest gap between ``sched.step`` and DiT's respaced posterior step, under the same noise."""
    sched.set_timesteps(num_steps)
    used = _dit_respaced_timesteps(num_steps)
    assert sched.timesteps.flip(0).tolist() == used  # linspace spacing is DiT's respacing
    abar = GaussianDiffusion(linear_betas()).alphas_cumprod
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[used][:-1]])
    respaced = GaussianDiffusion(1 - abar[used] / prev)  # DiT's respaced betas
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for index in indices:
        x = torch.randn(2, 4, 4, 4, generator=gen)
        eps = torch.randn(2, 4, 4, 4, generator=gen)
        v = torch.rand(2, 4, 4, 4, generator=gen) * 2 - 1
        output = torch.cat([eps, v], 1)
        got = sched.step(output, used[index], x, generator=torch.Generator().manual_seed(index)).prev_sample
        assert got.dtype == torch.float32
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(index)).double()
        idx = torch.full((2,), index)
        mean, log_var = respaced.p_mean_log_variance(x.double(), idx, eps.double(), v.double())
        expected = mean + (index > 0) * torch.exp(0.5 * log_var) * noise
        worst = max(worst, (got.double() - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("num_steps", [1000, 250])
def test_ddpm_step_equals_dit_respaced_posterior_step(num_steps: int) -> None:
    indices = sorted({0, 1, 2, 3, 4, num_steps // 2, num_steps - 2, num_steps - 1})
    ours = _step_error(dit_scheduler("ddpm", learned_sigma=True), num_steps, indices)
    assert ours < 2e-6  # float32 rounding only
    stock = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        prediction_type="epsilon",
        variance_type="learned_range",
        timestep_spacing="linspace",
    )
    # Same formula, but diffusers' float32 alphas_cumprod loses precision in 1 - abar_t / abar_prev near t=0.
    stock_error = _step_error(stock, num_steps, indices)
    assert 1e-5 < stock_error < 1e-3
    assert stock_error > 10 * ours


def test_guidance_scale_one_is_plain_forward(latent_dit: DiTTransformer2DModel) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    y = torch.tensor([0, 4, 9])
    t = torch.tensor([5, 500, 999])
    with torch.no_grad():
        plain = latent_dit(x, timestep=t, class_labels=y).sample
        got = guided_model_output(latent_dit, x, t, y, null_class=NULL, guidance_scale=1.0)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("cfg_channels", [3, 4])
def test_guidance_mixes_only_cfg_channels(latent_dit: DiTTransformer2DModel, cfg_channels: int) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    y = torch.tensor([1, 7])
    scale = 4.0
    with torch.no_grad():
        cond = latent_dit(x, timestep=torch.tensor([300, 300]), class_labels=y).sample
        uncond = latent_dit(x, timestep=torch.tensor([300, 300]), class_labels=torch.full_like(y, NULL)).sample
        got = guided_model_output(
            latent_dit, x, 300, y, null_class=NULL, guidance_scale=scale, cfg_channels=cfg_channels
        )
    assert got.shape == (2, 8, 8, 8)
    assert (cond - uncond).abs().max().item() > 1e-3  # the label matters, so the check has teeth
    k = cfg_channels
    torch.testing.assert_close(got[:, :k], uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:, k:], cond[:, k:], rtol=1e-5, atol=1e-6)


def test_sample_dit_pixel_space_deterministic(pixel_dit: DiTTransformer2DModel) -> None:
    pixel_dit.train()
    labels = torch.tensor([0, 3, 9])
    kwargs = {"null_class": NULL, "num_inference_steps": 6, "batch_size": 2}
    a = sample_dit(pixel_dit, labels, generator=torch.Generator().manual_seed(0), **kwargs)
    assert pixel_dit.training and all(m.training for m in pixel_dit.modules())  # mode restored
    b = sample_dit(pixel_dit, labels, generator=torch.Generator().manual_seed(0), **kwargs)
    c = sample_dit(pixel_dit, labels, generator=torch.Generator().manual_seed(1), **kwargs)
    pixel_dit.eval()
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_dit_with_vae_and_ddim(latent_dit: DiTTransformer2DModel) -> None:
    vae = tiny_vae(seed=3).eval()
    for sampler in ("ddpm", "ddim"):
        images = sample_dit(
            latent_dit,
            [2, 5],
            null_class=NULL,
            num_inference_steps=5,
            sampler=sampler,
            eta=0.5,
            vae=vae,
            generator=torch.Generator().manual_seed(4),
        )
        assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        assert images.std().item() > 0


class _ShiftVariance(nn.Module):
    """Wraps a DiT and shifts only its variance channels, to see whether a sampler reads them."""

    def __init__(self, inner: DiTTransformer2DModel, shift: float) -> None:
        super().__init__()
        self.inner = inner
        self.shift = shift

    @property
    def config(self):
        return self.inner.config

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> SimpleNamespace:
        out = self.inner(x, timestep=timestep, class_labels=class_labels).sample
        c = self.inner.config.in_channels
        return SimpleNamespace(sample=torch.cat([out[:, :c], out[:, c:] + self.shift], dim=1))


@pytest.mark.parametrize(("sampler", "used"), [("ddpm", True), ("ddim", False)])
def test_learned_variance_used_by_ddpm_only(pixel_dit: DiTTransformer2DModel, sampler: str, used: bool) -> None:
    def run(model: nn.Module) -> torch.Tensor:
        return sample_dit(
            model,
            [1, 2],
            null_class=NULL,
            num_inference_steps=5,
            sampler=sampler,
            eta=1.0,
            generator=torch.Generator().manual_seed(5),
        )

    base, shifted = run(_ShiftVariance(pixel_dit, 0.0)), run(_ShiftVariance(pixel_dit, 0.7))
    assert torch.equal(base, run(pixel_dit))
    assert (not torch.equal(base, shifted)) is used


def test_sample_dit_rejects_bad_arguments(pixel_dit: DiTTransformer2DModel) -> None:
    with pytest.raises(ValueError, match="sampler"):
        sample_dit(pixel_dit, [0], null_class=NULL, sampler="euler", num_inference_steps=2)
    with pytest.raises(ValueError, match="beta_schedule"):
        sample_dit(pixel_dit, [0], null_class=NULL, num_inference_steps=2, scheduler_config={"beta_schedule": "cosine"})
    with pytest.raises(ValueError, match="cfg_channels"):
        guided_model_output(
            pixel_dit, torch.zeros(1, 1, 8, 8), 3, [0], null_class=NULL, guidance_scale=2.0, cfg_channels=3
        )


def test_draw_class_labels_uniform_and_seeded() -> None:
    a = draw_class_labels(5000, 7, generator=torch.Generator().manual_seed(0))
    b = draw_class_labels(5000, 7, generator=torch.Generator().manual_seed(0))
    assert a.dtype == torch.long and torch.equal(a, b)
    assert int(a.min()) == 0 and int(a.max()) == 6
    counts = torch.bincount(a, minlength=7).double() / 5000
    assert (counts - 1 / 7).abs().max().item() < 0.03


@pytest.mark.parametrize(("channels", "mode"), [(3, "RGB"), (1, "L")])
def test_save_image_grid(tmp_path, channels: int, mode: str) -> None:
    images = torch.rand(5, channels, 6, 7, generator=torch.Generator().manual_seed(0))
    path = save_image_grid(images, tmp_path / "grid.png", nrow=3)
    assert path == tmp_path / "grid.png"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == mode
        assert picture.size == (3 * (7 + 2) + 2, 2 * (6 + 2) + 2)
        first = picture.getpixel((2, 2))
    expected = (images[0, :, 0, 0] * 255).round().to(torch.uint8).tolist()
    assert (list(first) if channels == 3 else [first]) == expected
