"""DiT transfer on diffusers: chain of forgetting (Diff-Tuning) and staged tuning of DiT blocks.

* the trainer and its config: :mod:`hf_tuning.diffusion.trainer`
* the diffusion maths (q_sample, the learned-variance bound, timestep distributions):
  :mod:`hf_tuning.diffusion.gaussian`
* DiT-faithful sampling (learned variance, DiT's CFG): :mod:`hf_tuning.diffusion.sampling`
* loading and checking the DiT and VAE: :mod:`hf_tuning.diffusion.models`
* the constant-decay EMA: :mod:`hf_tuning.diffusion.ema`
* reloading and sampling a finished run: :mod:`hf_tuning.diffusion.runs`

The knowledge bank is built by :mod:`datasets_builders.knowledge_bank`; FID lives in :mod:`eval.fid`.
"""

from __future__ import annotations

from hf_tuning.diffusion.ema import ExponentialMovingAverage
from hf_tuning.diffusion.gaussian import GaussianDiffusion, TimestepSampler, linear_betas
from hf_tuning.diffusion.models import (
    DiffusionSetupError,
    DiTModelArguments,
    check_label_table,
    check_vae_matches,
    disable_per_block_label_dropout,
    learns_sigma,
    load_dit,
    load_vae,
    null_class_of,
)
from hf_tuning.diffusion.runs import (
    RUN_CONFIG,
    SamplingArguments,
    load_run,
    read_run_config,
    sample_run,
    write_run_config,
)
from hf_tuning.diffusion.sampling import draw_class_labels, guided_model_output, sample_dit, save_image_grid
from hf_tuning.diffusion.trainer import (
    EMA_FILE,
    EMA_SUBFOLDER,
    ChainOfForgettingConfig,
    ChainOfForgettingTrainer,
)

__all__ = [
    "EMA_FILE",
    "EMA_SUBFOLDER",
    "RUN_CONFIG",
    "ChainOfForgettingConfig",
    "ChainOfForgettingTrainer",
    "DiTModelArguments",
    "DiffusionSetupError",
    "ExponentialMovingAverage",
    "GaussianDiffusion",
    "SamplingArguments",
    "TimestepSampler",
    "check_label_table",
    "check_vae_matches",
    "disable_per_block_label_dropout",
    "draw_class_labels",
    "guided_model_output",
    "learns_sigma",
    "linear_betas",
    "load_dit",
    "load_run",
    "load_vae",
    "null_class_of",
    "read_run_config",
    "sample_dit",
    "sample_run",
    "save_image_grid",
    "write_run_config",
]
