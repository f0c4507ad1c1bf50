"""Staged tuning for image classification on ``transformers.Trainer``.

A thin subclass of :class:`~hf_tuning.StagedTrainer`: it calls the backbone on ``pixel_values``
(timm models take a tensor and return logits, transformers models return an output object),
takes soft targets from mixup/cutmix, and keeps augmentation that mixes samples out of
evaluation by using ``eval_data_collator`` for every non-training dataloader. A
:mod:`hf_tuning.tuners` model is checkpointed and saved as its adapter folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

from hf_tuning.trainer import StagedTrainer
from hf_tuning.tuners.checkpoints import PetlCheckpointing
from hf_tuning.vision.backbones import logits_of

__all__ = ["StagedImageClassificationTrainer", "accuracy_metrics"]


def accuracy_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) for ``Trainer(compute_metrics=...)``."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    labels = np.asarray(prediction.label_ids)
    k = min(5, logits.shape[-1])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return {
        "top1": float((top[:, 0] == labels).mean() * 100),
        "top5": float((top == labels[:, None]).any(axis=1).mean() * 100),
    }


class StagedImageClassificationTrainer(PetlCheckpointing, StagedTrainer):
    """``StagedTrainer`` for image classifiers (timm or transformers; full, LoRA, adapter or a
    :mod:`hf_tuning.tuners` method, whose checkpoints are adapter folders).

    Args:
        eval_data_collator: collator for evaluation and prediction (default: the training one).
            Pass one without mixup when the training collator mixes samples.
        All other arguments are those of :class:`~hf_tuning.StagedTrainer`.
    """

    def __init__(self, *args: Any, eval_data_collator: Callable | None = None, **kwargs: Any) -> None:
        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if training_args is not None:
            # the batches are dicts the model does not take by keyword (timm's forward(x)); keep them whole
            training_args.remove_unused_columns = False
            if training_args.label_names is None:
                training_args.label_names = ["labels"]
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.model_accepts_loss_kwargs = False  # loss is a batch mean; the Trainer scales it for accumulation

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs["labels"]
        logits = logits_of(model(inputs["pixel_values"]))
        loss = self.classification_loss(logits, labels)
        method = self._petl_model(model)
        extra = method.extra_loss(logits, labels, self.classification_loss) if method is not None else None
        if extra is not None:  # e.g. DyT's token-rate loss and distillation
            loss = loss + extra
        return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against hard labels (with label smoothing) or soft targets from mixup / cutmix."""
        if labels.dtype.is_floating_point:
            return torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing_factor)

    def _get_dataloader(self, dataset: Any, description: str, batch_size: int, *args: Any, **kwargs: Any):
        if kwargs.get("is_training") or self.eval_data_collator is None:
            return super()._get_dataloader(dataset, description, batch_size, *args, **kwargs)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super()._get_dataloader(dataset, description, batch_size, *args, **kwargs)
        finally:
            self.data_collator = train_collator
