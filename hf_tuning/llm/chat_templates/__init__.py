"""Training chat templates: the stock formats plus ``{% generation %}`` markers.

TRL's ``assistant_only_loss`` builds the loss mask from those markers, and the stock Llama-3.1 and
SmolLM2 templates have none (their mask would be empty). Each template here renders the same text
as its stock format for conversations without tools, and marks every assistant reply together with
its end-of-turn token, so the model learns to stop.

Templates: ``llama3`` (Llama 3), ``llama3.1`` (Llama 3.1/3.2/3.3 Instruct: system turn with the
knowledge-cutoff and date lines) and ``chatml`` (SmolLM2, Qwen). A ``.jinja`` file path also works.
"""

from __future__ import annotations

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
    "detect_template_name",
    "has_generation_markers",
    "load_training_template",
    "stop_token_ids",
]

_HERE = Path(__file__).resolve().parent
_GENERATION_START = re.compile(r"\{%-?\s*generation\s*-?%\}")
_GENERATION_END = re.compile(r"\{%-?\s*endgeneration\s*-?%\}")


class ChatTemplateError(ValueError):
    """The tokenizer and the requested chat template do not fit together."""


@dataclass(frozen=True)
class TrainingTemplate:
    name: str
    file: str
    special_tokens: tuple[str, ...]  # must each be one token in the vocabulary
    end_of_turn: str

    def source(self) -> str:
        return (_HERE / self.file).read_text(encoding="utf-8")


TEMPLATES: dict[str, TrainingTemplate] = {
    "llama3": TrainingTemplate(
        "llama3",
        "llama3.jinja",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    "llama3.1": TrainingTemplate(
        "llama3.1",
        "llama3_1.jinja",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    "chatml": TrainingTemplate("chatml", "chatml.jinja", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
}


def has_generation_markers(template: Any) -> bool:
    """Whether a Jinja chat template wraps assistant replies in ``{% generation %}`` ... ``{% endgeneration %}``
    (the markers TRL's ``assistant_only_loss`` and ``return_assistant_tokens_mask`` build the mask from)."""
    return isinstance(template, str) and bool(_GENERATION_START.search(template) and _GENERATION_END.search(template))


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
        if tokenizer is not None:
            _check_special_tokens(tokenizer, template)
        return name, template.source()
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

    Also gives the tokenizer a pad token when it has none (Llama 3.1's reserved
    ``<|finetune_right_pad_id|>`` where present, else the end-of-turn token), because batched
    generation and padding-based collation need one.
    """
    resolved, source = load_training_template(name or "auto", tokenizer)
    tokenizer.chat_template = source
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = (
            "<|finetune_right_pad_id|>"
            if "<|finetune_right_pad_id|>" in vocab
            else end_of_turn_token(tokenizer, resolved)
        )
    return resolved


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """The token that closes an assistant turn: generation must stop on it."""
    if name in TEMPLATES:
        return TEMPLATES[name].end_of_turn
    return tokenizer.eos_token


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
