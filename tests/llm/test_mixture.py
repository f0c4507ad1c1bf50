"""Weighted dataset mixtures: exact row counts, seeded sampling, held-out rows of every source kept out of
training, the report, YAML/JSON configuration and the refused configurations."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk
from transformers import HfArgumentParser

from datasets_builders import agrimachine
from datasets_builders.agrimachine import (
    BUNDLED_SAMPLES,
    DEFAULT_SYSTEM_PROMPT,
    AgriMachineDataArguments,
    build_agrimachine_dataset,
)
from datasets_builders.instruction_formats import BadRowsError, DataSourceNotFoundError
from datasets_builders.mixture import (
    MixtureSource,
    build_mixture,
    concatenate_aligned,
    conversation_key,
    parse_mixture,
)
from tests.helpers import REPO_ROOT

MIXTURE_CONFIG = REPO_ROOT / "recipes" / "configs" / "agrimatech_smollm2_mixture.yaml"
LEAKED = ("leaked question", "leaked answer")  # held out in the alpaca source, a training row of the ShareGPT one


def alpaca_source(tmp_path: Path) -> Path:
    """24 alpaca rows, 4 of them held out (one of which the ShareGPT source repeats as a training row)."""
    rows = [
        {"id": f"a{i}", "category": "tillage", "instruction": f"question {i}", "output": f"answer {i}"}
        for i in range(20)
    ]
    rows += [{"instruction": f"exam {i}", "output": f"key {i}", "split": "test"} for i in range(3)]
    rows.append({"instruction": LEAKED[0], "output": LEAKED[1], "split": "test"})
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sharegpt_source(tmp_path: Path) -> Path:
    """12 conversations in a JSON array (no id/category columns): 9 for training (one is the alpaca source's
    held-out row), 3 held out (one is also held out in the alpaca source)."""

    def conversation(question: str, answer: str, **extra) -> dict:
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}

    rows = [conversation(f"chat {i}", f"reply {i}") for i in range(8)]
    rows += [conversation(*LEAKED), conversation("final exam", "final key", split="test")]
    rows += [conversation("exam 0", "key 0", split="test")]
    rows += [conversation("chat exam", "chat key", split="heldout")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def sources(tmp_path) -> tuple[str, str]:
    return str(alpaca_source(tmp_path)), str(sharegpt_source(tmp_path))


def mix(entries: list[dict], **kwargs):
    kwargs.setdefault("validation_size", 0)
    return build_mixture(parse_mixture(entries), **kwargs)


def train_rows(dataset) -> list[tuple[str, str]]:
    return list(zip(dataset["train"]["source"], map(conversation_key, dataset["train"]["messages"])))


def rows_of(dataset, label: str) -> Counter:
    return Counter(key for source, key in train_rows(dataset) if source == label)


# ------------------------------------------------------------------------------------------ sampling


def test_weights_and_counts_give_exact_row_counts(sources):
    alpaca, sharegpt = sources
    entries = [
        {"path": alpaca, "label": "alpaca", "weight": 0.5},
        {"path": sharegpt, "label": "chat", "format": "sharegpt", "weight": 2.5, "system_prompt": "Be brief."},
        {"path": "agrimachine_sample", "label": "sample", "count": 50},
    ]
    dataset, report = mix(entries, resolve=agrimachine.resolve_bundled, default_system_prompt="Default.")
    # alpaca: 20 training rows -> 10; chat: 9 training rows, 1 leaked -> 8 x 2.5 = 20; sample: exactly 50
    assert Counter(dataset["train"]["source"]) == {"alpaca": 10, "chat": 20, "sample": 50}
    chat = rows_of(dataset, "chat")
    assert len(chat) == 8 and sorted(Counter(chat.values()).items()) == [(2, 4), (3, 4)]  # 2 passes + 4 rows
    assert set(rows_of(dataset, "alpaca").values()) == {1} and set(rows_of(dataset, "sample").values()) == {1}
    by_label = {source.label: source for source in report.sources}
    assert [(s.available, s.taken, s.repeats) for s in report.sources] == [(20, 10, 0), (8, 20, 12), (311, 50, 0)]
    assert by_label["chat"].leakage_removed == 1 and by_label["alpaca"].leakage_removed == 0
    # each source keeps its own system prompt (or the default one), and the test rows keep their source
    first_system = {
        source: messages[0] for source, messages in zip(dataset["train"]["source"], dataset["train"]["messages"])
    }
    assert first_system["chat"] == {"role": "system", "content": "Be brief."}
    assert first_system["alpaca"] == {"role": "system", "content": "Default."}
    assert Counter(dataset["test"]["source"]) == {"alpaca": 4, "chat": 2, "sample": 40}


def test_weight_rounds_to_the_nearest_row_and_refuses_zero(sources):
    alpaca, _ = sources
    dataset, _ = mix([{"path": alpaca, "weight": 0.125}])  # 20 x 0.125 = 2.5 -> 3 (halves up)
    assert len(dataset["train"]) == 3
    with pytest.raises(ValueError, match=r"dataset_mixture\[0\] .*weight 0.01 of 20 training rows rounds to 0"):
        mix([{"path": alpaca, "weight": 0.01}])


def test_same_seed_same_rows_other_seed_other_sample_and_sources_are_independent(sources):
    alpaca, sharegpt = sources
    pair = [{"path": alpaca, "label": "alpaca", "weight": 0.5}, {"path": sharegpt, "label": "chat", "weight": 0.5}]
    first, _ = mix(pair, mixture_seed=3)
    assert train_rows(mix(pair, mixture_seed=3)[0]) == train_rows(first)  # same rows, same order
    assert rows_of(mix(pair, mixture_seed=4)[0], "alpaca") != rows_of(first, "alpaca")
    # another source added before it, or removed, does not change what a source contributes
    alone, _ = mix(pair[:1], mixture_seed=3)
    reordered, _ = mix(
        [{"path": "agrimachine_sample", "count": 5}, *pair[::-1]], mixture_seed=3, resolve=agrimachine.resolve_bundled
    )
    assert rows_of(alone, "alpaca") == rows_of(first, "alpaca") == rows_of(reordered, "alpaca")
    assert rows_of(reordered, "chat") == rows_of(first, "chat")


# ------------------------------------------------------------------------------------------ held-out rows


def test_held_out_and_validation_rows_of_every_source_never_reach_training(sources):
    alpaca, sharegpt = sources
    entries = [{"path": alpaca, "label": "alpaca", "weight": 3}, {"path": sharegpt, "label": "chat", "weight": 3}]
    dataset, report = mix(entries, validation_size=2, split_seed=1)
    evaluation = {key for name in ("validation", "test") for key in map(conversation_key, dataset[name]["messages"])}
    assert not evaluation & {key for _, key in train_rows(dataset)}
    leaked = conversation_key([{"role": "user", "content": LEAKED[0]}, {"role": "assistant", "content": LEAKED[1]}])
    assert dict(zip(map(conversation_key, dataset["test"]["messages"]), dataset["test"]["source"]))[leaked] == "alpaca"
    assert Counter(dataset["test"]["source"]) == {"alpaca": 4, "chat": 2}  # "exam 0" only once, from alpaca
    assert Counter(dataset["validation"]["source"]) == {"alpaca": 2, "chat": 2}
    for source in report.sources:
        build = source.build
        assert build.rows_read == (
            build.rows_skipped
            + build.duplicates_removed
            + build.heldout_overlap_removed
            + source.test
            + source.validation
            + source.heldout_duplicates
            + source.leakage_removed
            + source.available
        )
    chat = report.sources[1]
    assert (chat.build.rows_read, chat.test, chat.heldout_duplicates, chat.leakage_removed) == (12, 2, 1, 1)


def test_a_validation_row_of_one_source_is_removed_from_the_training_rows_of_another(tmp_path, sources):
    """The copy carries its own system message, so its validation hash differs and the row is one of its
    training rows; the leakage check compares conversations without system messages and still finds it."""
    alpaca, _ = sources
    single, _ = build_mixture([MixtureSource(alpaca, weight=1.0)], validation_size=1, split_seed=5)
    (held,) = single["validation"]["messages"]
    copy = tmp_path / "copy.jsonl"
    rows = [{"instruction": held[0]["content"], "output": held[1]["content"], "system": "Answer briefly."}]
    rows += [{"instruction": f"other {i}", "output": f"reply {i}"} for i in range(3)]
    copy.write_text("".join(json.dumps(row) + "\n" for row in rows))
    entries = [{"path": alpaca, "weight": 1}, {"path": str(copy), "label": "copy", "count": 4}]
    dataset, report = mix(entries, validation_size=1, split_seed=5)
    copy_report = report.sources[1]
    assert (copy_report.validation, copy_report.leakage_removed, copy_report.available) == (1, 1, 2)
    assert conversation_key(held) not in {key for _, key in train_rows(dataset)}
    assert Counter(dataset["train"]["source"])["copy"] == 4


# ------------------------------------------------------------------------------------------ columns and report


def test_sources_with_different_columns_are_aligned_and_the_report_adds_up(sources):
    alpaca, sharegpt = sources
    entries = [{"path": alpaca, "label": "alpaca", "weight": 1}, {"path": sharegpt, "label": "chat", "weight": 1}]
    dataset, report = mix(entries, max_train_samples=20)
    train = dataset["train"]
    assert set(train.column_names) == {"messages", "id", "category", "source"} and len(train) == 20
    ids = dict(zip(train["source"], train["id"]))
    assert ids["chat"] is None and ids["alpaca"].startswith("a")
    record = report.to_dict()
    assert json.loads(json.dumps(record)) == record and record["trimmed"] == 8
    counts = Counter(train["source"])
    assert report.proportions == {label: counts[label] / 20 for label in ("alpaca", "chat")}
    assert [source["in_train"] for source in record["sources"]] == [counts["alpaca"], counts["chat"]]
    assert record["sources"][1]["build"]["format"] == "sharegpt" and record["leakage_removed"] == 1
    summary = report.summary().splitlines()
    assert (
        summary[0]
        == "mixture of 2 sources (mixture_seed=42): train=20, test=6 (max_train_samples dropped 8 mixed rows)"
    )
    assert summary[2].split() == [
        "alpaca",
        "weight",
        "1",
        "24",
        "0",
        "0",
        "4",
        "0",
        "0",
        "20",
        "20",
        "0",
        f"{counts['alpaca'] / 20:.1%}",
    ]


def test_tool_calling_rows_and_plain_rows_concatenate_with_none_for_what_a_source_lacks():
    call = {"type": "function", "function": {"name": "rpm", "arguments": '{"gear": 3}'}}
    tool_turns = [
        {"role": "user", "content": "PTO rpm in gear 3?", "tool_calls": None},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "540", "tool_calls": None},
        {"role": "assistant", "content": "540 rpm.", "tool_calls": None},
    ]
    tools = Dataset.from_list([{"messages": tool_turns, "tools": '[{"type": "function"}]', "source": "tools"}])
    plain = Dataset.from_list(
        [
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "id": "7",
                "source": "plain",
            }
        ]
    )
    mixed = concatenate_aligned([tools, plain])
    assert mixed.to_list() == [
        {"messages": tool_turns, "tools": '[{"type": "function"}]', "source": "tools", "id": None},
        {
            "messages": [
                {"role": "user", "content": "q", "tool_calls": None},
                {"role": "assistant", "content": "a", "tool_calls": None},
            ],
            "tools": None,
            "source": "plain",
            "id": "7",
        },
    ]
    # the leakage key ignores the None a plain message gets beside tool-calling ones
    assert conversation_key(mixed[1]["messages"]) == conversation_key(plain[0]["messages"])
    with pytest.raises(ValueError, match="the sources' id columns cannot be combined: Value"):
        concatenate_aligned([plain, Dataset.from_list([{"id": 3}])])


# ------------------------------------------------------------------------------------------ configuration


def test_yaml_through_trl_parser_and_json_on_the_command_line_agree(tmp_path, sources):
    from trl import TrlParser

    alpaca, sharegpt = sources
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"dataset_mixture:\n  - path: {alpaca}\n    weight: 0.5\n  - path: {sharegpt}\n    count: 7\n"
        "    format: sharegpt\nmixture_seed: 3\nvalidation_size: 0\n"
    )
    (from_yaml,) = TrlParser((AgriMachineDataArguments,)).parse_args_and_config(["--config", str(config)])
    mixture = json.dumps([{"path": alpaca, "weight": 0.5}, {"path": sharegpt, "count": 7, "format": "sharegpt"}])
    argv = ["--dataset_mixture", mixture, "--mixture_seed", "3", "--validation_size", "0"]
    (from_cli,) = HfArgumentParser(AgriMachineDataArguments).parse_args_into_dataclasses(args=argv)
    assert (
        from_yaml.dataset_mixture
        == from_cli.dataset_mixture
        == [
            {"path": alpaca, "weight": 0.5, "format": "auto", "split": "train", "label": alpaca},
            {"path": sharegpt, "count": 7, "format": "sharegpt", "split": "train", "label": sharegpt},
        ]
    )
    assert AgriMachineDataArguments(**vars(from_cli)).dataset_mixture == from_cli.dataset_mixture  # round trip
    yaml_data, _ = build_agrimachine_dataset(from_yaml)
    assert train_rows(yaml_data) == train_rows(build_agrimachine_dataset(from_cli)[0])
    assert Counter(yaml_data["train"]["source"]) == {alpaca: 10, sharegpt: 7}


def test_shipped_mixture_config_builds():
    from trl import TrlParser

    args, _ = TrlParser((AgriMachineDataArguments,)).parse_args_and_config(
        ["--config", str(MIXTURE_CONFIG)], return_remaining_strings=True
    )
    assert [source.path for source in args.mixture_sources()] == list(BUNDLED_SAMPLES)
    assert args.hub_dataset_ids() == [] and args.system_prompt == DEFAULT_SYSTEM_PROMPT
    dataset, report = build_agrimachine_dataset(args)
    extra = report.sources[1]
    assert (extra.build.format, extra.test, extra.taken, extra.repeats) == (
        "sharegpt",
        8,
        2 * extra.available,
        extra.available,
    )
    assert report.leakage_removed == 0 and set(dataset["test"]["source"]) == set(BUNDLED_SAMPLES)


def test_hub_dataset_ids_lists_hub_sources_only(sources):
    alpaca, _ = sources
    args = AgriMachineDataArguments(
        dataset_mixture=[
            {"path": alpaca, "weight": 1},
            {"path": "org/agri", "config": "en", "count": 9},
            {"path": "org/agri", "config": "fr", "count": 9},
        ]
    )
    assert args.hub_dataset_ids() == ["org/agri"] and [s.label for s in args.mixture_sources()][1:] == [
        "org/agri/en",
        "org/agri/fr",
    ]
    assert AgriMachineDataArguments(dataset_name_or_path="org/agri").hub_dataset_ids() == ["org/agri"]
    assert AgriMachineDataArguments().hub_dataset_ids() == []


@pytest.mark.parametrize(
    ("mixture", "changes", "message"),
    [
        (
            [{"path": "a.jsonl", "weight": 1, "count": 3}],
            {},
            r"dataset_mixture\[0\]: give exactly one of weight .* got both",
        ),
        (
            [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}],
            {},
            r"dataset_mixture\[1\]: give exactly one .* got neither",
        ),
        ([{"path": "a.jsonl", "weight": 0}], {}, r"dataset_mixture\[0\]: weight must be a positive number, got 0"),
        ([{"path": "a.jsonl", "weight": -0.5}], {}, "weight must be a positive number, got -0.5"),
        ([{"path": "a.jsonl", "weight": float("inf")}], {}, "weight must be a positive number, got inf"),
        ([{"path": "a.jsonl", "count": 0}], {}, r"count must be a positive whole number of rows, got 0"),
        ([{"path": "a.jsonl", "count": 2.5}], {}, "count must be a positive whole number of rows, got 2.5"),
        ([{"path": "a.jsonl", "count": True}], {}, "count must be a positive whole number of rows, got True"),
        (
            [{"path": "a.jsonl", "weight": 1}, {"path": "b", "wieght": 1}],
            {},
            r"dataset_mixture\[1\]: unknown key 'wieght' \(did you mean 'weight'\?\); expected: path, weight, count",
        ),
        (
            [{"path": "a.jsonl", "weight": 1, "format": "xml"}],
            {},
            r"dataset_mixture\[0\]: format must be one of auto, alpaca",
        ),
        ([{"weight": 1}], {}, r"dataset_mixture\[0\]: path must be a file path, a Hub dataset id .* got nothing"),
        ([{"path": " ", "weight": 1}], {}, "path must be a file path"),
        ([{"path": "a.jsonl", "weight": 1, "system_prompt": 3}], {}, "system_prompt must be a string"),
        (["a.jsonl"], {}, r"dataset_mixture\[0\]: expected a mapping with keys path"),
        ([], {}, "dataset_mixture must be a non-empty list of sources"),
        ({"a.jsonl": 1}, {}, "dataset_mixture must be a non-empty list of sources .* got dict"),
        (
            '[{"path": "a.jsonl", "weight": 1}',
            {},
            r"dataset_mixture is not valid JSON \(Expecting ',' delimiter at column 34\)",
        ),
        (
            [{"path": "a.jsonl", "weight": 1}, {"path": "a.jsonl", "count": 2}],
            {},
            "the label 'a.jsonl' is used by 2 sources",
        ),
        (
            [{"path": "a.jsonl", "weight": 1}],
            {"dataset_name_or_path": "b.jsonl"},
            r"dataset_mixture replaces the single-source option\(s\) dataset_name_or_path='b.jsonl'",
        ),
        (
            [{"path": "a.jsonl", "weight": 1}],
            {"dataset_format": "alpaca", "dataset_split": "dev"},
            "dataset_split='dev', dataset_format='alpaca'",
        ),
        ([{"path": "a.jsonl", "weight": 1}], {"mixture_seed": "x"}, "mixture_seed must be an integer"),
    ],
)
def test_refused_configurations(mixture, changes, message):
    with pytest.raises(ValueError, match=message):
        AgriMachineDataArguments(dataset_mixture=mixture, **changes)


def test_source_errors_name_the_source_before_any_is_read(tmp_path, sources, monkeypatch):
    alpaca, _ = sources
    read = []
    monkeypatch.setattr("datasets_builders.mixture.build_instruction_dataset", lambda *a, **k: read.append(a))
    with pytest.raises(DataSourceNotFoundError, match=r"dataset_mixture\[1\] \(gone\): .*missing.jsonl: no such file"):
        mix([{"path": alpaca, "weight": 1}, {"path": str(tmp_path / "missing.jsonl"), "label": "gone", "weight": 1}])
    assert read == []
    monkeypatch.undo()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q"}\n')
    with pytest.raises(
        BadRowsError, match=r"(?s)in dataset_mixture\[1\] \(bad\) .*bad.jsonl:1: output: missing required field"
    ):
        mix([{"path": alpaca, "weight": 1}, {"path": str(bad), "label": "bad", "weight": 1}])


# ------------------------------------------------------------------------------------------ command line


def test_cli_builds_saves_atomically_and_prints_the_report(tmp_path, sources, capsys, monkeypatch):
    alpaca, sharegpt = sources
    out = tmp_path / "out" / "mix"
    mixture = json.dumps(
        [{"path": alpaca, "label": "alpaca", "count": 30}, {"path": sharegpt, "label": "chat", "weight": 1}]
    )
    argv = ["--dataset_mixture", mixture, "--output_dir", str(out), "--validation_size", "0"]
    assert agrimachine.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mixture of 2 sources (mixture_seed=42): train=38, test=6" in printed and f"saved to {out}" in printed
    saved = json.loads((out / "build_report.json").read_text())
    assert saved["split_sizes"] == {"train": 38, "test": 6} and [s["taken"] for s in saved["sources"]] == [30, 8]
    reloaded = load_from_disk(str(out))
    assert Counter(reloaded["train"]["source"]) == {"alpaca": 30, "chat": 8}
    # a save that fails half way leaves the previous folder as it was and no staging folder behind
    monkeypatch.setattr(agrimachine, "atomic_write_json", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        agrimachine.main([*argv[:-1], "1"])
    assert json.loads((out / "build_report.json").read_text()) == saved and sorted(
        p.name for p in out.parent.iterdir()
    ) == ["mix"]
    assert agrimachine.main(["--dataset_mixture", '[{"path": "x.jsonl"}]', "--output_dir", str(out)]) == 2
    assert "dataset_mixture[0]: give exactly one of weight" in capsys.readouterr().err
