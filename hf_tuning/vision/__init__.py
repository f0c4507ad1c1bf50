"""Staged tuning for image classification: timm and transformers ViT, Swin and ConvNeXt.

* backbones, pretrained weights and head fitting: :mod:`hf_tuning.vision.models`
* tuning modes (full, LoRA, the paper's bottleneck adapter): :mod:`hf_tuning.vision.tuning`,
  :mod:`hf_tuning.vision.adapters`
* the trainer: :mod:`hf_tuning.vision.trainer`
* saving and reloading a run: :mod:`hf_tuning.vision.saved`

The block families these models use are registered in :mod:`hf_tuning.families`.
"""

from hf_tuning.vision.adapters import BottleneckAdapter, add_bottleneck_adapters
from hf_tuning.vision.models import (
    VisionModelArguments,
    VisionModelError,
    classifier_head,
    load_vision_model,
    vision_data_config,
)
from hf_tuning.vision.saved import (
    TrainedClassifier,
    load_trained_classifier,
    save_adapter_weights,
    write_vision_config,
)
from hf_tuning.vision.trainer import StagedImageClassificationTrainer, accuracy_metrics, logits_of
from hf_tuning.vision.tuning import TUNING_MODES, VisionTuningArguments, prepare_for_tuning

__all__ = [
    "BottleneckAdapter",
    "StagedImageClassificationTrainer",
    "TUNING_MODES",
    "TrainedClassifier",
    "VisionModelArguments",
    "VisionModelError",
    "VisionTuningArguments",
    "accuracy_metrics",
    "add_bottleneck_adapters",
    "classifier_head",
    "load_trained_classifier",
    "load_vision_model",
    "logits_of",
    "prepare_for_tuning",
    "save_adapter_weights",
    "vision_data_config",
    "write_vision_config",
]
