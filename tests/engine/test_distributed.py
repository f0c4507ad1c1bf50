"""Staged tuning under real launchers: DDP (2 processes over gloo) and DeepSpeed ZeRO-2/3 (+offload).

Each test launches tests/helpers/staged_run.py with a shipped accelerate config and checks, from
per-rank parameter snapshots, that inside every stage the inactive parameters stay bit-identical
(no momentum or weight-decay drift on flat ZeRO partitions), the active ones change, and both
replicas end identical. The first DeepSpeed run builds its ops once (cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, script_env
from tests.helpers.snapshots import check_staged_run

SCRIPT = REPO_ROOT / "tests" / "helpers" / "staged_run.py"
pytestmark = pytest.mark.slow


def launch(tmp_path: Path, config: str, processes: int, *script_args: str, cwd: Path = REPO_ROOT) -> tuple[Path, Path]:
    """Launch the staged run; its output goes to ``out/``, parameter snapshots to ``snap/``, and what the
    processes printed to ``launch.log``."""
    out, snap = tmp_path / "out", tmp_path / "snap"
    env = script_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "accelerate_configs" / config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        "0",
        str(SCRIPT),
        "--output",
        str(out),
        "--snapshots",
        str(snap),
        *script_args,
    ]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (tmp_path / "launch.log").write_text(result.stdout + result.stderr)
    return out, snap


def test_single_gpu_config_runs_one_process(tmp_path):
    out, snap = launch(tmp_path, "single_gpu.yaml", 1, "--variant", "dt4", "--lora")
    info = check_staged_run(out, snap, world_size=1)
    assert info["distributed_type"] == "DistributedType.NO"


def test_ddp_two_processes(tmp_path):
    workdir = tmp_path / "cwd"  # an empty working directory: nothing may be logged outside output_dir
    workdir.mkdir()
    out, snap = launch(
        tmp_path, "multi_gpu.yaml", 2, "--variant", "dt1", "--bf16", "--report-to", "tensorboard", cwd=workdir
    )
    info = check_staged_run(out, snap, world_size=2)
    assert info["distributed_type"] == "DistributedType.MULTI_CPU"
    # only rank 0 reports: one printed dt/stage_begin per stage, one TensorBoard run, inside output_dir
    printed = (tmp_path / "launch.log").read_text()
    assert printed.count("'dt/stage_begin'") == len(info["stages"]) == 4
    assert list(workdir.iterdir()) == []
    (tb_run,) = (out / "runs").iterdir()
    # event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: one writing process
    pids = {path.name.split(".")[-2] for path in tb_run.glob("events.out.tfevents.*")}
    assert len(pids) == 1, sorted(p.name for p in tb_run.iterdir())


def test_deepspeed_zero2_full_finetuning(tmp_path):
    # no weight decay: an active parameter that changed can only have been moved by its gradient
    out, snap = launch(tmp_path, "deepspeed_zero2.yaml", 2, "--variant", "dt1", "--weight-decay", "0")
    info = check_staged_run(out, snap, world_size=2)
    assert info["distributed_type"] == "DistributedType.DEEPSPEED"


def test_deepspeed_zero3_lora_and_complete_adapter(tmp_path):
    out, snap = launch(tmp_path, "deepspeed_zero3.yaml", 2, "--variant", "dt2", "--lora")
    check_staged_run(out, snap, world_size=2)
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    final = load_file(str(snap / "rank0_stage3_end.safetensors"))
    assert len(adapter) == len([n for n in final if "lora_" in n]) > 0
    for name, tensor in adapter.items():
        full_name = name.replace(".weight", ".default.weight")
        assert tensor.numel() > 0 and tensor.shape == final[full_name].shape, name
        assert (tensor.float() == final[full_name]).all(), name


def test_deepspeed_zero3_offload_full_finetuning(tmp_path):
    out, snap = launch(tmp_path, "deepspeed_zero3_offload.yaml", 2, "--variant", "dt3")
    check_staged_run(out, snap, world_size=2)


def test_deepspeed_config_contradicting_the_arguments_fails_before_training(tmp_path):
    env = script_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
    script = REPO_ROOT / "tests" / "helpers" / "deepspeed_mismatch.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    message = result.stdout
    assert "train_micro_batch_size_per_gpu=8" in message and "per_device_train_batch_size=4" in message
    assert "gradient_clipping=0.5" in message
    assert "scheduler.params.warmup_num_steps=100" in message


@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_resume_mid_stage_is_exact_and_checkpoints_complete(tmp_path, config):
    """DeepSpeed keeps only the current stage's parameters in its state (ZeRO-3 partitions, PEFT
    module states saved without frozen parameters); the engine saves and restores the rest."""
    common = ("--variant", "dt1", "--lora", "--steps", "4", "--save-steps", "2")
    reference, _ = launch(tmp_path / "ref", config, 2, *common)
    with pytest.raises(AssertionError, match="simulated crash"):
        launch(tmp_path / "run", config, 2, *common, "--crash", "1:2")
    checkpoint = tmp_path / "run" / "out" / "stage-1" / "checkpoint-2"
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    expected = load_file(str(reference / "final" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()  # every stage's adapters, not just the active ones
    # restored a few parameters at a time: under ZeRO-3 that is many gather-and-broadcast rounds
    resumed, _ = launch(tmp_path / "run", config, 2, *common, "--resume", "--restore-chunk-bytes", "4096")
    final = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    for name, tensor in expected.items():
        assert (final[name] == tensor).all(), name
