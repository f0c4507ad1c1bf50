"""The instruction-data builder: formats, row diagnostics with file:line, dedupe, deterministic splits."""

from __future__ import annotations

import csv
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from datasets_builders import agrimachine
from datasets_builders.agrimachine import (
    DEFAULT_SYSTEM_PROMPT,
    SAMPLE_PATH,
    AgriMachineDataArguments,
    build_agrimachine_dataset,
    push_dataset,
    save_dataset,
)
from datasets_builders.instruction_formats import (
    BadRowsError,
    DataSourceNotFoundError,
    EmptyDatasetError,
    FormatError,
    build_instruction_dataset,
)
from tests.helpers import REPO_ROOT


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def build(path: Path, **kwargs) -> tuple[DatasetDict, object]:
    kwargs.setdefault("validation_size", 0)
    return build_instruction_dataset(path, **kwargs)


def alpaca_rows(count: int, **extra) -> list[dict]:
    return [{"id": f"r{i}", "instruction": f"question {i}", "output": f"answer {i}", **extra} for i in range(count)]


# ------------------------------------------------------------------------------------------------ formats


def test_alpaca_jsonl_normalises_exactly(tmp_path):
    rows = [
        {"id": 7, "category": "tractors", "instruction": "Q1", "input": "", "output": "A1"},
        {"instruction": "Q2", "input": "ctx", "output": "A2", "system": "own"},
        {"instruction": "Q3", "output": "A3", "input": None, "extra": "dropped"},
    ]
    dataset, report = build(write_jsonl(tmp_path / "a.jsonl", rows))
    assert list(dataset) == ["train"] and report.format == "alpaca"
    assert dataset["train"]["messages"] == [
        [user("Q1"), assistant("A1")],
        [system("own"), user("Q2\n\nctx"), assistant("A2")],
        [user("Q3"), assistant("A3")],
    ]
    assert dataset["train"].column_names == ["messages", "id", "category"]
    assert dataset["train"]["id"] == ["7", "", ""] and dataset["train"]["category"] == ["tractors", "", ""]


def test_sharegpt_json_array_normalises_exactly(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "user", "value": "u1"},
                {"from": "assistant", "value": "a1"},
                {"from": "human", "value": "u2"},
                {"from": "gpt", "value": "a2"},
            ]
        },
        {"system": "column system", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    dataset, report = build(path)
    assert report.format == "sharegpt" and dataset["train"].column_names == ["messages"]
    assert dataset["train"]["messages"] == [
        [user("hi"), assistant("hello")],
        [system("sys"), user("u1"), assistant("a1"), user("u2"), assistant("a2")],
        [system("column system"), user("x"), assistant("y")],
    ]


def test_messages_csv_with_json_cells(tmp_path):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "category", "messages"])
        writer.writerow(["1", "engines", json.dumps([user("a"), assistant("b")])])
        writer.writerow(["2", "", json.dumps([system("s"), user("c"), assistant("d")])])
    dataset, report = build(path)
    assert report.format == "messages"
    assert dataset["train"]["messages"] == [[user("a"), assistant("b")], [system("s"), user("c"), assistant("d")]]
    assert dataset["train"]["id"] == ["1", "2"] and dataset["train"]["category"] == ["engines", ""]


def test_messages_parquet_and_json_lines_in_json_file(tmp_path):
    rows = [{"id": 3, "messages": [user("a"), assistant("b")]}, {"id": 4, "messages": [user("c"), assistant("d")]}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "m.parquet"))
    dataset, _ = build(tmp_path / "m.parquet")
    assert dataset["train"]["messages"] == [[user("a"), assistant("b")], [user("c"), assistant("d")]]
    assert dataset["train"]["id"] == ["3", "4"]
    lines_in_json = write_jsonl(tmp_path / "lines.json", rows)
    assert build(lines_in_json)[0]["train"]["messages"] == dataset["train"]["messages"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "q", "output": "a"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"messages": [user("q"), assistant("a")]}, "messages"),
    ],
)
def test_auto_detection(tmp_path, row, expected):
    assert build(write_jsonl(tmp_path / "d.jsonl", [row]))[1].format == expected


def test_auto_detection_errors_list_expected_columns(tmp_path):
    with pytest.raises(FormatError, match="match no known format") as unknown:
        build(write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}]))
    message = str(unknown.value)
    assert "alpaca: instruction, output" in message and "sharegpt: conversations" in message
    assert "messages: messages" in message and str(tmp_path / "u.jsonl") in message
    both = {"instruction": "q", "output": "a", "messages": [user("q"), assistant("a")]}
    with pytest.raises(FormatError, match="ambiguous: they match alpaca and messages"):
        build(write_jsonl(tmp_path / "b.jsonl", [both]))
    assert build(tmp_path / "b.jsonl", format="messages")[1].format == "messages"


def test_declared_format_is_enforced(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2))
    with pytest.raises(FormatError, match="declared format 'sharegpt' expects conversations"):
        build(path, format="sharegpt")
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        build(path, format="xml")


# --------------------------------------------------------------------------------------------- validation

GOOD = {
    "alpaca": {"instruction": "q", "output": "a"},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "messages": {"messages": [user("q"), assistant("a")]},
}


def turns(*pairs: tuple) -> dict:
    return {"conversations": [{"from": role, "value": value} for role, value in pairs]}


def roles(*pairs: tuple) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


BAD_ROWS = [
    ("alpaca", "{not json", "row: unparseable JSON line"),
    ("alpaca", "[1, 2]", "row: expected a JSON object, got list"),
    ("alpaca", {"instruction": "q"}, "output: missing required field"),
    ("alpaca", {"output": "a", "instruction": None}, "instruction: missing required field"),
    ("alpaca", {"instruction": "q", "output": 3}, "output: expected a string, got number"),
    ("alpaca", {"instruction": "q", "output": ["a"]}, "output: expected a string, got list"),
    ("alpaca", {"instruction": " \n\t", "output": "a"}, "instruction: empty or whitespace-only"),
    ("alpaca", {"instruction": "q", "output": ""}, "output: empty or whitespace-only"),
    ("alpaca", {"instruction": "q", "output": "a", "input": 5}, "input: expected a string, got number"),
    ("alpaca", {"instruction": "q", "output": "a", "history": "h"}, "history: expected a list of [user, assistant]"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["u"]]}, "history[0]: expected a [user, assistant]"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["u", 1]]}, "history[0]: expected a [user, assistant]"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["u", " "]]}, "history[0][1]: empty or whitespace"),
    ("sharegpt", turns(("human", "q")), "conversations: no assistant reply"),
    ("sharegpt", turns(("human", "q"), ("gpt", "a"), ("human", "q2")), "conversations: does not end with an assistant"),
    ("sharegpt", turns(("human", "q"), ("bot", "a")), "conversations[1].from: unknown value 'bot'"),
    ("sharegpt", turns(("human", "q"), ("gpt", "  ")), "conversations[1].value: empty content"),
    ("sharegpt", turns(("human", "q"), ("system", "s"), ("gpt", "a")), "conversations[1].from: system message not in"),
    ("sharegpt", {"conversations": []}, "conversations: empty conversation"),
    ("sharegpt", {"conversations": "q"}, "conversations: expected a list of {from, value} objects, got string"),
    ("sharegpt", {"conversations": ["q"]}, "conversations[0]: expected an object, got string"),
    ("sharegpt", {"conversations": [{"value": "q"}]}, "conversations[0].from: missing required field"),
    ("messages", roles(("user", "q"), ("function", "a")), "messages[1].role: unknown value 'function'"),
    (
        "messages",
        roles(("user", "q"), ("tool", "a"), ("assistant", "b")),
        "messages[1]: a tool result must follow the function call it answers",
    ),
    ("messages", roles(("user", "q"), ("assistant", 5)), "messages[1].content: expected a string, got number"),
    ("messages", roles(("user", "q"), ("system", "s"), ("assistant", "a")), "messages[1].role: system message not"),
    ("messages", roles(("user", ""), ("assistant", "a")), "messages[0].content: empty content"),
    (
        "messages",
        roles(
            ("system", "s"),
        ),
        "messages: no assistant reply",
    ),
    # Image placeholders without images (this builder is text-only).
    (
        "messages",
        roles(("system", "s"), ("user", "q"), ("assistant", "See the worn belt: <image>")),
        "messages[2].content: an <image> placeholder but this text-only builder has no images to go with it",
    ),
    (
        "sharegpt",
        turns(("human", "Compare <image_1> and <image_2>"), ("gpt", "a")),
        "conversations[0].value: an <image_1>",
    ),
    ("sharegpt", GOOD["sharegpt"] | {"system": "<|vision_start|>"}, "system: an <|vision_start|> placeholder"),
    ("alpaca", {"instruction": "q", "input": "<|image|>", "output": "a"}, "input: an <|image|> placeholder"),
    ("alpaca", {"instruction": "<image 1> what?", "output": "a"}, "instruction: an <image 1> placeholder"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["<img>a.jpg</img>", "b"]]}, "history[0][0]: an <img>"),
]


@pytest.mark.parametrize(("fmt", "bad", "expected"), BAD_ROWS, ids=[case[2].split(":")[0] for case in BAD_ROWS])
def test_each_problem_is_reported_at_its_line(tmp_path, fmt, bad, expected):
    path = tmp_path / "bad.jsonl"
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text("\n".join([json.dumps(GOOD[fmt]), json.dumps(GOOD[fmt]), bad_line, json.dumps(GOOD[fmt])]) + "\n")
    with pytest.raises(BadRowsError) as raised:
        build(path, format=fmt)
    assert len(raised.value.problems) == 1, raised.value.problems
    assert raised.value.problems[0].startswith(f"{path}:3: {expected}")
    assert isinstance(raised.value, ValueError) and f"{path}:3: " in str(raised.value)


def test_csv_line_numbers_count_quoted_multiline_cells(tmp_path):
    path = tmp_path / "a.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])  # line 1
        writer.writerow(["q1", "first\nsecond\nthird", "a1"])  # lines 2-4
        writer.writerow(["q2", "", ""])  # line 5: empty output
        writer.writerow(["q3", "", "a3"])  # line 6
        writer.writerow(["", "", "a4"])  # line 7: empty instruction
    with pytest.raises(BadRowsError) as raised:
        build(path)
    assert raised.value.problems == [
        f"{path}:5: output: empty or whitespace-only",
        f"{path}:7: instruction: empty or whitespace-only",
    ]
    dataset, _ = build(path, on_bad_rows="skip")
    assert dataset["train"]["messages"][0] == [user("q1\n\nfirst\nsecond\nthird"), assistant("a1")]


def test_csv_bad_json_cell_and_column_count(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('messages,id\n"[{""role"": ""user""",1\nnot,enough,columns,here\n', encoding="utf-8")
    with pytest.raises(BadRowsError) as raised:
        build(path)
    assert raised.value.problems[0].startswith(f"{path}:2: messages: not valid JSON")
    assert raised.value.problems[1] == f"{path}:3: row: expected 2 columns, found 4"


def test_json_array_reports_the_line_where_the_element_starts(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        "[\n"
        '  {"instruction": "q1", "output": "a1"},\n'  # line 2
        '  {"instruction": "q2",\n'  # line 3
        '   "output": "a2\\nstill one line"},\n'
        '  {"instruction": "q3", "output": "a3"}, {"instruction": "q4",\n'  # line 5: two elements
        "\n"
        '   "output": 4},\n'
        "  \n"
        '  {"instruction": "q5", "output": ["x"]}\n'  # line 9
        "]\n",
        encoding="utf-8",
    )
    with pytest.raises(BadRowsError) as raised:
        build(path)
    assert raised.value.problems == [
        f"{path}:5: output: expected a string, got number",
        f"{path}:9: output: expected a string, got list",
    ]


def test_broken_json_array_fails_even_when_skipping(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q2", "output": }\n]\n')
    with pytest.raises(BadRowsError, match=r"broken\.json:3: row: unparseable JSON"):
        build(path, on_bad_rows="skip")


def test_error_lists_twenty_problems_and_counts_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"instruction": "q", "output": ""}] * 25)
    with pytest.raises(BadRowsError) as raised:
        build(path)
    assert len(raised.value.problems) == 25
    message = str(raised.value)
    assert f"{path}:20: output:" in message and f"{path}:21: output:" not in message
    assert "... and 5 more" in message and "on_bad_rows='skip'" in message


def test_skip_mode_counts_reasons_and_logs(tmp_path, caplog):
    rows = [
        *alpaca_rows(3),
        {"instruction": "q", "output": 1},
        {"instruction": "", "output": ""},
        {"instruction": "q", "output": ""},
        [1],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="datasets_builders.instruction_formats"):
        dataset, report = build(path, on_bad_rows="skip")
    assert len(dataset["train"]) == 3
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (7, 3, 4)
    assert report.skip_reasons == {"empty": 2, "wrong type": 1, "not an object": 1}
    assert report.skipped_examples[0] == f"{path}:4: output: expected a string, got number"
    assert "Skipped 4 bad row(s)" in caplog.text and f"{path}:4: output" in caplog.text
    assert "4 skipped (empty: 2, wrong type: 1, not an object: 1)" in report.summary()


def test_empty_dataset_errors_name_the_source(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EmptyDatasetError, match=r"empty\.jsonl: no valid rows"):
        build(empty)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": ""}])
    with pytest.raises(EmptyDatasetError, match=r"bad\.jsonl: no valid rows \(1 read, 1 bad\)"):
        build(all_bad, on_bad_rows="skip")


def test_missing_local_paths_are_file_not_found(tmp_path):
    for missing in [tmp_path / "nope.jsonl", "./data/missing", "data\\x.csv", "a/b/c"]:
        with pytest.raises(
            FileNotFoundError, match=r"no such file; expected a local \.json, \.jsonl, \.csv, \.parquet"
        ):
            build(missing)
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file format \.txt"):
        build(other)


def test_hub_ids_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, **kwargs):
        calls.append((path, kwargs))
        return Dataset.from_list([{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(BadRowsError) as raised:
        build_instruction_dataset("org/agri", config="cfg", split="train", validation_size=0)
    assert raised.value.problems == ["org/agri:row 1: output: empty or whitespace-only"]
    assert calls == [("org/agri", {"name": "cfg", "split": "train"})]

    def offline(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceNotFoundError, match="'org/agri' is neither a local file nor a reachable Hub"):
        build_instruction_dataset("org/agri")


# --------------------------------------------------------------------------------- what a text-only build drops


def belt_turns(question: str, answer: str = "The belt is worn.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_columns_nothing_reads_are_named_in_one_warning_and_in_the_report(tmp_path, caplog):
    rows = [
        {"id": "1", "category": "belts", "split": "train", "images": ["belt.jpg"], "source": "forum",
         "conversations": belt_turns("Which belt is this?")},
        {"id": "2", "images": [], "source": None, "score": 0.5, "conversations": belt_turns("And this one?")},
        {"id": "3", "images": [], "note": "", "conversations": belt_turns("How tight?", "1.5 cm of deflection.")},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "mm.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="datasets_builders.instruction_formats"):
        dataset, report = build(path)
    assert report.dropped_columns == ["images", "source", "score"]  # "note" holds nothing, so nothing is lost
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and f"{path}: the column(s) images, source, score are dropped" in warnings[0]
    assert "reads only the sharegpt columns (conversations, system, tools), id, category and split" in warnings[0]
    assert report.summary().endswith("; unused columns dropped: images, source, score")
    assert dataset["train"].column_names == ["messages", "id", "category"]
    saved = save_dataset(dataset, tmp_path / "out", report)
    assert json.loads((saved / "build_report.json").read_text())["dropped_columns"] == ["images", "source", "score"]

    csv_path = tmp_path / "a.csv"  # every CSV row has every column: empty cells drop nothing
    csv_path.write_text("instruction,output,notes,id\nq1,a1,,1\nq2,a2,,2\n", encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datasets_builders.instruction_formats"):
        _, clean = build(csv_path)
    assert clean.dropped_columns == [] and "unused columns" not in clean.summary() and not caplog.records


def test_image_placeholders_are_bad_rows_that_name_the_unread_images_column(tmp_path):
    rows = [
        {"id": "1", "images": ["belt.jpg"], "conversations": belt_turns("What is wrong here?\n<image>")},
        {"id": "2", "conversations": belt_turns("How tight should a V-belt be?", "About 1.5 cm of deflection.")},
        {"id": "3", "image": "", "conversations": belt_turns("<image>\nAnd here?")},
    ]
    path = write_jsonl(tmp_path / "mm.jsonl", rows)
    with pytest.raises(BadRowsError) as raised:
        build(path)
    problem = "an <image> placeholder but this text-only builder has no images to go with it"
    assert raised.value.problems == [
        f"{path}:1: conversations[0].value: {problem} (the row's 'images' column is not read)",
        f"{path}:3: conversations[0].value: {problem}",
    ]
    dataset, report = build(path, on_bad_rows="skip")
    assert dataset["train"]["id"] == ["2"] and report.skip_reasons == {"image placeholder": 2}
    assert "2 skipped (image placeholder: 2)" in report.summary()
    # Text that only looks like markup is not a placeholder.
    fine = write_jsonl(
        tmp_path / "fine.jsonl",
        [
            {"instruction": 'Is <img src="a.png"> valid HTML?', "output": "Yes."},
            {"instruction": "What does the <img> tag do?", "output": "It embeds an image in a web page."},
        ],
    )
    assert build(fine)[1].rows_kept == 2


# ----------------------------------------------------------------------------------- prompts and history


def test_system_prompt_inserted_unless_the_row_has_one(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, GOOD["alpaca"] | {"system": "own"}])
    assert build(path, system_prompt="default")[0]["train"]["messages"] == [
        [system("default"), user("q"), assistant("a")],
        [system("own"), user("q"), assistant("a")],
    ]
    for none in (None, ""):
        assert build(path, system_prompt=none)[0]["train"]["messages"][0] == [user("q"), assistant("a")]
    conversation = write_jsonl(tmp_path / "m.jsonl", [roles(("system", "own"), ("user", "q"), ("assistant", "a"))])
    assert build(conversation, system_prompt="default")[0]["train"]["messages"][0][0] == system("own")


def test_alpaca_history_becomes_alternating_turns(tmp_path):
    row = {"instruction": "q3", "input": "i3", "output": "a3", "history": [["q1", "a1"], ["q2", "a2"]], "system": "s"}
    dataset, _ = build(write_jsonl(tmp_path / "h.jsonl", [row]))
    assert dataset["train"]["messages"][0] == [
        system("s"),
        user("q1"),
        assistant("a1"),
        user("q2"),
        assistant("a2"),
        user("q3\n\ni3"),
        assistant("a3"),
    ]


# ------------------------------------------------------------------------------------ dedupe and splitting


def test_exact_duplicates_removed_keeping_the_first(tmp_path, caplog):
    rows = [
        {"id": "a", "instruction": "q", "output": "x"},
        {"id": "b", "instruction": "q", "output": "y"},
        {"id": "c", "instruction": "q", "output": "x"},
        {"id": "d", "instruction": "q", "input": "", "output": "x"},
    ]
    with caplog.at_level(logging.WARNING, logger="datasets_builders.instruction_formats"):
        dataset, report = build(write_jsonl(tmp_path / "d.jsonl", rows))
    assert dataset["train"]["id"] == ["a", "b"]
    assert report.duplicates_removed == 2 and report.rows_kept == 2 and report.rows_read == 4
    assert "removed 2 exact duplicate(s)" in caplog.text


def split_ids(dataset: DatasetDict) -> dict[str, set[str]]:
    return {name: set(part["id"]) for name, part in dataset.items()}


def test_validation_split_is_deterministic_and_independent_of_row_order(tmp_path):
    rows = alpaca_rows(400)
    first, report = build(write_jsonl(tmp_path / "a.jsonl", rows), validation_size=0.1)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    second, _ = build(write_jsonl(tmp_path / "b.jsonl", shuffled), validation_size=0.1)
    assert split_ids(first) == split_ids(second)
    assert (
        20 <= report.split_sizes["validation"] <= 60
        and report.split_sizes["train"] + report.split_sizes["validation"] == 400
    )
    grown, _ = build(write_jsonl(tmp_path / "c.jsonl", rows + alpaca_rows(500)[400:]), validation_size=0.1)
    assert split_ids(first)["validation"] <= split_ids(grown)["validation"]
    assert split_ids(first)["train"] <= split_ids(grown)["train"]
    reseeded, _ = build(tmp_path / "a.jsonl", validation_size=0.1, split_seed=7)
    assert split_ids(reseeded)["validation"] != split_ids(first)["validation"]


def test_validation_size_as_a_count(tmp_path):
    rows = alpaca_rows(50)
    counted, _ = build(write_jsonl(tmp_path / "a.jsonl", rows), validation_size=10)
    counted_reversed, _ = build(write_jsonl(tmp_path / "b.jsonl", rows[::-1]), validation_size=10)
    assert len(counted["validation"]) == 10 and split_ids(counted) == split_ids(counted_reversed)
    with pytest.raises(EmptyDatasetError, match="leaves no training rows"):
        build(tmp_path / "a.jsonl", validation_size=50)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        build(tmp_path / "a.jsonl", validation_size=1.5)


def test_fixed_test_split_from_the_split_column(tmp_path):
    rows = alpaca_rows(30, split="train")
    for index in (2, 5):
        rows[index]["split"] = "test"
    rows[9]["split"] = "HeldOut"
    leaked = {"id": "leak", "instruction": "question 5", "output": "answer 5", "split": "train"}
    rows.insert(0, leaked)  # a training copy of a test row, before it in the file
    dataset, report = build(write_jsonl(tmp_path / "s.jsonl", rows), validation_size=0.2)
    ids = split_ids(dataset)
    assert ids["test"] == {"r2", "r5", "r9"} and dataset["test"]["id"] == ["r2", "r5", "r9"]
    assert not ids["test"] & (ids["train"] | ids["validation"]) and "leak" not in ids["train"] | ids["validation"]
    assert report.heldout_overlap_removed == 1 and report.split_sizes["test"] == 3
    assert len(ids["train"]) + len(ids["validation"]) == 27 and "split" not in dataset["train"].column_names
    without_test, _ = build(write_jsonl(tmp_path / "t.jsonl", rows[11:]), validation_size=0.2)
    assert "test" not in without_test


# ------------------------------------------------------------------------------------------- agrimachine


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset_format": "xml"}, "dataset_format must be one of auto, alpaca, sharegpt, messages"),
        ({"on_bad_rows": "ignore"}, "on_bad_rows must be one of error, skip"),
        ({"validation_size": -0.1}, "validation_size must be a fraction"),
        ({"validation_size": 2.5}, "must be a whole number"),
        ({"split_seed": "x"}, "split_seed must be an integer"),
        ({"max_train_samples": 0}, "max_train_samples must be a positive integer"),
        ({"push_dataset_to_hub": "a/b/c"}, "push_dataset_to_hub must be a Hub repo id"),
        ({"dataset_name_or_path": " "}, "dataset_name_or_path must be"),
        ({"dataset_split": ""}, "dataset_split must be a non-empty"),
    ],
)
def test_data_arguments_reject_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        AgriMachineDataArguments(**changes)


def test_data_arguments_defaults():
    args = AgriMachineDataArguments()
    assert args.resolved_source() == str(SAMPLE_PATH) and SAMPLE_PATH.name == "agrimachine_sample.jsonl"
    assert args.system_prompt == DEFAULT_SYSTEM_PROMPT and args.validation_split_size() == 0.05
    assert AgriMachineDataArguments(validation_size=25.0).validation_split_size() == 25
    assert AgriMachineDataArguments(system_prompt=None).system_prompt == ""


def test_build_agrimachine_dataset_from_a_file(tmp_path):
    path = write_jsonl(tmp_path / "agri.jsonl", alpaca_rows(40, category="tillage"))
    args = AgriMachineDataArguments(dataset_name_or_path=str(path), validation_size=5.0, max_train_samples=10)
    dataset, report = build_agrimachine_dataset(args)
    assert len(dataset["train"]) == 10 and len(dataset["validation"]) == 5 and report.split_sizes["train"] == 10
    assert dataset["train"]["messages"][0][0] == system(DEFAULT_SYSTEM_PROMPT)
    assert set(dataset["train"]["category"]) == {"tillage"}


def test_cli_saves_atomically_and_pushes(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "agri.jsonl", alpaca_rows(20))
    out = tmp_path / "out" / "agri"
    pushed = []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.append((repo_id, kw)))
    argv = ["--dataset_name_or_path", str(path), "--output_dir", str(out), "--validation_size", "4"]
    assert agrimachine.main(argv) == 0
    assert agrimachine.main([*argv, "--push_dataset_to_hub", "me/agri", "--hub_private"]) == 0  # over the old one
    printed = capsys.readouterr().out
    assert "20 rows read, 20 kept" in printed and "train=16, validation=4" in printed
    reloaded = load_from_disk(str(out))
    assert {name: len(part) for name, part in reloaded.items()} == {"train": 16, "validation": 4}
    assert json.loads((out / "build_report.json").read_text())["split_sizes"] == {"train": 16, "validation": 4}
    assert sorted(p.name for p in out.parent.iterdir()) == ["agri"]  # no staging or old folder left
    assert pushed == [("me/agri", {"private": True, "token": None})]
    assert agrimachine.main(["--dataset_name_or_path", str(tmp_path / "none.jsonl"), "--output_dir", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_push_dataset_never_logs_the_token(monkeypatch, caplog):
    received = {}
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: received.update(kw, repo=repo_id))
    dataset = DatasetDict({"train": Dataset.from_list([{"messages": [user("q"), assistant("a")]}])})
    with caplog.at_level(logging.DEBUG):
        push_dataset(dataset, "me/agri", token="hf_secret_value")
    assert received == {"repo": "me/agri", "private": False, "token": "hf_secret_value"}
    assert "me/agri" in caplog.text and "hf_secret_value" not in caplog.text


def test_importing_the_package_does_not_import_torch():
    code = "import sys, datasets_builders as d; d.AgriMachineDataArguments; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_bundled_sample():
    if not SAMPLE_PATH.exists():
        pytest.skip(f"{SAMPLE_PATH} does not exist yet (it is written by another engineer)")
    raw = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset, report = build_agrimachine_dataset(AgriMachineDataArguments())
    assert report.rows_read == len(raw) >= 300 and report.format == "alpaca"
    assert report.rows_skipped == 0 and report.duplicates_removed == 0 and report.heldout_overlap_removed == 0
    declared_test = {row["id"] for row in raw if row["split"] == "test"}
    assert set(dataset["test"]["id"]) == declared_test and len(dataset["test"]) == len(declared_test)
    assert {row["split"] for row in raw} <= {"train", "test"}
    assert set(dataset["train"]["category"]) == {row["category"] for row in raw}
    test_instructions = {row["instruction"].strip() for row in raw if row["split"] == "test"}
    train_instructions = {row["instruction"].strip() for row in raw if row["split"] != "test"}
    assert not test_instructions & train_instructions
