"""Trainer checkpoints of a method model hold its adapter folder, not a copy of the frozen backbone.

Without this, ``transformers.Trainer`` saves a model it does not know (anything but a ``PreTrainedModel``
or a ``PeftModel``) as its whole state dict: hundreds of megabytes of frozen ViT per checkpoint, and a
final folder :func:`~hf_tuning.tuners.load_petl_model` cannot read. With it, every checkpoint and the
final ``save_model`` write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ card), and resuming
or loading the best checkpoint reads them back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hf_tuning.tuners.model import WEIGHTS_FILE, PetlModel

__all__ = ["PetlCheckpointing"]


class PetlCheckpointing:
    """Mixin for a ``transformers.Trainer`` subclass; put it first in the bases."""

    def _petl_model(self, model: Any = None) -> PetlModel | None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        return unwrapped if isinstance(unwrapped, PetlModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._petl_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            model.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_petl_weights(self, folder: str, model: PetlModel) -> bool:
        weights = Path(folder) / WEIGHTS_FILE
        if not weights.is_file():
            return False
        from safetensors.torch import load_file

        model.load_adapter_state_dict(load_file(str(weights)), source=str(weights))
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self._petl_model(model)
        if target is None or not self._load_petl_weights(resume_from_checkpoint, target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        target = self._petl_model()
        if target is None or not self._load_petl_weights(self.state.best_model_checkpoint, target):
            super()._load_best_model()
