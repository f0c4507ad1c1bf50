"""``recipes/image_classification_dt.py`` end to end on real images (scikit-learn digits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets_builders.digits import export_digits
from datasets_builders.vision import ImageDataError
from hf_tuning.vision import load_trained_classifier, logits_of
from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_recipe

RECIPE = REPO_ROOT / "recipes/image_classification_dt.py"
SWIN = json.dumps(
    {"img_size": 16, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 2]}
)


def _recipe():
    return load_recipe("image_classification_dt.py")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "digits_5_9"
    export_digits(root, [5, 6, 7, 8, 9], seed=0)
    return root


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "recipes/configs/digits_vit_dt3.yaml"),
        "--data_dir", str(data),
        "--output_dir", str(out),
        "--num_train_epochs", "1",
        "--max_steps", "4",
        "--per_device_train_batch_size", "16",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_swin_lora_dt3_saves_a_reloadable_adapter_and_evaluates(digits, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)  # a "pretrained" backbone: LoRA needs the same base weights when reloading
    backbone = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **json.loads(SWIN))
    save_file(backbone.state_dict(), tmp_path / "backbone.safetensors")
    out = tmp_path / "swin-lora"
    result = _recipe().main(
        _argv(
            digits, out,
            "--model_name_or_path", "swin_tiny_patch4_window7_224", "--model_kwargs", SWIN,
            "--checkpoint", str(tmp_path / "backbone.safetensors"),
            "--tuning_mode", "lora", "--dt_variant", "dt3", "--eval_split", "test",
            "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0", "--label_smoothing", "0.1",
        )
    )  # fmt: skip
    assert [r.steps for r in result["trainer"].stage_records] == [4, 4]
    assert {"adapter_model.safetensors", "adapter_config.json", "vision_config.json", "dt_stages.json"} <= {
        p.name for p in out.iterdir()
    }
    results = json.loads((out / "all_results.json").read_text())
    assert results["tuning_mode"] == "lora" and results["world_size"] == 1 and 0 <= results["eval_top1"] <= 100

    trained = result["trainer"].model.eval()
    reloaded = load_trained_classifier(out)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(reloaded.model(x)), logits_of(trained(x)))
    assert reloaded.class_names == [f"digit_{d}" for d in range(5, 10)]

    report = tmp_path / "report"
    cli = subprocess.run(
        [sys.executable, str(REPO_ROOT / "eval/evaluate_vision.py"), "--model_dir", str(out), "--data_format", "imagefolder",
         "--data_dir", str(digits), "--split", "test", "--output_dir", str(report)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    evaluated = json.loads((report / "eval_vision.json").read_text())
    assert evaluated["top1"] == pytest.approx(results["eval_top1"], abs=1e-6)  # the same model and split
    assert (report / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_hf_vit_adapter_dt1_full_state_roundtrip(digits, tmp_path):
    from transformers import ViTConfig

    base = tmp_path / "hf-vit"
    ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(base)
    out = tmp_path / "vit-adapter"
    result = _recipe().main(
        _argv(digits, out, "--model_name_or_path", str(base), "--tuning_mode", "adapter", "--dt_variant", "dt1",
              "--max_steps", "2")
    )  # fmt: skip
    records = result["trainer"].stage_records
    assert len(records) == 4 and all(r.steps == 2 for r in records)
    reloaded = load_trained_classifier(out)
    assert reloaded.tuning_mode == "adapter"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(reloaded.model(x)), logits_of(result["trainer"].model.eval()(x)))


def test_bad_data_fails_before_any_model_is_built(tmp_path):
    (tmp_path / "data/train/cat").mkdir(parents=True)
    with pytest.raises(ImageDataError, match="cat"):
        _recipe().main(_argv(tmp_path / "data", tmp_path / "out", "--model_name_or_path", "no_such_model_xyz"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ddp_two_processes_with_the_shipped_accelerate_config(digits, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "accelerate_configs/multi_gpu.yaml"),
        "--num_processes", "2", "--main_process_port", "0", str(RECIPE), *_argv(digits, out, "--max_steps", "2"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 2 and results["effective_batch_size"] == 32
    assert (out / "model.safetensors").is_file()


def _vit_backbone(tmp_path: Path) -> Path:
    """A "pretrained" timm ViT (the digits config's shape): method adapters need the same base to reload."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 8, "num_heads": 4}
    path = tmp_path / "vit-backbone.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs).state_dict(), path)
    return path


def test_dtl_plus_dt3_saves_an_adapter_folder_with_a_card_and_evaluates(digits, tmp_path):
    from eval.evaluate_vision import VisionEvalSettings, evaluate_run

    out = tmp_path / "vit-dtl-plus"
    result = _recipe().main(
        _argv(digits, out, "--checkpoint", str(_vit_backbone(tmp_path)), "--tuning_mode", "dtl_plus",
              "--dtl_kernel_size", "3", "--eval_split", "test", "--dtl_cache_prefix_features", "true")
    )  # fmt: skip
    assert [r.steps for r in result["trainer"].stage_records] == [4, 4]
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "vision_config.json"} <= files
    assert "model.safetensors" not in files  # the frozen backbone is never copied
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["method"] == "dtl" and saved["kernel_size"] == 3
    assert saved["base_model_name_or_path"] == "vit_tiny_patch16_224"
    card = (out / "README.md").read_text()
    assert "library_name: hf_tuning" in card and "load_petl_model" in card and "| 1 | odd |" in card

    trained = result["trainer"].model.eval()
    reloaded = load_trained_classifier(out)
    assert reloaded.tuning_mode == "dtl_plus"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(logits_of(reloaded.model(x)), trained(x))
    settings = VisionEvalSettings(model_dir=[str(out)], data_format="imagefolder", data_dir=str(digits), split="test")
    evaluated = evaluate_run(out, settings, tmp_path / "report")
    results = json.loads((out / "all_results.json").read_text())
    assert evaluated["top1"] == pytest.approx(results["eval_top1"], abs=1e-6)


@pytest.mark.parametrize("mode", ["full", "adapter"])
def test_every_mode_writes_a_model_card(digits, tmp_path, mode):
    out = tmp_path / mode
    _recipe().main(_argv(digits, out, "--tuning_mode", mode, "--max_steps", "1", "--dt_variant", "ost"))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and f"tuning_mode: {mode}" in card


def test_dtl_feature_cache_with_random_augmentation_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="dtl_cache_prefix_features replays .*train_crop"):
        _recipe().main(
            _argv(tmp_path / "no-data", tmp_path / "out", "--tuning_mode", "dtl", "--dtl_cache_prefix_features",
                  "true", "--train_crop", "true")
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_dtl_run_resumes_exactly_from_its_adapter_checkpoint(digits, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers.staged_run import CrashAt, SimulatedCrash

    backbone = str(_vit_backbone(tmp_path))
    common = ("--checkpoint", backbone, "--tuning_mode", "dtl", "--save_strategy", "steps", "--save_steps", "2")
    straight = tmp_path / "straight"
    _recipe().main(_argv(digits, straight, *common))
    crashed = tmp_path / "crashed"
    recipe = _recipe()
    crash = CrashAt(stage=1, step=2)
    original = recipe.StagedImageClassificationTrainer

    class Crashing(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            crash.trainer = self
            self.add_callback(crash)

    recipe.StagedImageClassificationTrainer = Crashing
    try:
        with pytest.raises(SimulatedCrash):
            recipe.main(_argv(digits, crashed, *common))
    finally:
        recipe.StagedImageClassificationTrainer = original
    checkpoint = next(crashed.glob("stage-1/checkpoint-*"))
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    _recipe().main(_argv(digits, crashed, *common, "--resume_from_checkpoint", "true"))
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(crashed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dyt_trains_to_its_keep_rate_and_reloads_with_the_same_logits(digits, tmp_path):
    """10 epochs on the digits: the measured keep rate of the evaluation path ends within 0.05 of the target."""
    out = tmp_path / "vit-dyt"
    result = _recipe().main(
        _argv(digits, out, "--checkpoint", str(_vit_backbone(tmp_path)), "--tuning_mode", "dyt", "--dt_variant",
              "ost", "--max_steps", "-1", "--num_train_epochs", "10", "--learning_rate", "3e-3", "--eval_split", "test")
    )  # fmt: skip
    trained = result["trainer"].model.eval()
    dataset = result["trainer"].eval_dataset
    images = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    with torch.no_grad():
        logits = trained(images)
    assert abs(float(trained.keep_rate()) - 0.5) <= 0.05
    assert json.loads((out / "adapter_config.json").read_text())["method"] == "dyt"
    reloaded = load_trained_classifier(out)
    assert reloaded.tuning_mode == "dyt"
    with torch.no_grad():
        assert torch.equal(reloaded.model(images), logits)


def test_snella_dt3_saves_its_allocated_sparsities_and_reloads_merged_with_the_same_logits(digits, tmp_path):
    out = tmp_path / "vit-snella"
    result = _recipe().main(
        _argv(digits, out, "--checkpoint", str(_vit_backbone(tmp_path)), "--tuning_mode", "snella",
              "--snell_rank", "4", "--snella_target_sparsity", "0.6", "--max_steps", "2")
    )  # fmt: skip
    trained = result["trainer"].model.eval()
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["method"] == "snella" and saved["rank"] == 4 and saved["target_sparsity"] == 0.6
    card = (out / "README.md").read_text()
    assert "SNELLA" in card and "tuning_mode: snella" in card and "load_petl_model" in card
    reloaded = load_trained_classifier(out)
    assert reloaded.tuning_mode == "snella"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = trained(x)
        assert torch.equal(reloaded.model(x), expected)
        reloaded.model.merge()
        torch.testing.assert_close(reloaded.model(x), expected, rtol=0, atol=1e-5)
