"""The shipped accelerate configs: each one parses, names a DeepSpeed file that matches its name, and the
multi-machine ones turn their per-machine fields into the launch accelerate would run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from tests.helpers import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))
DEEPSPEED_CONFIGS = [path for path in CONFIGS if "deepspeed" in path.name]
MULTINODE_CONFIGS = [path for path in CONFIGS if "multinode" in path.name]


def test_there_are_multinode_zero3_configs_with_and_without_offload():
    assert {path.name for path in MULTINODE_CONFIGS} >= {
        "deepspeed_zero3_multinode.yaml",
        "deepspeed_zero3_offload_multinode.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_parses_with_accelerate(path: Path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0, "every machine runs the same number of processes"


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda path: path.name)
def test_deepspeed_config_names_the_json_its_name_promises(path: Path):
    settings = load_config_from_file(str(path)).deepspeed_config
    json_path = REPO_ROOT / settings["deepspeed_config_file"]
    assert json_path.is_file(), f"{path.name} names {json_path}, which does not exist"
    zero = json.loads(json_path.read_text())["zero_optimization"]
    assert zero["stage"] == int(re.search(r"zero(\d)", path.name).group(1))
    offloaded = {key: zero.get(key, {}).get("device") for key in ("offload_param", "offload_optimizer")}
    if "offload" in path.name:
        assert offloaded == {"offload_param": "cpu", "offload_optimizer": "cpu"}
    else:
        assert offloaded == {"offload_param": None, "offload_optimizer": None}
    if zero["stage"] == 3:
        assert settings["zero3_init_flag"] is True
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the adapter is saved whole


@pytest.mark.parametrize("path", MULTINODE_CONFIGS, ids=lambda path: path.name)
def test_multinode_config_has_every_per_machine_field(path: Path):
    text = path.read_text()
    for field in ("machine_rank", "main_process_ip", "main_process_port", "num_machines"):
        assert re.search(rf"^{field}: ", text, re.MULTILINE), f"{path.name} lacks {field}"
    config = load_config_from_file(str(path))
    assert config.num_machines >= 2 and config.machine_rank == 0
    assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"  # no pdsh / ssh needed


@pytest.mark.parametrize("path", MULTINODE_CONFIGS, ids=lambda path: path.name)
def test_multinode_launch_on_the_second_machine(path: Path):
    """What ``accelerate launch --machine_rank 1 --main_process_ip ...`` prepares on machine 1 (nothing starts)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    argv = ["--config_file", str(path), "--machine_rank", "1", "--main_process_ip", "192.0.2.10"]
    args = launch_command_parser().parse_args([*argv, "recipes/agrimatech_llama_dt3.py", "--max_steps", "3"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    command, env = prepare_deepspeed_cmd_env(args)
    assert command is None  # the standard launcher: torchrun-style, one launcher per machine
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert args.rdzv_endpoint == "192.0.2.10:29500"
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    named = load_config_from_file(str(path)).deepspeed_config["deepspeed_config_file"]
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == named
    assert args.training_script_args == ["--max_steps", "3"]
