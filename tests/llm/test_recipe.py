"""The AgriMaTech recipe end to end at tiny scale: train, save, card, push, reload, resume, launchers, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.llama3_tokenizer import llama3_tokenizer
from hf_tuning.llm.chat_templates import has_generation_markers
from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_recipe

RECIPE = REPO_ROOT / "recipes" / "agrimatech_llama_dt3.py"
SMOLLM2_CONFIG = REPO_ROOT / "recipes" / "configs" / "agrimatech_smollm2_dt3.yaml"
LLAMA_CONFIG = REPO_ROOT / "recipes" / "configs" / "agrimatech_llama_dt3.yaml"


recipe = load_recipe("agrimatech_llama_dt3.py")


def save_tiny_llama3(folder: Path, hidden: int) -> Path:
    """A 4-layer LLaMA with the real Llama-3 vocabulary and its stock (marker-free) tokenizer, saved locally."""
    tokenizer = llama3_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama3(tmp_path_factory.mktemp("tiny-llama3"), hidden=32)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def agri_rows(count: int = 24) -> list[dict]:
    return [
        {
            "instruction": f"What should I check on the tractor before job {i}?",
            "input": "",
            "output": f"Check the oil, the coolant and the tyre pressures, then walk round for leaks before job {i}.",
            "split": "test" if i % 8 == 0 else "train",
        }
        for i in range(count)
    ]


def recipe_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(SMOLLM2_CONFIG),
        "--model_name_or_path", str(model_dir),
        "--chat_template", "auto",
        "--base_model_id", "tests/tiny-llama3",
        "--dataset_name_or_path", str(data),
        "--validation_size", "3",
        "--output_dir", str(out),
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "0.01",
        "--logging_steps", "1",
        "--save_steps", "1",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 128000, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_shipped_configs_parse():
    *_, llama = recipe.parse_args(["--config", str(LLAMA_CONFIG), "--output_dir", "/tmp/unused"])
    _, data, model, _ = recipe.parse_args(["--config", str(LLAMA_CONFIG), "--output_dir", "/tmp/unused"])
    assert (llama.dt_variant, llama.learning_rate, llama.assistant_only_loss) == ("dt3", 1e-4, True)
    assert (model.model_name_or_path, model.lora_r, model.lora_target_modules) == (
        "meta-llama/Llama-3.1-8B-Instruct",
        16,
        "all-linear",
    )
    assert data.dataset_name_or_path == "agrimachine_sample"
    chosen, *_ = recipe.parse_args(["--config", str(SMOLLM2_CONFIG), "--dt_variant", "dt1"])
    assert chosen.chat_template == "chatml"
    *_, overridden = recipe.parse_args(["--config", str(SMOLLM2_CONFIG), "--dt_variant", "dt1"])
    assert overridden.dt_variant == "dt1" and overridden.use_cpu


def test_recipe_trains_saves_pushes_and_reloads(tmp_path, tiny_model_dir, fake_hub):
    data = write_rows(tmp_path / "agri.jsonl", agri_rows())
    out = tmp_path / "out"
    result = recipe.main(
        recipe_args(
            tiny_model_dir,
            data,
            out,
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "user/agri-tiny",
            "--hub_private_repo",
            "true",
        )
    )
    trainer = result["trainer"]
    # the adapter, tokenizer, card and stage report are all there
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "dt_stages.json",
        "dt_timeline.png",
    ):
        assert (out / name).is_file(), name
    stages = json.loads((out / "dt_stages.json").read_text())
    assert stages["complete"] and [r["name"] for r in stages["stage_records"]] == ["even", "odd"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tests/tiny-llama3"
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tests/tiny-llama3" and meta["library_name"] == "peft"
    assert {"dt3", "lora", "hf-tuning"} <= set(meta["tags"])
    assert [s["name"] for s in meta["hf_tuning"]["stages"]] == ["even", "odd"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["name"] == "validation loss"
    assert os.environ["HF_TOKEN"] not in card
    # the saved template is the training template (generation markers), so reloads train the same way
    assert has_generation_markers((out / "chat_template.jinja").read_text())

    # pushed privately, without checkpoints, and loadable by repo id with identical outputs
    repo = fake_hub.repo("user/agri-tiny")
    assert repo.private
    assert not any(f.startswith(("stage-", "checkpoint-")) for f in repo.files())
    from peft import PeftModel

    tuned = trainer.model.eval()
    expected = logits(tuned)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(logits(base), expected)
    reloaded = PeftModel.from_pretrained(base, "user/agri-tiny").eval()
    assert torch.equal(logits(reloaded), expected)
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert torch.equal(logits(local), expected)


# Mid-stage only: resuming exactly at a stage boundary is the engine's (tests/engine/test_trainer.py); the
# recipe adds nothing there, and each case costs half a minute.
@pytest.mark.parametrize("dropped", [("checkpoint-3",)], ids=["mid-stage"])
def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, dropped):
    """Interrupt the finished run's copy in stage 1 (mid-stage, or right after stage 0) and resume it."""
    data = write_rows(tmp_path / "agri.jsonl", agri_rows())
    full = tmp_path / "full"
    recipe.main(recipe_args(tiny_model_dir, data, full, "--max_steps", "3", "--save_total_limit", "3"))
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    for name in dropped:
        shutil.rmtree(broken / "stage-1" / name)
    for name in ("adapter_model.safetensors", "dt_stages.json", "README.md"):
        (broken / name).unlink()
    recipe.main(
        recipe_args(
            tiny_model_dir,
            data,
            broken,
            "--max_steps",
            "3",
            "--save_total_limit",
            "3",
            "--resume_from_checkpoint",
            "true",
        )
    )
    expected, resumed = load_file(full / "adapter_model.safetensors"), load_file(broken / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    steps = [
        (r["start_step"], r["end_step"]) for r in json.loads((broken / "dt_stages.json").read_text())["stage_records"]
    ]
    assert steps == [(0, 3), (3, 6)]
    assert sorted(p.name for p in (broken / "stage-0").iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_qlora_4bit_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU 4-bit kernels (used by the recipe's final evaluation) need layer widths that are
    # multiples of its 64-value quantization block
    model_dir = save_tiny_llama3(tmp_path / "tiny-llama3-64", hidden=64)
    data = write_rows(tmp_path / "agri.jsonl", agri_rows())
    out = tmp_path / "qlora"
    result = recipe.main(
        recipe_args(
            model_dir, data, out, "--load_in_4bit", "true", "--max_steps", "1", "--gradient_checkpointing", "true"
        )
    )
    base = result["trainer"].model.get_base_model()
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    assert base.is_activation_checkpointing  # QLoRA with gradient checkpointing, as on a real GPU run
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        ({"--dataset_name_or_path": "missing/data.jsonl"}, FileNotFoundError, "missing/data.jsonl: no such file"),
        ({"data": []}, ValueError, "no valid rows|empty"),
        ({"data": [{"instruction": "Why?", "input": "", "output": " "}]}, ValueError, r"agri.jsonl:1: output: "),
        ({"--chat_template": "TEMPLATE"}, ValueError, "has no {% generation %}"),
        (
            {"--model_name_or_path": "no-such-org/no-such-model"},
            OSError,
            "model 'no-such-org/no-such-model' is not a local folder or file",
        ),
        ({"--model_name_or_path": "./no/such/folder"}, OSError, "does not exist"),
        ({"config_key": "lora_rank: 8"}, ValueError, r"unknown setting 'lora_rank' \(did you mean .*lora_r"),
    ],
    ids=[
        "missing-file",
        "empty",
        "no-reply",
        "template-without-markers",
        "unknown-model",
        "missing-folder",
        "wrong-config-key",
    ],
)
def test_bad_input_fails_before_training(tmp_path, tiny_model_dir, mutate, error, message):
    rows = mutate.get("data", agri_rows())
    data = write_rows(tmp_path / "agri.jsonl", rows)
    out = tmp_path / "out"
    args = recipe_args(tiny_model_dir, data, out)
    for flag, value in mutate.items():
        if flag.startswith("--"):
            if value == "TEMPLATE":
                value = str(tmp_path / "plain.jinja")
                Path(value).write_text("{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}")
            args[args.index(flag) + 1] = value
    if "config_key" in mutate:
        config = tmp_path / "bad.yaml"
        config.write_text(SMOLLM2_CONFIG.read_text() + mutate["config_key"] + "\n")
        args[args.index("--config") + 1] = str(config)
    with pytest.raises(error, match=message):
        recipe.main(args)
    assert not (out / "stage-0").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "processes"),
    [("deepspeed_zero3.yaml", 2)],
)
def test_recipe_under_accelerate_launch(tmp_path, tiny_model_dir, config, processes):
    """The recipe under ZeRO-3 (gloo on CPU): 2 processes, each saving (ZeRO-3 gathers the adapter on save); the
    adapter must be complete, not the empty tensors of the most reported LoRA + ZeRO-3 failure, and it merges like
    any other. The single-process, DDP, ZeRO-2 and ZeRO-3-offload configs are launched by
    tests/engine/test_distributed.py (the same engine; each launch costs half a minute to a minute): DDP and ZeRO-2
    runs save unsharded LoRA weights, as a single process does."""
    data = write_rows(tmp_path / "agri.jsonl", agri_rows(32))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / config), "--num_processes", str(processes),
        "--main_process_port", "0",
        str(RECIPE), *recipe_args(tiny_model_dir, data, out, "--save_strategy", "no"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert card["hf_tuning"]["dt_variant"] == "dt3"
    assert f"- world_size: {processes}" in (out / "README.md").read_text()

    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    expected_shapes = {
        k.replace(".default", ""): tuple(v.shape) for k, v in reference.state_dict().items() if "lora_" in k
    }
    saved = load_file(out / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected_shapes
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in lora_b), "an untrained/empty lora_B"
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = logits(base)
    assert not torch.allclose(logits(PeftModel.from_pretrained(base, out)), before)

    # the adapter of a DDP / ZeRO-2 / ZeRO-3 run merges like any other: the merged model is the PeftModel
    from hf_tuning.llm.merge import merge_adapter

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    merged_dir = merge_adapter(out, tmp_path / "merged", base=str(tiny_model_dir), dtype="float32").output_dir
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert (logits(merged) - logits(tuned)).abs().max().item() <= 1e-5


def test_recipe_trains_on_a_mixture_with_tool_calling_rows(tmp_path, tiny_model_dir):
    """Two sources given as JSON on the command line: plain alpaca rows and OpenAI-style tool-calling rows. The
    recipe keeps the ``tools`` column, so the tool definitions reach the Llama 3.1 template, and the card carries
    the mixture report. A row the template cannot render (Llama 3.1 makes one call per turn) stops the run before
    the weights load."""
    plain = write_rows(tmp_path / "agri.jsonl", agri_rows(16))
    fixture = REPO_ROOT / "tests/data/tool_calling/openai_messages_tools.jsonl"
    rows = [json.loads(line) for line in fixture.read_text().splitlines()]
    single_calls = [row for row in rows if all(len(m.get("tool_calls") or []) <= 1 for m in row["messages"])]
    assert 0 < len(single_calls) < len(rows)
    tools = write_rows(tmp_path / "tools.jsonl", single_calls)

    def run(tool_source: Path, out: Path):
        # labels, not the temporary paths, seed the samples: the rows drawn are the same in every run
        mixture = [
            {"path": str(plain), "weight": 1.0, "label": "agri"},
            {"path": str(tool_source), "count": 6, "label": "tool-rows"},
        ]
        return recipe.main(
            [
                "--config", str(SMOLLM2_CONFIG),
                "--model_name_or_path", str(tiny_model_dir),
                "--chat_template", "llama3.1",
                "--dataset_mixture", json.dumps(mixture),
                "--validation_size", "0",
                "--output_dir", str(out),
                "--max_steps", "1",
                "--max_length", "1024",  # tool definitions are long: at 256 TRL would drop the masked-out rows
                "--per_device_train_batch_size", "1",  # 128k-vocabulary logits of long rows: keep the step small
                "--save_strategy", "no",
                "--disable_tqdm", "true",
            ]
        )  # fmt: skip

    with pytest.raises(
        ValueError, match=r"cannot render 1 of the \d tool-calling .*\n  train row \d+ \(.Compare tomorrow"
    ):
        run(fixture, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    result = run(tools, tmp_path / "out")
    train = result["trainer"].train_dataset
    assert len(train) == 14 + 6  # 16 rows, 2 of them held out; the 3 single-call rows twice (count 6)
    tokenizer = result["trainer"].processing_class
    texts = [tokenizer.decode(ids) for ids in train["input_ids"]]
    with_tools = [text for text in texts if "Environment: ipython" in text]
    assert len(with_tools) == 2 * 2 and all("<|start_header_id|>ipython" in text for text in with_tools)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "mixture of 2 sources" in card and "tool-rows" in card
