"""Staged tuning for image classification: timm and transformers ViT, Swin and ConvNeXt.

* backbones, pretrained weights and head fitting: :mod:`hf_tuning.vision.backbones`
* tuning modes (full, LoRA, the paper's bottleneck adapter): :mod:`hf_tuning.vision.tuning`,
  :mod:`hf_tuning.vision.adapters`
* the trainer: :mod:`hf_tuning.vision.trainer`
* saving and reloading a run: :mod:`hf_tuning.vision.saved`
* model cards of finished runs and adapter folders: :mod:`hf_tuning.vision.model_card`
* the block families of these backbones: :mod:`hf_tuning.vision.families`

Names are imported on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from hf_tuning.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "adapters": ("BottleneckAdapter", "add_bottleneck_adapters"),
        "backbones": (
            "VisionModelArguments",
            "VisionModelError",
            "classifier_head",
            "load_vision_model",
            "logits_of",
            "model_library",
            "vision_data_config",
        ),
        "model_card": ("update_vision_eval_results", "write_vision_model_card"),
        "saved": ("TrainedClassifier", "load_trained_classifier", "save_adapter_weights", "write_vision_config"),
        "trainer": ("StagedImageClassificationTrainer", "accuracy_metrics"),
        "tuning": ("TUNING_MODES", "VisionTuningArguments", "prepare_for_tuning"),
    },
    globals(),
)
