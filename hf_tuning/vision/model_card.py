"""Model cards of image-classification runs: the vision layer over :mod:`hf_tuning.model_card`.

What is vision-specific lives here: the ``image-classification`` pipeline tag, which library loads the
folder (``library_name``), the classes, and how each tuning mode is reloaded. Every mode reloads through
:func:`hf_tuning.vision.load_trained_classifier`; a LoRA folder is also a PEFT adapter, while the PETL
methods hf_tuning implements itself (DTL, DTL+, ...) are not in PEFT's method list and load through
``hf_tuning.tuners.load_petl_model`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_tuning import model_card as core
from hf_tuning.model_card import HF_TUNING_LINK, hub_repo_id
from hf_tuning.records import StageRecord
from hf_tuning.stages import StagePlan

__all__ = ["PETL_MODES", "write_vision_model_card", "update_vision_eval_results"]

# tuning modes whose weights only hf_tuning's own tuners can load (PEFT has no such method)
PETL_MODES = ("dtl", "dtl_plus", "dyt", "snell", "snella")
LIBRARIES = ("timm", "transformers")
_TASK = {"pipeline_tag": "image-classification", "task_type": "image-classification", "dataset_type": "imagefolder"}
_NO_RESULTS = (
    "No evaluation has been run yet "
    "(`python eval/evaluate_vision.py --model_dir <this folder> --data_format ... --data_dir ...`)."
)
_MODE_NAMES = {
    "full": "full fine-tune",
    "lora": "LoRA adapter",
    "adapter": "bottleneck-adapter fine-tune",
    "dtl": "DTL adapter",
    "dtl_plus": "DTL+ adapter",
    "dyt": "DyT (Dynamic Tuning) adapter",
    "snell": "SNELL (kernelized sparse) adapter",
    "snella": "SNELLA (kernelized sparse, allocated) adapter",
}
_LISTED_CLASSES = 20  # more class names than this would drown the intro


def write_vision_model_card(
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    base_model: str,
    library: str,
    tuning_mode: str,
    class_names: Sequence[str],
    stage_plan: StagePlan | None,
    stage_records: Sequence[StageRecord] | None,
    dt_budget: str,
    hyperparameters: Mapping[str, Any],
    trainable_parameters: int | None = None,
    eval_results: Mapping[str, float] | None = None,
    dataset_description: str = "",
) -> Path:
    """Write ``output_dir/README.md`` for a vision run: what was tuned, its stages, results and how to reload it.

    ``base_model`` is the backbone as the run named it (a timm architecture, ``hf-hub:timm/...`` or a
    transformers repository); it becomes ``base_model`` metadata only when it is a Hub repository.
    ``library`` is the backbone's library (``timm`` or ``transformers``), which loads the folder unless the
    mode's adapter format says otherwise (``peft`` for LoRA, ``hf_tuning`` for the PETL modes).
    ``stage_plan=None`` writes the card of a folder saved outside a staged run (no Stages section).
    """
    if library not in LIBRARIES:
        raise ValueError(f"library={library!r} is not one of {', '.join(LIBRARIES)}")
    metadata: dict[str, Any] = {"tuning_mode": tuning_mode, "num_classes": len(class_names)}
    if trainable_parameters is not None:
        metadata["trainable_params"] = trainable_parameters
    return core.write_card(
        output_dir,
        **_TASK,
        model_name=model_name,
        base_model=hub_repo_id(base_model),
        intro=_intro(base_model, library, tuning_mode, class_names, stage_plan, dt_budget, trainable_parameters),
        library_name=_library_name(tuning_mode, library),
        stage_plan=stage_plan,
        stage_records=stage_records,
        dt_budget=dt_budget,
        hyperparameters=hyperparameters,
        usage=_usage(base_model, library, tuning_mode, len(class_names)),
        paragraphs=[dataset_description] if dataset_description else [],
        tags=(tuning_mode, "image-classification", library),
        metadata=metadata,
        eval_results=eval_results,
        no_results=_NO_RESULTS,
    )


def update_vision_eval_results(
    card_path: str | os.PathLike, results: Mapping[str, float], dataset_name: str = "held-out data"
) -> Path:
    """Merge ``results`` (``top1``, ``top5``, ``eval_loss``, ...) into a card as image-classification results,
    also into a card PEFT wrote beside a LoRA adapter, which has no pipeline tag to tell."""
    return core.update_eval_results(
        card_path,
        results,
        dataset_name,
        task_type=_TASK["task_type"],
        dataset_type=_TASK["dataset_type"],
        no_results=_NO_RESULTS,
    )


def _library_name(tuning_mode: str, library: str) -> str:
    """The library the Hub shows for loading the folder: the adapter format's, else the backbone's."""
    if tuning_mode == "lora":
        return "peft"
    return "hf_tuning" if tuning_mode in PETL_MODES else library


def _method_name(tuning_mode: str) -> str:
    return _MODE_NAMES.get(tuning_mode) or f"{tuning_mode.replace('_plus', '+').upper()} adapter"


def _intro(
    base_model: str,
    library: str,
    tuning_mode: str,
    class_names: Sequence[str],
    stage_plan: StagePlan | None,
    dt_budget: str,
    trainable_parameters: int | None,
) -> str:
    repo = hub_repo_id(base_model)
    base = f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{base_model}`"
    classes = f"{len(class_names)} classes" + (
        f" ({', '.join(class_names)})" if len(class_names) <= _LISTED_CLASSES else ""
    )
    how = (
        f"trained with staged subspace tuning (Diffusion Tuning **{stage_plan.variant.upper()}**, "
        f"budget `{dt_budget}`) by {HF_TUNING_LINK}"
        if stage_plan is not None
        else f"saved by {HF_TUNING_LINK} outside a staged run"
    )
    trainable = f" It trains {trainable_parameters:,} parameters." if trainable_parameters is not None else ""
    return (
        f"A {_method_name(tuning_mode)} (tuning mode `{tuning_mode}`) of the {library} backbone {base} "
        f"for image classification into {classes}, {how}.{trainable}"
    )


def _backbone_code(base_model: str, library: str, num_classes: int, variable: str) -> tuple[str, str]:
    """``(import, construction)`` of the base backbone with this run's head size."""
    if library == "timm":
        return (
            "import timm",
            f'{variable} = timm.create_model("{base_model}", pretrained=True, num_classes={num_classes})',
        )
    return (
        "from transformers import AutoModelForImageClassification",
        f"{variable} = AutoModelForImageClassification.from_pretrained(\n"
        f'    "{base_model}", num_labels={num_classes}, ignore_mismatched_sizes=True\n)',
    )


def _usage(base_model: str, library: str, tuning_mode: str, num_classes: int) -> str:
    parts = [
        "With hf_tuning, whatever the tuning mode (from the Hub, download the folder first with "
        "`huggingface_hub.snapshot_download`):",
        "",
        "```python",
        "from hf_tuning.vision import load_trained_classifier",
        "",
        'classifier = load_trained_classifier("<this folder>")',
        "classifier.model, classifier.data_config, classifier.class_names  # network, preprocessing, labels",
        "```",
    ]
    if tuning_mode == "lora":
        imports, build = _backbone_code(base_model, library, num_classes, "base")
        parts += [
            "",
            f"Or with PEFT, on the base backbone with a {num_classes}-class head:",
            "",
            "```python",
            imports,
            "from peft import PeftModel",
            "",
            build,
            'model = PeftModel.from_pretrained(base, "<this repo or folder>")',
            "```",
        ]
    elif tuning_mode in PETL_MODES:
        imports, build = _backbone_code(base_model, library, num_classes, "backbone")
        name = _method_name(tuning_mode).removesuffix(" adapter")
        parts += [
            "",
            f"PEFT cannot load this folder: {name} is not in PEFT's list of methods, so "
            "`peft.PeftModel.from_pretrained` does not apply. hf_tuning's tuners load it onto the backbone:",
            "",
            "```python",
            imports,
            "from hf_tuning.tuners import load_petl_model",
            "",
            build,
            'model = load_petl_model(backbone, "<this repo or folder>")',
            "```",
        ]
    return "\n".join(parts)
