"""AgriMaTech-LLaMA: Llama-3.1-8B-Instruct + LoRA + DT-3 on AgriMachine28K-style instruction data.

    accelerate launch recipes/agrimatech_llama_dt3.py --config recipes/configs/agrimatech_llama_dt3.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/agrimatech_llama_dt3.py \\
        --config recipes/configs/agrimatech_llama_dt3.yaml --push_to_hub --hub_model_id me/agrimatech-llama-dt3
    python recipes/agrimatech_llama_dt3.py --config recipes/configs/agrimatech_smollm2_dt3.yaml   # CPU, minutes
    python recipes/agrimatech_llama_dt3.py --config recipes/configs/agrimatech_smollm2_snell.yaml # SNELL, CPU

Every field of the four dataclasses below can be set in the YAML file and overridden on the
command line (``--dt_variant dt1 --lora_r 32``), as in TRL's scripts. The steps:

1. check everything that can fail (tuning mode, model, data, chat template) before loading weights;
2. load the model (optionally 4-bit for QLoRA) and let TRL wrap it with LoRA, or, with
   ``--tuning_mode snell`` / ``snella`` (and ``--use_peft false``), put SNELL deltas on its linear layers
   (:mod:`hf_tuning.llm.tuning`);
3. train stage by stage (DT-3: even blocks, then odd blocks), resumable with ``--resume_from_checkpoint``;
4. save the adapter, tokenizer and a model card, evaluate, and push to the Hub if asked. A SNELL adapter
   folder loads with ``hf_tuning.tuners.load_petl_model`` (and ``eval/evaluate_sft.py --adapter``).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from datasets_builders.agrimachine import AgriMachineDataArguments, build_agrimachine_dataset, push_dataset
from hf_tuning import StagedSFTConfig, StagedSFTTrainer
from hf_tuning.hub import push_output_dir
from hf_tuning.llm.chat_templates import (
    apply_training_chat_template,
    check_tool_conversations_render,
    compare_with_stock,
    stop_token_ids,
)
from hf_tuning.llm.loading import check_model_exists, kbit_device_map, load_causal_lm, load_tokenizer
from hf_tuning.llm.model_card import write_model_card
from hf_tuning.llm.tuning import METHOD_MODES, LlmTuningArguments, build_method_model, check_tuning_combination
from hf_tuning.precision import torch_dtype_for
from hf_tuning.recipe_runner import check_setting_names, run_recipe, training_started

logger = logging.getLogger("agrimatech")
# read when no --config is given
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "agrimatech_llama_dt3.yaml"


@dataclass
class RecipeArguments(LlmTuningArguments):
    """What the recipe adds to TRL's ModelConfig and SFTConfig: the tuning mode (``tuning_mode``, ``snell_*``,
    from :class:`~hf_tuning.llm.tuning.LlmTuningArguments`) and the fields below."""

    chat_template: str = field(
        default="auto",
        metadata={
            "help": "Training chat template: auto (from the tokenizer), llama3, llama3.1, chatml or a .jinja path."
        },
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path, if any."})
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id recorded as the base model in the card and adapter config (default: the model path)."
        },
    )
    license: str | None = field(default=None, metadata={"help": "License written to the model card."})


def parse_args(argv: list[str] | None = None):
    parser = TrlParser((RecipeArguments, AgriMachineDataArguments, ModelConfig, StagedSFTConfig))
    check_setting_names(parser, sys.argv[1:] if argv is None else argv)
    return parser.parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    recipe, data_args, model_args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)

    # 1. Everything that can fail, before any weights are loaded.
    check_tuning_combination(recipe, model_args, training_args)  # e.g. snell with use_peft or load_in_4bit
    model_source = check_model_exists(
        model_args.model_name_or_path,
        gguf_file=recipe.gguf_file,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    dataset, report = build_agrimachine_dataset(data_args)
    logger.info("data: %s", report.summary())
    if data_args.push_dataset_to_hub and training_args.process_index == 0:
        push_dataset(
            dataset,
            data_args.push_dataset_to_hub,
            private=bool(training_args.hub_private_repo),
            token=training_args.hub_token,
        )
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        gguf_file=recipe.gguf_file,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    stock_template = tokenizer.chat_template
    template = apply_training_chat_template(tokenizer, recipe.chat_template)
    for split in ("train", "validation"):  # e.g. parallel tool calls under llama3.1: refused now, not mid-tokenizing
        if split in dataset:
            check_tool_conversations_render(tokenizer, dataset[split], split=split)
    # what the card says differs from the base model's own template (measured, not assumed)
    template_difference = compare_with_stock(tokenizer, stock_template) if isinstance(stock_template, str) else None
    base_model_id = recipe.base_model_id or model_source.name

    # 2. The model; TRL adds the LoRA adapter from peft_config, or the recipe attaches a hf_tuning.tuners method.
    quantization = get_quantization_config(model_args)
    model = load_causal_lm(
        model_args.model_name_or_path,
        gguf_file=recipe.gguf_file,
        revision=model_args.model_revision,
        dtype=model_args.dtype or torch_dtype_for(training_args.bf16, training_args.fp16),
        trust_remote_code=training_args.trust_remote_code,
        quantization_config=quantization,
        device_map=kbit_device_map() if quantization is not None else None,
        attn_implementation=model_args.attn_implementation,
    )
    model.config._name_or_path = model.name_or_path = base_model_id  # what adapter_config.json records
    model.generation_config.eos_token_id = stop_token_ids(
        tokenizer, template, generation_config=model.generation_config
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    method = recipe.tuning_mode if recipe.tuning_mode in METHOD_MODES else None
    if method is not None:
        set_seed(training_args.seed)  # the factors start random: the same in every run with this seed
        model = build_method_model(model, recipe, base_model_name_or_path=base_model_id)

    # The recipe pushes the finished output folder once, never the per-stage checkpoints.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    # what TRL renders: the conversation, and the tool definitions of tool-calling rows (JSON text)
    columns = [name for name in ("messages", "tools") if name in dataset["train"].column_names]
    trainer = StagedSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"].select_columns(columns),
        eval_dataset=dataset["validation"].select_columns(columns) if "validation" in dataset else None,
        processing_class=tokenizer,
        peft_config=None if method is not None else get_peft_config(model_args),
    )
    logger.info("stage plan: %s", [(s.name, s.num_params) for s in trainer.stage_plan.stages])

    # 3. Train every stage.
    resume = training_args.resume_from_checkpoint
    resume = True if str(resume).lower() in ("true", "last") else resume
    training_started()  # from here on an error is a bug report: keep its traceback
    train_result = trainer.train(resume_from_checkpoint=resume)

    # 4. Save, evaluate, describe, push.
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))  # on every rank: ZeRO-3 gathers the adapter here
    metrics = {}
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        write_model_card(
            output_dir,
            model_name=training_args.hub_model_id or output_dir.name,
            base_model=base_model_id,
            stage_plan=trainer.stage_plan,
            stage_records=trainer.stage_records,
            dt_budget=training_args.dt_budget,
            hyperparameters=_hyperparameters(training_args, model_args, template, recipe),
            chat_template=template,
            chat_template_difference=template_difference,
            datasets=data_args.hub_dataset_ids(),
            dataset_description=f"Training data:\n\n```text\n{report.summary()}\n```",  # a mixture: a table
            eval_results={k: metrics[k] for k in ("eval_loss", "perplexity") if k in metrics},
            eval_dataset_name="AgriMachine held-out data",
            license=recipe.license,
            tags=[*([method, "petl"] if method else ["lora"]), "agriculture", "agricultural-mechanization"],
            method=method,
        )
        if push_to_hub:
            repo_id = training_args.hub_model_id or output_dir.name
            url = push_output_dir(
                output_dir, repo_id, private=bool(training_args.hub_private_repo), token=training_args.hub_token
            )
            logger.info("pushed to %s", url)
    trainer.accelerator.wait_for_everyone()
    return {"output_dir": str(output_dir), "train": train_result.metrics, "eval": metrics, "trainer": trainer}


def _hyperparameters(
    args: StagedSFTConfig, model_args: ModelConfig, template: str, tuning: LlmTuningArguments
) -> dict[str, Any]:
    if tuning.tuning_mode in METHOD_MODES:
        adapter = {"tuning_mode": tuning.tuning_mode, **tuning.card_settings()}
    else:
        adapter = {
            "lora_r": model_args.lora_r,
            "lora_alpha": model_args.lora_alpha,
            "lora_dropout": model_args.lora_dropout,
            "lora_target_modules": model_args.lora_target_modules,
            "load_in_4bit": model_args.load_in_4bit,
        }
    return {
        "dt_variant": args.dt_variant,
        "dt_budget": args.dt_budget,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "num_train_epochs (per stage)" if args.dt_budget == "per_stage" else "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "max_length": args.max_length,
        **adapter,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "chat_template": template,
        "assistant_only_loss": args.assistant_only_loss,
        "seed": args.seed,
    }


if __name__ == "__main__":
    sys.exit(run_recipe(main, default_config=DEFAULT_CONFIG))
