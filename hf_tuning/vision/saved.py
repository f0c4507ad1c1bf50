"""Save and reload a trained image classifier, whatever its library and tuning mode.

A run folder holds the weights the Trainer saved (a PEFT adapter for LoRA, an :mod:`hf_tuning.tuners`
adapter folder for DTL/DTL+, the full state dict otherwise) plus ``vision_config.json``: how to rebuild
the backbone, the tuning mode, the preprocessing and the class names. :func:`load_trained_classifier`
needs nothing else, except the base weights for a LoRA or method run (the adapter holds only the
added modules and the head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hf_tuning.io import atomic_write_json, read_json
from hf_tuning.vision.backbones import VisionModelArguments, load_state_dict_file, load_vision_model, model_library
from hf_tuning.vision.tuning import METHOD_MODES, VisionTuningArguments, prepare_for_tuning

__all__ = [
    "VISION_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "TrainedClassifier",
    "write_vision_config",
    "save_adapter_weights",
    "load_trained_classifier",
]

VISION_CONFIG_FILE = "vision_config.json"
# Bottleneck adapters + head + final norm under the model's own parameter names: transformers'
# save_pretrained renames keys to its legacy layout, which plain load_state_dict cannot read back.
ADAPTER_WEIGHTS_FILE = "vision_adapter.safetensors"


@dataclass
class TrainedClassifier:
    model: nn.Module
    data_config: dict[str, Any]
    class_names: list[str]
    tuning_mode: str


def write_vision_config(
    output_dir: str | Path,
    model_args: VisionModelArguments,
    tuning_args: VisionTuningArguments,
    data_config: dict[str, Any],
    class_names: list[str],
    library: str,
) -> None:
    atomic_write_json(
        Path(output_dir) / VISION_CONFIG_FILE,
        {
            "library": library,
            "model": dataclasses.asdict(model_args),
            "tuning": dataclasses.asdict(tuning_args),
            "data_config": data_config,
            "class_names": list(class_names),
        },
    )


def save_adapter_weights(model: nn.Module, output_dir: str | Path) -> Path:
    """Write the adapter-mode weights (adapters, head, final norm) atomically."""
    from safetensors.torch import save_file

    from hf_tuning.io import atomic_output

    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    path = Path(output_dir) / ADAPTER_WEIGHTS_FILE
    with atomic_output(path) as tmp:
        save_file(state, str(tmp))
    return path


def _load_adapter_weights(model: nn.Module, folder: Path) -> None:
    path = folder / ADAPTER_WEIGHTS_FILE
    state = load_state_dict_file(path)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise ValueError(
            f"{path} does not match the adapters of the rebuilt model: missing {sorted(expected - set(state))[:6]}, "
            f"unexpected {sorted(set(state) - expected)[:6]}"
        )
    model.load_state_dict(state, strict=False)


def load_trained_classifier(output_dir: str | Path, device: str = "cpu") -> TrainedClassifier:
    """Rebuild the classifier a vision recipe wrote to ``output_dir``, in eval mode."""
    folder = Path(output_dir)
    config_file = folder / VISION_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {folder} is not the output of a vision recipe")
    saved = read_json(config_file)
    model_args = VisionModelArguments(**{**saved["model"], "library": saved["library"]})
    tuning_args = VisionTuningArguments(**saved["tuning"])
    classes = saved["class_names"]
    if tuning_args.tuning_mode in ("lora", *METHOD_MODES):
        if not (model_args.pretrained or model_args.checkpoint or Path(model_args.model_name_or_path).is_dir()):
            raise ValueError(
                f"{folder} holds a {tuning_args.tuning_mode} adapter over a randomly initialised backbone (no "
                "pretrained weights or checkpoint were given): the adapter alone cannot restore that base"
            )
        base = load_vision_model(model_args, len(classes))
        if tuning_args.tuning_mode == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(folder))
        else:
            from hf_tuning.tuners import load_petl_model

            model = load_petl_model(base, folder)
    else:
        if saved["library"] == "transformers":
            from transformers import AutoModelForImageClassification
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the adapter keys are "unexpected" to the plain architecture
            try:
                model = AutoModelForImageClassification.from_pretrained(str(folder))
            finally:
                hf_logging.set_verbosity(verbosity)
            if tuning_args.tuning_mode == "adapter":
                model = prepare_for_tuning(model, tuning_args)
                _load_adapter_weights(model, folder)
        else:
            skeleton = dataclasses.replace(model_args, pretrained=False, checkpoint=None, head_class_map=None)
            model = prepare_for_tuning(load_vision_model(skeleton, len(classes)), tuning_args)
            weights = folder / "model.safetensors"
            result = model.load_state_dict(load_state_dict_file(weights), strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("relative_position_index")]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"{weights} does not match the model in {config_file}: missing {missing[:6]}, "
                    f"unexpected {result.unexpected_keys[:6]}"
                )
    assert model_library(model) == saved["library"], "library mismatch"
    return TrainedClassifier(model.to(device).eval(), saved["data_config"], classes, tuning_args.tuning_mode)
