"""Training arguments for staged subspace tuning (the TRL variant lives in :mod:`hf_tuning.llm.sft`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from hf_tuning.stages import ORDERS
from hf_tuning.variants import VARIANTS

__all__ = ["StagedTuningArgumentsMixin", "StagedTrainingArguments", "BUDGETS", "STAGE_INITS"]

logger = logging.getLogger(__name__)
BUDGETS = ("per_stage", "split")
STAGE_INITS = ("last", "best")


@dataclass
class StagedTuningArgumentsMixin:
    """The ``dt_*`` fields shared by :class:`StagedTrainingArguments` and :class:`StagedSFTConfig`."""

    dt_variant: str = field(
        default="dt3",
        metadata={
            "help": "Tuning variant: ost (everything at once), dt1 (4 adjacent depth groups, one at a "
            "time), dt2 (the same groups cumulatively), dt3 (even blocks, then odd blocks), dt4 (even "
            "blocks, then everything).",
            "choices": list(VARIANTS),
        },
    )
    dt_num_groups: int | None = field(
        default=None,
        metadata={
            "help": "Number of subspaces (default 4 for dt1/dt2, 2 for dt3/dt4; one per stage "
            "for hierarchical models under dt1/dt2)."
        },
    )
    dt_order: str = field(
        default="forward",
        metadata={
            "help": "Group order: forward (input side first, as in the paper), reverse, or random "
            "(a permutation drawn with `seed`).",
            "choices": list(ORDERS),
        },
    )
    dt_budget: str = field(
        default="per_stage",
        metadata={
            "help": "per_stage: every stage runs the full num_train_epochs/max_steps (the paper). "
            "split: that budget is divided across the stages, for equal-compute comparisons.",
            "choices": list(BUDGETS),
        },
    )
    dt_stage_init: str = field(
        default="last",
        metadata={
            "help": "Weights each stage starts from: last (the previous stage's end) or best (its "
            "best checkpoint by metric_for_best_model, as in the paper; needs evaluation).",
            "choices": list(STAGE_INITS),
        },
    )
    dt_always_trainable: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regexes of parameters trained in every stage. Unset: the head and final norm "
            "(the paper). An empty list trains them in no stage."
        },
    )
    dt_frozen: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regexes of parameters no stage trains, e.g. 'embed_tokens|lm_head' to save "
            "optimizer memory in full fine-tuning of a large LLM."
        },
    )
    dt_groups: list[str] | None = field(
        default=None,
        metadata={
            "help": "Explicit subspaces, one regex per group in depth order; replaces block "
            "discovery (for models whose blocks hf_tuning cannot find)."
        },
    )

    def __post_init__(self) -> None:
        self.dt_variant = str(self.dt_variant).lower()
        problems = []
        if self.dt_variant not in VARIANTS:
            problems.append(f"dt_variant={self.dt_variant!r} is not one of {', '.join(VARIANTS)}")
        if self.dt_order not in ORDERS:
            problems.append(f"dt_order={self.dt_order!r} is not one of {', '.join(ORDERS)}")
        if self.dt_budget not in BUDGETS:
            problems.append(f"dt_budget={self.dt_budget!r} is not one of {', '.join(BUDGETS)}")
        if self.dt_stage_init not in STAGE_INITS:
            problems.append(f"dt_stage_init={self.dt_stage_init!r} is not one of {', '.join(STAGE_INITS)}")
        if self.dt_num_groups is not None and self.dt_num_groups < 1:
            problems.append(f"dt_num_groups must be >= 1, got {self.dt_num_groups}")
        if self.dt_groups is not None and self.dt_num_groups not in (None, len(self.dt_groups)):
            problems.append(f"dt_num_groups={self.dt_num_groups} contradicts the {len(self.dt_groups)} dt_groups given")
        if self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            problems.append(
                "FSDP is not supported yet: the engine re-wraps the model for every stage, which FSDP's flat "
                "parameters do not allow; shard with DeepSpeed ZeRO-3 instead (accelerate_configs/deepspeed_zero3.yaml)"
            )
        if problems:
            raise ValueError("invalid staged tuning arguments: " + "; ".join(problems))
        if self.dt_stage_init == "best":
            # Each stage restores its best checkpoint through the Trainer's own mechanism.
            if str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
                raise ValueError(
                    "dt_stage_init='best' starts every stage from the previous stage's best checkpoint, "
                    "so it needs evaluation: set eval_strategy ('steps' or 'epoch'), an eval_dataset and "
                    "metric_for_best_model (default: eval loss)"
                )
            self.load_best_model_at_end = True
        elif self.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end=True with dt_stage_init='last' is contradictory: set "
                "dt_stage_init='best' to start each stage from the previous stage's best checkpoint"
            )
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # Without this, a multi-process launch on a machine with no accelerator silently trains
            # one independent replica per process (accelerate only picks MULTI_CPU/gloo for use_cpu).
            logger.warning("WORLD_SIZE>1 and no accelerator: setting use_cpu=True for gloo data parallelism")
            self.use_cpu = True
        super().__post_init__()  # type: ignore[misc]


@dataclass
class StagedTrainingArguments(StagedTuningArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` plus the ``dt_*`` staged-tuning fields (for :class:`StagedTrainer`)."""
