"""Model cards of LLM runs: the LLM layer over :mod:`hf_tuning.model_card`.

What is LLM-specific lives here: the ``text-generation`` pipeline tag, the ``trl``/``sft`` tags, the
training chat template and how its text differs from the base model's stock template
(``docs/chat_templates.md``), and the loading snippet (PEFT for LoRA, ``hf_tuning.tuners`` for a method
such as SNELL). Rendering, the stage table, the results section and their later updates are the core's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_tuning import model_card as core
from hf_tuning.io import atomic_write_text
from hf_tuning.llm.chat_templates import describe_training_template
from hf_tuning.model_card import CARD_FILE, HF_TUNING_LINK
from hf_tuning.records import StageRecord
from hf_tuning.stages import StagePlan

__all__ = ["render_model_card", "write_model_card", "update_eval_results", "method_usage", "CARD_FILE"]

_TASK = {"pipeline_tag": "text-generation", "task_type": "text-generation", "dataset_type": "instruction-following"}
_NO_RESULTS = "No evaluation has been run yet (`python eval/evaluate_sft.py --base_model ... --adapter <this folder>`)."


def render_model_card(
    *,
    model_name: str,
    base_model: str,
    stage_plan: StagePlan,
    stage_records: Sequence[StageRecord],
    dt_budget: str,
    hyperparameters: Mapping[str, Any],
    datasets: Sequence[str] = (),
    dataset_description: str = "",
    eval_results: Mapping[str, float] | None = None,
    eval_dataset_name: str = "held-out data",
    library_name: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    usage: str = "",
    chat_template: str | None = None,
    chat_template_difference: str | None = None,
    method: str | None = None,
) -> str:
    """The card of a finished staged run: its plan, what every stage did, results and how to load it.

    ``method`` names the :mod:`hf_tuning.tuners` method the run trained (``snell``, ``snella``): the card then
    calls it a method adapter, its library is ``hf_tuning`` and its usage loads it with
    ``hf_tuning.tuners.load_petl_model``. Without it the run is a LoRA adapter loaded with PEFT
    (``library_name`` defaults to ``peft``).

    ``chat_template`` is the name :func:`~hf_tuning.llm.chat_templates.apply_training_chat_template` returned:
    the card says which training template was used and how its text differs from the stock one, and
    ``chat_template_difference`` (from :func:`~hf_tuning.llm.chat_templates.compare_with_stock`) what was
    measured against the base model's own template.
    """
    if library_name is None:
        library_name = "hf_tuning" if method else "peft"
    what = f"{method.upper()} adapter" if method else "LoRA adapter" if library_name == "peft" else "fine-tune"
    intro = (
        f"A {what} of [{base_model}]"
        f"(https://huggingface.co/{base_model}) trained with staged subspace tuning "
        f"(Diffusion Tuning **{stage_plan.variant.upper()}**) by {HF_TUNING_LINK}."
    )
    paragraphs = [
        dataset_description,
        *([f"Chat template in training: {describe_training_template(chat_template)}"] if chat_template else []),
        *(
            [f"Compared with the base model's own template: {chat_template_difference}."]
            if chat_template_difference
            else []
        ),
    ]
    return core.render_card(
        **_TASK,
        model_name=model_name,
        base_model=base_model,
        intro=intro,
        library_name=library_name,
        stage_plan=stage_plan,
        stage_records=stage_records,
        dt_budget=dt_budget,
        hyperparameters=hyperparameters,
        usage=usage or (method_usage(base_model, method) if method else _default_usage(base_model)),
        paragraphs=paragraphs,
        tags=("trl", "sft", *tags),
        datasets=datasets,
        license=license,
        eval_results=eval_results,
        eval_dataset_name=eval_dataset_name,
        no_results=_NO_RESULTS,
    )


def write_model_card(output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    path = Path(output_dir) / CARD_FILE
    atomic_write_text(path, render_model_card(**kwargs))
    return path


def update_eval_results(
    card_path: str | os.PathLike, results: Mapping[str, float], dataset_name: str = "held-out data"
) -> Path:
    """Merge ``results`` into an existing card (see :func:`hf_tuning.model_card.update_eval_results`), as
    text-generation results: a card PEFT wrote has no pipeline tag to tell."""
    return core.update_eval_results(
        card_path,
        results,
        dataset_name,
        task_type=_TASK["task_type"],
        dataset_type=_TASK["dataset_type"],
        no_results=_NO_RESULTS,
    )


def _default_usage(base_model: str) -> str:
    return (
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype="auto")\n'
        'model = PeftModel.from_pretrained(base, "<this repo or folder>")\n'
        'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")  # carries the chat template\n'
        "```"
    )


def method_usage(base_model: str, method: str) -> str:
    """How to load a :mod:`hf_tuning.tuners` adapter folder (SNELL...) on its base model and generate with it."""
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "from hf_tuning.tuners import load_petl_model\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype="auto")\n'
        f'model = load_petl_model(base, "<this repo or folder>")  # reads adapter_config.json (method {method})\n'
        "model.merge()  # optional: fold the deltas into the weights, then it runs at the base model's speed\n"
        'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")  # carries the chat template\n'
        "```\n\n"
        f"PEFT cannot load this folder: `{method}` is not one of PEFT's methods. "
        "`python eval/evaluate_sft.py --base_model ... --adapter <this folder>` reads it too."
    )
