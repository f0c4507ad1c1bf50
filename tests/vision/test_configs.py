"""Every shipped vision YAML parses with the vision recipe's parser, offline and without its data,
and the paper-reproduction configs hold the numbers their comments claim."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_recipe

RECIPE = REPO_ROOT / "recipes" / "image_classification_dt.py"
CONFIG_DIR = REPO_ROOT / "recipes" / "configs"
VISION_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith(("agrimatech", "dit_")))
VARIANTS = ("ost", "dt1", "dt2", "dt3", "dt4")
SWIN_FFT = CONFIG_DIR / "swin_base_22kto1k.yaml"
SWIN_ADAPTER = CONFIG_DIR / "swin_base_22kto1k_adapter.yaml"
SWIN_CONFIGS = (SWIN_FFT, SWIN_ADAPTER)
VIT_VTAB = CONFIG_DIR / "vit_b16_vtab1k_lora_dt3.yaml"
VIT_VTAB_DTL = CONFIG_DIR / "vit_b16_vtab1k_dtl.yaml"
PER_VARIANT_FIELDS = {"dt_variant", "output_dir"}  # what the command line changes between the variants' runs


recipe = load_recipe("image_classification_dt.py")


@pytest.fixture(autouse=True)
def offline_and_without_data(monkeypatch, tmp_path):
    """Parsing must not open a connection, and must not need the data: run it from an empty folder,
    so the configs' relative data_dir / head_class_map paths point nowhere."""

    def refuse(*args, **kwargs):
        raise AssertionError("parsing a config tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    workdir = tmp_path / "empty"
    workdir.mkdir()
    monkeypatch.chdir(workdir)


def parse(path: Path, tmp_path: Path, *extra: str):
    # bf16 true needs a bf16-capable accelerator at parse time: the CPU override the comments name
    return recipe.parse_args(["--config", str(path), "--output_dir", str(tmp_path / "x"), "--bf16", "false", *extra])


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def field_differences(a: tuple, b: tuple, ignore: set[str]) -> dict[str, tuple]:
    """Fields of the parsed dataclasses (BatchArguments, model, tuning, data, augmentation, training)
    whose values differ, by name."""
    differences = {}
    for left, right in zip(a, b, strict=True):
        assert type(left) is type(right)
        for f in dataclasses.fields(left):
            if f.name in ignore:
                continue
            if getattr(left, f.name) != getattr(right, f.name):
                differences[f.name] = (getattr(left, f.name), getattr(right, f.name))
    return differences


def test_the_expected_configs_are_shipped():
    names = {p.name for p in VISION_CONFIGS}
    expected = {p.name for p in [*SWIN_CONFIGS, VIT_VTAB, VIT_VTAB_DTL]}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", VISION_CONFIGS, ids=lambda p: p.stem)
def test_every_vision_config_parses(path, tmp_path):
    """No unknown key (TrlParser raises on one), valid choices (checked in each dataclass's __post_init__)."""
    parsed = parse(path, tmp_path)
    assert len(parsed) == 6  # nothing left over
    batch, model_args, tuning_args, data_args, augmentation, training_args = parsed
    assert isinstance(batch, recipe.BatchArguments)
    assert isinstance(model_args, recipe.VisionModelArguments)
    assert isinstance(tuning_args, recipe.VisionTuningArguments)
    assert isinstance(data_args, recipe.VisionDataArguments)
    assert isinstance(augmentation, recipe.AugmentationArguments)
    assert isinstance(training_args, recipe.StagedTrainingArguments)
    assert training_args.output_dir == str(tmp_path / "x")
    assert training_args.dt_variant == raw(path).get("dt_variant", "dt3")
    # YAML 1.1 reads 1e-5 (no dot) as a string: every number must arrive as a number
    assert isinstance(training_args.learning_rate, float)
    assert isinstance(training_args.warmup_steps, int | float)


@pytest.mark.parametrize("path", SWIN_CONFIGS, ids=lambda p: p.stem)
def test_one_swin_file_serves_every_variant_from_the_command_line(path, tmp_path):
    """OST and DT1-DT4 differ in nothing but dt_variant, so one file holds them and the command line
    picks the variant: every parsed field (defaults and derived values included) is the same otherwise."""
    parsed = {
        variant: parse(path, tmp_path, "--dt_variant", variant, "--output_dir", str(tmp_path / variant))
        for variant in VARIANTS
    }
    for variant in VARIANTS:
        assert parsed[variant][5].dt_variant == variant
        assert parsed[variant][5].output_dir == str(tmp_path / variant)
        assert field_differences(parsed["ost"], parsed[variant], PER_VARIANT_FIELDS) == {}
    assert raw(path)["dt_variant"] in VARIANTS
    header = path.read_text().split("\n\n")[0]  # the comment block documents the override and each variant
    assert "--dt_variant" in header and all(f"| {variant} " in header for variant in VARIANTS)


def test_swin_adapter_file_differs_from_full_only_in_the_tuning_mode():
    full, adapter = raw(SWIN_FFT), raw(SWIN_ADAPTER)
    changed = {k for k in full.keys() | adapter.keys() if full.get(k) != adapter.get(k)}
    assert changed == {"tuning_mode", "adapter_reduction", "adapter_dropout", "output_dir"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", SWIN_CONFIGS, ids=lambda p: p.stem)
def test_swin_configs_hold_the_papers_numbers(path, variant, tmp_path):
    batch, model_args, tuning_args, data_args, augmentation, args = parse(path, tmp_path, "--dt_variant", variant)
    assert args.dt_variant == variant
    adapter = "adapter" in path.name
    assert raw(path)["bf16"] is True  # AMP in the paper; only the test overrides it

    assert model_args.model_name_or_path == "swin_base_patch4_window7_224.ms_in22k"
    assert model_args.library == "timm" and model_args.pretrained and model_args.checkpoint is None
    assert model_args.head_class_map and model_args.head_class_map.endswith("map22kto1k.txt")
    assert model_args.drop_path_rate == 0.2
    assert model_args.crop_pct == 0.875
    assert tuning_args.tuning_mode == ("adapter" if adapter else "full")
    if adapter:
        assert tuning_args.adapter_reduction == 4 and tuning_args.adapter_dropout == 0.0

    assert (data_args.data_format, data_args.train_split, data_args.eval_split) == ("imagefolder", "train", "val")
    assert augmentation.train_crop and augmentation.auto_augment == "rand-m9-mstd0.5-inc1"
    assert augmentation.random_erasing == 0.25
    assert (augmentation.mixup_alpha, augmentation.cutmix_alpha) == (0.8, 1.0)
    assert augmentation.label_smoothing == 0.1
    assert args.label_smoothing_factor == 0.0  # smoothing lives in the mixup targets, not twice

    assert batch.total_batch_size == 1024 and batch.lr_reference_batch == 512
    assert args.per_device_train_batch_size == 64
    assert args.learning_rate == 2e-5
    assert args.num_train_epochs == 30 and args.dt_budget == "per_stage"
    assert args.warmup_steps == pytest.approx(5 / 30, rel=1e-12)
    assert args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.weight_decay == 1e-8 and args.max_grad_norm == 5.0
    assert args.dt_stage_init == "best" and args.load_best_model_at_end
    assert args.metric_for_best_model == "eval_top1" and args.greater_is_better
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch" and args.save_total_limit

    # the Swin codebase's scaling: BASE_LR 2e-5 and MIN_LR 2e-7 both x 1024/512 (the logs show 4e-5)
    settings = recipe.apply_batch_convention(batch, args)
    assert settings["effective_batch_size"] == 1024
    assert args.gradient_accumulation_steps == 1024 // (64 * args.world_size)
    assert settings["learning_rate"] == pytest.approx(4e-5)
    assert settings["learning_rate"] * args.lr_scheduler_kwargs["min_lr_rate"] == pytest.approx(2e-7 * 1024 / 512)


def test_swin_timm_weights_are_known_offline():
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("swin_base_patch4_window7_224.ms_in22k")
    assert cfg is not None and cfg.num_classes == 21841  # the head map indexes these 22k rows
    assert timm.is_model("swin_base_patch4_window7_224")


def test_vit_vtab_lora_config(tmp_path):
    batch, model_args, tuning_args, data_args, augmentation, args = parse(VIT_VTAB, tmp_path)
    assert raw(VIT_VTAB)["bf16"] is True

    assert model_args.model_name_or_path == "vit_base_patch16_224.orig_in21k" and model_args.pretrained
    assert model_args.image_mean == [0.5, 0.5, 0.5] and model_args.image_std == [0.5, 0.5, 0.5]
    assert model_args.crop_pct == 1.0
    assert model_args.model_kwargs == {"pretrained_cfg_overlay": {"crop_mode": "squash"}}
    assert model_args.drop_path_rate == 0.0
    assert (tuning_args.tuning_mode, tuning_args.lora_r, tuning_args.lora_alpha) == ("lora", 8, 8)

    assert (data_args.data_format, data_args.task) == ("vtab", "cifar")
    assert (data_args.train_split, data_args.eval_split) == ("train800val200", "test")
    assert not augmentation.train_crop and augmentation.hflip == 0.0
    assert not augmentation.mixup_enabled and augmentation.label_smoothing == 0.0

    assert batch.total_batch_size == 64 and batch.lr_reference_batch is None
    assert args.per_device_train_batch_size == 64
    assert args.learning_rate == 1e-3 and args.weight_decay == 1e-4
    assert args.num_train_epochs == 100 and args.warmup_steps == pytest.approx(10 / 100)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert (args.dt_variant, args.dt_budget, args.dt_stage_init) == ("dt3", "per_stage", "last")
    assert args.eval_strategy == "no"  # final-epoch evaluation, once, after training
    assert recipe.apply_batch_convention(batch, args)["learning_rate"] == 1e-3  # absolute, not batch-scaled


def test_vit_vtab_dtl_config_holds_the_methods_protocol(tmp_path):
    batch, model_args, tuning_args, data_args, augmentation, args = parse(VIT_VTAB_DTL, tmp_path)
    assert model_args.model_name_or_path == "vit_base_patch16_224.orig_in21k" and model_args.drop_path_rate == 0.0
    config = tuning_args.method_config()
    assert (config.method, config.rank, config.kernel_size) == ("dtl", 2, 0)
    assert config.map_blocks == list(range(12)) and config.add_after_blocks == list(range(6, 12))
    plus = parse(VIT_VTAB_DTL, tmp_path, "--tuning_mode", "dtl_plus", "--dtl_kernel_size", "4")[2].method_config()
    assert plus.kernel_size == 4 and plus.plus
    assert not augmentation.train_crop and not augmentation.random_transforms()
    assert batch.total_batch_size == 32 and args.weight_decay == 0.05 and args.dataloader_drop_last
    assert args.num_train_epochs == 100 and args.warmup_steps == pytest.approx(0.1)
    assert (args.dt_variant, args.eval_strategy) == ("ost", "no")
    assert (data_args.train_split, data_args.eval_split) == ("train800val200", "test")


def test_vit_vtab_task_is_overridden_on_the_command_line(tmp_path):
    data_args = parse(VIT_VTAB, tmp_path, "--task", "dtd", "--data_dir", "/data/vtab-1k")[3]
    assert (data_args.task, data_args.data_dir) == ("dtd", "/data/vtab-1k")


def test_an_unknown_key_is_rejected(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(VIT_VTAB.read_text() + "lora_rank: 8\n")
    with pytest.raises(ValueError, match="lora_rank"):
        parse(config, tmp_path)


def test_an_invalid_choice_is_rejected(tmp_path):
    # YAML values become argparse defaults, which argparse does not check against choices:
    # the dataclasses' __post_init__ does
    config = tmp_path / "bad_variant.yaml"
    config.write_text(SWIN_FFT.read_text().replace("dt_variant: dt1", "dt_variant: dt5"))
    with pytest.raises(ValueError, match="dt5"):
        parse(config, tmp_path)
