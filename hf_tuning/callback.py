"""``StagedTuningCallback``: watches each stage of a staged run from inside ``Trainer.train()``.

The stage switching lives in :class:`hf_tuning.trainer.StagedTrainerMixin` (one fresh optimizer,
scheduler and DDP/DeepSpeed engine per stage), which also turns what this callback saw into the
stage's :class:`~hf_tuning.records.StageRecord`. The callback checks that each stage trains exactly its
parameters, lets backward stop at the stage's lowest block, times the stage and keeps every log entry
of the run with its global step (each stage's ``TrainerState`` only holds its own).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from hf_tuning.backward import BackwardStopper
from hf_tuning.stages import Stage

__all__ = ["StagedTuningCallback"]


class StagedTuningCallback(TrainerCallback):
    """Per-stage checks and measurements for :class:`~hf_tuning.StagedTrainer` and
    :class:`~hf_tuning.StagedSFTTrainer`, which add it themselves.

    Attributes:
        log_history: every log entry of the run so far, each with its global ``step``.
        stage: the stage running (or last run).
        lowest_block: the lowest block backward reached in that stage (see :mod:`hf_tuning.backward`).
        runtime_s: wall time of that stage's ``train()`` phase.
    """

    def __init__(self, backward: BackwardStopper | None = None) -> None:
        self.backward = backward
        self.log_history: list[dict[str, Any]] = []
        self.stage: Stage | None = None
        self.lowest_block: int | None = None
        self.runtime_s = 0.0
        self._started = 0.0

    # -- driven by the trainer ---------------------------------------------------------------
    def begin_stage(self, stage: Stage) -> None:
        self.stage, self.lowest_block, self.runtime_s = stage, None, 0.0

    def restore(self, log_history: Sequence[dict[str, Any]]) -> None:
        """Continue the log of a resumed run."""
        self.log_history = list(log_history)

    def stage_entries(self, index: int) -> list[dict[str, Any]]:
        """The log entries of stage ``index``."""
        return [entry for entry in self.log_history if entry.get("dt/stage") == index]

    # -- callback events (one train() call per stage) -------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.stage is None:
            raise RuntimeError(
                "StagedTuningCallback reports on runs of StagedTrainer / StagedSFTTrainer, which add it "
                "themselves; it cannot drive a plain Trainer"
            )
        if model is not None:
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            expected = set(self.stage.params)
            if trainable != expected:
                extra, missing = sorted(trainable - expected)[:5], sorted(expected - trainable)[:5]
                raise RuntimeError(
                    f"stage {self.stage.index} ({self.stage.name}) should train exactly its "
                    f"{len(expected)} parameters, but {len(trainable)} are trainable "
                    f"(unexpected: {extra}, missing: {missing}); something changed requires_grad "
                    "after the stage mask was applied"
                )
        if self.backward is not None:
            # after the Trainer enabled gradient checkpointing (which re-installs the
            # input-require-grads hook for reentrant checkpointing), before the first forward
            self.lowest_block = self.backward.apply(set(self.stage.params))
        self._started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the trainer reports the global step while logging (see StagedTrainerMixin.log)
        if logs:
            self.log_history.append({**logs, "step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        if self.stage is None:
            return
        if self.backward is not None:
            self.backward.restore()
        self.runtime_s = time.time() - self._started
