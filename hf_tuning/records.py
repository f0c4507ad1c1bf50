"""What each finished stage did, and the report of a staged run built from it.

A :class:`StageRecord` is produced by the trainer when a stage ends and never changes afterwards; the
checkpoint state (for resuming), ``dt_stages.json``, the timeline and the model card all read the same
records. The global step where a stage starts is the previous record's :attr:`StageRecord.end_step`, so
no step offset is stored anywhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_tuning.stages import StagePlan

__all__ = ["StageRecord", "STAGES_FILE", "stage_report", "step_offset"]

STAGES_FILE = "dt_stages.json"


@dataclass(frozen=True)
class StageRecord:
    """One finished stage.

    Attributes:
        index, name, groups: the stage of the plan (:class:`~hf_tuning.stages.Stage`).
        trainable_params: parameters the stage trained.
        steps: optimizer steps the stage took; ``planned_steps`` the steps it was given.
        start_step: global step (counted across stages) at the stage's start.
        final_train_loss: the last logged training loss of the stage.
        train_loss_mean: the stage's mean training loss as the Trainer reports it; ``None`` when the
            stage was already complete in the checkpoint a run resumed from.
        best_metric, metric_for_best_model, best_checkpoint: the stage's best evaluation, if any.
        runtime_s: wall time of the stage's ``train()`` phase.
        backward_stops_at_block: the lowest block backward reached (-1: down to the embeddings).
        ends_with: the weights the stage hands to the next one: ``best`` (its best checkpoint, loaded under
            ``dt_stage_init='best'``) or ``last`` (its final weights, also when ``best`` was asked for but the
            stage never saved an evaluated checkpoint).
    """

    index: int
    name: str
    groups: tuple[str, ...]
    trainable_params: int
    steps: int
    planned_steps: int
    start_step: int
    final_train_loss: float | None = None
    train_loss_mean: float | None = None
    best_metric: float | None = None
    metric_for_best_model: str | None = None
    best_checkpoint: str | None = None
    runtime_s: float = 0.0
    backward_stops_at_block: int | None = None
    ends_with: str = "last"

    @property
    def end_step(self) -> int:
        """Global step at the stage's end: where the next stage starts."""
        return self.start_step + self.steps

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``end_step`` included for readers of the file)."""
        return {**dataclasses.asdict(self), "groups": list(self.groups), "end_step": self.end_step}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageRecord:
        """Read the JSON form back (derived keys such as ``end_step`` are recomputed, unknown ones ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        return cls(**{**values, "groups": tuple(values.get("groups", ()))})


def step_offset(records: Sequence[StageRecord]) -> int:
    """Global step at which the next stage starts: where the last finished stage ended."""
    return records[-1].end_step if records else 0


def stage_report(
    plan: StagePlan, settings: Mapping[str, Any], records: Sequence[StageRecord], *, complete: bool
) -> dict[str, Any]:
    """The content of ``dt_stages.json``: the plan, the run's settings and the finished stages."""
    return {
        **plan.to_dict(),
        **settings,
        "complete": complete,
        "stages_done": len(records),
        "stage_records": [record.to_dict() for record in records],
    }
