"""A tiny staged run for any launcher (python, accelerate launch, DeepSpeed).

Every rank dumps the parameters at the start and end of every stage, gathered under ZeRO-3,
into --snapshots, plus world.json (world size, distributed type, and whether the previous stage's
optimizer was still alive when each stage built its own), so the tests can check what each stage
changed, that the replicas agree, and that stage switches do not hold two optimizers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_tuning import StagedTrainer, StagedTrainingArguments, deepspeed_resume
from tests.helpers.tiny import lm_dataset, tiny_llama


class SnapshotCallback(TrainerCallback):
    """Saves every parameter at each stage's first and last step, one file per rank."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.trainer: StagedTrainer | None = None

    def _dump(self, model: torch.nn.Module, when: str) -> None:
        named = list(model.named_parameters())
        params = [p for _, p in named]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                tensors = {n: p.detach().float().clone().contiguous() for n, p in named}
        else:
            tensors = {n: p.detach().float().clone().contiguous() for n, p in named}
        rank = int(os.environ.get("RANK", "0"))
        stage = self.trainer._active_stage.index
        save_file(tensors, str(self.directory / f"rank{rank}_stage{stage}_{when}.safetensors"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._dump(model, "begin")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._dump(model, "end")


class ReleaseProbe(TrainerCallback):
    """Records, each time a stage builds its optimizer, whether the previous stage's optimizer (the accelerate
    wrapper and the optimizer inside it, DeepSpeed's ZeRO optimizer with its fp32 state under DeepSpeed) is
    still alive."""

    def __init__(self) -> None:
        self.previous: list[weakref.ref] = []
        self.alive_at_creation: list[bool] = []

    def watch(self, trainer: StagedTrainer) -> None:
        create = trainer.create_optimizer

        def create_checked(*args, **kwargs):
            gc.collect()
            self.alive_at_creation.append(any(ref() is not None for ref in self.previous))
            return create(*args, **kwargs)

        trainer.create_optimizer = create_checked  # DeepSpeed's setup calls it too, before building its engine

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", None)
        self.previous = [weakref.ref(o) for o in (optimizer, inner) if o is not None]


class SimulatedCrash(RuntimeError):
    """Stands for a killed process."""


class CrashAt(TrainerCallback):
    """Simulates a crash after the given (stage, step) was checkpointed."""

    def __init__(self, stage: int, step: int) -> None:
        self.stage, self.step = stage, step
        self.trainer: StagedTrainer | None = None

    def on_save(self, args, state, control, **kwargs):
        if self.trainer._active_stage.index == self.stage and state.global_step == self.step:
            raise SimulatedCrash(f"simulated crash at stage {self.stage} step {self.step}")


def run(
    output: str,
    variant: str = "dt1",
    snapshots: str | None = None,
    lora: bool = False,
    steps: int = 3,
    save_steps: int = 0,
    crash: str | None = None,
    resume: bool | str = False,
    weight_decay: float = 0.1,
    callbacks: tuple = (),
    **overrides,
) -> StagedTrainer:
    """Train the tiny LLaMA with ``variant``; returns the trainer after saving ``output/final``."""
    model = tiny_llama(layers=8)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        # make B non-zero so every adapter influences the output from the first step
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
    settings = dict(
        output_dir=output,
        dt_variant=variant,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        weight_decay=weight_decay,
        warmup_steps=1,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        disable_tqdm=True,
        seed=7,
        bf16=False,
        ddp_find_unused_parameters=False,
    )
    settings.update(overrides)
    eval_dataset = lm_dataset(16, seed=2) if settings.get("eval_strategy", "no") != "no" else None
    trainer = StagedTrainer(
        model=model,
        args=StagedTrainingArguments(**settings),
        train_dataset=lm_dataset(64, seed=1),
        eval_dataset=eval_dataset,
    )
    if snapshots:
        Path(snapshots).mkdir(parents=True, exist_ok=True)
        snapshot = SnapshotCallback(Path(snapshots))
        snapshot.trainer = trainer
        trainer.add_callback(snapshot)
    if crash:
        stage, step = (int(x) for x in crash.split(":"))
        crasher = CrashAt(stage, step)
        crasher.trainer = trainer
        trainer.add_callback(crasher)
    for callback in callbacks:
        callback.trainer = trainer
        trainer.add_callback(callback)
    release = ReleaseProbe()
    release.watch(trainer)
    trainer.add_callback(release)
    trainer.train(resume_from_checkpoint=resume if isinstance(resume, str) else (True if resume else None))
    trainer.save_model(os.path.join(output, "final"))
    if trainer.args.process_index == 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        info = {
            "world_size": world,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "stages": [list(s.params) for s in trainer.stage_plan.stages],
            "always": list(trainer.stage_plan.partition.always_trainable),
            "previous_optimizer_alive_at_creation": release.alive_at_creation,
            "stages_run": [record.index for record in trainer.stage_records if record.train_loss_mean is not None],
        }
        Path(output, "world.json").write_text(json.dumps(info))
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="dt1")
    parser.add_argument("--output", required=True)
    parser.add_argument("--snapshots", default=None)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--crash", default=None, help="STAGE:STEP")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-to", nargs="*", default=[], help="logging integrations (default none)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--restore-chunk-bytes", type=int, default=None, help="see deepspeed_resume.CHUNK_BYTES")
    cli = parser.parse_args()
    if cli.restore_chunk_bytes is not None:
        deepspeed_resume.CHUNK_BYTES = cli.restore_chunk_bytes
    run(
        cli.output,
        cli.variant,
        cli.snapshots,
        cli.lora,
        cli.steps,
        cli.save_steps,
        cli.crash,
        cli.resume,
        cli.weight_decay,
        report_to=cli.report_to,
        bf16=cli.bf16,
    )


if __name__ == "__main__":
    main()
    # Every output is written by now. DeepSpeed's CPU communication op can abort a rank during the interpreter's
    # native teardown ("terminate called without an active exception", SIGABRT) after the run has finished; leave
    # without that teardown so the launch reports the run's own result.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
