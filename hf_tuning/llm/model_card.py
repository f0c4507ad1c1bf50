"""Model cards for staged-tuning outputs: Hub metadata, the stage plan, hyperparameters, results.

The YAML header carries what the Hub indexes (``base_model``, ``library_name: peft``,
``datasets``, ``tags``, ``model-index`` results) plus an ``hf_tuning`` block with the variant and
its stages. The body names the training chat template and how its text differs from the base
model's stock template (``docs/chat_templates.md``). The results section sits between markers,
so :func:`update_eval_results` can rewrite it after a separate evaluation run without touching
the rest. Tokens never reach the card: only the values passed in are written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_tuning.io import atomic_write_text
from hf_tuning.llm.chat_templates import describe_training_template
from hf_tuning.records import StageRecord
from hf_tuning.stages import StagePlan

__all__ = ["render_model_card", "write_model_card", "update_eval_results", "CARD_FILE"]

CARD_FILE = "README.md"
_RESULTS = re.compile(r"<!-- hf_tuning:results -->.*?<!-- /hf_tuning:results -->", re.S)
_METRIC_NAMES = {
    "eval_loss": ("loss", "validation loss"),
    "perplexity": ("perplexity", "validation perplexity"),
    "test_loss": ("loss", "held-out test loss"),
    "test_perplexity": ("perplexity", "held-out test perplexity"),
    "rouge1": ("rouge", "ROUGE-1"),
    "rouge2": ("rouge", "ROUGE-2"),
    "rougeL": ("rouge", "ROUGE-L"),
    "rougeLsum": ("rouge", "ROUGE-Lsum"),
    "bleu": ("bleu", "BLEU"),
}


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
    library_name: str = "peft",
    license: str | None = None,
    tags: Sequence[str] = (),
    usage: str = "",
    chat_template: str | None = None,
    chat_template_difference: str | None = None,
) -> str:
    """The card of a finished staged run: its plan, what every stage did, results and how to load it.

    ``chat_template`` is the name :func:`~hf_tuning.llm.chat_templates.apply_training_chat_template` returned:
    the card says which training template was used and how its text differs from the stock one, and
    ``chat_template_difference`` (from :func:`~hf_tuning.llm.chat_templates.compare_with_stock`) what was
    measured against the base model's own template.
    """
    variant = stage_plan.variant
    records = {record.index: record for record in stage_records}
    stages = [
        {
            "index": stage.index,
            "name": stage.name,
            "groups": list(stage.groups),
            "trainable_params": stage.num_params,
            "steps": records[stage.index].steps if stage.index in records else None,
        }
        for stage in stage_plan.stages
    ]
    final_losses = {index: record.final_train_loss for index, record in records.items()}
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name=library_name,
        license=license,
        datasets=list(datasets) or None,
        pipeline_tag="text-generation",
        tags=sorted({"hf-tuning", "diffusion-tuning", "staged-tuning", variant, "trl", "sft", *tags} - {""}),
        eval_results=_eval_results(eval_results, eval_dataset_name) if eval_results else None,
        hf_tuning={"dt_variant": variant, "dt_budget": dt_budget, "stages": stages},
    )
    body = "\n".join(
        [
            f"# {model_name}",
            "",
            f"A {'LoRA adapter' if library_name == 'peft' else 'fine-tune'} of [{base_model}]"
            f"(https://huggingface.co/{base_model}) trained with staged subspace tuning "
            f"(Diffusion Tuning **{variant.upper()}**) by [hf_tuning](https://github.com/hf-tuning/hf_tuning).",
            "",
            dataset_description,
            "",
            *([f"Chat template in training: {describe_training_template(chat_template)}", ""] if chat_template else []),
            *(
                [f"Compared with the base model's own template: {chat_template_difference}.", ""]
                if chat_template_difference
                else []
            ),
            "## Stages",
            "",
            "| stage | trains | trainable parameters | steps | final train loss |",
            "|---|---|---|---|---|",
            *(
                f"| {s['index']} | {s['name']} | {s['trainable_params']:,} | {_fmt(s['steps'])} | "
                f"{_fmt(final_losses.get(s['index']))} |"
                for s in stages
            ),
            "",
            "## Results",
            "",
            _results_section(eval_results, eval_dataset_name),
            "",
            "## Usage",
            "",
            usage or _default_usage(base_model),
            "",
            "## Training hyperparameters",
            "",
            *(f"- {key}: {value}" for key, value in hyperparameters.items()),
            "",
        ]
    )
    # The body goes in as a value, not as template text: it may hold Jinja syntax ("{% generation %}").
    template = "---\n{{ card_data }}\n---\n\n{{ card_body }}"
    return ModelCard.from_template(data, template_str=template, card_body=body.removesuffix("\n")).content


def write_model_card(output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    path = Path(output_dir) / CARD_FILE
    atomic_write_text(path, render_model_card(**kwargs))
    return path


def update_eval_results(
    card_path: str | os.PathLike, results: Mapping[str, float], dataset_name: str = "held-out data"
) -> Path:
    """Merge ``results`` into an existing card's ``model-index`` and results section.

    Works on any card, not only ours (PEFT writes its own ``README.md`` next to an adapter): a card without
    a model name gets its folder's name (the Hub's model-index needs one to be read back), and a card without
    our results section gets one appended.
    """
    path = Path(card_path)
    card = ModelCard.load(path)
    current = {r.metric_name: r.metric_value for r in (card.data.eval_results or [])}
    by_label = {label: key for key, (_, label) in _METRIC_NAMES.items()}
    merged = {by_label.get(name, name): value for name, value in current.items()}
    merged.update(results)
    if not card.data.model_name:
        card.data.model_name = path.resolve().parent.name
    card.data.eval_results = _eval_results(merged, dataset_name)
    section = _results_section(merged, dataset_name)
    text = str(card)
    text = (
        _RESULTS.sub(lambda _: section, text)
        if _RESULTS.search(text)
        else f"{text.rstrip()}\n\n## Results\n\n{section}\n"
    )
    yaml.safe_load(text.split("---")[1])  # the header must stay valid YAML
    atomic_write_text(path, text)
    return path


def _eval_results(results: Mapping[str, float], dataset_name: str) -> list[EvalResult]:
    out = []
    for key, value in results.items():
        metric_type, label = _METRIC_NAMES.get(key, (key, key))
        out.append(
            EvalResult(
                task_type="text-generation",
                dataset_type="instruction-following",
                dataset_name=dataset_name,
                metric_type=metric_type,
                metric_name=label,
                metric_value=round(float(value), 4),
            )
        )
    return out


def _results_section(results: Mapping[str, float] | None, dataset_name: str) -> str:
    if not results:
        rows = (
            "No evaluation has been run yet (`python eval/evaluate_sft.py --base_model ... --adapter <this folder>`)."
        )
    else:
        rows = "\n".join(
            ["| metric | value |", "|---|---|"]
            + [f"| {_METRIC_NAMES.get(k, (k, k))[1]} | {_fmt(v)} |" for k, v in results.items()]
        )
    return f"<!-- hf_tuning:results -->\nOn the {dataset_name}:\n\n{rows}\n<!-- /hf_tuning:results -->"


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


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)
