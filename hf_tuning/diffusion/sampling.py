"""DiT-faithful sampling on diffusers: respaced DDPM with the learned sigma and DiT's guidance.

``DiTPipeline`` is not what DiT (and Diff-Tuning's evaluation) runs: it drops the learned variance,
guides all latent channels and hard-codes the null class 1000. Here:

* ``ddpm`` uses ``DDPMScheduler(variance_type="learned_range", timestep_spacing="linspace")`` with
  a float64 ``alphas_cumprod`` (see :func:`dit_scheduler`). A test checks that its step equals DiT's
  respaced posterior step computed with :class:`~hf_tuning.diffusion.gaussian.GaussianDiffusion` on
  the respaced betas ``1 - abar[t_i] / abar[t_{i-1}]``, and that linspace picks DiT's timesteps;
* classifier-free guidance runs one forward on ``[x; x]`` with labels ``[y; null]`` and, like DiT,
  guides only the first ``cfg_channels`` output channels;
* the null class is an argument, because a fine-tuned model keeps the null row of its label table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hf_tuning.diffusion.gaussian import GaussianDiffusion
from hf_tuning.io import atomic_output

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler

__all__ = [
    "SAMPLERS",
    "guided_model_output",
    "sample_dit",
    "dit_scheduler",
    "draw_class_labels",
    "save_image_grid",
    "to_pil_image",
]

SAMPLERS = ("ddpm", "ddim")


def _timestep_batch(timestep: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """A LongTensor [batch] of timesteps, whatever scalar or per-sample form the caller passed."""
    t = torch.as_tensor(timestep, device=device).long()
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    return t


def guided_model_output(
    transformer: nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    class_labels: torch.Tensor,
    *,
    null_class: int,
    guidance_scale: float,
    cfg_channels: int = 3,
) -> torch.Tensor:
    """The model output for ``latents`` under classifier-free guidance, computed as DiT does.

    One forward on ``[x; x]`` with labels ``[y; null]``; the first ``cfg_channels`` channels become
    ``uncond + s * (cond - uncond)`` and the remaining channels (the rest of epsilon and the
    variance values) are the conditional half's. ``cfg_channels=3`` is DiT's exact quirk (it
    guides 3 of the 4 latent epsilon channels); 4, i.e. all epsilon channels, is the principled
    choice. ``guidance_scale == 1`` is a single plain conditional forward.
    """
    batch = latents.shape[0]
    labels = torch.as_tensor(class_labels, device=latents.device).long()
    if labels.shape != (batch,):
        raise ValueError(f"class_labels must have shape [{batch}], got {tuple(labels.shape)}")
    t = _timestep_batch(timestep, batch, latents.device)
    if guidance_scale == 1:
        return transformer(latents, timestep=t, class_labels=labels).sample
    if cfg_channels < 1:
        raise ValueError(f"cfg_channels must be >= 1, got {cfg_channels}")
    out = transformer(
        torch.cat([latents, latents]),
        timestep=torch.cat([t, t]),
        class_labels=torch.cat([labels, torch.full_like(labels, null_class)]),
    ).sample
    if cfg_channels > out.shape[1]:
        raise ValueError(f"cfg_channels={cfg_channels} exceeds the model's {out.shape[1]} output channels")
    cond, uncond = out[:batch], out[batch:]
    guided = uncond[:, :cfg_channels] + guidance_scale * (cond[:, :cfg_channels] - uncond[:, :cfg_channels])
    return torch.cat([guided, cond[:, cfg_channels:]], dim=1)


def _schedule_kwargs(scheduler_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The training schedule for the scheduler: DiT's default, or a (validated, linear) config's."""
    if scheduler_config is None:
        return {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    GaussianDiffusion.from_scheduler_config(scheduler_config)  # raises on anything but DiT's linear schedule
    return {
        "num_train_timesteps": int(scheduler_config.get("num_train_timesteps", 1000)),
        "beta_start": float(scheduler_config.get("beta_start", 1e-4)),
        "beta_end": float(scheduler_config.get("beta_end", 0.02)),
        "beta_schedule": "linear",
    }


def dit_scheduler(
    sampler: str = "ddpm", *, learned_sigma: bool = True, scheduler_config: Mapping[str, Any] | None = None
) -> DDPMScheduler | DDIMScheduler:
    """The diffusers scheduler that reproduces DiT's sampler step; call ``set_timesteps`` on it.

    diffusers builds ``alphas_cumprod`` in float32, and the respaced beta ``1 - abar_t / abar_prev``
    then cancels catastrophically near t=0 (one step of the full 1000-step chain was off by 2.5e-4,
    of the 250-step chain by 3e-5). The step *formula* is DiT's, so the float64 table of
    :class:`GaussianDiffusion` is installed instead; the step then matches DiT's to ~5e-7 (float32
    rounding), as tests/diffusion/test_sampling.py checks. A model without a learned sigma gets
    ``fixed_small`` (the posterior variance); DiT's own default for ``learn_sigma=False`` would be
    ``fixed_large`` (beta_t).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    schedule = _schedule_kwargs(scheduler_config)
    if sampler == "ddpm":
        scheduler = DDPMScheduler(
            **schedule,
            clip_sample=False,
            prediction_type="epsilon",
            variance_type="learned_range" if learned_sigma else "fixed_small",
            timestep_spacing="linspace",  # picks exactly DiT's respaced timesteps
        )
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    else:
        # DiT's "ddimN" respacing is the stride T // N starting at 0, i.e. diffusers' "leading" spacing.
        scheduler = DDIMScheduler(
            **schedule,
            clip_sample=False,
            prediction_type="epsilon",
            set_alpha_to_one=True,
            steps_offset=0,
            timestep_spacing="leading",
        )
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    scheduler.alphas_cumprod = GaussianDiffusion.from_scheduler_config(schedule).alphas_cumprod.clone()
    return scheduler


def _decode(latents: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """Latents to images in [0, 1]; without a VAE the latents are pixels in [-1, 1]."""
    if vae is not None:
        config = vae.config
        latents = latents / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            latents = latents + shift
        vae_dtype = next(vae.parameters()).dtype
        latents = vae.decode(latents.to(vae_dtype)).sample
    return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_dit(
    transformer: nn.Module,
    class_labels: torch.Tensor | Sequence[int],
    *,
    null_class: int,
    guidance_scale: float = 1.5,
    cfg_channels: int = 3,
    num_inference_steps: int = 250,
    sampler: str = "ddpm",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    vae: nn.Module | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Generate one image per label, as DiT's evaluation sampler does; float32 in [0, 1], on the CPU.

    ``ddpm`` is DiT's respaced ancestral sampler and uses all ``2C`` output channels (the learned
    variance); ``ddim`` uses only the epsilon channels (``eta`` sets its noise). Labels are processed
    in chunks of ``batch_size``; all randomness comes from ``generator``, so a seed fixes the images.
    The transformer runs in eval mode under ``no_grad`` and gets its training mode back afterwards.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    labels = torch.as_tensor(class_labels).long().flatten()
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = transformer.config
    channels = int(config.in_channels)
    out_channels = int(getattr(config, "out_channels", None) or channels)
    if out_channels not in (channels, 2 * channels):
        raise ValueError(f"transformer out_channels={out_channels} must be in_channels={channels} or twice it")
    learned_sigma = out_channels == 2 * channels
    size = int(config.sample_size)
    # Guidance never touches the variance values: on a model with fewer epsilon channels than
    # cfg_channels (a 1-channel pixel DiT) every epsilon channel is guided.
    cfg_channels = min(cfg_channels, channels)
    dit_scheduler(sampler, learned_sigma=learned_sigma, scheduler_config=scheduler_config)  # validate early
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    from diffusers.utils.torch_utils import randn_tensor

    was_training = transformer.training
    transformer.eval()
    images: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for chunk in labels.split(batch_size or labels.numel()):
                n = chunk.numel()
                chunk = chunk.to(device)
                scheduler = dit_scheduler(sampler, learned_sigma=learned_sigma, scheduler_config=scheduler_config)
                scheduler.set_timesteps(num_inference_steps)
                latents = randn_tensor(
                    (n, channels, size, size), generator=generator, device=device, dtype=torch.float32
                )
                for t in scheduler.timesteps.tolist():
                    out = guided_model_output(
                        transformer,
                        latents.to(dtype),
                        t,
                        chunk,
                        null_class=null_class,
                        guidance_scale=guidance_scale,
                        cfg_channels=cfg_channels,
                    ).float()
                    if sampler == "ddpm":
                        latents = scheduler.step(out, t, latents, generator=generator).prev_sample
                    else:
                        latents = scheduler.step(
                            out[:, :channels], t, latents, eta=eta, generator=generator
                        ).prev_sample
                images.append(_decode(latents, vae).cpu())
    finally:
        transformer.train(was_training)
    return torch.cat(images)


def draw_class_labels(num_samples: int, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform labels in [0, num_classes) for FID sampling (never the null class)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, num_classes, (num_samples,), generator=generator, device=device)


def to_pil_image(image: torch.Tensor):
    """One [0, 1] image (1 or 3, H, W) as an 8-bit PIL image (grey or RGB)."""
    from PIL import Image

    array = (image.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = array.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> Path:
    """Write [0, 1] images (N, 1 or 3, H, W) as one PNG grid, atomically so readers never see half a file.

    ``nrow`` images per row (default about sqrt(N)); the grid is
    ``(rows * (H + padding) + padding) x (nrow * (W + padding) + padding)`` pixels on black.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N>0, 1 or 3, H, W), got {tuple(images.shape)}")
    n, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = torch.zeros(channels, rows * (height + padding) + padding, ncol * (width + padding) + padding)
    for index, image in enumerate(images.detach().float().cpu().clamp(0.0, 1.0)):
        top = padding + (index // ncol) * (height + padding)
        left = padding + (index % ncol) * (width + padding)
        grid[:, top : top + height, left : left + width] = image
    picture = to_pil_image(grid)
    path = Path(path)
    with atomic_output(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
