"""``hf-tuning plan``: the plan of a real-size model from its config alone."""

from __future__ import annotations

import json

from hf_tuning.cli import main, name_patterns
from tests.helpers import DATA_DIR

LLAMA_8B = str(DATA_DIR / "llama-3.1-8b")


def test_plan_llama_8b_full_finetuning(capsys):
    assert main(["plan", "--model", LLAMA_8B, "--variant", "dt1"]) == 0
    out = capsys.readouterr().out
    assert "trainable before staging: 8,030,261,248 parameters" in out
    assert "G0     blocks 0-7: 2,270,232,576" in out  # 8 layers + embeddings
    assert "1. G0" in out and "4. G3" in out
    assert "model.norm.weight, lm_head.weight" in out


def test_plan_lora_json_and_frozen(capsys):
    assert main(["plan", "--model", LLAMA_8B, "--variant", "dt3", "--lora", "--lora-r", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in plan["stages"]] == ["even", "odd"]
    # r=8 all-linear LoRA on Llama-3.1-8B: 20,971,520 adapter parameters, half per parity
    assert [s["num_params"] for s in plan["stages"]] == [10_485_760, 10_485_760]
    assert main(["plan", "--model", LLAMA_8B, "--variant", "dt1", "--frozen", "embed_tokens|lm_head", "--json"]) == 0
    frozen = json.loads(capsys.readouterr().out)
    assert frozen["partition"]["frozen_params"] == 2 * 128256 * 4096
    assert frozen["stages"][0]["num_params"] == 8 * 218_112_000 + 4096


def test_plan_errors_are_reported(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "missing"), "--variant", "dt3"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["plan", "--model", LLAMA_8B, "--variant", "dt1", "--num-groups", "40"]) == 2
    assert "more than the 32 blocks" in capsys.readouterr().err


def test_name_patterns_compress_layer_indices():
    names = [f"model.layers.{i}.mlp.{p}.weight" for i in (0, 2, 4) for p in ("up_proj", "down_proj")]
    assert name_patterns(names) == ["model.layers.{N}.mlp.{up_proj, down_proj}.weight  N in {0,2..4}"]
