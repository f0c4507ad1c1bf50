"""The AgriMaTech recipe with ``--tuning_mode snell`` / ``snella``: SNELL deltas on a LLaMA's linear layers instead of
LoRA, trained by ``StagedSFTTrainer`` stage by stage, saved as an adapter folder, pushed, reloaded, resumed, refused
in bad combinations; and once on the real SmolLM2-135M-Instruct weights.

The tiny runs use a tiny vocabulary (a word-level tokenizer with a marked chat template) rather than
``test_recipe.py``'s real Llama-3 one: its 128k-token LM head is most of a tiny run's time (27 s against 11 s here),
and the chat-template path it exercises does not depend on the tuning mode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trl.trainer.sft_trainer as trl_sft
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_tuning.llm.tuning import LlmTuningArguments, TuningCombinationError, check_tuning_combination
from hf_tuning.tuners import PetlConfigError, SNELLAConfig, SNELLConfig, get_petl_model, load_petl_model
from tests.helpers import REPO_ROOT
from tests.helpers.real_models import SMOLLM2, requires_smollm2
from tests.helpers.tiny import WORDS, tiny_llama, tiny_tokenizer
from tests.llm.test_recipe import agri_rows, recipe, write_rows

SMOLLM2_SNELL_CONFIG = REPO_ROOT / "recipes" / "configs" / "agrimatech_smollm2_snell.yaml"
SMOLLM2_LORA_CONFIG = REPO_ROOT / "recipes" / "configs" / "agrimatech_smollm2_dt3.yaml"
SNELL = ("--tuning_mode", "snell", "--use_peft", "false", "--snell_rank", "4", "--snell_sparsity", "0.5")
# the reply and its </s> are the assistant tokens; roles and most words are <unk> in the tiny vocabulary
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} </s>{% endgeneration %} "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
VOCAB = len(WORDS) + 4  # tiny_tokenizer's size: the words and four special tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 4-block LLaMA with the tiny vocabulary and a chat template with generation markers, saved locally."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tiny_llama(layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("agri") / "agri.jsonl", agri_rows())


def run_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(SMOLLM2_LORA_CONFIG),  # the LoRA demo config: snell must turn its use_peft off
        "--model_name_or_path", str(model_dir), "--chat_template", "auto", "--base_model_id", "tests/tiny-llama",
        "--dataset_name_or_path", str(data), "--validation_size", "3", "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "0.3",  # factors move visibly
        "--logging_steps", "1", "--save_steps", "1", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def snell_run(tiny_dir, data, tmp_path_factory) -> tuple[Path, object]:
    """One DT-3 SNELL run (2 steps per stage, a checkpoint every step), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("snell-run") / "out"
    result = recipe.main(run_args(tiny_dir, data, out, *SNELL))
    return out, result["trainer"]


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def start_weights(model_dir: Path, config: SNELLConfig) -> dict[str, torch.Tensor]:
    """The adapter the recipe starts from: it seeds (seed 42) right before drawing the factors."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(42)
    return get_petl_model(base, config).adapter_state_dict()


def moved_blocks(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[int]:
    """The decoder blocks with a trainable tensor that changed (SNELL's buffers, the sparsities, never do)."""
    assert before.keys() == after.keys()
    changed = [name for name in after if name.endswith("_factors") or ".mix_" in name]
    changed = [name for name in changed if not torch.equal(before[name], after[name])]
    return {int(name.split(".layers.")[1].split(".")[0]) for name in changed}


def test_snell_run_saves_an_adapter_folder_staged_by_block(snell_run, tiny_dir):
    out, trainer = snell_run
    assert type(trainer.model).__name__ == "SNELLModel"
    # TRL's fused LM head went on the causal LM inside, and TRL's module is left as it was
    assert "forward" in vars(trainer.model.get_base_model()) and "forward" not in vars(trainer.model)
    assert trl_sft.add_fused_lm_head.__module__ == "trl.trainer.utils"

    # the output folder: the method's adapter folder, the tokenizer, the recipe's card and stage report
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "dt_stages.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # the frozen base is never copied
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["method"], saved["rank"], saved["sparsity"], saved["target_modules"]) == ("snell", 4, 0.5, None)
    assert (saved["dropout"], saved["drop_path"], saved["base_model_name_or_path"]) == (0.05, 0.0, "tests/tiny-llama")
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert {"snell", "petl", "dt3", "trl", "sft"} <= set(meta["tags"]) and "lora" not in meta["tags"]
    assert meta["library_name"] == "hf_tuning" and meta["base_model"] == "tests/tiny-llama"
    assert "A SNELL adapter of" in card and "load_petl_model(base" in card and "PeftModel" not in card
    assert "- tuning_mode: snell" in card and "- snell_rank: 4" in card and "lora_r" not in card
    assert [s["name"] for s in meta["hf_tuning"]["stages"]] == ["even", "odd"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["name"] == "validation loss"

    # checkpoints are adapter folders with the tokenizer, as a LoRA run's are
    end_of_stage_0 = out / "stage-0" / "checkpoint-2"
    assert json.loads((end_of_stage_0 / "adapter_config.json").read_text())["method"] == "snell"
    assert (end_of_stage_0 / "tokenizer.json").is_file() and not (end_of_stage_0 / "model.safetensors").exists()

    # DT-3 staged the factors by decoder block: stage 0 moved the even blocks' only, stage 1 the odd blocks'
    start = start_weights(tiny_dir, SNELLConfig(rank=4, sparsity=0.5, dropout=0.05, drop_path=0.0))
    after_stage_0 = load_file(end_of_stage_0 / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    assert len(final) == 4 * 7 * 3  # 4 blocks x 7 projections x (two factor tensors + the sparsity buffer)
    assert moved_blocks(start, after_stage_0) == {0, 2}
    assert moved_blocks(after_stage_0, final) == {1, 3}

    # reloaded on a fresh base: identical logits; merged: the same to 1e-5
    expected = logits(trainer.model.eval())
    plain = logits(AutoModelForCausalLM.from_pretrained(tiny_dir))
    assert (plain - expected).abs().max() > 0.1  # the trained deltas change the output (so merging is tested)
    reloaded = load_petl_model(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    assert torch.equal(logits(reloaded), expected)
    reloaded.merge()
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


def test_interrupted_snell_run_resumes_to_the_same_adapter_and_pushes(snell_run, tiny_dir, data, tmp_path, fake_hub):
    """As the LoRA resume test: a copy of the finished run loses the rest of stage 1 after its first step and resumes
    bit-identically (the delta dropout is on, so the RNG must be replayed too); then it is pushed once."""
    full, trainer = snell_run
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    shutil.rmtree(broken / "stage-1" / "checkpoint-2")
    for name in ("adapter_model.safetensors", "adapter_config.json", "dt_stages.json", "README.md"):
        (broken / name).unlink()
    push = ("--push_to_hub", "true", "--hub_model_id", "user/agri-snell", "--hub_private_repo", "true")
    recipe.main(run_args(tiny_dir, data, broken, *SNELL, "--resume_from_checkpoint", "true", *push))
    expected, resumed = load_file(full / "adapter_model.safetensors"), load_file(broken / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    steps = [
        (r["start_step"], r["end_step"]) for r in json.loads((broken / "dt_stages.json").read_text())["stage_records"]
    ]
    assert steps == [(0, 2), (2, 4)]

    repo = fake_hub.repo("user/agri-snell")
    assert repo.private and {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(repo.files())
    assert not any(f.startswith(("stage-", "checkpoint-")) for f in repo.files())
    reloaded = load_petl_model(AutoModelForCausalLM.from_pretrained(tiny_dir), "user/agri-snell")
    assert torch.equal(logits(reloaded), logits(trainer.model.eval()))


def test_snella_with_gradient_checkpointing_under_dt1(tmp_path, tiny_dir, data):
    """Frozen embeddings and checkpointed decoder layers: the input must carry grad for any factor to get one (stage 0
    trains the lowest blocks, under two checkpointed ones). Under DT-1 each stage trains one group of adjacent blocks
    (two groups here, to keep the run short) and moves that group's factors (and SNELLA's mixing terms) only."""
    out = tmp_path / "snella"
    settings = ("--tuning_mode", "snella", "--use_peft", "false", "--snell_rank", "4", "--dt_variant", "dt1")
    settings += ("--dt_num_groups", "2")
    result = recipe.main(
        run_args(tiny_dir, data, out, *settings, "--max_steps", "1", "--gradient_checkpointing", "true")
    )
    trainer = result["trainer"]
    assert trainer.model.get_base_model().is_activation_checkpointing
    assert trainer.model.allocator is not None  # SNELLA's allocator runs as a trainer callback
    assert json.loads((out / "adapter_config.json").read_text())["method"] == "snella"
    card = (out / "README.md").read_text()
    assert "A SNELLA adapter of" in card and "- snell_rank: 4" in card and "- snella_target_sparsity: 0.8" in card
    assert (out / "stage-0" / "checkpoint-1" / "method_training_state.safetensors").is_file()  # the allocator's
    previous = start_weights(tiny_dir, SNELLAConfig(rank=4, dropout=0.05, drop_path=0.0))
    assert len(trainer.stage_plan.stages) == 2
    for stage, blocks in zip(trainer.stage_plan.stages, ({0, 1}, {2, 3}), strict=True):
        weights = load_file(out / f"stage-{stage.index}" / "checkpoint-1" / "adapter_model.safetensors")
        assert moved_blocks(previous, weights) == blocks, stage.index
        previous = weights


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (("--tuning_mode", "snell"), TuningCombinationError, "use_peft is true"),
        ((*SNELL, "--load_in_4bit", "true"), TuningCombinationError, "needs a floating-point base"),
        ((*SNELL, "--snell_rank", "3"), PetlConfigError, "even integer"),
        ((*SNELL, "--snell_sparsity", "1.0"), PetlConfigError, r"sparsity must be in \[0, 1\)"),
        ((*SNELL, "--tuning_mode", "snella", "--snella_target_sparsity", "0.2"), PetlConfigError, "target_sparsity"),
        (("--tuning_mode", "dora"), SystemExit, None),
    ],
    ids=["with-lora", "4bit", "odd-rank", "full-sparsity", "snella-target-below-start", "unknown-mode"],
)
def test_bad_combinations_fail_before_any_weights_load(tmp_path, tiny_dir, data, monkeypatch, extra, error, message):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(recipe, "load_causal_lm", no_weights)
    with pytest.raises(error, match=message):
        recipe.main(run_args(tiny_dir, data, tmp_path / "out", *extra))


def test_zero3_and_snella_under_zero_are_refused():
    plain = SimpleNamespace(use_peft=False, load_in_4bit=False, load_in_8bit=False)
    zero = {stage: SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)) for stage in (2, 3)}
    with pytest.raises(TuningCombinationError, match="does not support DeepSpeed ZeRO-3"):
        check_tuning_combination(LlmTuningArguments(tuning_mode="snell"), plain, zero[3])
    check_tuning_combination(LlmTuningArguments(tuning_mode="snell"), plain, zero[2])
    with pytest.raises(TuningCombinationError, match="allocator reads every factor's gradient"):
        check_tuning_combination(LlmTuningArguments(tuning_mode="snella"), plain, zero[2])
    # the default mode is TRL's LoRA, whatever the rest says
    check_tuning_combination(LlmTuningArguments(), SimpleNamespace(use_peft=True, load_in_4bit=True), zero[3])


def test_shipped_snell_config_parses_and_the_lora_configs_keep_lora():
    tuning, _, model_args, training = recipe.parse_args(["--config", str(SMOLLM2_SNELL_CONFIG)])
    assert (tuning.tuning_mode, model_args.use_peft, training.dt_variant) == ("snell", False, "dt3")
    check_tuning_combination(tuning, model_args, training)
    config = tuning.method_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (config.rank, config.sparsity, config.dropout, config.drop_path) == (8, 0.9, 0.05, 0.0)
    assert config.target_modules == ["q_proj", "v_proj"]  # the CPU demo's choice (see the config's comment)
    lora, _, lora_model, _ = recipe.parse_args(["--config", str(SMOLLM2_LORA_CONFIG)])
    assert lora.tuning_mode == "lora" and lora_model.use_peft


@requires_smollm2
def test_snell_on_smollm2_trains_saves_reloads_and_merges(tmp_path, data):
    """The real SmolLM2-135M-Instruct weights, one step of one 32-token row per DT-3 stage, no evaluation: kept small
    for a 2-core CI. SNELL targets four projections of the last two blocks (each delta costs about 0.1-0.3 s a step
    on such a CPU, so all 210 would take a minute a step). The saved folder reloads on a freshly loaded base with
    identical logits, and merging matches them."""
    from hf_tuning.llm.loading import load_causal_lm

    out = tmp_path / "smollm2-snell"
    targets = ["layers.28.self_attn.q_proj", "layers.28.mlp.down_proj", "layers.29.self_attn.v_proj"]
    targets += ["layers.29.mlp.up_proj"]
    args = [
        "--config", str(SMOLLM2_SNELL_CONFIG), "--dataset_name_or_path", str(data), "--validation_size", "0",
        "--output_dir", str(out), "--max_steps", "1", "--max_length", "32", "--assistant_only_loss", "false",
        "--per_device_train_batch_size", "1", "--save_strategy", "no", "--disable_tqdm", "true",
        "--logging_steps", "1", "--learning_rate", "0.5", "--snell_target_modules", *targets,
    ]  # fmt: skip
    trainer = recipe.main(args)["trainer"]
    assert [r["end_step"] for r in json.loads((out / "dt_stages.json").read_text())["stage_records"]] == [1, 2]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["method"], saved["base_model_name_or_path"]) == ("snell", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert saved["target_modules"] == targets
    assert [s.name for s in trainer.stage_plan.stages] == ["even", "odd"]

    ids = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        base = load_causal_lm(SMOLLM2, dtype=trainer.model.dtype)
        plain = base(input_ids=ids).logits
        assert (plain - expected).abs().max() > 0.1  # the trained deltas change the output (so merging is tested)
        reloaded = load_petl_model(base, out)
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        reloaded.merge()
        # 30 blocks of fp32 rounding: ~2e-5 here (1e-5 holds on the 4-block tiny model)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
