"""DiT's Gaussian diffusion maths (linear betas, epsilon prediction, learned-range variance) in torch.

diffusers has schedulers for sampling and ``add_noise`` for training, but nothing that trains a
learned variance: DiT adds a variational-bound term (KL to the true posterior in bits, and a
discretized-Gaussian decoder NLL at ``t == 0``) so that its ``2C``-channel output has a usable
sigma head. This module supplies that term and the timestep samplers that Diff-Tuning uses to
weight the loss over ``t``.

Every schedule table is kept in float64 (as the reference numpy code does) and cast to the input's
dtype and device only after the per-sample coefficients are gathered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "linear_betas",
    "GaussianDiffusion",
    "TimestepSampler",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
]

_LOG2 = math.log(2.0)


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT's (and DDPM's) linear beta schedule, in float64 so cumulative products stay exact."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; log-variances keep it stable."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of data in [-1, 1] quantised to 256 bins of width 2/255.

    The outermost bins extend to -inf / +inf (detected at -0.999 / 0.999), so the probabilities sum
    to one. Uses the exact normal CDF (``torch.special.ndtr``) rather than the reference code's
    tanh approximation; probabilities are floored at 1e-12 as usual so the loss stays bounded.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    half_bin = 1.0 / 255.0
    cdf_plus = torch.special.ndtr(inv_std * (centered + half_bin))
    cdf_min = torch.special.ndtr(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: losses are per sample."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class GaussianDiffusion:
    """Forward process, posterior and learned-variance reverse step of a discrete-time diffusion.

    Built from any betas, so a respaced schedule (``1 - abar[t_i] / abar[t_{i-1}]``) is just
    another instance; ``t`` then indexes the respaced steps.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; the log is clipped to the t=1 value (needs >= 2 steps).
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else self.betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> GaussianDiffusion:
        """Build from a diffusers scheduler config so training uses exactly the pipeline's schedule."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (a diffusers scheduler config), got {type(config).__name__}")
        schedule = config.get("beta_schedule", "linear")
        if schedule != "linear":
            raise ValueError(f"beta_schedule must be 'linear' (DiT's schedule), got {schedule!r}")
        if config.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported; expected a linear beta_schedule")
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("rescale_betas_zero_snr=True is not supported by DiT's schedule")
        betas = linear_betas(
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 1e-4)),
            float(config.get("beta_end", 0.02)),
        )
        return cls(betas)

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather table[t] per sample, cast to ``like``'s dtype/device, shaped to broadcast over it."""
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"t must have shape [{like.shape[0]}], got {tuple(t.shape)}")
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = getattr(self, name).to(t.device)
            self._device_tables[key] = table
        values = table[t.long()].to(device=like.device, dtype=like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise (equal to diffusers' ``add_noise``)."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the true posterior q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, xt) * x0 + self._extract("posterior_mean_coef2", t, xt) * xt
        var = self._extract("posterior_variance", t, xt).expand_as(xt)
        log_var = self._extract("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean, var, log_var

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample for x_0 given a predicted epsilon."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt
            - self._extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps
        )

    def p_mean_log_variance(
        self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the model's p(x_{t-1} | x_t), without clipping x_0 (as DiT trains).

        ``var_values`` in [-1, 1] interpolates the log-variance between the clipped log posterior
        variance (-1) and log beta_t (+1); ``None`` means the fixed clipped posterior variance.
        """
        x0 = self.predict_x0_from_eps(xt, t, eps)
        mean, _, min_log = self.q_posterior_mean_variance(x0, xt, t)
        if var_values is None:
            return mean, min_log
        if var_values.shape != xt.shape:
            raise ValueError(f"var_values shape {tuple(var_values.shape)} differs from x_t shape {tuple(xt.shape)}")
        max_log = self._extract("log_betas", t, xt)
        frac = (var_values + 1.0) / 2.0
        return mean, frac * max_log + (1.0 - frac) * min_log

    def vb_bits(
        self,
        x0: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        var_values: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-sample variational-bound term in bits: KL(q || p) for t > 0, decoder NLL at t == 0.

        Pass a *detached* ``eps``: the term exists to train the variance head, and DiT stops its
        gradient into the mean so the epsilon head is trained by the MSE alone. The decoder NLL
        treats x_0 as 8-bit data in [-1, 1], as DiT does even for latents.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        mean, log_var = self.p_mean_log_variance(xt, t, eps, var_values)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / _LOG2
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / _LOG2
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """DiT's per-sample loss: epsilon MSE, plus the VB term when the model also predicts variance.

        Half-precision inputs are upcast to float32: the log-variance and KL terms lose too much
        precision in bf16/fp16.
        """
        channels = x0.shape[1]
        out_channels = model_output.shape[1]
        if (
            model_output.shape[0] != x0.shape[0]
            or model_output.shape[2:] != x0.shape[2:]
            or out_channels
            not in (
                channels,
                2 * channels,
            )
        ):
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} does not fit x0 shape {tuple(x0.shape)}: "
                f"expected {channels} (epsilon) or {2 * channels} (epsilon + variance) channels"
            )
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        model_output, x0, xt, noise = (x.to(dtype) for x in (model_output, x0, xt, noise))
        eps = model_output[:, :channels]
        mse = _mean_flat((eps - noise) ** 2)
        if out_channels == 2 * channels:
            vb = self.vb_bits(x0, xt, t, eps.detach(), model_output[:, channels:])
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


_SAMPLER_KINDS = ("uniform", "power")


@dataclass
class TimestepSampler:
    """A categorical distribution over training timesteps; sampling from it weights the loss over t.

    ``power``: P(t) ∝ (t + 1) ** scale, which favours noisy steps (Diff-Tuning's adaptation term);
    with ``reverse`` Q(t) ∝ (num_timesteps - t) ** scale, which favours clean steps (its
    retention term). ``scale = 0`` is uniform.
    """

    kind: str
    scale: float = 1.0
    reverse: bool = False
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.kind not in _SAMPLER_KINDS:
            raise ValueError(f"kind must be one of {_SAMPLER_KINDS}, got {self.kind!r}")
        scale = float(self.scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {self.scale!r}")
        self.scale = scale
        if (
            isinstance(self.num_timesteps, bool)
            or int(self.num_timesteps) != self.num_timesteps
            or self.num_timesteps < 1
        ):
            raise ValueError(f"num_timesteps must be a positive integer, got {self.num_timesteps!r}")
        self.num_timesteps = int(self.num_timesteps)

    def probabilities(self) -> torch.Tensor:
        """The float64 probability of each timestep 0..num_timesteps-1."""
        steps = torch.arange(self.num_timesteps, dtype=torch.float64)
        if self.kind == "uniform":
            weights = torch.ones_like(steps)
        elif self.reverse:
            weights = (self.num_timesteps - steps) ** self.scale
        else:
            weights = (steps + 1.0) ** self.scale
        return weights / weights.sum()

    def sample(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``batch_size`` timesteps (LongTensor) on ``device``; randomness only from ``generator``."""
        draw_device = generator.device if generator is not None else torch.device("cpu")
        if self.kind == "uniform":
            t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=draw_device)
        else:
            probs = self.probabilities().to(draw_device)
            t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return t.to(device=device if device is not None else draw_device, dtype=torch.long)
