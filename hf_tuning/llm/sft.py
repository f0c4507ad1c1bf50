"""Staged subspace tuning on ``trl.SFTTrainer`` (same implementation as :class:`StagedTrainer`).

The trainer takes a plain causal LM (full fine-tuning), a PEFT model (or ``peft_config``), or a
:mod:`hf_tuning.tuners` method model such as SNELL on a LLaMA: checkpoints and ``save_model`` then write
the method's adapter folder (:class:`~hf_tuning.tuners.checkpoints.PetlCheckpointing`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trl.trainer.sft_trainer as trl_sft
from trl import SFTConfig, SFTTrainer

from hf_tuning.arguments import StagedTuningArgumentsMixin
from hf_tuning.precision import resolve_mixed_precision
from hf_tuning.trainer import StagedTrainerMixin
from hf_tuning.tuners.checkpoints import PetlCheckpointing
from hf_tuning.tuners.model import PetlModel

__all__ = ["StagedSFTConfig", "StagedSFTTrainer"]

logger = logging.getLogger(__name__)


@dataclass
class StagedSFTConfig(StagedTuningArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` plus the ``dt_*`` staged-tuning fields.

    ``bf16`` left unset follows the hardware (TRL's default is ``True`` everywhere, which fails on
    a CPU): bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.
    """

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision; unset: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            precision = "fp16" if self.fp16 else resolve_mixed_precision(use_cpu=self.use_cpu)
            self.bf16, self.fp16 = precision == "bf16", precision == "fp16"
        super().__post_init__()


@contextlib.contextmanager
def _fused_lm_head_inside_methods() -> Iterator[None]:
    """While ``SFTTrainer.__init__`` runs, give TRL's fused LM head the causal LM inside a method model.

    TRL patches the forward of the model it trains with a fused LM head that runs ``self.base_model`` as the
    decoder stack and projects its ``last_hidden_state`` itself. It unwraps a ``PeftModel`` first; a method
    model's ``base_model`` is the whole causal LM (whose output has logits, no hidden state), so the patch
    goes on that causal LM instead, and the method model's forward passes ``fused_lm_head`` through to it.
    """
    original = getattr(trl_sft, "add_fused_lm_head", None)
    if original is None:  # a TRL without the fused head: nothing to redirect
        yield
        return

    def add_fused_lm_head(model: Any, *args: Any, **kwargs: Any) -> Any:
        target = model.get_base_model() if isinstance(model, PetlModel) else model
        return original(target, *args, **kwargs)

    trl_sft.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        trl_sft.add_fused_lm_head = original


class StagedSFTTrainer(PetlCheckpointing, StagedTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that optimises the model's subspaces stage by stage.

    With ``peft_config`` the model is wrapped by TRL first, so only adapter parameters (and
    ``modules_to_save``) are staged. A :mod:`hf_tuning.tuners` model (``get_petl_model(llama, SNELLConfig())``,
    passed with ``peft_config=None``) is staged over its method's modules, which sit inside the decoder
    blocks; its checkpoints and final save are adapter folders (``adapter_config.json`` with a ``method``
    key, ``adapter_model.safetensors``) plus the tokenizer, as a LoRA run's are.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _fused_lm_head_inside_methods():
            super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, packing: bool, *rest: Any) -> Any:
        """TRL drops the rows whose every trained token lies beyond ``max_length`` (a long prompt, long tool
        definitions) and shows only a progress bar; say how many went, so that no row is lost unnoticed."""
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, *rest)
        if not packing and hasattr(dataset, "__len__") and hasattr(prepared, "__len__"):
            dropped = len(dataset) - len(prepared)
            if dropped > 0:
                name = rest[-1] if rest else "train"
                logger.warning(
                    "%d of the %d %s rows were dropped: max_length=%s cut off every token they would train on "
                    "(raise max_length, or shorten the prompts)",
                    dropped,
                    len(dataset),
                    name,
                    args.max_length,
                )
        return prepared

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        # PetlCheckpointing writes the adapter folder; the tokenizer goes beside it, as Trainer._save does
        if self._petl_model() is not None and self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)
