"""Catch DeepSpeed configs that contradict the training arguments before any stage starts.

Transformers compares "auto"-less DeepSpeed values with ``TrainingArguments`` only when
training starts; for a staged run that can be after hours of stage 0, so we surface the same
mismatches at construction time, plus one that is specific to staged tuning: a DeepSpeed
scheduler with a fixed step count cannot restart with each stage's own budget.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DeepSpeedConfigError", "check_deepspeed_config"]


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config contradicts the training arguments or the staged schedule."""


def _config_source(args: Any) -> str:
    if isinstance(getattr(args, "deepspeed", None), str):
        return args.deepspeed
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the DeepSpeed config"


def check_deepspeed_config(args: Any, hf_ds_config: Any) -> None:
    """Raise :class:`DeepSpeedConfigError` listing every contradiction found.

    ``hf_ds_config`` is the ``HfTrainerDeepSpeedConfig`` after ``trainer_config_process`` has
    filled the "auto" values from ``args`` and recorded the mismatches.
    """
    if hf_ds_config is None:
        return
    problems = list(getattr(hf_ds_config, "mismatches", []) or [])
    config = hf_ds_config.config
    scheduler = config.get("scheduler") or {}
    for key in ("total_num_steps", "warmup_num_steps"):
        value = (scheduler.get("params") or {}).get(key)
        if value is not None and value != "auto":
            problems.append(
                f"- ds scheduler.params.{key}={value} is fixed, but staged tuning restarts the schedule "
                'in every stage with that stage\'s own step count: set it to "auto" or drop the '
                "scheduler section and use lr_scheduler_type"
            )
    if not problems:
        return
    raise DeepSpeedConfigError(
        f"{_config_source(args)} contradicts the training arguments:\n"
        + "\n".join(problems)
        + '\nUse "auto" for these keys (the shipped deepspeed_configs/*.json do) or change the arguments.'
    )
