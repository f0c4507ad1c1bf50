"""Constructs a StagedTrainer with a DeepSpeed config that contradicts its arguments; prints the error."""

from __future__ import annotations

import sys

from hf_tuning import DeepSpeedConfigError, StagedTrainer, StagedTrainingArguments
from tests.helpers.tiny import lm_dataset, tiny_llama

CONFIG = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": 0.5,
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100, "warmup_max_lr": "auto"}},
}

if __name__ == "__main__":
    args = StagedTrainingArguments(
        output_dir=sys.argv[1],
        deepspeed=CONFIG,
        per_device_train_batch_size=4,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
    )
    try:
        StagedTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(8))
    except DeepSpeedConfigError as err:
        print(f"DeepSpeedConfigError: {err}")
        sys.exit(0)
    sys.exit("no error raised")
