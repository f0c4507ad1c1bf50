"""Instruction data from local files or the Hub, normalised to chat ``messages`` with row-level diagnostics.

Rows in the alpaca, sharegpt or messages format are read from ``.json``, ``.jsonl``, ``.csv``, ``.parquet``
or a Hub dataset id. Every bad row is reported as ``<file>:<line>: <field>: <problem>`` so it can be fixed in
an editor, exact duplicates are removed, and the data is split deterministically: rows whose ``split`` column
says ``test`` (or ``heldout``) form a fixed ``test`` split, and the ``validation`` split is chosen by a stable
hash of each conversation, so the assignment depends neither on row order nor on rows added later.

Tool-calling conversations come in two layouts, normalised to one (see :func:`normalise_conversation`):
LLaMA-Factory's sharegpt turns ``function_call`` and ``observation`` with a ``tools`` column, and the
OpenAI/TRL ``messages`` with assistant ``tool_calls`` and ``tool`` messages. Content given as a list of
``{"type": "text", "text": ...}`` parts is joined into one text. Both live in
:mod:`datasets_builders.conversation_tools`; this module reads, normalises, dedupes and splits, and calls into it.

The builder is text-only. Columns its format does not read (``images`` in multimodal ShareGPT data, say) are
named in a warning and in :attr:`BuildReport.dropped_columns`, and a row whose text carries an image
placeholder (:data:`IMAGE_PLACEHOLDERS`) is a bad row: training on the bare placeholder without its image
would teach the model to answer questions about pictures it never saw.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, List, Value

# The tool-calling and row-check names below were defined here before they moved; importing them from this
# module keeps working (TOOL_CALL_FEATURES is not in __all__, hence the explicit re-export).
from datasets_builders.conversation_tools import TOOL_CALL_FEATURES as TOOL_CALL_FEATURES
from datasets_builders.conversation_tools import (
    TOOL_MESSAGE_FEATURES,
    ToolDefinitions,
    assistant_call_message,
    check_tool_turns,
    content_text,
    is_tool_message,
    row_tools,
    sharegpt_calls,
    with_tool_calls_field,
    with_tool_columns,
)
from datasets_builders.row_checks import (
    IMAGE_PLACEHOLDERS,
    RowProblem,
    RowProblems,
    check_image_placeholder,
    has_data,
    text_value,
    type_name,
)

__all__ = [
    "FORMATS",
    "FORMAT_CHOICES",
    "BAD_ROW_POLICIES",
    "LOCAL_SUFFIXES",
    "FORMAT_COLUMNS",
    "PASSTHROUGH_COLUMNS",
    "HELDOUT_SPLIT_VALUES",
    "IMAGE_PLACEHOLDERS",
    "MESSAGE_FEATURES",
    "TOOL_MESSAGE_FEATURES",
    "BadRowsError",
    "EmptyDatasetError",
    "FormatError",
    "DataSourceNotFoundError",
    "RowProblem",
    "RawRow",
    "BuildReport",
    "build_instruction_dataset",
    "read_source",
    "detect_format",
    "normalise_row",
    "normalise_conversation",
    "with_tool_columns",
    "validation_score",
    "looks_like_hub_id",
]

logger = logging.getLogger(__name__)

FORMATS = ("alpaca", "sharegpt", "messages")
FORMAT_CHOICES = ("auto", *FORMATS)
BAD_ROW_POLICIES = ("error", "skip")
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
FORMAT_COLUMNS = {
    "alpaca": "instruction, output (optional: input, system, history)",
    "sharegpt": "conversations = list of {from, value} (optional: system, tools)",
    "messages": "messages = list of {role, content} (optional: tools)",
}
PASSTHROUGH_COLUMNS = ("id", "category")
HELDOUT_SPLIT_VALUES = ("test", "heldout")
MAX_LISTED_PROBLEMS = 20
MAX_LOGGED_LOCATIONS = 5

_KEY_COLUMN = {"alpaca": "instruction", "sharegpt": "conversations", "messages": "messages"}
# The columns each format reads; with PASSTHROUGH_COLUMNS and ``split``, every other column is dropped.
_READ_COLUMNS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system", "tools"),
    "messages": ("messages", "tools"),
}
_IMAGE_COLUMNS = ("images", "image")
_JSON_CELL_COLUMNS = ("conversations", "messages", "history")
_PATH_SUFFIXES = (*LOCAL_SUFFIXES, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".xz", ".bz2", ".zst", ".xlsx")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
MESSAGE_FEATURES = List({"role": Value("string"), "content": Value("string")})
_FEATURE_MESSAGES = MESSAGE_FEATURES


class BadRowsError(ValueError):
    """Rows that failed validation; ``problems`` holds every ``<file>:<line>: <field>: <problem>`` string."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        listed = "\n  ".join(self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{len(self.problems)} problem(s) in {source}:\n  {listed}{tail}\n"
            "Fix these rows, or pass on_bad_rows='skip' to drop them."
        )


class EmptyDatasetError(ValueError):
    """No usable row is left; training on nothing would only fail later and less clearly."""


class FormatError(ValueError):
    """The format cannot be detected, or the declared one does not match the data."""


class DataSourceNotFoundError(FileNotFoundError):
    """The source is neither an existing local file nor a reachable Hub dataset."""


@dataclass
class RawRow:
    """A row as read, with where it starts; ``problem`` is set when it could not even be parsed."""

    location: str
    value: Any = None
    problem: RowProblem | None = None


@dataclass
class BuildReport:
    """What a build did to the data; ``rows_read = rows_kept + rows_skipped + duplicates + heldout overlap``."""

    source: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    rows_skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    duplicates_removed: int = 0
    heldout_overlap_removed: int = 0
    split_sizes: dict[str, int] = field(default_factory=dict)
    dropped_columns: list[str] = field(default_factory=list)  # columns with data that the format does not read
    rows_with_tools: int = 0  # kept rows with tool definitions, tool calls or tool results

    def summary(self) -> str:
        """One line for logs and the CLI."""
        reasons = ", ".join(f"{kind}: {count}" for kind, count in self.skip_reasons.items())
        skipped = f"{self.rows_skipped} skipped" + (f" ({reasons})" if reasons else "")
        dropped = self.duplicates_removed + self.heldout_overlap_removed
        splits = ", ".join(f"{name}={size}" for name, size in self.split_sizes.items())
        unused = f"; unused columns dropped: {', '.join(self.dropped_columns)}" if self.dropped_columns else ""
        tools = f"; {self.rows_with_tools} with tools" if self.rows_with_tools else ""
        return (
            f"{self.source} [{self.format}]: {self.rows_read} rows read, {self.rows_kept} kept, {skipped}, "
            f"{dropped} duplicates removed; splits: {splits}{tools}{unused}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Example:
    """A valid row: its final messages, passthrough columns, held-out flag, split-hash key and tool definitions
    (JSON text, None without tools)."""

    messages: list[dict[str, Any]]
    extras: dict[str, str]
    heldout: bool
    split_key: str
    tools: str | None = None

    @property
    def uses_tools(self) -> bool:
        return self.tools is not None or any(is_tool_message(message) for message in self.messages)


# ----------------------------------------------------------------------------------------------- reading


def looks_like_hub_id(text: str) -> bool:
    """``name`` or ``owner/name`` with the characters the Hub allows."""
    return bool(_HUB_ID.match(text))


def _looks_like_path(text: str) -> bool:
    """A data-file suffix, a path prefix or more than one slash: the user meant a local file."""
    if text.startswith(("/", ".", "~")) or "\\" in text or not looks_like_hub_id(text):
        return True
    return Path(text).suffix.lower() in _PATH_SUFFIXES


def read_source(
    source: str | os.PathLike, *, config: str | None = None, split: str = "train"
) -> tuple[str, list[RawRow]]:
    """Read every row of a local file or a Hub dataset; return the label used in locations and the rows."""
    label = os.fspath(source)
    path = Path(label).expanduser()
    if path.is_file():
        return label, _read_file(path, label)
    if path.is_dir():
        return label, _read_with_load_dataset(label, config, split)
    if _looks_like_path(label):
        raise DataSourceNotFoundError(
            f"{label}: no such file; expected a local {', '.join(LOCAL_SUFFIXES)} file or a Hub dataset id"
        )
    return label, _read_with_load_dataset(label, config, split)


def _read_file(path: Path, label: str) -> list[RawRow]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_json_lines(path.read_text(encoding="utf-8-sig"), label)
    if suffix == ".json":
        return _read_json(path.read_text(encoding="utf-8-sig"), label)
    if suffix == ".csv":
        return _read_csv(path, label)
    if suffix == ".parquet":
        return _read_parquet(path, label)
    raise ValueError(
        f"{label}: unsupported file format {suffix or '(no suffix)'}; accepted: {', '.join(LOCAL_SUFFIXES)}"
    )


def _read_json_lines(text: str, label: str) -> list[RawRow]:
    """One object per physical line; blank lines are ignored (``\\n`` only: JSON strings may hold U+2028)."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{label}:{number}"
        try:
            rows.append(RawRow(location, json.loads(line)))
        except json.JSONDecodeError as exc:
            detail = f"unparseable JSON line ({exc.msg} at column {exc.colno})"
            rows.append(RawRow(location, problem=RowProblem(location, "row", "unparseable JSON", detail)))
    return rows


def _read_json(text: str, label: str) -> list[RawRow]:
    """A JSON array of objects, or JSON lines in a ``.json`` file."""
    if text.lstrip().startswith("["):
        return _read_json_array(text, label)
    if len([line for line in text.split("\n") if line.strip()]) > 1 and _is_single_json_object(text):
        raise FormatError(f"{label}: a single JSON object; expected a JSON array of objects or JSON lines")
    return _read_json_lines(text, label)


def _is_single_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_json_array(text: str, label: str) -> list[RawRow]:
    """Walk the array element by element so each row knows the line where it starts."""
    decoder = json.JSONDecoder()
    rows: list[RawRow] = []
    pos, line, counted = text.index("[") + 1, 1, 0
    while True:
        pos = _JSON_WHITESPACE.match(text, pos).end()
        if pos < len(text) and text[pos] == "]":
            return rows
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _broken_array(label, exc.lineno, f"unparseable JSON ({exc.msg} at column {exc.colno})") from None
        rows.append(RawRow(f"{label}:{line}", value))
        pos = _JSON_WHITESPACE.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise _broken_array(label, text.count("\n", 0, pos) + 1, "expected ',' or ']' after an array element")


def _broken_array(label: str, line: int, detail: str) -> BadRowsError:
    """A syntax error inside an array: nothing after it can be located, so this fails in every mode."""
    return BadRowsError(label, [f"{label}:{line}: row: {detail}; the rest of the array cannot be read"])


def _read_csv(path: Path, label: str) -> list[RawRow]:
    """A record starts on the line after the previous record ended (``reader.line_num``), so quoted
    multi-line cells do not shift the reported lines."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        previous_end = reader.line_num
        for record in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if record:
                rows.append(_csv_row(header, record, f"{label}:{start}"))
    return rows


def _csv_row(header: list[str], record: list[str], location: str) -> RawRow:
    if len(record) != len(header):
        detail = f"expected {len(header)} columns, found {len(record)}"
        return RawRow(location, problem=RowProblem(location, "row", "wrong column count", detail))
    row: dict[str, Any] = dict(zip(header, record))
    for name in _JSON_CELL_COLUMNS:
        cell = row.get(name)
        if cell is None:
            continue
        if not cell.strip():
            row[name] = None
            continue
        try:
            row[name] = json.loads(cell)
        except json.JSONDecodeError as exc:
            detail = f"not valid JSON ({exc.msg}); list cells in CSV must be JSON"
            return RawRow(location, problem=RowProblem(location, name, "unparseable JSON", detail))
    return RawRow(location, row)


def _read_parquet(path: Path, label: str) -> list[RawRow]:
    import pyarrow.parquet as pq

    return [RawRow(f"{label}:row {index}", row) for index, row in enumerate(pq.read_table(path).to_pylist())]


def _read_with_load_dataset(name: str, config: str | None, split: str) -> list[RawRow]:
    """A Hub dataset id (or a local dataset folder); rows are located as ``<name>:row <index>``."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, name=config, split=split)
    except OSError as exc:
        raise DataSourceNotFoundError(
            f"{name!r} is neither a local file nor a reachable Hub dataset ({type(exc).__name__}: {exc}). "
            f"Local files must exist and end in {', '.join(LOCAL_SUFFIXES)}."
        ) from exc
    return [RawRow(f"{name}:row {index}", row) for index, row in enumerate(loaded)]


# ---------------------------------------------------------------------------------------------- formats


def detect_format(row: Mapping[str, Any]) -> str:
    """The format whose key column the row has (instruction, conversations or messages)."""
    matches = [fmt for fmt, column in _KEY_COLUMN.items() if column in row]
    if len(matches) == 1:
        return matches[0]
    problem = "are ambiguous: they match " + " and ".join(matches) if matches else "match no known format"
    raise FormatError(f"the first row's columns {sorted(row)} {problem}; expected {_expected_columns()}")


def _expected_columns() -> str:
    return "; ".join(f"{fmt}: {columns}" for fmt, columns in FORMAT_COLUMNS.items())


def _resolve_format(rows: list[RawRow], declared: str, label: str) -> str:
    """Detect from the first object row, or check that the declared format's key column is there."""
    first = next((row.value for row in rows if isinstance(row.value, Mapping)), None)
    if first is None:
        return declared
    if declared == "auto":
        try:
            return detect_format(first)
        except FormatError as exc:
            raise FormatError(f"{label}: {exc}") from None
    if _KEY_COLUMN[declared] not in first:
        raise FormatError(
            f"{label}: declared format {declared!r} expects {FORMAT_COLUMNS[declared]}, "
            f"but the first row has the columns {sorted(first)}"
        )
    return declared


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _required_text(row: Mapping[str, Any], name: str, problems: RowProblems) -> str | None:
    return text_value(row.get(name), name, problems, "empty or whitespace-only")


def _optional_text(row: Mapping[str, Any], name: str, problems: RowProblems) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.add(name, "wrong type", f"expected a string, got {type_name(value)}")
        return ""
    check_image_placeholder(value, name, problems)
    return value


def _history_messages(history: Any, problems: RowProblems) -> list[dict[str, str]]:
    """Alpaca ``history``: [[user, assistant], ...] before the instruction, as alternating turns."""
    if history is None:
        return []
    if not isinstance(history, list):
        problems.add("history", "bad history", f"expected a list of [user, assistant] pairs, got {type_name(history)}")
        return []
    messages = []
    for index, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(text, str) for text in pair):
            problems.add(f"history[{index}]", "bad history", "expected a [user, assistant] pair of strings")
            continue
        for position, (role, text) in enumerate(zip(("user", "assistant"), pair)):
            if not text.strip():
                problems.add(f"history[{index}][{position}]", "empty", "empty or whitespace-only")
            check_image_placeholder(text, f"history[{index}][{position}]", problems)
            messages.append(_message(role, text))
    return messages


def _alpaca_messages(row: Mapping[str, Any], problems: RowProblems) -> list[dict[str, str]]:
    """system?, history turns, user = instruction (+ blank line + input when there is one), assistant = output."""
    instruction = _required_text(row, "instruction", problems)
    output = _required_text(row, "output", problems)
    extra = _optional_text(row, "input", problems)
    system = _optional_text(row, "system", problems)
    history = _history_messages(row.get("history"), problems)
    if instruction is None or output is None:
        return []
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    head = [_message("system", system)] if system.strip() else []
    return [*head, *history, _message("user", user), _message("assistant", output)]


@dataclass(frozen=True)
class _ConversationSpec:
    """How one conversation format names its column, role key, content key and roles, and how it writes a tool
    call: as a turn of its own role (``call_role``) or as a list under a key of an assistant message
    (``calls_key``)."""

    column: str
    role_key: str
    content_key: str
    roles: Mapping[str, str]
    call_role: str | None = None
    calls_key: str | None = None


_SHAREGPT = _ConversationSpec(
    "conversations",
    "from",
    "value",
    {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
        "function_call": "assistant",
        "observation": "tool",
    },
    call_role="function_call",
)
_MESSAGES = _ConversationSpec(
    "messages",
    "role",
    "content",
    {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"},
    calls_key="tool_calls",
)


def _conversation_messages(
    turns: Any, spec: _ConversationSpec, problems: RowProblems, tools: ToolDefinitions | None = None
) -> list[dict[str, Any]]:
    """Validate every turn, then the shape: system only first, tool calls and results in place, at least one
    reply, ending with one."""
    column = spec.column
    if turns is None:
        problems.add(column, "missing field", "missing required field")
        return []
    if not isinstance(turns, list):
        problems.add(
            column,
            "wrong type",
            f"expected a list of {{{spec.role_key}, {spec.content_key}}} objects, got {type_name(turns)}",
        )
        return []
    if not turns:
        problems.add(column, "empty", "empty conversation")
        return []
    messages = [_turn_message(turn, index, spec, tools, problems) for index, turn in enumerate(turns)]
    if any(message is None for message in messages):
        return []
    check_tool_turns(messages, turns, spec.column, problems)
    _check_conversation_shape(messages, spec, problems)
    return messages


def _turn_message(
    turn: Any, index: int, spec: _ConversationSpec, tools: ToolDefinitions | None, problems: RowProblems
) -> dict[str, Any] | None:
    where = f"{spec.column}[{index}]"
    if not isinstance(turn, Mapping):
        problems.add(where, "wrong type", f"expected an object, got {type_name(turn)}")
        return None
    role = turn.get(spec.role_key)
    content = turn.get(spec.content_key)
    content_where = f"{where}.{spec.content_key}"
    role_ok = _check_role(role, f"{where}.{spec.role_key}", spec, problems)
    if role_ok and role == spec.call_role:
        calls = sharegpt_calls(content, content_where, tools, problems)
        return None if calls is None else {"role": "assistant", "content": "", "tool_calls": calls}
    raw_calls = turn.get(spec.calls_key) if spec.calls_key else None
    if has_data(raw_calls):  # exports often write tool_calls: [] (or null) on messages without calls
        calls_where = f"{where}.{spec.calls_key}"
        if role_ok and spec.roles[role] != "assistant":
            detail = f"only assistant messages make tool calls, not {role!r} ones"
            problems.add(calls_where, "misplaced tool call", detail)
            return None
        message = assistant_call_message(content, raw_calls, calls_where, content_where, tools, problems)
        return message if role_ok else None
    text = content_text(content, content_where, problems, "empty content")
    if not role_ok or text is None:
        return None
    if spec.roles[role] == "system" and index > 0:
        problems.add(f"{where}.{spec.role_key}", "system not first", "system message not in first position")
    return _message(spec.roles[role], text)


def _check_role(role: Any, where: str, spec: _ConversationSpec, problems: RowProblems) -> bool:
    if role is None:
        problems.add(where, "missing field", "missing required field")
        return False
    if not isinstance(role, str) or role not in spec.roles:
        problems.add(where, "unknown role", f"unknown value {role!r} (expected one of {', '.join(spec.roles)})")
        return False
    return True


def _check_conversation_shape(messages: list[dict[str, Any]], spec: _ConversationSpec, problems: RowProblems) -> None:
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        problems.add(spec.column, "no assistant reply", "no assistant reply")
    elif roles[-1] != "assistant":
        problems.add(spec.column, "not ending with assistant", "does not end with an assistant reply")


def _sharegpt_messages(
    row: Mapping[str, Any], problems: RowProblems, tools: ToolDefinitions | None
) -> list[dict[str, Any]]:
    """A top-level ``system`` column is used when the conversation has no system turn of its own."""
    messages = _conversation_messages(row.get("conversations"), _SHAREGPT, problems, tools)
    system = _optional_content(row, "system", problems)
    if messages and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, _message("system", system))
    return messages


def _messages_messages(
    row: Mapping[str, Any], problems: RowProblems, tools: ToolDefinitions | None
) -> list[dict[str, Any]]:
    return _conversation_messages(row.get("messages"), _MESSAGES, problems, tools)


def _alpaca_row_messages(
    row: Mapping[str, Any], problems: RowProblems, tools: ToolDefinitions | None
) -> list[dict[str, Any]]:
    return _alpaca_messages(row, problems)  # alpaca has no tool calls; its rows' tools column is not read


def _optional_content(row: Mapping[str, Any], name: str, problems: RowProblems) -> str:
    """An optional text column that may also be given as text parts."""
    value = row.get(name)
    if isinstance(value, list):
        return content_text(value, name, problems, "empty content") or ""
    return _optional_text(row, name, problems)


_NORMALISERS = {"alpaca": _alpaca_row_messages, "sharegpt": _sharegpt_messages, "messages": _messages_messages}


def normalise_conversation(
    value: Any, fmt: str, location: str
) -> tuple[list[dict[str, Any]], str | None, list[RowProblem]]:
    """The row's own chat messages (no default system prompt), its tool definitions and its problems; the rest
    is only meaningful when there is no problem.

    Tool-calling rows of both layouts come out the same: a call is an assistant message with ``content`` (""
    when it has no text) and ``tool_calls = [{"type": "function", "function": {"name", "arguments"}}]``, its
    ``arguments`` JSON text; a result is ``{"role": "tool", "content": text}``. The tool definitions are the
    JSON text of ``[{"type": "function", "function": {...}}, ...]``, or None when the row has none.
    """
    if not isinstance(value, Mapping):
        problems = RowProblems(location)
        problems.add("row", "not an object", f"expected a JSON object, got {type_name(value)}")
        return [], None, problems.items
    problems = RowProblems(location, next((name for name in _IMAGE_COLUMNS if has_data(value.get(name))), None))
    tools = row_tools(value, problems) if "tools" in _READ_COLUMNS[fmt] else None
    messages = _NORMALISERS[fmt](value, problems, tools)
    return messages, tools.text if tools else None, problems.items


def normalise_row(value: Any, fmt: str, location: str) -> tuple[list[dict[str, Any]], list[RowProblem]]:
    """The row's own chat messages (no default system prompt) and its problems; messages are only
    meaningful when there is no problem. :func:`normalise_conversation` also returns the tool definitions."""
    messages, _, problems = normalise_conversation(value, fmt, location)
    return messages, problems


# ----------------------------------------------------------------------------------------------- building


def _canonical(messages: list[dict[str, Any]], tools: str | None = None) -> str:
    """The conversation as one string for dedupe and the split hash; tools only count where there are some,
    so rows without tools keep the keys (and splits) they always had."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return text if tools is None else f"{text}\x00{tools}"


def _with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The row's own system message wins; otherwise the default prompt leads, if there is one."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [_message("system", system_prompt), *messages]


def _dropped_columns(rows: list[RawRow], fmt: str) -> list[str]:
    """Columns, in the order first seen, that hold data in some row but that nothing reads (none when no row
    is an object, which is also when the format stays ``auto``)."""
    kept = {*_READ_COLUMNS.get(fmt, ()), *PASSTHROUGH_COLUMNS, "split"}
    dropped: dict[str, None] = {}
    for raw in rows:
        if isinstance(raw.value, Mapping):
            dropped.update((name, None) for name, value in raw.value.items() if name not in kept and has_data(value))
    return list(dropped)


def _is_heldout(row: Mapping[str, Any]) -> bool:
    value = row.get("split")
    return value is not None and str(value).strip().lower() in HELDOUT_SPLIT_VALUES


def _extras(row: Mapping[str, Any]) -> dict[str, str]:
    return {name: "" if row[name] is None else str(row[name]) for name in PASSTHROUGH_COLUMNS if name in row}


def _normalise_rows(
    rows: list[RawRow], fmt: str, system_prompt: str | None
) -> tuple[list[_Example], list[list[RowProblem]]]:
    """Valid rows as examples, and the problems of each bad row (one list per row)."""
    examples, bad = [], []
    for raw in rows:
        if raw.problem is not None:
            bad.append([raw.problem])
            continue
        messages, tools, problems = normalise_conversation(raw.value, fmt, raw.location)
        if problems:
            bad.append(problems)
            continue
        final = _with_system_prompt(messages, system_prompt)
        key = _canonical(messages, tools)
        examples.append(_Example(final, _extras(raw.value), _is_heldout(raw.value), key, tools))
    return examples, bad


def _handle_bad_rows(bad: list[list[RowProblem]], on_bad_rows: str, label: str, report: BuildReport) -> None:
    """Raise with every problem, or record and log what skipping drops."""
    if not bad:
        return
    flat = [str(problem) for problems in bad for problem in problems]
    if on_bad_rows == "error":
        raise BadRowsError(label, flat)
    kinds = Counter(kind for problems in bad for kind in dict.fromkeys(problem.kind for problem in problems))
    report.rows_skipped = len(bad)
    report.skip_reasons = dict(kinds.most_common())
    report.skipped_examples = flat[:MAX_LOGGED_LOCATIONS]
    reasons = ", ".join(f"{kind}: {count}" for kind, count in report.skip_reasons.items())
    logger.warning(
        "Skipped %d bad row(s) of %s (%s); first: %s", len(bad), label, reasons, "; ".join(report.skipped_examples)
    )


def _dedupe(examples: list[_Example], report: BuildReport) -> list[_Example]:
    """Drop exact repeats, keeping the first; a training row equal to a held-out row is dropped instead of
    the held-out one, so the test split never leaks into training. Source order is kept."""
    heldout_first = sorted(range(len(examples)), key=lambda index: not examples[index].heldout)
    seen: set[str] = set()
    heldout_keys: set[str] = set()
    keep: set[int] = set()
    for index in heldout_first:
        example = examples[index]
        key = _canonical(example.messages, example.tools)
        if key not in seen:
            seen.add(key)
            keep.add(index)
            if example.heldout:
                heldout_keys.add(key)
        elif key in heldout_keys and not example.heldout:
            report.heldout_overlap_removed += 1
        else:
            report.duplicates_removed += 1
    return [example for index, example in enumerate(examples) if index in keep]


def validation_score(split_key: str, seed: int) -> float:
    """A number in [0, 1) from the conversation and the seed alone (sha256, not ``hash``, which is salted)."""
    digest = hashlib.sha256(f"{seed}\x00{split_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_validation_size(validation_size: float | int) -> None:
    if isinstance(validation_size, bool) or not isinstance(validation_size, int | float):
        raise ValueError(f"validation_size must be a fraction in [0, 1) or a row count, got {validation_size!r}")
    if isinstance(validation_size, float) and not 0 <= validation_size < 1:
        raise ValueError(f"validation_size as a fraction must be in [0, 1), got {validation_size}")
    if isinstance(validation_size, int) and validation_size < 0:
        raise ValueError(f"validation_size as a row count must be >= 0, got {validation_size}")


def _validation_indices(pool: list[_Example], validation_size: float | int, seed: int, label: str) -> set[int]:
    """Fraction: rows whose score is below it (adding rows never moves existing ones). Count: the rows
    with the lowest scores."""
    scores = [
        (validation_score(example.split_key, seed), example.split_key, index) for index, example in enumerate(pool)
    ]
    if isinstance(validation_size, int):
        if validation_size >= len(pool) and validation_size > 0:
            raise EmptyDatasetError(
                f"{label}: validation_size={validation_size} leaves no training rows ({len(pool)} rows available)"
            )
        return {index for _, _, index in sorted(scores)[:validation_size]}
    chosen = {index for score, _, index in scores if score < validation_size}
    if validation_size > 0 and not chosen and len(pool) > 1:
        logger.warning(
            "%s: validation_size=%s selects no row of %d; using the lowest-scoring one",
            label,
            validation_size,
            len(pool),
        )
        chosen = {min(scores)[2]}
    if len(chosen) == len(pool):
        raise EmptyDatasetError(
            f"{label}: validation_size={validation_size} leaves no training rows ({len(pool)} rows)"
        )
    return chosen


def _split_examples(
    examples: list[_Example], validation_size: float | int, seed: int, label: str
) -> dict[str, list[_Example]]:
    pool = [example for example in examples if not example.heldout]
    if not pool:
        raise EmptyDatasetError(f"{label}: every valid row is held out (split = test/heldout); nothing to train on")
    validation = _validation_indices(pool, validation_size, seed, label)
    splits = {"train": [example for index, example in enumerate(pool) if index not in validation]}
    if validation_size:
        splits["validation"] = [example for index, example in enumerate(pool) if index in validation]
    heldout = [example for example in examples if example.heldout]
    if heldout:
        splits["test"] = heldout
    return splits


def _to_dataset(examples: list[_Example], columns: list[str], with_tools: bool = False) -> Dataset:
    """Rows without tools keep the plain ``messages`` schema; a build with any tool row puts every split in the
    tool schema (:data:`TOOL_MESSAGE_FEATURES` and a ``tools`` column, null where a row has none)."""
    if with_tools:
        features = Features({"messages": TOOL_MESSAGE_FEATURES, "tools": Value("string")})
        data: dict[str, list[Any]] = {
            "messages": [[with_tool_calls_field(message) for message in example.messages] for example in examples],
            "tools": [example.tools for example in examples],
        }
    else:
        features = Features({"messages": MESSAGE_FEATURES})
        data = {"messages": [example.messages for example in examples]}
    features.update({name: Value("string") for name in columns})
    for name in columns:
        data[name] = [example.extras.get(name, "") for example in examples]
    return Dataset.from_dict(data, features=features)


def _passthrough_columns(examples: Iterable[_Example]) -> list[str]:
    present = {name for example in examples for name in example.extras}
    return [name for name in PASSTHROUGH_COLUMNS if name in present]


def _check_options(format: str, on_bad_rows: str, validation_size: float | int) -> None:
    if format not in FORMAT_CHOICES:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMAT_CHOICES)}")
    if on_bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"unknown on_bad_rows {on_bad_rows!r}; expected one of {', '.join(BAD_ROW_POLICIES)}")
    _check_validation_size(validation_size)


def build_instruction_dataset(
    source: str | os.PathLike,
    *,
    format: str = "auto",
    config: str | None = None,
    split: str = "train",
    system_prompt: str | None = None,
    on_bad_rows: str = "error",
    validation_size: float | int = 0.05,
    split_seed: int = 42,
) -> tuple[DatasetDict, BuildReport]:
    """Read, validate, normalise to ``messages``, dedupe and split one instruction dataset.

    ``config``/``split`` only apply to Hub ids. ``validation_size`` is a fraction in [0, 1) or a row count;
    0 leaves out the ``validation`` split. ``test`` exists only when rows say ``split: test`` (or heldout).
    """
    _check_options(format, on_bad_rows, validation_size)
    label, rows = read_source(source, config=config, split=split)
    fmt = _resolve_format(rows, format, label)
    report = BuildReport(source=label, format=fmt, rows_read=len(rows), dropped_columns=_dropped_columns(rows, fmt))
    if report.dropped_columns:
        logger.warning(
            "%s: the column(s) %s are dropped: this text-only builder reads only the %s columns (%s), %s and split",
            label,
            ", ".join(report.dropped_columns),
            fmt,
            ", ".join(_READ_COLUMNS[fmt]),
            ", ".join(PASSTHROUGH_COLUMNS),
        )
    examples, bad = _normalise_rows(rows, fmt, system_prompt)
    _handle_bad_rows(bad, on_bad_rows, label, report)
    if not examples:
        raise EmptyDatasetError(f"{label}: no valid rows ({len(rows)} read, {len(bad)} bad)")
    examples = _dedupe(examples, report)
    if report.duplicates_removed or report.heldout_overlap_removed:
        logger.warning(
            "%s: removed %d exact duplicate(s) and %d training row(s) equal to a held-out row",
            label,
            report.duplicates_removed,
            report.heldout_overlap_removed,
        )
    splits = _split_examples(examples, validation_size, split_seed, label)
    columns = _passthrough_columns(examples)
    report.rows_with_tools = sum(example.uses_tools for members in splits.values() for example in members)
    with_tools = report.rows_with_tools > 0
    dataset = DatasetDict({name: _to_dataset(members, columns, with_tools) for name, members in splits.items()})
    report.split_sizes = {name: len(members) for name, members in splits.items()}
    report.rows_kept = sum(report.split_sizes.values())
    logger.info("%s", report.summary())
    return dataset, report
