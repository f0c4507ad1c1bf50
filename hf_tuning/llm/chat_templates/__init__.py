"""Training chat templates: the stock formats plus ``{% generation %}`` markers.

TRL's ``assistant_only_loss`` builds the loss mask from those markers, and the stock Llama-3.1 and
SmolLM2 templates have none (their mask would be empty). Each template here renders the same text
as its stock format, and marks every assistant reply and tool call together with its end-of-turn
token, so the model learns to stop. Tool definitions and tool results are rendered but never learned.

Templates: ``llama3`` (Llama 3; refuses tool calling, which Llama 3 has no format for), ``llama3.1``
(Llama 3.1/3.2/3.3 Instruct: system turn with the knowledge-cutoff and date lines; Llama 3.1's tool
format, one call per turn) and ``chatml`` (SmolLM2, Qwen; Qwen2.5's tool format, parallel calls
included). A ``.jinja`` file path also works.

Where the text differs from a stock template, :data:`TrainingTemplate.differences` says how (the model
card repeats it), and :func:`apply_training_chat_template` logs the first difference it finds between the
tokenizer's own template and the training one. ``docs/chat_templates.md`` has the details.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = [
    "TEMPLATES",
    "ChatTemplateError",
    "TrainingTemplate",
    "apply_training_chat_template",
    "check_tool_conversations_render",
    "compare_with_stock",
    "describe_training_template",
    "detect_template_name",
    "has_generation_markers",
    "known_template_name",
    "load_training_template",
    "stock_default_system_message",
    "stop_token_ids",
]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_GENERATION_START = re.compile(r"\{%-?\s*generation\s*-?%\}")
_GENERATION_END = re.compile(r"\{%-?\s*endgeneration\s*-?%\}")
# The line of chatml.jinja that load_training_template rewrites with the model's own default system text.
_DEFAULT_SYSTEM_SLOT = "{%- set default_system_message = '' -%}"
_PROBE_TEXT = "hf_tuning chat template probe"
# Conversations without tools on which a training template must render what the stock template renders.
_PROBES = (
    (
        "a conversation with a system message",
        [
            {"role": "system", "content": "You advise farmers."},
            {"role": "user", "content": "When do I change the oil?"},
            {"role": "assistant", "content": "Every 250 hours."},
            {"role": "user", "content": "And the filter?"},
            {"role": "assistant", "content": "At every oil change."},
        ],
        False,
    ),
    (
        "a conversation without a system message",
        [
            {"role": "user", "content": "When do I change the oil?"},
            {"role": "assistant", "content": "Every 250 hours."},
        ],
        False,
    ),
    ("a generation prompt without a system message", [{"role": "user", "content": "When do I change the oil?"}], True),
)


class ChatTemplateError(ValueError):
    """The tokenizer and the requested chat template do not fit together."""


@dataclass(frozen=True)
class TrainingTemplate:
    name: str
    file: str
    special_tokens: tuple[str, ...]  # must each be one token in the vocabulary
    end_of_turn: str
    differences: str  # how its text differs from the stock template it stands for (model card, docs)
    tool_calling: str = "not supported"  # what it does with tools, calls and results (model card, docs)

    def source(self) -> str:
        return (_HERE / self.file).read_text(encoding="utf-8")


TEMPLATES: dict[str, TrainingTemplate] = {
    "llama3": TrainingTemplate(
        "llama3",
        "llama3.jinja",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "renders the same text as the stock Llama 3 template",
        "refused (Llama 3 has no tool-calling format)",
    ),
    "llama3.1": TrainingTemplate(
        "llama3.1",
        "llama3_1.jinja",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "renders the same text as the stock Llama 3.1 template, tool conversations included; the date line is "
        "fixed at 'Today Date: 26 Jul 2024' (the stock Llama 3.1 default), where the stock Llama 3.2 template "
        "writes the current date",
        "as the stock Llama 3.1 template renders user-defined tools: definitions in the first user turn, "
        'one {"name", "parameters"} call per assistant turn and no text beside it (parallel calls are refused), '
        "results in ipython turns",
    ),
    "chatml": TrainingTemplate(
        "chatml",
        "chatml.jinja",
        ("<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        "renders the same text as the model's stock ChatML template (SmolLM2, Qwen2.5) for conversations without "
        "tools, including the default system turn that template adds when a conversation has none; Qwen3's "
        "<think> blocks are not rendered",
        "as the stock Qwen2.5 template renders them: definitions inside <tools></tools> in the system turn, calls "
        "inside <tool_call></tool_call> (several per turn allowed), results inside <tool_response></tool_response> in "
        "a user turn",
    ),
}


def has_generation_markers(template: Any) -> bool:
    """Whether a Jinja chat template wraps assistant replies in ``{% generation %}`` ... ``{% endgeneration %}``
    (the markers TRL's ``assistant_only_loss`` and ``return_assistant_tokens_mask`` build the mask from)."""
    return isinstance(template, str) and bool(_GENERATION_START.search(template) and _GENERATION_END.search(template))


def describe_training_template(name: str) -> str:
    """One sentence for the model card: which training template was used and how its text differs from the
    stock one (``name`` as :func:`apply_training_chat_template` returned it)."""
    if name in TEMPLATES:
        return (
            f"`{name}`, hf_tuning's copy of the stock chat format with `{{% generation %}}` markers for the "
            f"assistant-only loss; it {TEMPLATES[name].differences}. Tool calling: {TEMPLATES[name].tool_calling}."
        )
    if name == "tokenizer":
        return "the tokenizer's own template, used unchanged (it already had `{% generation %}` markers)."
    return f"the custom template `{name}`; compare it with the base model's own template before serving."


def detect_template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """Pick the training template from the tokenizer's special tokens and stock template."""
    vocab = tokenizer.get_vocab()
    stock = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3.1" if "Cutting Knowledge Date" in stock else "llama3"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    raise ChatTemplateError(
        f"cannot tell which chat format the tokenizer {tokenizer.name_or_path!r} uses: it has neither the "
        "Llama-3 header tokens nor the ChatML <|im_start|>/<|im_end|> tokens. Pass chat_template=llama3, "
        "llama3.1, chatml, or the path of a .jinja template with {% generation %} markers."
    )


def load_training_template(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, str]:
    """Return ``(name, jinja source)`` for a template name, ``"auto"`` or a ``.jinja`` path."""
    if name in (None, "", "auto"):
        if tokenizer is None:
            raise ChatTemplateError("chat_template='auto' needs the tokenizer to detect the format")
        if has_generation_markers(tokenizer.chat_template):
            return "tokenizer", tokenizer.chat_template
        name = detect_template_name(tokenizer)
    if name in TEMPLATES:
        template = TEMPLATES[name]
        source = template.source()
        if tokenizer is not None:
            _check_special_tokens(tokenizer, template)
            if name == "chatml":
                source = _with_default_system_message(source, stock_default_system_message(tokenizer))
        return name, source
    path = Path(name)
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise ChatTemplateError(f"chat template file {str(path)!r} does not exist")
        source = path.read_text(encoding="utf-8")
        if not has_generation_markers(source):
            raise ChatTemplateError(
                f"chat template {str(path)!r} has no {{% generation %}} ... {{% endgeneration %}} markers around the "
                "assistant replies, so the loss mask would be empty. Wrap each assistant message and its "
                "end-of-turn token in them (see hf_tuning/llm/chat_templates/*.jinja)."
            )
        return str(path), source
    raise ChatTemplateError(
        f"unknown chat template {name!r}: expected one of auto, {', '.join(TEMPLATES)} or a .jinja path"
    )


def apply_training_chat_template(tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> str:
    """Set ``tokenizer.chat_template`` to the training template; returns the template's name.

    For ``chatml`` the default system turn of the tokenizer's own template (if it adds one) is written into
    the training template, so the tokenizer saved after training renders it too. When the training template
    renders a conversation without tools differently from the tokenizer's own template (Llama 3.2's current
    date, a ChatML variant with reasoning blocks), a warning shows the first difference.

    Also gives the tokenizer a pad token when it has none (Llama 3.1's reserved
    ``<|finetune_right_pad_id|>`` where present, else the end-of-turn token), because batched
    generation and padding-based collation need one.
    """
    stock = tokenizer.chat_template
    resolved, source = load_training_template(name or "auto", tokenizer)
    tokenizer.chat_template = source
    if resolved in TEMPLATES and isinstance(stock, str) and stock != source:
        difference = compare_with_stock(tokenizer, stock)
        if difference is not None:
            logger.warning(
                "The %s training chat template does not render the same text as the tokenizer's own template "
                "(the tokenizer saved with the model carries the training one; see docs/chat_templates.md): %s",
                resolved,
                difference,
            )
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = (
            "<|finetune_right_pad_id|>"
            if "<|finetune_right_pad_id|>" in vocab
            else end_of_turn_token(tokenizer, resolved)
        )
    return resolved


def check_tool_conversations_render(
    tokenizer: PreTrainedTokenizerBase, conversations: Any, *, split: str = "train", limit: int = 5
) -> int:
    """Render every tool-calling conversation of ``conversations`` (rows with ``messages`` and optionally
    ``tools``, as the data builder writes them) with the tokenizer's template; returns how many were rendered.

    Conversations without tools render under every training template; tool calls do not (``llama3`` has no tool
    format, ``llama3.1`` one call per turn). TRL would meet such a row while tokenizing, after the weights have
    loaded: this finds them first and names them.
    """
    columns = getattr(conversations, "column_names", None) or []
    if "tools" not in columns and not _any_tool_message(conversations):
        return 0
    failures, rendered = [], 0
    for index, row in enumerate(conversations):
        tools = row.get("tools")
        if not tools and not any(m.get("tool_calls") or m.get("role") == "tool" for m in row["messages"]):
            continue
        rendered += 1
        try:
            tokenizer.apply_chat_template(
                row["messages"], tools=json.loads(tools) if isinstance(tools, str) else tools, tokenize=False
            )
        except Exception as error:  # noqa: BLE001 - jinja's TemplateError and what a template raises
            question = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
            failures.append(f"{split} row {index} ({question[:60]!r}...): {error}")
    if failures:
        shown = "\n  ".join(failures[:limit]) + (
            f"\n  ... and {len(failures) - limit} more" if len(failures) > limit else ""
        )
        raise ChatTemplateError(
            f"the training chat template cannot render {len(failures)} of the {rendered} tool-calling conversations:"
            f"\n  {shown}"
        )
    return rendered


def _any_tool_message(conversations: Any) -> bool:
    """Whether the rows' messages carry tool calls at all (the builder adds ``tool_calls`` only then)."""
    features = getattr(conversations, "features", None)
    if features is None or "messages" not in features:
        return True  # not a datasets.Dataset: look at the rows
    message = features["messages"]
    inner = getattr(message, "feature", message[0] if isinstance(message, list) else message)
    return isinstance(inner, dict) and "tool_calls" in inner


def stock_default_system_message(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> str:
    """The system text a ChatML template (the tokenizer's own by default) inserts when a conversation has no
    system message: SmolLM2's and Qwen2.5's templates add one, plain ChatML adds none (``""``).

    Found by rendering one user message with the template and reading what comes before it, so it is the
    text the template really renders, whatever its Jinja looks like.
    """
    template = tokenizer.chat_template if template is None else template
    if not isinstance(template, str):
        return ""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PROBE_TEXT}], tokenize=False, chat_template=template
        )
    except Exception as exc:  # any template may fail on any input; then there is no default to copy
        logger.debug("could not render the tokenizer's chat template to find its default system turn: %s", exc)
        return ""
    head, found, _ = text.partition(f"<|im_start|>user\n{_PROBE_TEXT}<|im_end|>")
    match = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head, re.S) if found else None
    return match.group(1) if match else ""


def compare_with_stock(tokenizer: PreTrainedTokenizerBase, stock: str, template: str | None = None) -> str | None:
    """Render a few conversations without tools with ``stock`` and with ``template`` (the tokenizer's current
    template by default); describe the first difference, or return None when the texts are the same (or the
    stock template cannot render them)."""
    for label, messages, prompt in _PROBES:
        try:
            expected = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt, chat_template=stock
            )
        except Exception as exc:  # a stock template we cannot render is not one we can compare with
            logger.debug("could not render the tokenizer's own chat template for comparison: %s", exc)
            return None
        actual = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt, chat_template=template
        )
        if actual != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))
            return (
                f"for {label}, the stock template renders {_excerpt(expected, at)} where the training "
                f"template renders {_excerpt(actual, at)}"
            )
    return None


def _excerpt(text: str, at: int, width: int = 40) -> str:
    start = max(0, at - width)
    return ("..." if start else "") + repr(text[start : at + width]) + ("..." if at + width < len(text) else "")


def _with_default_system_message(source: str, text: str) -> str:
    """Write ``text`` into the chatml template as its default system message. A JSON string is also a Jinja
    string literal; non-ASCII characters stay as they are (Jinja reads ``\\uXXXX`` surrogate pairs wrongly)."""
    if _DEFAULT_SYSTEM_SLOT not in source:
        raise RuntimeError("chatml.jinja has lost its default_system_message line")
    literal = json.dumps(text, ensure_ascii=False)
    return source.replace(_DEFAULT_SYSTEM_SLOT, "{%- set default_system_message = " + literal + " -%}", 1)


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """The token that closes an assistant turn: generation must stop on it."""
    if name in TEMPLATES:
        return TEMPLATES[name].end_of_turn
    return tokenizer.eos_token


def known_template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The training template family a saved tokenizer belongs to, or ``""`` when it is none of them (for
    :func:`stop_token_ids`, the tokenizer's EOS then ends a turn)."""
    try:
        return detect_template_name(tokenizer)
    except ChatTemplateError:
        return ""


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: str, *, generation_config: Any = None) -> list[int]:
    """The token ids generation must stop on: the end-of-turn token of ``template`` (the name
    :func:`apply_training_chat_template` returned), the tokenizer's EOS and any EOS ``generation_config`` names."""
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer, template))
    if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(ids)


def _check_special_tokens(tokenizer: PreTrainedTokenizerBase, template: TrainingTemplate) -> None:
    vocab = tokenizer.get_vocab()
    missing = [token for token in template.special_tokens if token not in vocab]
    if missing:
        raise ChatTemplateError(
            f"the {template.name} chat template needs the special tokens {missing}, which the tokenizer "
            f"{tokenizer.name_or_path!r} does not have. Pick the template that matches the model "
            f"(detected: {_safe_detect(tokenizer)})."
        )


def _safe_detect(tokenizer: PreTrainedTokenizerBase) -> str:
    try:
        return detect_template_name(tokenizer)
    except ChatTemplateError:
        return "none"
