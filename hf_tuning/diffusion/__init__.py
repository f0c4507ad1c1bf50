"""DiT transfer on diffusers: chain of forgetting (Diff-Tuning) and staged tuning of DiT blocks.

* the trainer and its config: :mod:`hf_tuning.diffusion.trainer`
* the diffusion maths (q_sample, the learned-variance bound, timestep distributions):
  :mod:`hf_tuning.diffusion.gaussian`
* DiT-faithful sampling (learned variance, DiT's CFG): :mod:`hf_tuning.diffusion.sampling`
* loading and checking the DiT and VAE: :mod:`hf_tuning.diffusion.loading`
* DiT's pixel pipeline: :mod:`hf_tuning.diffusion.transforms`
* reading the knowledge bank and drawing from it: :mod:`hf_tuning.diffusion.knowledge_bank`
* the constant-decay EMA: :mod:`hf_tuning.diffusion.ema`
* reloading and sampling a finished run: :mod:`hf_tuning.diffusion.runs`
* the DiT block family: :mod:`hf_tuning.diffusion.families`

The knowledge bank is built by ``python -m datasets_builders.knowledge_bank``; FID lives in ``eval/fid.py``.
Names are imported on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from hf_tuning.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "ema": ("ExponentialMovingAverage",),
        "gaussian": ("GaussianDiffusion", "TimestepSampler", "linear_betas"),
        "loading": (
            "DiffusionSetupError",
            "DiTModelArguments",
            "check_label_table",
            "check_vae_matches",
            "disable_per_block_label_dropout",
            "learns_sigma",
            "load_dit",
            "load_vae",
            "null_class_of",
        ),
        "knowledge_bank": ("KnowledgeBank", "bank_batch_size", "bank_indices", "read_bank_metadata"),
        "transforms": ("build_diffusion_transform", "center_crop_arr"),
        "runs": ("RUN_CONFIG", "SamplingArguments", "load_run", "read_run_config", "sample_run", "write_run_config"),
        "sampling": ("draw_class_labels", "guided_model_output", "sample_dit", "save_image_grid", "to_pil_image"),
        "trainer": ("EMA_FILE", "EMA_SUBFOLDER", "ChainOfForgettingConfig", "ChainOfForgettingTrainer"),
    },
    globals(),
)
