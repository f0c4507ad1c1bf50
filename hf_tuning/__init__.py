"""hf_tuning: staged subspace tuning (Diffusion Tuning DT1-DT4) for the Hugging Face stack.

Where things live:

* the variants (ost, dt1..dt4) and their stage rules: :mod:`hf_tuning.variants`
* how a model is split into subspaces: :mod:`hf_tuning.partition` (block families in
  :mod:`hf_tuning.families`)
* stage plans built from both: :mod:`hf_tuning.stages`
* the trainers: :mod:`hf_tuning.trainer` (transformers) and :mod:`hf_tuning.sft` (TRL)
* for SFT recipes: training chat templates (:mod:`hf_tuning.chat_templates`), model loading from
  the Hub, a folder or GGUF (:mod:`hf_tuning.models`), model cards (:mod:`hf_tuning.model_card`)
  and Hub upload of a finished run (:mod:`hf_tuning.hub`)
* image classifiers (timm / transformers ViT, Swin, ConvNeXt): :mod:`hf_tuning.vision`
* DiT transfer by chain of forgetting (diffusers): :mod:`hf_tuning.diffusion`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "BlockFamily": "hf_tuning.families",
    "BlocksNotFoundError": "hf_tuning.families",
    "register_block_family": "hf_tuning.families",
    "find_block_stack": "hf_tuning.families",
    "PartitionError": "hf_tuning.partition",
    "SubspaceGroup": "hf_tuning.partition",
    "SubspacePartition": "hf_tuning.partition",
    "partition_subspaces": "hf_tuning.partition",
    "Stage": "hf_tuning.stages",
    "StagePlan": "hf_tuning.stages",
    "build_stage_plan": "hf_tuning.stages",
    "VARIANTS": "hf_tuning.variants",
    "TuningVariant": "hf_tuning.variants",
    "StagedTrainingArguments": "hf_tuning.arguments",
    "StagedTrainer": "hf_tuning.trainer",
    "StagedTuningCallback": "hf_tuning.callback",
    "StagedSFTConfig": "hf_tuning.sft",
    "StagedSFTTrainer": "hf_tuning.sft",
    "DeepSpeedConfigError": "hf_tuning.deepspeed_checks",
    "ChatTemplateError": "hf_tuning.chat_templates",
    "apply_training_chat_template": "hf_tuning.chat_templates",
    "ModelNotFoundError": "hf_tuning.models",
    "load_causal_lm": "hf_tuning.models",
    "load_tokenizer": "hf_tuning.models",
    "push_output_dir": "hf_tuning.hub",
    "write_model_card": "hf_tuning.model_card",
}

__all__ = [
    "BlockFamily",
    "ChatTemplateError",
    "ModelNotFoundError",
    "BlocksNotFoundError",
    "DeepSpeedConfigError",
    "PartitionError",
    "Stage",
    "StagePlan",
    "StagedSFTConfig",
    "StagedSFTTrainer",
    "StagedTrainer",
    "StagedTrainingArguments",
    "StagedTuningCallback",
    "SubspaceGroup",
    "SubspacePartition",
    "TuningVariant",
    "VARIANTS",
    "apply_training_chat_template",
    "build_stage_plan",
    "find_block_stack",
    "load_causal_lm",
    "load_tokenizer",
    "partition_subspaces",
    "push_output_dir",
    "register_block_family",
    "write_model_card",
]

if TYPE_CHECKING:  # pragma: no cover
    from hf_tuning.arguments import StagedTrainingArguments
    from hf_tuning.callback import StagedTuningCallback
    from hf_tuning.chat_templates import ChatTemplateError, apply_training_chat_template
    from hf_tuning.deepspeed_checks import DeepSpeedConfigError
    from hf_tuning.families import BlockFamily, BlocksNotFoundError, find_block_stack, register_block_family
    from hf_tuning.hub import push_output_dir
    from hf_tuning.model_card import write_model_card
    from hf_tuning.models import ModelNotFoundError, load_causal_lm, load_tokenizer
    from hf_tuning.partition import PartitionError, SubspaceGroup, SubspacePartition, partition_subspaces
    from hf_tuning.sft import StagedSFTConfig, StagedSFTTrainer
    from hf_tuning.stages import Stage, StagePlan, build_stage_plan
    from hf_tuning.trainer import StagedTrainer
    from hf_tuning.variants import VARIANTS, TuningVariant


def __getattr__(name: str):
    """Import lazily: ``import hf_tuning`` stays cheap, TRL is only loaded for the SFT classes."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_tuning' has no attribute {name!r}")
