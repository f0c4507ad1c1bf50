"""Staged subspace tuning on ``trl.SFTTrainer`` (same implementation as :class:`StagedTrainer`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from hf_tuning.arguments import StagedTuningArgumentsMixin
from hf_tuning.precision import resolve_mixed_precision
from hf_tuning.trainer import StagedTrainerMixin

__all__ = ["StagedSFTConfig", "StagedSFTTrainer"]


@dataclass
class StagedSFTConfig(StagedTuningArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` plus the ``dt_*`` staged-tuning fields.

    ``bf16`` left unset follows the hardware (TRL's default is ``True`` everywhere, which fails on
    a CPU): bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.
    """

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision; unset: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            precision = "fp16" if self.fp16 else resolve_mixed_precision(use_cpu=self.use_cpu)
            self.bf16, self.fp16 = precision == "bf16", precision == "fp16"
        super().__post_init__()


class StagedSFTTrainer(StagedTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that optimises the model's subspaces stage by stage.

    With ``peft_config`` the model is wrapped by TRL first, so only adapter parameters (and
    ``modules_to_save``) are staged.
    """
