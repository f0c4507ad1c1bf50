"""Chain-of-forgetting transfer (Diff-Tuning) for class-conditional DiT on ``transformers.Trainer``.

One training step, as in the reference code (``docs/chain_of_forgetting.md``):

* the batch holds target images and, with a knowledge bank, ``int(B * cof_bank_fraction)``
  samples of the pretrained model (6 of 32 by default);
* target timesteps follow P(t) ~ (t+1)^s (reconsolidation, mostly high noise), bank timesteps
  Q(t) ~ (T-t)^s (retention, mostly low noise);
* bank samples always carry the null label, so they train only the unconditional branch;
  label dropout is then applied once per sample to the whole batch;
* loss = epsilon MSE + the variational-bound term of the learned variance, averaged per stream:
  ``mean(target) + cof_retention_weight * mean(bank)``;
* a constant-decay EMA of all weights, starting from the pretrained ones, is what samples come from.

``cof_timesteps='uniform'`` without a bank is plain DiT fine-tuning, the baseline. Since this is a
:class:`~hf_tuning.StagedTrainer`, ``dt_variant`` stages the DiT blocks as for any other model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from hf_tuning.arguments import StagedTrainingArguments
from hf_tuning.diffusion.ema import ExponentialMovingAverage
from hf_tuning.diffusion.gaussian import GaussianDiffusion, TimestepSampler, linear_betas
from hf_tuning.diffusion.knowledge_bank import KnowledgeBank, bank_batch_size, bank_indices
from hf_tuning.diffusion.loading import (
    DiffusionSetupError,
    check_label_table,
    disable_per_block_label_dropout,
    learns_sigma,
    null_class_of,
)
from hf_tuning.io import atomic_directory, atomic_output
from hf_tuning.trainer import StagedTrainer
from hf_tuning.variants import VARIANTS

__all__ = ["ChainOfForgettingConfig", "ChainOfForgettingTrainer", "EMA_FILE", "EMA_SUBFOLDER", "TIMESTEP_MODES"]

logger = logging.getLogger(__name__)
EMA_FILE = "ema.safetensors"
EMA_SUBFOLDER = "transformer_ema"
TIMESTEP_MODES = ("power", "uniform")


@dataclass
class ChainOfForgettingConfig(StagedTrainingArguments):
    """``StagedTrainingArguments`` with the chain-of-forgetting fields; defaults are the reference's."""

    cof_timesteps: str = field(
        default="power",
        metadata={
            "help": "power: target t ~ (t+1)^s and bank t ~ (T-t)^s (chain of forgetting); uniform: t uniform "
            "for both (with no bank: plain fine-tuning).",
            "choices": list(TIMESTEP_MODES),
        },
    )
    cof_power: float = field(default=1.0, metadata={"help": "s in P(t) ~ (t+1)^s for the target stream."})
    cof_bank_power: float | None = field(
        default=None, metadata={"help": "s in Q(t) ~ (T-t)^s for the bank stream (default: cof_power)."}
    )
    cof_bank_fraction: float = field(
        default=0.2, metadata={"help": "Share of each batch taken from the knowledge bank: int(B * f), 6 of 32."}
    )
    cof_retention_weight: float = field(default=0.1, metadata={"help": "Weight of the bank (retention) loss."})
    cof_label_dropout: float = field(
        default=0.1, metadata={"help": "Probability that a label is replaced by the null class (once per sample)."}
    )
    ema_decay: float = field(default=0.9999, metadata={"help": "Constant EMA decay (DiT: 0.9999, no warm-up)."})
    num_train_timesteps: int = field(default=1000, metadata={"help": "Diffusion steps T of the linear schedule."})
    beta_start: float = field(default=1e-4, metadata={"help": "First beta of the linear schedule."})
    beta_end: float = field(default=0.02, metadata={"help": "Last beta of the linear schedule."})
    # the reference's optimisation: AdamW 1e-4, no weight decay, constant LR, no clipping, batch 32
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "LR schedule (the reference: constant)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping; 0 = none (the reference)."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Images per device and step, target and bank together."}
    )
    dt_variant: str = field(
        default="ost",
        metadata={
            "help": "Staged tuning over the DiT blocks: ost (all at once) or dt1..dt4.",
            "choices": list(VARIANTS),
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.cof_timesteps not in TIMESTEP_MODES:
            problems.append(f"cof_timesteps={self.cof_timesteps!r} is not one of {', '.join(TIMESTEP_MODES)}")
        if not 0.0 <= self.cof_bank_fraction < 1.0:
            problems.append(f"cof_bank_fraction must be in [0, 1), got {self.cof_bank_fraction}")
        if not 0.0 <= self.cof_label_dropout < 1.0:
            problems.append(f"cof_label_dropout must be in [0, 1), got {self.cof_label_dropout}")
        if self.cof_retention_weight < 0:
            problems.append(f"cof_retention_weight must be >= 0, got {self.cof_retention_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("cof_power", "cof_bank_power"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                problems.append(f"{name} must be >= 0, got {value}")
        if problems:
            raise ValueError("invalid chain-of-forgetting arguments: " + "; ".join(problems))
        self.remove_unused_columns = False
        if self.label_names is None:
            self.label_names = ["labels"]
        super().__post_init__()

    @property
    def bank_power(self) -> float:
        return self.cof_power if self.cof_bank_power is None else self.cof_bank_power


class _UpdateEMA(TrainerCallback):
    def __init__(self, trainer: ChainOfForgettingTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.ema.update(self.trainer.model)


class ChainOfForgettingTrainer(StagedTrainer):
    """Fine-tunes a class-conditional ``DiTTransformer2DModel`` on target images by chain of forgetting.

    Args:
        model: the DiT (pretrained; its label table must have room for the target classes).
        args: :class:`ChainOfForgettingConfig`.
        train_dataset: target items ``{"pixel_values", "labels"}`` (labels in ``0..C-1``).
        vae: frozen ``AutoencoderKL``, or None for a pixel-space DiT.
        knowledge_bank: :class:`~hf_tuning.diffusion.KnowledgeBank`, or None (no retention).
        num_classes: target classes C (default: ``train_dataset.num_classes``).
    """

    def __init__(
        self,
        model: nn.Module,
        args: ChainOfForgettingConfig,
        train_dataset: Any = None,
        *,
        vae: nn.Module | None = None,
        knowledge_bank: KnowledgeBank | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, ChainOfForgettingConfig):
            raise TypeError(f"ChainOfForgettingTrainer needs ChainOfForgettingConfig, got {type(args).__name__}")
        classes = num_classes if num_classes is not None else getattr(train_dataset, "num_classes", None)
        if classes is None:
            raise DiffusionSetupError("pass num_classes: the training dataset does not say how many classes it has")
        check_label_table(model, classes)
        self.num_classes = int(classes)
        self.null_class = null_class_of(model)
        self.learn_sigma = learns_sigma(model)
        disable_per_block_label_dropout(model)  # applied once per sample in compute_loss instead
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise DiffusionSetupError(
                "ChainOfForgettingTrainer keeps a full EMA copy of the weights, which ZeRO-3 partitions away; use "
                "DDP or ZeRO-2 (accelerate_configs/multi_gpu.yaml or deepspeed_zero2.yaml)"
            )
        self.model_accepts_loss_kwargs = False
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
            vae.eval().to(self.args.device)
        self.knowledge_bank = knowledge_bank
        self.bank_batch = (
            bank_batch_size(args.per_device_train_batch_size, args.cof_bank_fraction) if knowledge_bank else 0
        )
        if knowledge_bank is not None and self.bank_batch == 0:
            raise DiffusionSetupError(
                f"a knowledge bank is given but int(per_device_train_batch_size={args.per_device_train_batch_size} x "
                f"cof_bank_fraction={args.cof_bank_fraction}) = 0 bank samples per batch; raise either"
            )
        if self.bank_batch >= args.per_device_train_batch_size:
            raise DiffusionSetupError("the knowledge bank would take the whole batch; lower cof_bank_fraction")
        self.diffusion = GaussianDiffusion(linear_betas(args.num_train_timesteps, args.beta_start, args.beta_end))
        kind = "power" if args.cof_timesteps == "power" else "uniform"
        self.target_timesteps = TimestepSampler(kind, scale=args.cof_power, num_timesteps=args.num_train_timesteps)
        self.bank_timesteps = TimestepSampler(
            kind, scale=args.bank_power, reverse=True, num_timesteps=args.num_train_timesteps
        )
        self.ema = ExponentialMovingAverage(self.model, decay=args.ema_decay)
        self.add_callback(_UpdateEMA(self))
        self._bank_step: int | None = None
        self._bank_micro = 0
        self._metrics: dict[str, list[float]] = defaultdict(list)

    # ---------------------------------------------------------------------------------------
    # Batches
    # ---------------------------------------------------------------------------------------
    @property
    def target_batch_size(self) -> int:
        return self.args.per_device_train_batch_size - self.bank_batch

    def _get_dataloader(self, dataset: Any, description: str, batch_size: int, *args: Any, **kwargs: Any):
        if kwargs.get("is_training") and self.bank_batch:
            # the per-device batch holds target and bank samples; the loader yields the target part
            batch_size = batch_size * self.target_batch_size // self.args.per_device_train_batch_size
        return super()._get_dataloader(dataset, description, batch_size, *args, **kwargs)

    def _next_bank_indices(self) -> list[int]:
        """Bank samples for this micro-batch, a pure function of (global step, micro-batch, rank): a
        resumed run draws the same ones as the uninterrupted run."""
        step = self._step_offset + self.state.global_step
        if step != self._bank_step:
            self._bank_step, self._bank_micro = step, 0
        draw = (step * self.args.gradient_accumulation_steps + self._bank_micro) * self.args.world_size
        draw += self.args.process_index
        self._bank_micro += 1
        return bank_indices(draw * self.bank_batch, self.bank_batch, len(self.knowledge_bank), self.args.seed)

    @torch.no_grad()
    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latents x0 of a batch: sampled from cached VAE moments, encoded by the VAE, or the pixels."""
        device = self.args.device
        if "latent_moments" in inputs:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            latents = DiagonalGaussianDistribution(inputs["latent_moments"].to(device)).sample()
        elif self.vae is not None:
            pixels = inputs["pixel_values"].to(device, dtype=self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample()
        else:
            return inputs["pixel_values"].to(device)
        shift = getattr(self.vae.config, "shift_factor", None) if self.vae is not None else None
        if shift is not None:
            latents = latents - shift
        scale = self.vae.config.scaling_factor if self.vae is not None else None
        if scale is None:
            raise DiffusionSetupError("cached bank latents need the VAE (for its scaling_factor); pass vae=...")
        return latents * scale

    # ---------------------------------------------------------------------------------------
    # Loss
    # ---------------------------------------------------------------------------------------
    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        device = self.args.device
        x0 = self.encode(inputs).float()
        labels = inputs["labels"].to(device).long()
        timesteps = self.target_timesteps.sample(len(x0), device=device)
        num_target = len(x0)
        training = model.training
        if training and self.bank_batch:
            bank_x0 = self.encode(self.knowledge_bank.batch(self._next_bank_indices())).float()
            x0 = torch.cat([x0, bank_x0])
            timesteps = torch.cat([timesteps, self.bank_timesteps.sample(len(bank_x0), device=device)])
            labels = torch.cat([labels, labels.new_full((len(bank_x0),), self.null_class)])
        if training and self.args.cof_label_dropout > 0:
            dropped = torch.rand(len(labels), device=device) < self.args.cof_label_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        noise = torch.randn_like(x0)
        noisy = self.diffusion.q_sample(x0, timesteps, noise)
        output = model(noisy, timestep=timesteps, class_labels=labels).sample
        terms = self.diffusion.training_losses(output.float(), x0, noisy, timesteps, noise)
        per_sample = terms["loss"]
        target_loss = per_sample[:num_target].mean()
        loss = target_loss
        if len(per_sample) > num_target:
            retention_loss = per_sample[num_target:].mean()
            loss = target_loss + self.args.cof_retention_weight * retention_loss
            if training:
                self._metrics["cof/retention_loss"].append(float(retention_loss.detach()))
        if training:
            self._metrics["cof/target_loss"].append(float(target_loss.detach()))
            self._metrics["cof/mse"].append(float(terms["mse"][:num_target].mean().detach()))
            if self.learn_sigma:
                self._metrics["cof/vb"].append(float(terms["vb"][:num_target].mean().detach()))
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._metrics:
            logs = {**logs, **{key: sum(values) / len(values) for key, values in self._metrics.items() if values}}
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------------------------------
    # EMA in checkpoints and outputs
    # ---------------------------------------------------------------------------------------
    def _save_checkpoint_extras(self, folder: Path) -> None:
        from safetensors.torch import save_file

        with atomic_output(folder / EMA_FILE) as tmp:
            save_file(self.ema.state_dict(), str(tmp), metadata={"decay": str(self.ema.decay)})

    def _resolve_resume(self, resume: str | bool | None) -> tuple[str | None, int]:
        checkpoint, stage = super()._resolve_resume(resume)
        if checkpoint is not None:
            path = Path(checkpoint) / EMA_FILE
            if not path.is_file():
                raise DiffusionSetupError(
                    f"{checkpoint} has no {EMA_FILE}: it was not written by ChainOfForgettingTrainer, or is "
                    "incomplete; resuming without the EMA would sample from different weights"
                )
            from safetensors.torch import load_file

            self.ema.load_state_dict(load_file(str(path)))
        return checkpoint, stage

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The online weights (Trainer format) and, for a final save, the EMA weights as a diffusers
        ``DiTTransformer2DModel`` folder ``transformer_ema/``, which is what sampling loads."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call or not self.args.should_save:
            return
        self.save_ema(Path(output_dir or self.args.output_dir) / EMA_SUBFOLDER)

    def save_ema(self, folder: str | Path) -> Path:
        import copy

        averaged = copy.deepcopy(self.accelerator.unwrap_model(self.model)).to("cpu")
        self.ema.copy_to(averaged)
        with atomic_directory(folder) as staging:
            averaged.save_pretrained(str(staging), safe_serialization=True)
        return Path(folder)
