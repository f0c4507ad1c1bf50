"""A finished DiT run as a reusable artefact: its settings file, reloading, and sampling from it.

A run folder holds ``transformer_ema/`` (a diffusers ``DiTTransformer2DModel``) and
``cof_config.json``: the target classes (label ``i`` is class folder ``i``, reusing label row
``i``), the null class, the image geometry and where the VAE comes from. That is everything
:func:`load_run` needs to sample from the run without the training config.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_tuning.diffusion.loading import DiffusionSetupError, DiTModelArguments, load_dit, load_vae
from hf_tuning.diffusion.sampling import SAMPLERS, draw_class_labels, sample_dit
from hf_tuning.io import atomic_write_json, read_json

__all__ = ["RUN_CONFIG", "SamplingArguments", "sample_run", "write_run_config", "read_run_config", "load_run"]

RUN_CONFIG = "cof_config.json"


@dataclass
class SamplingArguments:
    """How samples are drawn: DiT's evaluation sampler by default (250 DDPM steps, learned variance)."""

    guidance_scale: float = field(default=1.5, metadata={"help": "Classifier-free guidance scale (1 = none)."})
    cfg_channels: int = field(
        default=3, metadata={"help": "Latent channels guided: 3 is DiT's exact behaviour, 4 all of epsilon."}
    )
    num_inference_steps: int = field(default=250, metadata={"help": "Sampling steps, respaced as DiT does."})
    sampler: str = field(default="ddpm", metadata={"help": "ddpm (learned variance) or ddim.", "choices": SAMPLERS})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise (0: deterministic)."})
    sample_batch_size: int = field(default=64, metadata={"help": "Images sampled at once."})

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.num_inference_steps < 1 or self.sample_batch_size < 1:
            raise ValueError("num_inference_steps and sample_batch_size must be positive")


def sample_run(
    transformer: nn.Module,
    vae: nn.Module | None,
    *,
    num_samples: int,
    num_classes: int,
    null_class: int,
    sampling: SamplingArguments,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` images with labels drawn uniformly from the target classes ``0..C-1``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = draw_class_labels(num_samples, num_classes, generator=generator)
    images = sample_dit(
        transformer,
        labels,
        null_class=null_class,
        guidance_scale=sampling.guidance_scale,
        cfg_channels=sampling.cfg_channels,
        num_inference_steps=sampling.num_inference_steps,
        sampler=sampling.sampler,
        eta=sampling.eta,
        generator=generator,
        vae=vae,
        batch_size=sampling.sample_batch_size,
    )
    return images, labels.cpu()


def write_run_config(
    output_dir: str | os.PathLike,
    *,
    model_args: DiTModelArguments,
    data_args: Any,
    sampling: SamplingArguments,
    classes: list[str],
    null_class: int,
) -> Path:
    path = Path(output_dir) / RUN_CONFIG
    atomic_write_json(
        path,
        {
            "classes": list(classes),
            "null_class": null_class,
            "image_size": data_args.image_size,
            "image_channels": data_args.image_channels,
            "vae_name_or_path": "none"
            if model_args.pixel_space
            else (model_args.vae_name_or_path or model_args.model_name_or_path),
            "vae_subfolder": model_args.vae_subfolder
            if model_args.vae_name_or_path
            else (model_args.vae_subfolder or "vae"),
            "started_from": model_args.model_name_or_path or "scratch",
            "sampling": asdict(sampling),
        },
    )
    return path


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise DiffusionSetupError(
            f"{path} does not exist; expected the output_dir of recipes/dit_chain_of_forgetting.py (it holds "
            f"{RUN_CONFIG} and transformer_ema/)"
        )
    return read_json(path)


def load_run(
    run_dir: str | os.PathLike, *, subfolder: str = "transformer_ema", device: str | torch.device = "cpu"
) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    """The run's transformer (EMA weights by default), its VAE (or None) and its settings."""
    config = read_run_config(run_dir)
    model_args = DiTModelArguments(
        model_name_or_path=str(run_dir),
        subfolder=subfolder,
        vae_name_or_path=config["vae_name_or_path"],
        vae_subfolder=config.get("vae_subfolder"),
    )
    transformer = load_dit(model_args).to(device).eval()
    vae = load_vae(model_args)
    if vae is not None:
        vae = vae.to(device)
    return transformer, vae, config
