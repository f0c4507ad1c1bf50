"""``recipes/dit_chain_of_forgetting.py`` end to end on real digits: pretrain, bank, transfer, evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datasets_builders.digits import export_digits
from datasets_builders.knowledge_bank import KnowledgeBankArguments, build_knowledge_bank
from datasets_builders.vision import ImageDataError
from hf_tuning.diffusion import DiffusionSetupError, load_run
from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_recipe

RECIPE = REPO_ROOT / "recipes/dit_chain_of_forgetting.py"
CONFIGS = REPO_ROOT / "recipes/configs"
SMALL_MODEL = json.dumps(
    {"sample_size": 8, "in_channels": 1, "out_channels": 2, "num_layers": 2, "num_attention_heads": 2,
     "attention_head_dim": 8, "patch_size": 2, "norm_type": "ada_norm_zero", "num_embeds_ada_norm": 5}
)  # fmt: skip


def _recipe():
    return load_recipe("dit_chain_of_forgetting.py")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit_digits")
    export_digits(root / "digits04", [0, 1, 2, 3, 4])
    export_digits(root / "digits59", [5, 6, 7, 8, 9])
    return {"source": root / "digits04", "target": root / "digits59"}


def _fast(*extra: str) -> list[str]:
    return ["--use_cpu", "true", "--num_inference_steps", "4", "--grid_samples", "6", "--logging_steps", "1",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dit_pretrain") / "pretrain"
    _recipe().main(
        ["--config", str(CONFIGS / "dit_digits_pretrain.yaml"), "--model_config", SMALL_MODEL,
         "--data_dir", str(digits["source"]), "--output_dir", str(out), "--max_steps", "3", *_fast()]
    )  # fmt: skip
    return out


def test_pretraining_writes_a_sampleable_run(pretrained):
    config = json.loads((pretrained / "cof_config.json").read_text())
    assert config["classes"] == [f"digit_{d}" for d in range(5)] and config["null_class"] == 5
    assert (pretrained / "samples.png").is_file()
    transformer, vae, _ = load_run(pretrained)
    assert vae is None and transformer.config.num_layers == 2
    results = json.loads((pretrained / "all_results.json").read_text())
    assert results["bank_per_batch"] == 0 and results["cof_timesteps"] == "uniform" and results["world_size"] == 1


def test_transfer_by_chain_of_forgetting_resumes_and_evaluates(digits, pretrained, tmp_path):
    transformer, _, _ = load_run(pretrained)
    bank = build_knowledge_bank(
        transformer,
        KnowledgeBankArguments(
            output_dir=str(tmp_path / "bank"), num_images=12, cfg_channels=1, num_inference_steps=3, batch_size=6
        ),
        model_name=str(pretrained),
    )
    argv = ["--config", str(CONFIGS / "dit_digits_chain_of_forgetting.yaml"), "--model_name_or_path", str(pretrained),
            "--data_dir", str(digits["target"]), "--bank_dir", str(bank), "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", *_fast()]  # fmt: skip
    whole = _recipe().main([*argv, "--output_dir", str(tmp_path / "whole")])["results"]
    assert whole["bank_images"] == 12 and whole["bank_per_batch"] == 6 and whole["cof_timesteps"] == "power"
    # an interrupted run resumed from its checkpoint ends with the same EMA weights
    checkpoint = tmp_path / "whole" / "stage-0" / "checkpoint-2"
    _recipe().main([*argv, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(checkpoint)])
    ema = "transformer_ema/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "whole" / ema)), load_file(str(tmp_path / "resumed" / ema))
    assert all(torch.equal(a[key], b[key]) for key in a)

    # sample and score the run
    from eval.evaluate_dit import main as evaluate_main

    extractor = tmp_path / "features.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))).save(str(extractor))
    (tmp_path / "features.pt.json").write_text(json.dumps({"channels": 1, "input_size": 8}))
    assert evaluate_main(
        ["--run_dir", str(tmp_path / "whole"), "--reference_dir", str(digits["target"] / "test"),
         "--feature_extractor", str(extractor), "--num_samples", "24", "--num_inference_steps", "3",
         "--samples_dir", str(tmp_path / "samples")]
    ) == 0  # fmt: skip
    scored = json.loads((tmp_path / "whole" / "fid.json").read_text())
    assert scored["num_fake"] == 24 and scored["fid"] > 0 and sum(scored["class_counts"]) == 24
    assert scored["sampling"]["num_inference_steps"] == 3 and scored["sampling"]["cfg_channels"] == 1
    assert len(list((tmp_path / "samples").rglob("*.png"))) == 24


def test_bad_input_fails_before_training(digits, pretrained, tmp_path):
    base = ["--config", str(CONFIGS / "dit_digits_finetune.yaml"), "--model_name_or_path", str(pretrained), *_fast()]
    with pytest.raises(ImageDataError, match="knowledge bank has no images"):
        (tmp_path / "empty_bank").mkdir()
        _recipe().main([*base, "--data_dir", str(digits["target"]), "--bank_dir", str(tmp_path / "empty_bank"),
                        "--output_dir", str(tmp_path / "a")])  # fmt: skip
    # 10 target classes do not fit a label table of 5 rows (+ null)
    ten = tmp_path / "digits_all"
    export_digits(ten, list(range(10)))
    with pytest.raises(DiffusionSetupError, match="10 classes but the transformer's label table has 5"):
        _recipe().main([*base, "--data_dir", str(ten), "--output_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="cfg_channels=3 but the model has 1 latent channels"):
        _recipe().main([*base, "--data_dir", str(digits["target"]), "--cfg_channels", "3",
                        "--output_dir", str(tmp_path / "c")])  # fmt: skip
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_shipped_configs_hold_the_reference_settings():
    recipe = _recipe()
    model, data, sampling, _, train = recipe.parse_args(
        ["--config", str(CONFIGS / "dit_xl2_256_chain_of_forgetting.yaml"), "--use_cpu", "true"]
    )
    assert model.model_name_or_path == "facebook/DiT-XL-2-256" and model.vae_name_or_path == "stabilityai/sd-vae-ft-ema"
    assert (data.image_size, data.random_flip) == (256, True) and data.bank_dir
    assert (train.learning_rate, train.weight_decay, train.max_grad_norm, train.lr_scheduler_type) == (
        1e-4,
        0.0,
        0.0,
        "constant",
    )
    assert (train.per_device_train_batch_size, train.max_steps, train.ema_decay) == (32, 24000, 0.9999)
    assert (train.cof_timesteps, train.cof_power, train.bank_power) == ("power", 1.0, 1.0)
    assert int(32 * train.cof_bank_fraction) == 6 and train.cof_retention_weight == 0.1
    assert train.cof_label_dropout == 0.1 and train.dt_variant == "ost"
    assert (sampling.guidance_scale, sampling.cfg_channels, sampling.num_inference_steps, sampling.sampler) == (
        1.5,
        3,
        250,
        "ddpm",
    )
    _, data, _, _, baseline = recipe.parse_args(
        ["--config", str(CONFIGS / "dit_xl2_256_finetune.yaml"), "--use_cpu", "true"]
    )
    assert baseline.cof_timesteps == "uniform" and data.bank_dir is None
    for name in ("dit_digits_pretrain.yaml", "dit_digits_chain_of_forgetting.yaml", "dit_digits_finetune.yaml"):
        model, data, sampling, _, train = recipe.parse_args(["--config", str(CONFIGS / name)])
        assert (data.image_size, data.image_channels, sampling.cfg_channels) == (8, 1, 1)
        assert model.pixel_space


@pytest.mark.slow
def test_ddp_two_processes_with_the_shipped_accelerate_config(digits, pretrained, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "accelerate_configs/multi_gpu.yaml"),
        "--num_processes", "2", "--main_process_port", "0", str(RECIPE),
        "--config", str(CONFIGS / "dit_digits_finetune.yaml"), "--model_name_or_path", str(pretrained),
        "--data_dir", str(digits["target"]), "--output_dir", str(out), "--max_steps", "2", *_fast(),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 2
    assert (out / "transformer_ema" / "config.json").is_file()
