"""Model cards for every hf_tuning output, whatever its domain: Hub metadata, the stages, hyperparameters, results.

One copy of the machinery; the domains (:mod:`hf_tuning.llm.model_card`, :mod:`hf_tuning.vision.model_card`)
only say what the model is (intro, tags, pipeline tag) and how to load it. The YAML header carries what the
Hub indexes (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``, ``model-index`` results) plus an
``hf_tuning`` block with the variant and its stages. The results section sits between markers, so
:func:`update_eval_results` can rewrite it after a separate evaluation run without touching the rest. Tokens
never reach a card: only the values passed in are written.
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
from hf_tuning.records import StageRecord
from hf_tuning.stages import StagePlan

__all__ = [
    "CARD_FILE",
    "BASE_TAGS",
    "HF_TUNING_LINK",
    "METRIC_NAMES",
    "hub_repo_id",
    "render_card",
    "write_card",
    "update_eval_results",
]

CARD_FILE = "README.md"
BASE_TAGS = ("hf-tuning", "diffusion-tuning", "staged-tuning")
HF_TUNING_LINK = "[hf_tuning](https://github.com/hf-tuning/hf_tuning)"
NO_RESULTS = "No evaluation has been run yet."
# result key -> (model-index metric type, label shown on the card and stored as the metric name)
METRIC_NAMES: dict[str, tuple[str, str]] = {
    "eval_loss": ("loss", "validation loss"),
    "perplexity": ("perplexity", "validation perplexity"),
    "test_loss": ("loss", "held-out test loss"),
    "test_perplexity": ("perplexity", "held-out test perplexity"),
    "rouge1": ("rouge", "ROUGE-1"),
    "rouge2": ("rouge", "ROUGE-2"),
    "rougeL": ("rouge", "ROUGE-L"),
    "rougeLsum": ("rouge", "ROUGE-Lsum"),
    "bleu": ("bleu", "BLEU"),
    "eval_top1": ("accuracy", "top-1 accuracy"),
    "top1": ("accuracy", "top-1 accuracy"),
    "eval_top5": ("accuracy", "top-5 accuracy"),
    "top5": ("accuracy", "top-5 accuracy"),
}
_REPO_ID = re.compile(r"^[\w-][\w.-]*/[\w-][\w.-]*$")
_RESULTS = re.compile(r"<!-- hf_tuning:results -->.*?<!-- /hf_tuning:results -->", re.S)
# the model-index dataset type of a card we did not write and that has no results yet, by its pipeline tag
_DATASET_TYPES = {"text-generation": "instruction-following", "image-classification": "imagefolder"}


def hub_repo_id(name: str) -> str | None:
    """The Hub model repository ``name`` refers to (``hf-hub:`` prefix dropped), or ``None`` for a local path
    or a bare architecture name such as timm's ``vit_base_patch16_224``: the Hub refuses a card whose
    ``base_model`` is not a model id."""
    repo = name.removeprefix("hf-hub:")
    return repo if _REPO_ID.match(repo) and not os.path.exists(repo) else None


def render_card(
    *,
    model_name: str,
    base_model: str | None,
    intro: str,
    pipeline_tag: str,
    task_type: str,
    dataset_type: str,
    library_name: str,
    stage_plan: StagePlan | None,
    stage_records: Sequence[StageRecord] | None,
    dt_budget: str | None,
    hyperparameters: Mapping[str, Any],
    usage: str,
    paragraphs: Sequence[str] = (),
    tags: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    license: str | None = None,
    eval_results: Mapping[str, float] | None = None,
    eval_dataset_name: str = "held-out data",
    no_results: str = NO_RESULTS,
) -> str:
    """The card's text: YAML header, then ``# model_name``, ``intro``, each of ``paragraphs``, the stages, the
    results, ``usage`` and the hyperparameters.

    ``base_model`` is only metadata (``None`` when it is no Hub repository: the Hub rejects anything else); the
    intro names it in words. With ``stage_plan=None`` (a PETL adapter saved outside a staged run) the card has
    no Stages section and no stage metadata. ``metadata`` is added to the ``hf_tuning`` block. ``task_type`` and
    ``dataset_type`` label the ``model-index`` entries; ``no_results`` says how to get results when there are none.
    """
    stages = _stage_rows(stage_plan, stage_records or ())
    hf_tuning = (
        {"dt_variant": stage_plan.variant, "dt_budget": dt_budget, "stages": stages} if stage_plan is not None else {}
    )
    hf_tuning.update(metadata or {})
    variant = stage_plan.variant if stage_plan is not None else ""
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name=library_name,
        license=license,
        datasets=list(datasets) or None,
        pipeline_tag=pipeline_tag,
        tags=sorted({*BASE_TAGS, variant, *tags} - {""}),
        eval_results=_eval_results(eval_results, eval_dataset_name, task_type, dataset_type) if eval_results else None,
        hf_tuning=hf_tuning or None,
    )
    body = "\n".join(
        [
            f"# {model_name}",
            "",
            intro,
            "",
            *(line for paragraph in paragraphs for line in (paragraph, "")),
            *(_stage_table(stages, stage_records or ()) if stage_plan is not None else []),
            "## Results",
            "",
            _results_section(eval_results, eval_dataset_name, no_results),
            "",
            "## Usage",
            "",
            usage,
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


def write_card(output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Render (see :func:`render_card`) into ``output_dir/README.md`` atomically: a crash never leaves half a card."""
    path = Path(output_dir) / CARD_FILE
    atomic_write_text(path, render_card(**kwargs))
    return path


def update_eval_results(
    card_path: str | os.PathLike,
    results: Mapping[str, float],
    dataset_name: str = "held-out data",
    *,
    task_type: str | None = None,
    dataset_type: str | None = None,
    no_results: str = NO_RESULTS,
) -> Path:
    """Merge ``results`` into an existing card's ``model-index`` and results section.

    Works on any card, not only ours (PEFT writes its own ``README.md`` next to an adapter): a card without
    a model name gets its folder's name (the Hub's model-index needs one to be read back), and a card without
    our results section gets one appended. ``task_type`` and ``dataset_type`` default to those of the card's
    current results, else to its pipeline tag, so an evaluation script need not know which domain wrote it.
    """
    path = Path(card_path)
    card = ModelCard.load(path)
    previous = card.data.eval_results or []
    task_type = task_type or (previous[0].task_type if previous else card.data.pipeline_tag)
    if not task_type:
        raise ValueError(f"{path} has no pipeline_tag and no results: pass task_type")
    dataset_type = dataset_type or (previous[0].dataset_type if previous else _DATASET_TYPES.get(task_type, task_type))
    current = {r.metric_name: r.metric_value for r in previous}
    by_label = {label: key for key, (_, label) in METRIC_NAMES.items()}
    merged = {by_label.get(name, name): value for name, value in current.items()}
    merged.update(results)
    if not card.data.model_name:
        card.data.model_name = path.resolve().parent.name
    card.data.eval_results = _eval_results(merged, dataset_name, task_type, dataset_type)
    section = _results_section(merged, dataset_name, no_results)
    text = str(card)
    text = (
        _RESULTS.sub(lambda _: section, text)
        if _RESULTS.search(text)
        else f"{text.rstrip()}\n\n## Results\n\n{section}\n"
    )
    yaml.safe_load(text.split("---")[1])  # the header must stay valid YAML
    atomic_write_text(path, text)
    return path


def _stage_rows(stage_plan: StagePlan | None, stage_records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """One metadata row per planned stage; ``steps`` stays ``None`` for a stage the run never reached."""
    if stage_plan is None:
        return []
    steps = {record.index: record.steps for record in stage_records}
    return [
        {
            "index": stage.index,
            "name": stage.name,
            "groups": list(stage.groups),
            "trainable_params": stage.num_params,
            "steps": steps.get(stage.index),
        }
        for stage in stage_plan.stages
    ]


def _stage_table(stages: Sequence[Mapping[str, Any]], stage_records: Sequence[StageRecord]) -> list[str]:
    final_losses = {record.index: record.final_train_loss for record in stage_records}
    return [
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
    ]


def _eval_results(
    results: Mapping[str, float], dataset_name: str, task_type: str, dataset_type: str
) -> list[EvalResult]:
    out = []
    for key, value in results.items():
        metric_type, label = METRIC_NAMES.get(key, (key, key))
        out.append(
            EvalResult(
                task_type=task_type,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                metric_type=metric_type,
                metric_name=label,
                metric_value=round(float(value), 4),
            )
        )
    return out


def _results_section(results: Mapping[str, float] | None, dataset_name: str, no_results: str) -> str:
    if not results:
        rows = no_results
    else:
        rows = "\n".join(
            ["| metric | value |", "|---|---|"]
            + [f"| {METRIC_NAMES.get(k, (k, k))[1]} | {_fmt(v)} |" for k, v in results.items()]
        )
    return f"<!-- hf_tuning:results -->\nOn the {dataset_name}:\n\n{rows}\n<!-- /hf_tuning:results -->"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)
