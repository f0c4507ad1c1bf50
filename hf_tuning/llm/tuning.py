"""What an SFT run trains: LoRA through TRL's ``peft_config`` (the default), or a :mod:`hf_tuning.tuners` method.

``--tuning_mode snell`` / ``snella`` puts a kernelized sparse delta (SNELL, SNELLA) on the linear layers
of the decoder blocks instead of LoRA. The method's factors sit inside the blocks, so the staged engine
partitions them by block like LoRA's matrices; the run saves an adapter folder that
:func:`hf_tuning.tuners.load_petl_model` reads (PEFT cannot: its ``adapter_config.json`` names a ``method``).

    tuning = LlmTuningArguments(tuning_mode="snell", snell_rank=8)
    check_tuning_combination(tuning, model_args, training_args)   # before any weights load
    model = build_method_model(model, tuning, base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    trainer = StagedSFTTrainer(model=model, args=training_args, ..., peft_config=None)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from hf_tuning.tuners import PetlModel, SNELLConfig

__all__ = [
    "TUNING_MODES",
    "METHOD_MODES",
    "LlmTuningArguments",
    "TuningCombinationError",
    "build_method_model",
    "check_tuning_combination",
]

logger = logging.getLogger(__name__)
TUNING_MODES = ("lora", "snell", "snella")
METHOD_MODES = ("snell", "snella")  # served by hf_tuning.tuners, saved as its adapter folders


class TuningCombinationError(ValueError):
    """The tuning mode contradicts another setting of the run (LoRA, quantization, DeepSpeed ZeRO-3)."""


@dataclass
class LlmTuningArguments:
    """The recipe's tuning mode and the settings of the :mod:`hf_tuning.tuners` methods.

    ``lora`` keeps TRL's behaviour: ``use_peft`` and the ``lora_*`` fields of ``trl.ModelConfig`` decide.
    """

    tuning_mode: str = field(
        default="lora",
        metadata={
            "help": "lora: TRL's peft_config from use_peft and the lora_* fields (as before). snell / snella: a "
            "kernelized sparse delta (hf_tuning.tuners) on every linear layer of the decoder blocks instead; "
            "needs use_peft false and a floating-point base (no load_in_4bit / load_in_8bit).",
            "choices": list(TUNING_MODES),
        },
    )
    snell_rank: int = field(
        default=8,
        metadata={"help": "SNELL/SNELLA: factor rank (even). (in + out) * rank parameters per matrix, as LoRA r."},
    )
    snell_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "SNELL: fraction of each delta's entries zeroed (default 0.9); SNELLA: every matrix's starting "
            "sparsity (default 0.01)."
        },
    )
    snell_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "SNELL/SNELLA: nn.Linear names or name suffixes to adapt (e.g. q_proj v_proj); default every "
            "nn.Linear inside the decoder blocks (LLaMA: q, k, v, o, gate, up and down projections)."
        },
    )
    snell_dropout: float = field(
        default=0.05,
        metadata={
            "help": "SNELL/SNELLA: dropout on each delta's input (none on o_proj). 0.05 as the usual LLM LoRA "
            "dropout: the method's vision default 0.1 regularises small image sets; instruction data needs less."
        },
    )
    snell_drop_path: float = field(
        default=0.0,
        metadata={
            "help": "SNELL/SNELLA: per-sequence drop of each delta's output in training. 0 for LLMs: dropping a "
            "whole sequence's update is the vision method's stochastic depth, which decoder fine-tuning does "
            "not use (and which makes short SFT runs noisy)."
        },
    )
    snella_target_sparsity: float = field(
        default=0.8, metadata={"help": "SNELLA: overall sparsity the allocator's budget shrinks towards."}
    )

    def __post_init__(self) -> None:
        if self.tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode={self.tuning_mode!r} is not one of {', '.join(TUNING_MODES)}")
        if self.tuning_mode in METHOD_MODES:
            self.method_config()  # the config's own validation, before anything else happens
        else:
            ignored = [f"--{name}" for name in self.changed_method_settings()]
            if ignored:
                logger.warning(
                    "tuning_mode=%s ignores %s (set --tuning_mode snell to use them)",
                    self.tuning_mode,
                    ", ".join(ignored),
                )

    def changed_method_settings(self) -> list[str]:
        """The method fields set to something other than their defaults (only this class's own fields: a recipe's
        subclass adds settings every mode uses)."""
        return [
            f.name for f in fields(LlmTuningArguments) if f.name != "tuning_mode" and getattr(self, f.name) != f.default
        ]

    def method_config(self, base_model_name_or_path: str | None = None) -> SNELLConfig:
        """The :mod:`hf_tuning.tuners` config of ``snell`` / ``snella`` (raises ``PetlConfigError`` on bad values)."""
        from hf_tuning.tuners import SNELLAConfig, SNELLConfig

        if self.tuning_mode not in METHOD_MODES:
            raise ValueError(f"tuning_mode={self.tuning_mode!r} is not a hf_tuning.tuners method")
        settings: dict[str, Any] = {
            "rank": self.snell_rank,
            "target_modules": list(self.snell_target_modules) if self.snell_target_modules else None,
            "dropout": self.snell_dropout,
            "drop_path": self.snell_drop_path,
            "base_model_name_or_path": base_model_name_or_path,
        }
        if self.snell_sparsity is not None:
            settings["sparsity"] = self.snell_sparsity
        if self.tuning_mode == "snella":
            return SNELLAConfig(target_sparsity=self.snella_target_sparsity, **settings)
        return SNELLConfig(**settings)

    def card_settings(self) -> dict[str, Any]:
        """What the model card lists for this mode's method, under the recipe's flag names (defaults filled in)."""
        config = self.method_config()
        names = ["rank", "sparsity", "target_modules", "dropout", "drop_path"]
        settings = {f"snell_{name}": getattr(config, name) for name in names}
        if self.tuning_mode == "snella":
            settings["snella_target_sparsity"] = config.target_sparsity
        return settings


def _zero_stage(training_args: Any) -> int:
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0


def check_tuning_combination(tuning: LlmTuningArguments, model_args: Any, training_args: Any = None) -> None:
    """Refuse a method mode combined with what would also wrap, quantize or shard the model, before weights load.

    ``model_args`` is TRL's ``ModelConfig``; ``training_args`` the ``StagedSFTConfig`` (for its DeepSpeed plugin).
    """
    mode = tuning.tuning_mode
    if mode not in METHOD_MODES:
        return
    if getattr(model_args, "use_peft", False):
        raise TuningCombinationError(
            f"--tuning_mode {mode} trains {mode.upper()} deltas instead of LoRA, but use_peft is true, so TRL would "
            "also wrap the model with LoRA. Pass --use_peft false (the shipped configs set use_peft: true; "
            "recipes/configs/agrimatech_smollm2_snell.yaml does not)"
        )
    quantized = [flag for flag in ("load_in_4bit", "load_in_8bit") if getattr(model_args, flag, False)]
    if quantized:
        raise TuningCombinationError(
            f"--tuning_mode {mode} needs a floating-point base model, but --{quantized[0]} quantizes it: SNELL builds "
            "each matrix's dense delta and merges it into the weight, which a bitsandbytes layer cannot take. Load "
            "the base in bf16 (drop --load_in_4bit / --load_in_8bit), or use --tuning_mode lora for QLoRA"
        )
    stage = _zero_stage(training_args) if training_args is not None else 0
    if stage == 3:
        raise TuningCombinationError(
            f"--tuning_mode {mode} does not support DeepSpeed ZeRO-3: the adapter folder is written from the "
            "unsharded parameters, which ZeRO-3 partitions across ranks (they would be saved empty). Use DDP "
            "(accelerate_configs/multi_gpu.yaml) or ZeRO-2"
        )
    if mode == "snella" and stage > 0:
        raise TuningCombinationError(
            f"--tuning_mode snella's allocator reads every factor's gradient after each step, which DeepSpeed ZeRO-"
            f"{stage} keeps partitioned. Use DDP (accelerate_configs/multi_gpu.yaml), or --tuning_mode snell"
        )


def build_method_model(
    model: nn.Module, tuning: LlmTuningArguments, base_model_name_or_path: str | None = None
) -> PetlModel:
    """Attach the mode's method to the loaded causal LM: the base is frozen, only the method's factors train.

    Seed the run before calling it: the factors start random (the recipe calls ``set_seed`` first).
    """
    from hf_tuning.tuners import get_petl_model

    method = get_petl_model(model, tuning.method_config(base_model_name_or_path))
    trainable, total = method.get_nb_trainable_parameters()
    logger.info(
        "%s: %d layers adapted, %s trainable parameters of %s (%.3f%%)",
        tuning.tuning_mode,
        len(method.targets),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return method
