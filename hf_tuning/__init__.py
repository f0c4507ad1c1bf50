"""hf_tuning: staged subspace tuning (Diffusion Tuning DT1-DT4) for the Hugging Face stack.

The package has two layers, and imports only go down (``tests/engine/test_layers.py`` checks it):

* the engine core, modules at this level: the variants (:mod:`hf_tuning.variants`), the block-family
  registry (:mod:`hf_tuning.families`), the membership rules (:mod:`hf_tuning.partition`), stage plans
  (:mod:`hf_tuning.stages`), the trainer (:mod:`hf_tuning.trainer`) with its callback, backward stop,
  arguments, stage records, DeepSpeed helpers, atomic I/O, timeline, precision, Hub upload and the
  ``hf-tuning`` CLI;
* domain packages on top of it, each registering its own block families:
  :mod:`hf_tuning.llm` (SFT trainer, model loading, chat templates, model cards),
  :mod:`hf_tuning.vision` (ViT, Swin, ConvNeXt classifiers), :mod:`hf_tuning.diffusion` (DiT chain of
  forgetting) and :mod:`hf_tuning.tuners` (one folder per PETL method).

The scripts that use the library (``recipes/``, ``datasets_builders/``, ``eval/``, ``benchmarks/``)
sit above both. This module is the public facade: every name below is imported on first use, so
``import hf_tuning`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hf_tuning.lazy import lazy_exports

# Each domain declares its block families in its `families` module (pure declarations: no torch, timm
# or diffusers import); importing them here registers them however hf_tuning is entered. The first
# registered family that matches a model wins, so the order is kept explicit.
DOMAINS = ("llm", "vision", "diffusion")
for _domain in DOMAINS:
    importlib.import_module(f"hf_tuning.{_domain}.families")

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "families": ("BlockFamily", "BlocksNotFoundError", "find_block_stack", "register_block_family"),
        "partition": ("PartitionError", "SubspaceGroup", "SubspacePartition", "partition_subspaces"),
        "stages": ("Stage", "StagePlan", "build_stage_plan"),
        "variants": ("VARIANTS", "TuningVariant"),
        "records": ("StageRecord",),
        "arguments": ("StagedTrainingArguments",),
        "trainer": ("StagedTrainer",),
        "callback": ("StagedTuningCallback",),
        "deepspeed_checks": ("DeepSpeedConfigError",),
        "hub": ("push_output_dir",),
        "llm.sft": ("StagedSFTConfig", "StagedSFTTrainer"),
        "llm.chat_templates": ("ChatTemplateError", "apply_training_chat_template"),
        "llm.loading": ("ModelNotFoundError", "load_causal_lm", "load_tokenizer"),
        "llm.model_card": ("write_model_card",),
    },
    globals(),
)

if TYPE_CHECKING:  # pragma: no cover
    from hf_tuning.arguments import StagedTrainingArguments
    from hf_tuning.callback import StagedTuningCallback
    from hf_tuning.deepspeed_checks import DeepSpeedConfigError
    from hf_tuning.families import BlockFamily, BlocksNotFoundError, find_block_stack, register_block_family
    from hf_tuning.hub import push_output_dir
    from hf_tuning.llm.chat_templates import ChatTemplateError, apply_training_chat_template
    from hf_tuning.llm.loading import ModelNotFoundError, load_causal_lm, load_tokenizer
    from hf_tuning.llm.model_card import write_model_card
    from hf_tuning.llm.sft import StagedSFTConfig, StagedSFTTrainer
    from hf_tuning.partition import PartitionError, SubspaceGroup, SubspacePartition, partition_subspaces
    from hf_tuning.records import StageRecord
    from hf_tuning.stages import Stage, StagePlan, build_stage_plan
    from hf_tuning.trainer import StagedTrainer
    from hf_tuning.variants import VARIANTS, TuningVariant
