"""Stage records: one immutable record per finished stage, produced by the trainer, and the one step offset
derived from them, identical in the trainer, the checkpoint state, ``dt_stages.json`` and the timeline."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hf_tuning.records import StageRecord, stage_report, step_offset
from hf_tuning.stages import build_stage_plan
from hf_tuning.trainer import STATE_FILE
from tests.helpers.staged_run import run
from tests.helpers.tiny import tiny_llama


def record(index: int, start: int, steps: int, **extra) -> StageRecord:
    return StageRecord(
        index=index, name=f"G{index}", groups=(f"G{index}",), trainable_params=10, steps=steps,
        planned_steps=steps, start_step=start, **extra,
    )  # fmt: skip


def test_a_record_is_frozen_and_derives_its_end():
    r = record(1, start=4, steps=3)
    assert r.end_step == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.steps = 5  # type: ignore[misc]


def test_the_json_form_round_trips_and_tolerates_older_files():
    r = record(2, start=6, steps=2, final_train_loss=1.5, train_loss_mean=1.7, runtime_s=0.25)
    data = json.loads(json.dumps(r.to_dict()))
    assert data["end_step"] == 8 and data["groups"] == ["G2"]
    assert StageRecord.from_dict(data) == r
    # a checkpoint written before train_loss_mean existed, with a stale end_step: recomputed, not trusted
    older = {k: v for k, v in data.items() if k != "train_loss_mean"} | {"end_step": 99}
    restored = StageRecord.from_dict(older)
    assert restored.train_loss_mean is None and restored.end_step == 8


def test_the_step_offset_is_where_the_last_record_ends():
    assert step_offset([]) == 0
    assert step_offset([record(0, 0, 3), record(1, 3, 4)]) == 7


def test_the_report_carries_the_plan_settings_and_records():
    plan = build_stage_plan(tiny_llama(layers=4), "dt3")
    report = stage_report(plan, {"budget": "split"}, [record(0, 0, 2)], complete=False)
    assert report["variant"] == "dt3" and report["budget"] == "split" and not report["complete"]
    assert report["stages_done"] == 1 and report["stage_records"][0]["end_step"] == 2


def test_one_record_per_stage_contiguous_and_the_same_everywhere(tmp_path):
    out = tmp_path / "out"
    trainer = run(str(out), "dt1", steps=2, save_steps=2)
    records = trainer.stage_records
    assert [r.index for r in records] == [0, 1, 2, 3] and all(isinstance(r, StageRecord) for r in records)
    assert [r.start_step for r in records] == [0, 2, 4, 6]  # each stage starts where the previous ended
    assert trainer._step_offset == records[-1].end_step == 8
    written = json.loads((out / "dt_stages.json").read_text())["stage_records"]
    assert [StageRecord.from_dict(r) for r in written] == records
    # the last checkpoint of stage k holds exactly the records of stages 0..k-1
    for stage in range(4):
        state = json.loads((out / f"stage-{stage}" / "checkpoint-2" / STATE_FILE).read_text())
        assert [StageRecord.from_dict(r) for r in state["completed_stages"]] == records[:stage]
        assert "step_offset" not in state  # derived from the records, never stored twice
