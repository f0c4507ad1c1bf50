"""``StagedTuningCallback``: watches a staged run and writes its per-stage report.

The stage switching itself lives in :class:`hf_tuning.trainer.StagedTrainerMixin` (one fresh
optimizer, scheduler and DDP/DeepSpeed engine per stage). This callback checks that each stage
trains exactly its parameters, lets backward stop at the stage's lowest block, records what every stage did and writes ``dt_stages.json`` and
``dt_timeline.png`` into ``output_dir`` after every stage, so a crash never loses the report of
the stages already finished.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from hf_tuning.backward import BackwardStopper
from hf_tuning.io import atomic_write_json
from hf_tuning.stages import Stage, StagePlan
from hf_tuning.timeline import plot_stage_timeline

__all__ = ["StagedTuningCallback", "STAGES_FILE", "TIMELINE_FILE"]

logger = logging.getLogger(__name__)
STAGES_FILE = "dt_stages.json"
TIMELINE_FILE = "dt_timeline.png"


class StagedTuningCallback(TrainerCallback):
    """Per-stage bookkeeping for :class:`~hf_tuning.StagedTrainer` and :class:`~hf_tuning.StagedSFTTrainer`.

    Attributes:
        records: one dict per finished stage (groups, trainable parameters, steps, start and end
            global step, final and mean train loss, best eval metric, runtime).
        log_history: the log entries of finished stages, with global steps.
    """

    def __init__(
        self, plan: StagePlan, settings: dict[str, Any] | None = None, backward: BackwardStopper | None = None
    ) -> None:
        self.plan = plan
        self.backward = backward
        self.lowest_block: int | None = None
        self.settings = dict(settings or {})
        self.records: list[dict[str, Any]] = []
        self.log_history: list[dict[str, Any]] = []
        self.stage: Stage | None = None
        self.step_offset = 0
        self._started = 0.0

    # -- driven by the trainer ---------------------------------------------------------------
    def begin_stage(self, stage: Stage, step_offset: int) -> None:
        self.stage, self.step_offset = stage, step_offset

    def restore(self, records: list[dict[str, Any]], log_history: list[dict[str, Any]]) -> None:
        self.records, self.log_history = list(records), list(log_history)

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
        # the trainer reports the global step while logging; keep our own copy of every entry so
        # the timeline spans all stages (each stage's TrainerState only holds its own)
        if logs:
            self.log_history.append({**logs, "step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        stage = self.stage
        if stage is None:
            return
        if self.backward is not None:
            self.backward.restore()
        entries = [e for e in self.log_history if e.get("dt/stage") == stage.index]
        losses = [e["loss"] for e in entries if "loss" in e]
        metric = args.metric_for_best_model
        evals = [e for e in entries if any(k.startswith("eval_") for k in e)]
        best = state.best_metric
        if best is None and any("eval_loss" in e for e in evals):
            best, metric = min(e["eval_loss"] for e in evals if "eval_loss" in e), "eval_loss"
        self.records.append(
            {
                "index": stage.index,
                "name": stage.name,
                "groups": list(stage.groups),
                "trainable_params": stage.num_params,
                "steps": state.global_step,
                "planned_steps": state.max_steps,
                "start_step": self.step_offset,
                "end_step": self.step_offset + state.global_step,
                "final_train_loss": losses[-1] if losses else None,
                "best_metric": best,
                "metric_for_best_model": metric,
                "best_checkpoint": state.best_model_checkpoint,
                "runtime_s": round(time.time() - self._started, 3),
                "backward_stops_at_block": self.lowest_block,
            }
        )

    # -- outputs ---------------------------------------------------------------------------
    def report(self, complete: bool) -> dict[str, Any]:
        return {
            **self.plan.to_dict(),
            **self.settings,
            "complete": complete,
            "stages_done": len(self.records),
            "stage_records": self.records,
        }

    def write(self, output_dir: str | Path, complete: bool) -> None:
        output_dir = Path(output_dir)
        atomic_write_json(output_dir / STAGES_FILE, self.report(complete))
        try:
            plot_stage_timeline(
                self.records,
                self.log_history,
                output_dir / TIMELINE_FILE,
                title=f"{self.plan.variant} ({len(self.plan)} stages)",
            )
        except Exception as err:  # a plotting failure must never cost the run
            logger.warning("could not draw %s: %s", TIMELINE_FILE, err)
