"""Staged tuning of language models: the TRL trainer and what an SFT recipe needs around it.

* the trainer and its config (``trl.SFTTrainer`` + the staged engine): :mod:`hf_tuning.llm.sft`
* what a run trains (LoRA, or SNELL / SNELLA from :mod:`hf_tuning.tuners`): :mod:`hf_tuning.llm.tuning`
* loading a causal LM and its tokenizer from the Hub, a folder or a GGUF file: :mod:`hf_tuning.llm.loading`
* training chat templates with ``{% generation %}`` markers: :mod:`hf_tuning.llm.chat_templates`
* model cards of finished runs: :mod:`hf_tuning.llm.model_card`
* finished adapters (recognise, attach, detach): :mod:`hf_tuning.llm.adapters`
* after training: ``hf-tuning merge`` (:mod:`hf_tuning.llm.merge`), ``hf-tuning export-gguf``
  (:mod:`hf_tuning.llm.gguf_export`) and ``hf-tuning chat`` (:mod:`hf_tuning.llm.chat`)
* the block families of text models: :mod:`hf_tuning.llm.families`

Names are imported on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from hf_tuning.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "sft": ("StagedSFTConfig", "StagedSFTTrainer"),
        "tuning": (
            "LlmTuningArguments",
            "TuningCombinationError",
            "build_method_model",
            "check_tuning_combination",
        ),
        "loading": ("ModelNotFoundError", "ModelSource", "load_causal_lm", "load_tokenizer", "resolve_model_source"),
        "chat_templates": (
            "ChatTemplateError",
            "apply_training_chat_template",
            "end_of_turn_token",
            "has_generation_markers",
            "stop_token_ids",
        ),
        "model_card": ("render_model_card", "update_eval_results", "write_model_card"),
        "adapters": ("attach_adapter", "check_adapter_dir", "tuned_model"),
        "chat": ("ChatSession", "GenerationSettings", "load_chat_model", "run_chat"),
    },
    globals(),
)
