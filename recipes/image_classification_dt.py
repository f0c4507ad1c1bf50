"""Staged tuning (OST, DT1-DT4) of an image classifier: timm or transformers ViT, Swin, ConvNeXt.

    accelerate launch recipes/image_classification_dt.py --config recipes/configs/swin_base_22kto1k.yaml --dt_variant dt1
    accelerate launch recipes/image_classification_dt.py --config recipes/configs/vit_b16_vtab1k_lora_dt3.yaml \\
        --task cifar --data_dir /data/vtab-1k
    python recipes/image_classification_dt.py --config recipes/configs/digits_vit_dt3.yaml   # CPU, seconds

Every field of the dataclasses below can be set in the YAML file and overridden on the command
line (``--dt_variant dt4 --tuning_mode lora``). The steps:

1. read and check the data splits before any weights are loaded;
2. build the backbone with its starting weights and fit the head to the class count;
3. make the tuning mode's parameters trainable (everything, LoRA or bottleneck adapters);
4. train stage by stage, resumable with ``--resume_from_checkpoint``;
5. save the weights with ``vision_config.json`` (``eval/evaluate_vision.py`` reloads from it) and a
   model card (``README.md``).

``--tuning_mode`` is full, lora, adapter, dtl, dtl_plus, dyt, snell or snella (the last five:
:mod:`hf_tuning.tuners`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import TrlParser

from datasets_builders.image_classification import VisionDataArguments, load_image_splits
from datasets_builders.vision import (
    AugmentationArguments,
    ImageClassificationCollator,
    ImageClassificationDataset,
    build_image_transform,
)
from hf_tuning import StagedTrainingArguments
from hf_tuning.io import atomic_write_json
from hf_tuning.recipe_runner import check_setting_names, run_recipe, training_started
from hf_tuning.vision import (
    StagedImageClassificationTrainer,
    VisionModelArguments,
    VisionTuningArguments,
    accuracy_metrics,
    load_vision_model,
    prepare_for_tuning,
    save_adapter_weights,
    vision_data_config,
    write_vision_config,
    write_vision_model_card,
)
from hf_tuning.vision.backbones import model_library
from hf_tuning.vision.tuning import METHOD_MODES

logger = logging.getLogger("image_classification_dt")
# read when no --config is given
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "vit_b16_vtab1k_lora_dt3.yaml"


@dataclass
class BatchArguments:
    """The paper's batch and learning-rate convention, independent of the number of GPUs."""

    total_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Effective batch (per-device batch x processes x accumulation). Set: gradient_accumulation_steps "
            "is derived from it, so 1024 holds on 8 GPUs or on 2."
        },
    )
    lr_reference_batch: int | None = field(
        default=None,
        metadata={
            "help": "Scale learning_rate linearly by effective batch / this (the Swin and ConvNeXt codebases use 512)."
        },
    )


def parse_args(argv: list[str] | None = None):
    parser = TrlParser(
        (
            BatchArguments,
            VisionModelArguments,
            VisionTuningArguments,
            VisionDataArguments,
            AugmentationArguments,
            StagedTrainingArguments,
        )
    )
    check_setting_names(parser, sys.argv[1:] if argv is None else argv)
    return parser.parse_args_and_config(argv)


def apply_batch_convention(batch: BatchArguments, args: StagedTrainingArguments) -> dict[str, float]:
    """Derive gradient accumulation from the effective batch and scale the LR; returns what was set."""
    per_step = args.per_device_train_batch_size * args.world_size
    if batch.total_batch_size is not None:
        if batch.total_batch_size % per_step:
            raise ValueError(
                f"total_batch_size={batch.total_batch_size} is not a multiple of per_device_train_batch_size x "
                f"processes = {args.per_device_train_batch_size} x {args.world_size}"
            )
        args.gradient_accumulation_steps = batch.total_batch_size // per_step
    effective = per_step * args.gradient_accumulation_steps
    if batch.lr_reference_batch:
        args.learning_rate = args.learning_rate * effective / batch.lr_reference_batch
    return {"effective_batch_size": effective, "learning_rate": args.learning_rate}


MODE_SETTINGS = {
    "lora": ("lora_r", "lora_alpha", "lora_dropout"),
    "adapter": ("adapter_reduction", "adapter_dropout"),
    "dtl": ("dtl_rank", "dtl_map_blocks", "dtl_add_after_blocks"),
    "dtl_plus": ("dtl_rank", "dtl_kernel_size", "dtl_map_blocks", "dtl_add_after_blocks"),
    "dyt": ("dyt_bottleneck", "dyt_target_rate", "dyt_distillation", "dyt_num_experts"),
    "snell": ("snell_rank", "snell_sparsity"),
    "snella": ("snell_rank", "snell_sparsity", "snella_target_sparsity"),
}


def write_run_card(
    trainer: StagedImageClassificationTrainer,
    output_dir: Path,
    model_args: VisionModelArguments,
    tuning_args: VisionTuningArguments,
    train_split: Any,
    library: str,
    metrics: dict[str, float],
    settings: dict[str, float],
) -> Path:
    """The run's model card (README.md), whatever the tuning mode: stages, results, how to reload."""
    args = trainer.args
    hyperparameters = {
        "tuning_mode": tuning_args.tuning_mode,
        **{name: getattr(tuning_args, name) for name in MODE_SETTINGS.get(tuning_args.tuning_mode, ())},
        "dt_variant": args.dt_variant,
        "learning_rate": settings["learning_rate"],
        "effective_batch_size": settings["effective_batch_size"],
        "num_train_epochs": args.num_train_epochs,
        "lr_scheduler_type": str(args.lr_scheduler_type),
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }
    partition = trainer.stage_plan.partition
    results = {k.removeprefix("eval_"): v for k, v in metrics.items() if k in ("eval_top1", "eval_top5")}
    return write_vision_model_card(
        output_dir,
        model_name=output_dir.name,
        base_model=model_args.model_name_or_path,
        library=library,
        tuning_mode=tuning_args.tuning_mode,
        class_names=train_split.classes,
        stage_plan=trainer.stage_plan,
        stage_records=trainer.stage_records,
        dt_budget=args.dt_budget,
        hyperparameters=hyperparameters,
        trainable_parameters=partition.numel(partition.trainable) if partition is not None else None,
        eval_results=results or None,
        dataset_description=f"Trained on {len(train_split)} images in {train_split.num_classes} classes ({train_split.source}).",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    batch, model_args, tuning_args, data_args, augmentation, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)

    if (
        tuning_args.tuning_mode in METHOD_MODES
        and tuning_args.dtl_cache_prefix_features
        and augmentation.random_transforms()
    ):
        raise ValueError(
            "dtl_cache_prefix_features replays the first epoch's features, but training augments at random: "
            f"{', '.join(augmentation.random_transforms())}. Set train_crop: false and mixup/cutmix to 0, or turn the cache off"
        )
    # 1. Data first: a missing split file or an empty class fails here, before any weights load.
    train_split, eval_split = load_image_splits(data_args)
    logger.info(
        "data: %d training images (%s), %d classes", len(train_split), train_split.source, train_split.num_classes
    )
    settings = apply_batch_convention(batch, training_args)

    # 2-3. Backbone, head, tuning mode.
    set_seed(training_args.seed)  # the new head and any added modules start the same in every run with this seed
    model = load_vision_model(model_args, train_split.num_classes)
    data_config = vision_data_config(model, model_args)
    library = model_library(model)
    model = prepare_for_tuning(model, tuning_args, model_args.model_name_or_path)

    train_dataset = ImageClassificationDataset(
        train_split,
        build_image_transform(data_config, train=True, augmentation=augmentation),
        cache_images=data_args.cache_images,
    )
    eval_dataset = None
    if eval_split is not None:
        eval_dataset = ImageClassificationDataset(
            eval_split, build_image_transform(data_config, train=False), cache_images=data_args.cache_images
        )
    trainer = StagedImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=ImageClassificationCollator(train_split.num_classes, augmentation),
        eval_data_collator=ImageClassificationCollator(train_split.num_classes),
        compute_metrics=accuracy_metrics,
    )
    logger.info("stage plan: %s", [(s.name, s.num_params) for s in trainer.stage_plan.stages])

    # 4. Train every stage.
    resume = training_args.resume_from_checkpoint
    resume = True if str(resume).lower() in ("true", "last") else resume
    training_started()  # from here on an error is a bug report: keep its traceback
    train_result = trainer.train(resume_from_checkpoint=resume)

    # 5. Save and evaluate.
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    if trainer.is_world_process_zero():
        write_vision_config(output_dir, model_args, tuning_args, data_config, train_split.classes, library)
        if tuning_args.tuning_mode == "adapter":
            save_adapter_weights(trainer.model, output_dir)
        atomic_write_json(
            output_dir / "all_results.json",
            {
                **{f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()},
                **metrics,
                **settings,
                "world_size": training_args.world_size,
                "dt_variant": training_args.dt_variant,
                "tuning_mode": tuning_args.tuning_mode,
            },
        )
        write_run_card(trainer, output_dir, model_args, tuning_args, train_split, library, metrics, settings)
    trainer.accelerator.wait_for_everyone()
    return {"output_dir": str(output_dir), "train": train_result.metrics, "eval": metrics, "trainer": trainer}


if __name__ == "__main__":
    sys.exit(run_recipe(main, default_config=DEFAULT_CONFIG))
