"""Tool calling and content parts: the parts of a chat message beyond a role and a plain text.

Tool-calling conversations arrive in two layouts: LLaMA-Factory's sharegpt, where a ``function_call`` turn
holds ``{"name", "arguments"}`` and an ``observation`` turn the result, with the function definitions in a
``tools`` column; and the OpenAI/TRL ``messages``, where an assistant message carries ``tool_calls`` and a
``tool`` message the result. Both come out in one layout, the one transformers documents for
``apply_chat_template``: a call is an assistant message with ``content`` ("" when it has no text) and
``tool_calls = [{"type": "function", "function": {"name", "arguments"}}]``, a result is
``{"role": "tool", "content": text}``, and the definitions are ``[{"type": "function", "function": {...}}]``.

Arguments and definitions are stored as JSON text, not as objects: an Arrow column holds one type per field,
and every function takes different arguments, so their objects would not fit one schema. The arguments are written as transformers' ``tojson`` writes them, so a
template that prints the text renders what a stock template renders for the object.

Content given as a list of parts is joined into one text; a non-text part is a bad row (the builder is
text-only). Every check records its problems on the row (:class:`~datasets_builders.row_checks.RowProblems`)
with the exact field, for example ``messages[2].tool_calls[0].function.arguments``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, List, Value

from datasets_builders.row_checks import RowProblems, check_image_placeholder, has_data, text_value, type_name

__all__ = [
    "TOOL_CALL_FEATURES",
    "TOOL_MESSAGE_FEATURES",
    "ToolDefinitions",
    "is_tool_message",
    "row_tools",
    "sharegpt_calls",
    "assistant_call_message",
    "check_tool_turns",
    "content_text",
    "joined_text_parts",
    "with_tool_calls_field",
    "with_tool_columns",
]

# Tool-calling rows: every message may carry tool_calls, whose arguments are JSON text (Arrow needs one type per
# field, and every function takes different arguments); the ``tools`` column is JSON text for the same reason.
TOOL_CALL_FEATURES = List(
    {"type": Value("string"), "function": {"name": Value("string"), "arguments": Value("string")}}
)
TOOL_MESSAGE_FEATURES = List({"role": Value("string"), "content": Value("string"), "tool_calls": TOOL_CALL_FEATURES})
# The keys a content part may hold its text under: "text" (OpenAI, transformers), "value" (some sharegpt exports).
_TEXT_PART_KEYS = ("text", "value")
_CALL_SHAPE = '{"name": ..., "arguments": {...}}'


@dataclass(frozen=True)
class ToolDefinitions:
    """A row's function definitions in the OpenAI layout, as the JSON text stored in the ``tools`` column."""

    text: str
    names: tuple[str, ...]


def is_tool_message(message: Mapping[str, Any]) -> bool:
    return message["role"] == "tool" or bool(message.get("tool_calls"))


def _parse_json_text(value: Any, where: str, kind: str, expected: str, problems: RowProblems) -> tuple[bool, Any]:
    """``value`` decoded when it is a string (JSON text), as is otherwise; ``(False, None)`` when it does not parse."""
    if not isinstance(value, str):
        return True, value
    try:
        return True, json.loads(value)
    except json.JSONDecodeError as exc:
        problems.add(where, kind, f"not valid JSON ({exc.msg} at column {exc.colno}); expected {expected}")
        return False, None


def row_tools(row: Mapping[str, Any], problems: RowProblems) -> ToolDefinitions | None:
    """The ``tools`` column: a list (or its JSON text) of function definitions, each bare (LLaMA-Factory:
    ``{name, description, parameters}``) or wrapped (OpenAI: ``{type: function, function: {...}}``). They are
    stored wrapped, the layout transformers documents for ``apply_chat_template(tools=...)``."""
    value = row.get("tools")
    if not has_data(value):
        return None
    parsed, value = _parse_json_text(value, "tools", "bad tools", "a JSON list of function definitions", problems)
    if not parsed:
        return None
    if not isinstance(value, list):
        problems.add("tools", "bad tools", f"expected a list of function definitions, got {type_name(value)}")
        return None
    functions = [_tool_function(tool, f"tools[{index}]", problems) for index, tool in enumerate(value)]
    if not functions or any(function is None for function in functions):
        return None
    names = [function["name"] for function in functions]
    for name, count in Counter(names).items():
        if count > 1:
            problems.add("tools", "bad tools", f"the function {name!r} is defined {count} times")
    definitions = [{"type": "function", "function": function} for function in functions]
    return ToolDefinitions(json.dumps(definitions, ensure_ascii=False), tuple(names))


def _tool_function(tool: Any, where: str, problems: RowProblems) -> dict[str, Any] | None:
    """One definition's function object, or None (with the problem recorded)."""
    if not isinstance(tool, Mapping):
        problems.add(where, "bad tools", f"expected a function definition object, got {type_name(tool)}")
        return None
    function: Any = tool
    if "function" in tool or "type" in tool:
        if tool.get("type") != "function":
            problems.add(f"{where}.type", "bad tools", f"expected 'function', got {tool.get('type')!r}")
            return None
        function, where = tool.get("function"), f"{where}.function"
        if not isinstance(function, Mapping):
            problems.add(where, "bad tools", f"expected an object with name and parameters, got {type_name(function)}")
            return None
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.add(f"{where}.name", "bad tools", "expected the function's name as a non-empty string")
        return None
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        problems.add(f"{where}.parameters", "bad tools", f"expected a JSON schema object, got {type_name(parameters)}")
        return None
    return dict(function)


def _function_call(
    function: Mapping[str, Any], where: str, tools: ToolDefinitions | None, problems: RowProblems
) -> dict | None:
    """``{type: function, function: {name, arguments}}`` with the arguments as JSON text written as transformers'
    ``tojson`` writes the object, so a template that prints the text renders what a stock template renders for
    the object."""
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.add(f"{where}.name", "bad tool call", "expected the called function's name as a non-empty string")
        return None
    if tools is not None and name not in tools.names:
        problems.add(
            f"{where}.name",
            "unknown function",
            f"calls {name!r}, which the row's tools do not define ({', '.join(tools.names)})",
        )
    arguments = function.get("arguments")
    if arguments is None:
        problems.add(
            f"{where}.arguments", "missing field", "missing required field (use {} for a call without arguments)"
        )
        return None
    expected = "a JSON object of argument names and values"
    parsed, arguments = _parse_json_text(arguments, f"{where}.arguments", "bad arguments", expected, problems)
    if not parsed:
        return None
    if not isinstance(arguments, Mapping):
        problems.add(f"{where}.arguments", "bad arguments", f"expected {expected}, got {type_name(arguments)}")
        return None
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def sharegpt_calls(value: Any, where: str, tools: ToolDefinitions | None, problems: RowProblems) -> list[dict] | None:
    """A ``function_call`` turn's value: ``{"name": ..., "arguments": {...}}`` or a list of them (parallel
    calls), as JSON text or already parsed."""
    expected = f"{_CALL_SHAPE} or a list of them"
    parsed, value = _parse_json_text(value, where, "bad tool call", expected, problems)
    if not parsed:
        return None
    if value is None:
        problems.add(where, "missing field", "missing required field")
        return None
    listed = isinstance(value, list)
    calls = value if listed else [value]
    if not calls or not all(isinstance(call, Mapping) for call in calls):
        problems.add(where, "bad tool call", f"expected {expected}, got {type_name(value)}")
        return None
    parsed_calls = [
        _function_call(call, f"{where}[{index}]" if listed else where, tools, problems)
        for index, call in enumerate(calls)
    ]
    return None if any(call is None for call in parsed_calls) else parsed_calls


def _openai_calls(value: Any, where: str, tools: ToolDefinitions | None, problems: RowProblems) -> list[dict] | None:
    """An assistant message's ``tool_calls``: ``[{type: function, function: {name, arguments}}, ...]``. Call
    ``id`` and result ``tool_call_id`` are not kept: results answer the calls in order, and no template here
    renders ids."""
    expected = "a non-empty list of {type: function, function: {name, arguments}} objects"
    parsed, value = _parse_json_text(value, where, "bad tool call", expected, problems)
    if not parsed:
        return None
    if not isinstance(value, list) or not value:
        problems.add(where, "bad tool call", f"expected {expected}, got {type_name(value)}")
        return None
    calls = []
    for index, call in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            problems.add(at, "bad tool call", f"expected {{type: function, function: {_CALL_SHAPE}}}")
            return None
        if call.get("type") not in (None, "function"):
            problems.add(f"{at}.type", "bad tool call", f"expected 'function', got {call.get('type')!r}")
            return None
        calls.append(_function_call(call["function"], f"{at}.function", tools, problems))
    return None if any(call is None for call in calls) else calls


def content_text(value: Any, where: str, problems: RowProblems, empty_detail: str) -> str | None:
    """Content as a string, or as a list of text parts joined with nothing between them (how chat templates
    render consecutive text parts). A part of any other type (image, audio, ...) is a problem: this builder is
    text-only."""
    if isinstance(value, list):
        value = joined_text_parts(value, where, problems)
        if value is None:
            return None
    return text_value(value, where, problems, empty_detail)


def joined_text_parts(parts: list, where: str, problems: RowProblems) -> str | None:
    texts = []
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        if not isinstance(part, Mapping):
            problems.add(
                at, "wrong type", f'expected a content part {{"type": "text", "text": ...}}, got {type_name(part)}'
            )
            continue
        kind = part.get("type")
        if kind != "text":
            detail = "a part without a type" if kind is None else f"a part of type {kind!r}"
            problems.add(at, "non-text part", f"{detail}; this text-only builder reads only text parts")
            continue
        text = next((part[key] for key in _TEXT_PART_KEYS if part.get(key) is not None), None)
        if not isinstance(text, str):
            problems.add(at, "wrong type", f"expected the part's text as a string under 'text', got {type_name(text)}")
            continue
        texts.append(text)
    return "".join(texts) if len(texts) == len(parts) else None


def assistant_call_message(
    content: Any,
    raw_calls: Any,
    calls_where: str,
    content_where: str,
    tools: ToolDefinitions | None,
    problems: RowProblems,
) -> dict[str, Any] | None:
    """An assistant message with ``tool_calls`` (found at ``calls_where``); its text (which may be empty) comes
    before the calls. The caller checks that the message's role is the assistant's."""
    calls = _openai_calls(raw_calls, calls_where, tools, problems)
    text = joined_text_parts(content, content_where, problems) if isinstance(content, list) else content
    if text is not None and not isinstance(text, str):
        problems.add(content_where, "wrong type", f"expected a string, text parts or null, got {type_name(text)}")
        return None
    text = text if text and text.strip() else ""  # a call without text has content ""
    if text:
        check_image_placeholder(text, content_where, problems)
    if calls is None:
        return None
    return {"role": "assistant", "content": text, "tool_calls": calls}


_TURN_NAMES = {
    "system": "a system message",
    "user": "a user turn",
    "assistant": "an assistant reply",
    "tool": "a tool result",
}


def _describe_turn(message: Mapping[str, Any] | None) -> str:
    if message is None:
        return "nothing (it opens the conversation)"
    return "another function call" if message.get("tool_calls") else _TURN_NAMES[message["role"]]


def check_tool_turns(messages: list[dict[str, Any]], turns: list[Any], column: str, problems: RowProblems) -> None:
    """A call answers a user turn or a tool result and is followed by its results, at most one per call; a result
    follows a call; a result's ``name``, when given, is one of the functions called. ``turns`` are the rows as
    given (for the results' ``name``), ``messages`` the same turns normalised, ``column`` names them in problems."""
    unanswered, called = 0, set()
    for index, message in enumerate(messages):
        where = f"{column}[{index}]"
        previous = messages[index - 1] if index else None
        following = messages[index + 1] if index + 1 < len(messages) else None
        if message.get("tool_calls"):
            if previous is None or previous["role"] not in ("user", "tool") or previous.get("tool_calls"):
                detail = f"a function call must follow a user turn or a tool result, not {_describe_turn(previous)}"
                problems.add(where, "misplaced tool call", detail)
            if following is not None and following["role"] != "tool":
                detail = f"a function call must be followed by its result, not by {_describe_turn(following)}"
                problems.add(where, "call without result", detail)
            unanswered, called = (
                len(message["tool_calls"]),
                {call["function"]["name"] for call in message["tool_calls"]},
            )
        elif message["role"] == "tool":
            if not unanswered:
                more = f" (there are more results than the {len(called)} call(s) before it)" if called else ""
                problems.add(
                    where, "result without call", f"a tool result must follow the function call it answers{more}"
                )
            unanswered = max(0, unanswered - 1)
            name = turns[index].get("name")
            if name is not None and not isinstance(name, str):
                problems.add(
                    f"{where}.name", "wrong type", f"expected the function's name as a string, got {type_name(name)}"
                )
            elif name is not None and called and name not in called:
                detail = f"the result of {name!r}, which the call before it does not call ({', '.join(sorted(called))})"
                problems.add(f"{where}.name", "unknown function", detail)
        else:
            unanswered, called = 0, set()


def with_tool_calls_field(message: Mapping[str, Any]) -> dict[str, Any]:
    return {"role": message["role"], "content": message["content"], "tool_calls": message.get("tool_calls")}


def with_tool_columns(dataset: Dataset) -> Dataset:
    """``dataset`` in the tool schema that builds with tool rows have (unchanged if it already is), so built
    datasets with and without tools can be concatenated; transformers drops the null ``tool_calls`` when it
    renders, so the text is the same."""
    if "tools" in dataset.column_names and dataset.features["messages"] == TOOL_MESSAGE_FEATURES:
        return dataset
    features = dataset.features.copy()
    features["messages"] = TOOL_MESSAGE_FEATURES
    features["tools"] = Value("string")

    def widen(row: Mapping[str, Any]) -> dict[str, Any]:
        return {"messages": [with_tool_calls_field(message) for message in row["messages"]], "tools": row.get("tools")}

    return dataset.map(widen, features=features)
