"""Tool-calling conversations: both input layouts normalise to one row, the rows survive Arrow, the training
templates render them as the stock Llama 3.1 and Qwen2.5 templates do, and the loss covers exactly the
assistant's calls and replies with their end-of-turn tokens."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import pytest
from datasets import concatenate_datasets, load_from_disk
from jinja2.exceptions import TemplateError

from benchmarks.llama3_tokenizer import llama3_tokenizer
from datasets_builders.instruction_formats import (
    TOOL_MESSAGE_FEATURES,
    BadRowsError,
    build_instruction_dataset,
    with_tool_columns,
)
from hf_tuning.llm.chat_templates import apply_training_chat_template, end_of_turn_token, load_training_template
from tests.helpers.real_models import requires_smollm2, smollm2_tokenizer
from tests.helpers.tiny import tokenizing_sft_trainer

DATA = Path(__file__).resolve().parents[1] / "data" / "tool_calling"
SHAREGPT = DATA / "llamafactory_sharegpt_tools.json"
OPENAI = DATA / "openai_messages_tools.jsonl"
SYSTEM = "You are a farm machinery assistant. Use the tools when they help."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a farm location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "Town and state or region"},
                "days": {"type": "integer", "description": "Days ahead, 1 to 7"},
            },
            "required": ["location"],
        },
    },
}
SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def build(path: Path, **kwargs):
    return build_instruction_dataset(path, validation_size=0, **kwargs)


def message(role: str, content: str, tool_calls: list | None = None) -> dict:
    return {"role": role, "content": content, "tool_calls": tool_calls}


def call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def chat_inputs(row: dict) -> tuple[list[dict], list[dict] | None]:
    """What TRL's SFTTrainer passes to apply_chat_template for a built row: the messages, and the tools column
    decoded from its JSON text."""
    return row["messages"], json.loads(row["tools"]) if row["tools"] else None


# ------------------------------------------------------------------------------------------------ building


def test_both_layouts_normalise_to_the_same_rows():
    sharegpt, sharegpt_report = build(SHAREGPT)
    openai, openai_report = build(OPENAI)
    assert (sharegpt_report.format, openai_report.format) == ("sharegpt", "messages")
    assert sharegpt_report.rows_with_tools == openai_report.rows_with_tools == 3
    assert "; 3 with tools" in openai_report.summary()
    for dataset in (sharegpt, openai):
        assert dataset["train"].column_names == ["messages", "tools"]
        assert dataset["train"].features["messages"] == TOOL_MESSAGE_FEATURES
    first = openai["train"][0]
    assert first["messages"] == [
        message("system", SYSTEM),
        message("user", "Is it dry enough to spray in Ames tomorrow?"),  # two text parts, joined
        message("assistant", "", [call("get_weather", '{"location": "Ames, Iowa", "days": 1}')]),  # re-serialised
        message("tool", '{"date": "2025-06-12", "rain_mm": 0.0, "wind_kmh": 9}'),
        message(
            "assistant", "Yes: no rain is forecast and the wind is 9 km/h, under the usual 15 km/h limit for spraying."
        ),
    ]
    assert json.loads(first["tools"]) == [WEATHER]
    # The same conversations (LLaMA-Factory bare definitions as a JSON string and object arguments; OpenAI wrapped
    # definitions and JSON-string arguments, a system turn vs a system column) give identical rows.
    for index in (0, 1, 3):
        assert sharegpt["train"][index] == openai["train"][index]
    assert openai["train"][3]["tools"] is None  # a row without tools in a tool dataset
    # Parallel calls: LLaMA-Factory answers them in one observation, OpenAI in one tool message per call.
    parallel = (
        [m["role"] for m in sharegpt["train"][2]["messages"]],
        [m["role"] for m in openai["train"][2]["messages"]],
    )
    assert parallel == (["user", "assistant", "tool", "assistant"], ["user", "assistant", "tool", "tool", "assistant"])
    assert openai["train"][2]["messages"][1]["content"] == "I'll check both towns."


def test_tool_rows_survive_save_and_reload_and_concatenate_with_plain_rows(tmp_path):
    dataset, _ = build(OPENAI)
    dataset.save_to_disk(tmp_path / "tools")
    reloaded = load_from_disk(tmp_path / "tools")
    assert reloaded["train"].to_list() == dataset["train"].to_list()
    plain_path = tmp_path / "plain.jsonl"
    plain_path.write_text(json.dumps({"instruction": "Tyre pressure?", "output": "1.6 bar."}) + "\n")
    plain, report = build(plain_path)
    assert plain["train"].column_names == ["messages"] and report.rows_with_tools == 0  # schema unchanged
    mixed = concatenate_datasets([with_tool_columns(plain["train"]), reloaded["train"]])
    assert mixed[0] == {
        "messages": [message("user", "Tyre pressure?"), message("assistant", "1.6 bar.")],
        "tools": None,
    }
    assert with_tool_columns(reloaded["train"]) is reloaded["train"]


WEATHER_TOOLS = json.dumps([WEATHER])


def sharegpt_row(*turns, tools=WEATHER_TOOLS, **extra) -> dict:
    return {"conversations": [{"from": role, "value": value} for role, value in turns], "tools": tools, **extra}


def messages_row(*messages, tools=(WEATHER,)) -> dict:
    return {"messages": list(messages), "tools": list(tools)}


CALL = json.dumps({"name": "get_weather", "arguments": {"location": "Ames"}})
OPENAI_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Ames"}'}}
USER, REPLY = {"role": "user", "content": "Rain?"}, {"role": "assistant", "content": "No."}
RESULT = {"role": "tool", "content": '{"rain_mm": 0}'}

BAD_TOOL_ROWS = [
    (
        sharegpt_row(
            ("human", "Rain?"),
            ("function_call", CALL.replace("get_weather", "get_wether")),
            ("observation", "0"),
            ("gpt", "No"),
        ),
        "conversations[1].value.name: calls 'get_wether', which the row's tools do not define (get_weather)",
    ),
    (
        messages_row(USER, {"role": "assistant", "tool_calls": [call("lookup_part_number", "{}")]}, RESULT, REPLY),
        "messages[1].tool_calls[0].function.name: calls 'lookup_part_number', which the row's tools do not define",
    ),
    (
        sharegpt_row(("human", "Rain?"), ("function_call", '{"name": "get_weather", "arguments": [1]}'), ("gpt", "No")),
        "conversations[1].value.arguments: expected a JSON object of argument names and values, got list",
    ),
    (
        messages_row(
            USER, {"role": "assistant", "tool_calls": [call("get_weather", "{location: Ames}")]}, RESULT, REPLY
        ),
        "messages[1].tool_calls[0].function.arguments: not valid JSON (Expecting property name enclosed in double",
    ),
    (
        sharegpt_row(("human", "Rain?"), ("function_call", "get_weather(Ames)"), ("observation", "0"), ("gpt", "No")),
        'conversations[1].value: not valid JSON (Expecting value at column 1); expected {"name": ..., "arguments"',
    ),
    (
        sharegpt_row(("human", "Rain?"), ("observation", "0 mm"), ("gpt", "No")),
        "conversations[1]: a tool result must follow the function call it answers",
    ),
    (
        messages_row(USER, {"role": "assistant", "tool_calls": [OPENAI_CALL]}, RESULT, RESULT, REPLY),
        "messages[3]: a tool result must follow the function call it answers (there are more results than the 1 call",
    ),
    (
        sharegpt_row(("system", "s"), ("function_call", CALL), ("observation", "0"), ("gpt", "No")),
        "conversations[1]: a function call must follow a user turn or a tool result, not a system message",
    ),
    (
        sharegpt_row(
            ("human", "Rain?"), ("gpt", "Let me see."), ("function_call", CALL), ("observation", "0"), ("gpt", "No")
        ),
        "conversations[2]: a function call must follow a user turn or a tool result, not an assistant reply",
    ),
    (
        sharegpt_row(("human", "Rain?"), ("function_call", CALL), ("gpt", "No")),
        "conversations[1]: a function call must be followed by its result, not by an assistant reply",
    ),
    (
        sharegpt_row(("human", "Rain?"), ("gpt", "No"), tools='[{"name": "get_weather",'),
        "tools: not valid JSON (Expecting property name enclosed in double quotes at column 25); expected a JSON list",
    ),
    (
        sharegpt_row(("human", "Rain?"), ("gpt", "No"), tools='{"name": "get_weather"}'),
        "tools: expected a list of function definitions, got object",
    ),
    (
        messages_row(USER, REPLY, tools=[{"type": "function", "function": {"description": "no name"}}]),
        "tools[0].function.name: expected the function's name as a non-empty string",
    ),
    (
        messages_row(USER, REPLY, tools=[WEATHER, WEATHER]),
        "tools: the function 'get_weather' is defined 2 times",
    ),
    (
        messages_row({"role": "user", "content": "Rain?", "tool_calls": [OPENAI_CALL]}, RESULT, REPLY),
        "messages[0].tool_calls: only assistant messages make tool calls, not 'user' ones",
    ),
    (
        messages_row(USER, {"role": "assistant", "tool_calls": [OPENAI_CALL]}, RESULT | {"name": "get_rain"}, REPLY),
        "messages[2].name: the result of 'get_rain', which the call before it does not call (get_weather)",
    ),
    (
        messages_row(
            USER, {"role": "assistant", "tool_calls": [OPENAI_CALL]}, RESULT | {"name": ["get_weather"]}, REPLY
        ),
        "messages[2].name: expected the function's name as a string, got list",
    ),
    (
        messages_row(
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "url": "x"}]},
            REPLY,
        ),
        "messages[0].content[1]: a part of type 'image_url'; this text-only builder reads only text parts",
    ),
    (
        sharegpt_row(("human", [{"type": "text", "value": "Rain?"}, {"type": "audio"}]), ("gpt", "No")),
        "conversations[0].value[1]: a part of type 'audio'; this text-only builder reads only text parts",
    ),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_TOOL_ROWS, ids=[case[1].split(":")[0] for case in BAD_TOOL_ROWS])
def test_each_tool_problem_is_reported_at_its_line(tmp_path, bad, expected):
    good = sharegpt_row(("human", "Rain?"), ("function_call", CALL), ("observation", "0 mm"), ("gpt", "No."))
    if "messages" in bad:
        good = messages_row(USER, {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL]}, RESULT, REPLY)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in (good, good | {"id": 2}, bad, good | {"id": 4})) + "\n")
    with pytest.raises(BadRowsError) as raised:
        build(path)
    assert len(raised.value.problems) == 1, raised.value.problems
    assert raised.value.problems[0].startswith(f"{path}:3: {expected}")


def test_text_parts_are_joined_in_every_layout(tmp_path):
    parts = [{"type": "text", "text": "Grease "}, {"type": "text", "value": "it daily."}]
    path = tmp_path / "parts.jsonl"
    rows = [
        sharegpt_row(("human", [{"type": "text", "text": "PTO?"}]), ("gpt", parts), tools=None, system=parts),
        sharegpt_row(("human", "Rain?"), ("function_call", CALL), ("observation", parts), ("gpt", "No.")),
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset, _ = build(path)
    first, second = dataset["train"]
    assert first["messages"] == [
        message("system", "Grease it daily."),
        message("user", "PTO?"),
        message("assistant", "Grease it daily."),
    ]
    assert second["messages"][2] == message("tool", "Grease it daily.")
    messages_path = tmp_path / "parts_messages.jsonl"
    row = messages_row({"role": "user", "content": parts, "tool_calls": []}, {**REPLY, "tool_calls": None})
    messages_path.write_text(json.dumps(row) + "\n")
    # tool_calls: [] or null, as exports often write on messages without calls, is no call
    assert build(messages_path)[0]["train"][0]["messages"] == [
        message("user", "Grease it daily."),
        message("assistant", "No."),
    ]


# ------------------------------------------------------------------------------------------------ templates


def reply_text(template: str, turn: dict) -> str:
    """What the template renders for an assistant turn, before its end-of-turn token, built here from the stock
    formats: Llama 3.1 writes one call as {"name", "parameters"}; Qwen2.5 writes the text, then each call in
    <tool_call> tags on its own lines."""
    calls = [item["function"] for item in turn.get("tool_calls") or []]
    if not calls:
        return turn["content"].strip() if template == "llama3.1" else turn["content"]
    if template == "llama3.1":
        (only,) = calls
        return f'{{"name": "{only["name"]}", "parameters": {only["arguments"]}}}'
    tagged = "\n".join(
        f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {c["arguments"]}}}\n</tool_call>' for c in calls
    )
    return f"{turn['content']}\n{tagged}" if turn["content"] else tagged


def check_tool_mask(tokenizer, template: str, row: dict) -> str:
    """The mask of a built row, token by token: 1 on every assistant call or reply and its end-of-turn token,
    0 on everything else (system text, tool definitions, user turns, tool results). Each assistant turn must
    start where the inference prompt (``add_generation_prompt``) for the turns before it ends. Returns the
    learned text."""
    messages, tools = chat_inputs(row)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer, template))
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    full = tokenizer(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False), add_special_tokens=False)
    ids, expected = full["input_ids"], [0] * len(full["input_ids"])
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:index], tools=tools, tokenize=False, add_generation_prompt=True
        )
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        reply = tokenizer(reply_text(template, turn), add_special_tokens=False)["input_ids"] + [eot_id]
        assert ids[start : start + len(reply)] == reply, f"turn {index} is not where the inference prompt ends"
        expected[start : start + len(reply)] = [1] * len(reply)
    assert encoded["input_ids"] == ids
    assert encoded["assistant_masks"] == expected
    return tokenizer.decode([token for token, learned in zip(ids, expected) if learned])


@lru_cache(maxsize=1)
def llama31():
    """Shared by the tests, which only render with it (copying a 128k-token tokenizer takes a while)."""
    tokenizer = copy.deepcopy(llama3_tokenizer())
    apply_training_chat_template(tokenizer, "llama3.1")
    return tokenizer


@lru_cache(maxsize=1)
def chatml():
    """Shared by the tests, which only render with it."""
    tokenizer = smollm2_tokenizer()
    apply_training_chat_template(tokenizer, "chatml")
    return tokenizer


# The stock Llama 3.1 rendering of the first fixture conversation, written out by hand.
LLAMA31_WEATHER = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
    "{\n"
    '    "type": "function",\n'
    '    "function": {\n'
    '        "name": "get_weather",\n'
    '        "description": "Weather forecast for a farm location.",\n'
    '        "parameters": {\n'
    '            "type": "object",\n'
    '            "properties": {\n'
    '                "location": {\n'
    '                    "type": "string",\n'
    '                    "description": "Town and state or region"\n'
    "                },\n"
    '                "days": {\n'
    '                    "type": "integer",\n'
    '                    "description": "Days ahead, 1 to 7"\n'
    "                }\n"
    "            },\n"
    '            "required": [\n'
    '                "location"\n'
    "            ]\n"
    "        }\n"
    "    }\n"
    "}\n\n"
    "Is it dry enough to spray in Ames tomorrow?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"name": "get_weather", "parameters": {"location": "Ames, Iowa", "days": 1}}<|eot_id|>'
    "<|start_header_id|>ipython<|end_header_id|>\n\n"
    '"{\\"date\\": \\"2025-06-12\\", \\"rain_mm\\": 0.0, \\"wind_kmh\\": 9}"<|eot_id|>'  # a string result, as JSON
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "Yes: no rain is forecast and the wind is 9 km/h, under the usual 15 km/h limit for spraying.<|eot_id|>"
)


def test_llama31_renders_the_stock_tool_layout_and_learns_only_calls_and_replies():
    dataset, _ = build(SHAREGPT)
    tokenizer = llama31()
    weather, parts = dataset["train"][0], dataset["train"][1]
    messages, tools = chat_inputs(weather)
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == LLAMA31_WEATHER
    assert check_tool_mask(tokenizer, "llama3.1", weather) == (
        '{"name": "get_weather", "parameters": {"location": "Ames, Iowa", "days": 1}}<|eot_id|>'
        "Yes: no rain is forecast and the wind is 9 km/h, under the usual 15 km/h limit for spraying.<|eot_id|>"
    )
    # A conversation that goes on after a tool result, with a second call.
    assert check_tool_mask(tokenizer, "llama3.1", parts) == (
        '{"name": "lookup_part_number", "parameters": {"machine": "John Deere 9670 STS", '
        '"part": "feeder house drive belt"}}<|eot_id|>It is H215371, and your dealer has it in stock.<|eot_id|>'
        '{"name": "calibrate_sprayer", "parameters": {"nozzle": "11004", "pressure_bar": 3.0, "speed_kmh": 8}}'
        "<|eot_id|>That setting applies about 255 L/ha.<|eot_id|>"
    )
    # tools_in_user_message=False: the stock alternative, definitions at the end of the system header.
    in_system = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, tools_in_user_message=False)
    assert in_system.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You have access to the following functions. To call a function, please respond with JSON for a function "
        'call.Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        'value}.Do not use variables.\n\n{\n    "type": "function",'
    )
    assert f"}}\n\n{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nIs it dry" in in_system


def test_llama31_refuses_what_its_format_has_no_place_for():
    dataset, _ = build(OPENAI)
    tokenizer = llama31()
    messages, tools = chat_inputs(dataset["train"][2])  # two parallel calls, with text beside them
    with pytest.raises(TemplateError, match="Llama 3.1 makes one tool call per assistant turn; this turn has 2"):
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    messages[1]["tool_calls"] = messages[1]["tool_calls"][:1]
    with pytest.raises(TemplateError, match="no place for text beside a tool call.*I'll check both towns"):
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    with pytest.raises(TemplateError, match="does not render built-in tools"):
        tokenizer.apply_chat_template(messages[:1], tokenize=False, builtin_tools=["wolfram_alpha"])
    with pytest.raises(TemplateError, match="tool definitions into the first user message"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "Hi"}], tools=tools, tokenize=False)


def test_llama3_refuses_tool_conversations():
    tokenizer, (_, llama3) = llama31(), load_training_template("llama3")
    dataset, _ = build(SHAREGPT)
    messages, tools = chat_inputs(dataset["train"][0])
    with pytest.raises(TemplateError, match="Llama 3 has no tool-calling format.*tool definitions"):
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=llama3)
    with pytest.raises(TemplateError, match=r"tool calls or tool results \(message 2, role assistant\)"):
        tokenizer.apply_chat_template(messages, tokenize=False, chat_template=llama3)
    with pytest.raises(TemplateError, match=r"tool calls or tool results \(message 2, role tool\)"):
        tokenizer.apply_chat_template(messages[:2] + messages[3:], tokenize=False, chat_template=llama3)
    plain = dataset["train"][3]["messages"]  # without tools, in the tool schema (null tool_calls): as before
    assert tokenizer.apply_chat_template(plain, tokenize=False, chat_template=llama3) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow often should I grease the PTO shaft?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Every 8 to 10 hours of use, or as the operator's manual says.<|eot_id|>"
    )


# The Qwen2.5 layout of the parallel-call fixture conversation, written out by hand (SmolLM2's default system text).
CHATML_PARALLEL = (
    f"<|im_start|>system\n{SMOLLM2_DEFAULT}\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{json.dumps(WEATHER)}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nCompare tomorrow's rain in Ames and in Boone.<|im_end|>\n"
    "<|im_start|>assistant\nI'll check both towns.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Ames, Iowa", "days": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Boone, Iowa", "days": 1}}\n</tool_call>'
    "<|im_end|>\n"
    "<|im_start|>user\n"
    '<tool_response>\n{"location": "Ames, Iowa", "rain_mm": 0.0}\n</tool_response>\n'
    '<tool_response>\n{"location": "Boone, Iowa", "rain_mm": 4.5}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\nAmes stays dry; Boone expects 4.5 mm of rain.<|im_end|>\n"
)


@requires_smollm2
def test_chatml_renders_the_qwen25_tool_layout_and_learns_only_calls_and_replies():
    dataset, _ = build(OPENAI)
    tokenizer = chatml()
    parallel = dataset["train"][2]
    messages, tools = chat_inputs(parallel)
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == CHATML_PARALLEL
    assert check_tool_mask(tokenizer, "chatml", parallel) == (
        "I'll check both towns.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Ames, Iowa", "days": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Boone, Iowa", "days": 1}}\n</tool_call>'
        "<|im_end|>Ames stays dry; Boone expects 4.5 mm of rain.<|im_end|>"
    )
    learned = check_tool_mask(tokenizer, "chatml", dataset["train"][1])  # goes on after a tool result
    assert learned.count("<|im_end|>") == 4 and "H215371" in learned and "rate_l_ha" not in learned
    weather = check_tool_mask(tokenizer, "chatml", dataset["train"][0])
    assert weather.startswith('<tool_call>\n{"name": "get_weather"') and SYSTEM not in weather
    assert check_tool_mask(tokenizer, "chatml", dataset["train"][3]).endswith("manual says.<|im_end|>")


def _trl_stock_template(name: str) -> str:
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    assert path.is_file(), f"the installed TRL has no copy of the stock {name} chat template"
    return path.read_text(encoding="utf-8")


def with_object_arguments(messages: list[dict]) -> list[dict]:
    """The messages as a caller of a stock template writes them: arguments as objects (a stock template writes
    JSON-text arguments a second time, quoted)."""
    converted = copy.deepcopy(messages)
    for turn in converted:
        for item in turn.get("tool_calls") or []:
            item["function"]["arguments"] = json.loads(item["function"]["arguments"])
    return converted


@pytest.mark.parametrize(
    ("name", "stock_file"), [("llama3.1", "llama3_1"), pytest.param("chatml", "qwen2_5", marks=requires_smollm2)]
)
def test_tool_conversations_render_like_the_stock_templates(name, stock_file):
    """Compared with the stock Llama 3.1 and Qwen2.5 templates as TRL ships them, on every prefix of every
    fixture conversation the stock template can render, as training text and as a generation prompt."""
    tokenizer, stock = (llama31() if name == "llama3.1" else chatml()), _trl_stock_template(stock_file)
    # For chatml, the default system turn Qwen2.5's template adds (apply_training_chat_template takes it over from
    # a Qwen tokenizer; tests/llm/test_chat_templates.py checks that).
    defaults = {"default_system_message": QWEN25_DEFAULT} if name == "chatml" else {}
    dataset, _ = build(OPENAI)
    rows = [row for index, row in enumerate(dataset["train"]) if not (name == "llama3.1" and index == 2)]
    compared = 0
    for row in rows:
        messages, tools = chat_inputs(row)
        for end in range(2, len(messages) + 1):
            for prompt in (False, True):
                ours = tokenizer.apply_chat_template(
                    messages[:end], tools=tools, tokenize=False, add_generation_prompt=prompt, **defaults
                )
                theirs = tokenizer.apply_chat_template(
                    with_object_arguments(messages[:end]),
                    tools=tools,
                    tokenize=False,
                    add_generation_prompt=prompt,
                    chat_template=stock,
                )
                assert ours == theirs
                compared += 1
    assert compared >= 20


@requires_smollm2
def test_trl_tokenizes_the_reloaded_dataset_with_the_same_mask(tmp_path):
    """SFTTrainer reads the ``tools`` column (JSON text) and the messages with their tool calls as built and
    reloaded from disk; its labels must be exactly the mask checked above."""
    dataset, _ = build(OPENAI)
    dataset.save_to_disk(tmp_path / "data")
    train = load_from_disk(tmp_path / "data")["train"]
    tokenizer = chatml()
    trainer = tokenizing_sft_trainer(tokenizer, train, str(tmp_path / "out"))
    for index in range(len(train)):
        row = trainer.train_dataset[index]
        learned = check_tool_mask(tokenizer, "chatml", train[index])
        labels = [token for token in row["labels"] if token != -100]
        assert tokenizer.decode(labels) == learned
        messages, tools = chat_inputs(train[index])
        expected = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert row["input_ids"] == expected["input_ids"]
        assert row["labels"] == [t if m else -100 for t, m in zip(expected["input_ids"], expected["assistant_masks"])]
