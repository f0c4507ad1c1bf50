"""Trainer checkpoints of a method model hold its adapter folder, not a copy of the frozen backbone.

Without this, ``transformers.Trainer`` saves a model it does not know (anything but a ``PreTrainedModel``
or a ``PeftModel``) as its whole state dict: hundreds of megabytes of frozen ViT per checkpoint, and a
final folder :func:`~hf_tuning.tuners.load_petl_model` cannot read. With it, every checkpoint and the
final ``save_model`` write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ card), and resuming
or loading the best checkpoint reads them back. A method's training state (SNELLA's importance
statistics) goes beside them in checkpoints, and the callbacks a method needs are added to the trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hf_tuning.io import atomic_output
from hf_tuning.tuners.model import WEIGHTS_FILE, PetlModel

__all__ = ["PetlCheckpointing", "TRAINING_STATE_FILE"]

TRAINING_STATE_FILE = "method_training_state.safetensors"


class PetlCheckpointing:
    """Mixin for a staged ``transformers.Trainer`` subclass; put it first in the bases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._petl_model()
        for callback in model.trainer_callbacks() if model is not None else []:
            self.add_callback(callback)

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

    def _save_checkpoint_extras(self, folder: Path) -> None:
        super()._save_checkpoint_extras(folder)
        model = self._petl_model()
        state = model.training_state_dict() if model is not None else {}
        if state:
            from safetensors.torch import save_file

            with atomic_output(folder / TRAINING_STATE_FILE) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))

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
            return
        if target.training_state_dict():
            state_file = Path(resume_from_checkpoint) / TRAINING_STATE_FILE
            if not state_file.is_file():
                raise FileNotFoundError(
                    f"{state_file} is missing: a {target.petl_config.method} run cannot resume exactly without it"
                )
            from safetensors.torch import load_file

            target.load_training_state_dict(load_file(str(state_file)))

    def _load_best_model(self) -> None:
        target = self._petl_model()
        if target is None or not self._load_petl_weights(self.state.best_model_checkpoint, target):
            super()._load_best_model()
