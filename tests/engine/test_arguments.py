"""The dt_* fields through HfArgumentParser (command line and YAML), as recipes use them."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from hf_tuning import StagedSFTConfig, StagedTrainingArguments


def test_command_line_overrides(tmp_path):
    parser = HfArgumentParser(StagedSFTConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--dt_variant",
            "dt1",
            "--dt_num_groups",
            "8",
            "--dt_order",
            "reverse",
            "--dt_budget",
            "split",
            "--dt_frozen",
            "embed_tokens",
            "lm_head",
            "--dt_always_trainable",
            "norm",
            "--bf16",
            "false",
            "--report_to",
            "none",
        ]
    )
    assert (args.dt_variant, args.dt_num_groups, args.dt_order, args.dt_budget) == ("dt1", 8, "reverse", "split")
    assert args.dt_frozen == ["embed_tokens", "lm_head"] and args.dt_always_trainable == ["norm"]


def test_yaml_config_and_bad_values(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\ndt_variant: dt4\ndt_stage_init: last\nreport_to: none\n")
    (args,) = HfArgumentParser(StagedTrainingArguments).parse_yaml_file(str(config))
    assert args.dt_variant == "dt4"
    config.write_text(f"output_dir: {tmp_path}\ndt_varient: dt4\n")
    with pytest.raises(ValueError, match="dt_varient"):
        HfArgumentParser(StagedTrainingArguments).parse_yaml_file(str(config))
    with pytest.raises(SystemExit):
        HfArgumentParser(StagedTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--dt_budget", "half"]
        )
    with pytest.raises(ValueError, match="dt_num_groups=3 contradicts the 2 dt_groups"):
        StagedTrainingArguments(output_dir=str(tmp_path), dt_groups=["a", "b"], dt_num_groups=3, report_to=[])
