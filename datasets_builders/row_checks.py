"""Row-precise diagnostics shared by the instruction-data reader and the tool-call validator.

A bad row is reported as ``<file>:<line>: <field>: <problem>`` (:class:`RowProblem`), and every check that
can find one writes into the row's :class:`RowProblems` instead of raising, so one pass lists every problem
of every row. The text checks every format applies (a non-blank string, no image placeholder: the builder is
text-only) live here too, so :mod:`datasets_builders.instruction_formats` and
:mod:`datasets_builders.conversation_tools` apply the same rules without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IMAGE_PLACEHOLDERS",
    "RowProblem",
    "RowProblems",
    "type_name",
    "has_data",
    "text_value",
    "check_image_placeholder",
]

# Image placeholders of common multimodal instruction data, by the data they come from:
#   <image>, <image_1>, <image 1>   LLaVA, ShareGPT4V, LLaMA-Factory's multimodal sharegpt, MMMU
#   <|image|>, <|image_1|>          Llama 3.2 Vision, Phi-3-vision
#   <img>path</img>                 Qwen-VL, InternVL (a bare <img> is left alone: HTML questions mention it)
#   <|vision_start|>                Qwen2-VL / Qwen2.5-VL
IMAGE_PLACEHOLDERS = re.compile(r"<image(?:[ _]?\d+)?>|<\|image(?:_\d+)?\|>|<img>[^<]*</img>|<\|vision_start\|>")


@dataclass(frozen=True)
class RowProblem:
    """One problem of one row; ``kind`` groups problems for the skip report."""

    location: str
    field: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: {self.detail}"


class RowProblems:
    """Collects the problems of one row at one location; ``image_column`` names the row's (unread) images."""

    def __init__(self, location: str, image_column: str | None = None):
        self.location = location
        self.image_column = image_column
        self.items: list[RowProblem] = []

    def add(self, field_name: str, kind: str, detail: str) -> None:
        self.items.append(RowProblem(self.location, field_name, kind, detail))


def type_name(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def has_data(value: Any) -> bool:
    """Not None and not an empty string, list or object."""
    return value is not None and not (isinstance(value, str | list | tuple | dict) and not value)


def text_value(value: Any, where: str, problems: RowProblems, empty_detail: str) -> str | None:
    """``value`` if it is a non-blank string; otherwise record why not at ``where`` and return None."""
    if value is None:
        problems.add(where, "missing field", "missing required field")
    elif not isinstance(value, str):
        problems.add(where, "wrong type", f"expected a string, got {type_name(value)}")
    elif not value.strip():
        problems.add(where, "empty", empty_detail)
    else:
        check_image_placeholder(value, where, problems)
        return value
    return None


def check_image_placeholder(text: str, where: str, problems: RowProblems) -> None:
    """An image placeholder has no image to go with it here: the builder is text-only."""
    found = IMAGE_PLACEHOLDERS.search(text)
    if found is None:
        return
    detail = f"an {found.group()} placeholder but this text-only builder has no images to go with it"
    if problems.image_column:
        detail += f" (the row's {problems.image_column!r} column is not read)"
    problems.add(where, "image placeholder", detail)
