"""Staged subspace tuning on ``trl.SFTTrainer`` (same implementation as :class:`StagedTrainer`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from hf_tuning.arguments import StagedTuningArgumentsMixin
from hf_tuning.trainer import StagedTrainerMixin

__all__ = ["StagedSFTConfig", "StagedSFTTrainer"]


@dataclass
class StagedSFTConfig(StagedTuningArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` plus the ``dt_*`` staged-tuning fields."""


class StagedSFTTrainer(StagedTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that optimises the model's subspaces stage by stage.

    With ``peft_config`` the model is wrapped by TRL first, so only adapter parameters (and
    ``modules_to_save``) are staged.
    """
