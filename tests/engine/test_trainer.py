"""StagedTrainer on one process: what each stage trains, optimizer/schedule resets, resume, outputs."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_tuning import StagedTrainer, StagedTrainingArguments
from hf_tuning.trainer import STATE_FILE, find_last_staged_checkpoint
from tests.helpers.snapshots import check_staged_run
from tests.helpers.staged_run import SimulatedCrash, run
from tests.helpers.tiny import lm_dataset, tiny_llama


@pytest.mark.parametrize(
    ("variant", "lora"), [("dt1", False), ("dt2", True), ("dt3", False), ("dt4", True), ("ost", False)]
)
def test_each_stage_trains_exactly_its_subspace(tmp_path, variant, lora):
    run(str(tmp_path / "out"), variant, snapshots=str(tmp_path / "snap"), lora=lora)
    info = check_staged_run(tmp_path / "out", tmp_path / "snap", world_size=1)
    assert len(info["stages"]) == {"ost": 1, "dt1": 4, "dt2": 4, "dt3": 2, "dt4": 2}[variant]


class OptimizerProbe(TrainerCallback):
    """Records, per stage, which parameters the optimizer holds and whether the old one was freed."""

    def __init__(self) -> None:
        self.stages: list[dict] = []
        self.previous: weakref.ref | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        gc.collect()
        inner = getattr(optimizer, "optimizer", optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self.stages.append(
            {
                "previous_alive": self.previous is not None and self.previous() is not None,
                "params": {names[id(p)] for group in inner.param_groups for p in group["params"]},
            }
        )
        self.previous = weakref.ref(inner)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self.stages[-1]["state"] = {names[id(p)] for p in inner.state}


def test_fresh_optimizer_over_the_stage_only(tmp_path):
    probe = OptimizerProbe()
    trainer = run(str(tmp_path / "out"), "dt1", callbacks=(probe,))
    assert len(probe.stages) == 4
    for stage, seen in zip(trainer.stage_plan.stages, probe.stages):
        assert seen["params"] == set(stage.params)
        assert seen["state"] <= set(stage.params) and seen["state"]
        assert not seen["previous_alive"], "the previous stage's optimizer (and its state) was kept alive"
    # after training every originally trainable parameter is trainable again
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_schedule_restarts_with_warmup_each_stage(tmp_path):
    trainer = run(str(tmp_path / "out"), "dt3", steps=4, warmup_steps=2, lr_scheduler_type="linear")
    history = trainer.stage_callback.log_history
    per_stage = [[e["learning_rate"] for e in history if "loss" in e and e["dt/stage"] == k] for k in (0, 1)]
    assert per_stage[0] == per_stage[1] and len(per_stage[0]) == 4
    assert per_stage[0][0] < max(per_stage[0])  # warmup ramp at the start of each stage
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == list(range(1, 9))  # one global step axis across stages


def test_resume_mid_stage_is_exact(tmp_path):
    reference = run(str(tmp_path / "ref"), "dt1", steps=4, save_steps=2)
    with pytest.raises(SimulatedCrash):
        run(str(tmp_path / "run"), "dt1", steps=4, save_steps=2, crash="1:2")
    assert (tmp_path / "run" / "stage-1" / "checkpoint-2" / "dt_state.json").is_file()
    assert not (tmp_path / "run" / "stage-2").exists()
    resumed = run(str(tmp_path / "run"), "dt1", steps=4, save_steps=2, resume=True)
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name

    def train_logs(trainer):
        return [
            (e["step"], e["dt/stage"], e["learning_rate"], e["loss"])
            for e in trainer.stage_callback.log_history
            if "loss" in e
        ]

    ref_logs, resumed_logs = train_logs(reference), train_logs(resumed)
    assert resumed_logs[-8:] == ref_logs[-8:]  # same stage, step, LR and loss after the resume point
    report = json.loads((tmp_path / "run" / "dt_stages.json").read_text())
    assert report["complete"] and [r["index"] for r in report["stage_records"]] == [0, 1, 2, 3]


def test_resume_skips_an_incomplete_newest_checkpoint(tmp_path):
    """A checkpoint interrupted while being saved has no dt_state.json (written last): resume from the one
    before it in the same stage, not from the end of the previous stage."""
    with pytest.raises(SimulatedCrash):
        run(str(tmp_path / "run"), "dt1", steps=4, save_steps=2, crash="1:4")
    stage = tmp_path / "run" / "stage-1"
    (stage / "checkpoint-4" / STATE_FILE).unlink()
    assert find_last_staged_checkpoint(tmp_path / "run") == str(stage / "checkpoint-2")
    with pytest.raises(ValueError, match=r"incomplete.*newest complete checkpoint \(.*stage-1/checkpoint-2\)"):
        run(str(tmp_path / "run"), "dt1", steps=4, save_steps=2, resume=str(stage / "checkpoint-4"))
    resumed = run(str(tmp_path / "run"), "dt1", steps=4, save_steps=2, resume=True)
    stage_1 = [e for e in resumed.stage_callback.log_history if "loss" in e and e["dt/stage"] == 1]
    assert [e["step"] for e in stage_1] == [5, 6, 7, 8]  # steps 7 and 8 retrained, 5 and 6 kept


def test_resume_exactly_at_a_stage_boundary(tmp_path):
    """Interrupted right after a stage's last checkpoint: the stage is complete, it takes no extra step
    (the trainer would otherwise run one past max_steps) and the next stage starts as it would have."""
    reference = run(str(tmp_path / "ref"), "dt1", steps=4, save_steps=2)
    with pytest.raises(SimulatedCrash):
        run(str(tmp_path / "run"), "dt1", steps=4, save_steps=2, crash="0:4")
    assert find_last_staged_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "stage-0" / "checkpoint-4")
    resumed = run(str(tmp_path / "run"), "dt1", steps=4, save_steps=2, resume=True)
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    first = resumed.stage_records[0]
    assert (first.steps, first.end_step, first.train_loss_mean) == (4, 4, None)  # complete, nothing retrained
    losses = [(e["step"], e["loss"]) for e in resumed.stage_callback.log_history if "loss" in e]
    assert losses == [(e["step"], e["loss"]) for e in reference.stage_callback.log_history if "loss" in e]


def test_best_stage_init_is_refused_when_a_stage_would_never_evaluate(tmp_path):
    common = dict(
        output_dir=str(tmp_path), dt_variant="dt1", dt_budget="split", max_steps=8, dt_stage_init="best",
        per_device_train_batch_size=4, report_to=[], use_cpu=True,
    )  # fmt: skip
    data, held_out = lm_dataset(16), lm_dataset(8, seed=2)
    too_late = StagedTrainingArguments(**common, eval_strategy="steps", eval_steps=4, save_steps=4)
    with pytest.raises(ValueError, match=r"stage 0 \(2 steps\).*stage 3 \(2 steps\)"):
        StagedTrainer(model=tiny_llama(layers=4), args=too_late, train_dataset=data, eval_dataset=held_out)
    for fitting in (
        StagedTrainingArguments(**common, eval_strategy="steps", eval_steps=2, save_steps=2),
        StagedTrainingArguments(**common, eval_strategy="steps", eval_steps=0.5, save_steps=0.5),
        StagedTrainingArguments(**common, eval_strategy="epoch", save_strategy="epoch"),
    ):
        StagedTrainer(model=tiny_llama(layers=4), args=fitting, train_dataset=data, eval_dataset=held_out)


def test_resume_errors(tmp_path):
    run(str(tmp_path / "out"), "dt1", steps=2, save_steps=2)
    with pytest.raises(ValueError, match="different stage plan"):
        run(str(tmp_path / "out"), "dt3", steps=2, save_steps=2, resume=True)
    with pytest.raises(ValueError, match="no staged checkpoint"):
        run(str(tmp_path / "empty"), "dt1", steps=2, resume=True)
    args = StagedTrainingArguments(output_dir=str(tmp_path / "x"), report_to=[], dt_variant="dt1")
    trainer = StagedTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(8))
    plain = tmp_path / "plain_checkpoint"
    plain.mkdir()
    with pytest.raises(ValueError, match="not a checkpoint of a staged run"):
        trainer.train(resume_from_checkpoint=str(plain))


class BlockGradRecorder(TrainerCallback):
    """Records which decoder blocks produced outputs that require grad (backward passes through them)."""

    def __init__(self) -> None:
        self.by_stage: dict[int, set[int]] = {}
        self.handles = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stage = self.trainer._active_stage.index
        self.by_stage[stage] = set()
        layers = [m for n, m in model.named_modules() if n.endswith("model.layers")][0]
        for index, layer in enumerate(layers):

            def hook(module, inputs, output, index=index, stage=stage):
                tensor = output[0] if isinstance(output, tuple) else output
                if module.training and tensor.requires_grad:
                    self.by_stage[stage].add(index)

            self.handles.append(layer.register_forward_hook(hook))

    def on_train_end(self, *args, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles = []


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_backward_stops_at_lowest_active_block(tmp_path, checkpointing):
    recorder = BlockGradRecorder()
    extra = {}
    if checkpointing:
        extra = {
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": checkpointing == "reentrant"},
        }

    trainer = run(
        str(tmp_path / "out"), "dt1", lora=True, snapshots=str(tmp_path / "snap"), callbacks=(recorder,), **extra
    )
    check_staged_run(tmp_path / "out", tmp_path / "snap", world_size=1)  # every active adapter still trains
    assert recorder.by_stage == {0: set(range(8)), 1: set(range(2, 8)), 2: set(range(4, 8)), 3: {6, 7}}
    assert trainer.model.base_model.model.model.layers[0].gradient_checkpointing == bool(checkpointing)


def test_input_require_grads_hook_is_lifted_per_stage(tmp_path):
    """With PEFT's input-require-grads hook (as TRL installs it), backward would run to the embeddings."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(layers=8), LoraConfig(r=4, target_modules="all-linear"))
    model.enable_input_require_grads()
    args = StagedTrainingArguments(
        output_dir=str(tmp_path),
        dt_variant="dt1",
        max_steps=1,
        report_to=[],
        disable_tqdm=True,
        per_device_train_batch_size=4,
        save_strategy="no",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    recorder = BlockGradRecorder()
    trainer = StagedTrainer(model=model, args=args, train_dataset=lm_dataset(16))
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.by_stage[3] == {6, 7}
    # restored afterwards, so the model behaves as the user left it
    embedding_out = model.get_input_embeddings()(torch.tensor([[5, 6]]))
    assert embedding_out.requires_grad


def test_outputs_report_timeline_and_tensorboard(tmp_path, monkeypatch):
    # from an empty working directory and without TENSORBOARD_LOGGING_DIR: every stage, the first included,
    # logs into one run folder inside output_dir, never into ./runs
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    trainer = run(str(tmp_path / "out"), "dt2", steps=3, report_to=["tensorboard"])
    assert list(workdir.iterdir()) == []
    (tb_run,) = (tmp_path / "out" / "runs").iterdir()
    report = json.loads((tmp_path / "out" / "dt_stages.json").read_text())
    assert report["variant"] == "dt2" and report["complete"] and report["budget"] == "per_stage"
    records = report["stage_records"]
    assert [r["name"] for r in records] == ["G0", "G0+G1", "G0+G1+G2", "all"]
    assert [(r["start_step"], r["end_step"], r["steps"]) for r in records] == [
        (0, 3, 3),
        (3, 6, 3),
        (6, 9, 3),
        (9, 12, 3),
    ]
    assert [r["trainable_params"] for r in records] == [s.num_params for s in trainer.stage_plan.stages]
    assert all(isinstance(r["final_train_loss"], float) and isinstance(r["train_loss_mean"], float) for r in records)
    png = (tmp_path / "out" / "dt_timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_run))
    events.Reload()
    begins = [(e.step, e.value) for e in events.Scalars("train/dt/stage_begin")]
    assert begins == [(0, 0.0), (3, 1.0), (6, 2.0), (9, 3.0)]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))


def test_stage_init_best_restores_best_checkpoint(tmp_path):
    trainer = run(
        str(tmp_path / "out"),
        "dt3",
        steps=4,
        snapshots=str(tmp_path / "snap"),
        dt_stage_init="best",
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        save_strategy="steps",
        learning_rate=0.05,
        metric_for_best_model="loss",
    )
    records = json.loads((tmp_path / "out" / "dt_stages.json").read_text())["stage_records"]
    best = records[0]["best_checkpoint"]
    assert best and Path(best).parent.name == "stage-0"
    saved = load_file(str(Path(best) / "model.safetensors"))
    stage1_begin = load_file(str(tmp_path / "snap" / "rank0_stage1_begin.safetensors"))
    for name, value in saved.items():
        assert torch.equal(value.float(), stage1_begin[name]), name
    # the best checkpoint is not the last step here, so "best" really differs from "last"
    assert not best.endswith("checkpoint-4")
    last = load_file(str(Path(best).parent / "checkpoint-4" / "model.safetensors"))
    assert any(not torch.equal(last[n].float(), stage1_begin[n]) for n in saved)
    assert trainer.args.load_best_model_at_end
    assert [r["ends_with"] for r in records] == ["best", "best"]


def test_a_stage_without_a_best_checkpoint_is_reported_not_hidden(tmp_path, caplog):
    """Evaluation delayed past the stage (eval_delay): nothing to load, so the stage hands on its last weights,
    says so in the log and records it."""
    with caplog.at_level("WARNING", logger="hf_tuning.trainer"):
        trainer = run(
            str(tmp_path / "out"), "dt3", steps=2, dt_stage_init="best", eval_strategy="steps", eval_steps=1,
            save_steps=1, save_strategy="steps", eval_delay=100,
        )  # fmt: skip
    assert [r.ends_with for r in trainer.stage_records] == ["last", "last"]
    assert "saved no evaluated checkpoint" in caplog.text
    records = json.loads((tmp_path / "out" / "dt_stages.json").read_text())["stage_records"]
    assert [r["ends_with"] for r in records] == ["last", "last"]


def test_split_budget_divides_the_steps(tmp_path):
    trainer = run(str(tmp_path / "out"), "dt1", steps=10, dt_budget="split")
    records = trainer.stage_records
    assert [r.steps for r in records] == [3, 3, 2, 2]
    assert trainer.args.max_steps == 10  # restored
    with pytest.raises(ValueError, match="leaves a stage with no step"):
        run(str(tmp_path / "few"), "dt1", steps=3, dt_budget="split")


def test_configuration_errors(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to=[])
    with pytest.raises(ValueError, match="dt_variant='dt7'"):
        StagedTrainingArguments(**base, dt_variant="dt7")
    with pytest.raises(ValueError, match="needs evaluation"):
        StagedTrainingArguments(**base, dt_stage_init="best")
    with pytest.raises(ValueError, match="contradictory"):
        StagedTrainingArguments(**base, load_best_model_at_end=True, eval_strategy="steps")
    with pytest.raises(ValueError, match="more than the 8 blocks"):
        StagedTrainer(model=tiny_llama(), args=StagedTrainingArguments(**base, dt_variant="dt1", dt_num_groups=12))
    with pytest.raises(ValueError, match="dt_groups"):
        StagedTrainer(model=torch.nn.Sequential(torch.nn.Linear(2, 2)), args=StagedTrainingArguments(**base))
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fresh optimizer"):
        StagedTrainer(model=model, args=StagedTrainingArguments(**base), optimizers=(optimizer, None))
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="StagedTrainingArguments"):
        StagedTrainer(model=tiny_llama(), args=TrainingArguments(**base))


def test_regex_groups_through_the_trainer(tmp_path):
    trainer = run(
        str(tmp_path / "out"),
        "dt1",
        snapshots=str(tmp_path / "snap"),
        dt_groups=[r"layers\.[0-3]\.self_attn", r"layers\.[4-7]\.self_attn", r"\.mlp\."],
    )
    check_staged_run(tmp_path / "out", tmp_path / "snap", world_size=1)
    assert [s.name for s in trainer.stage_plan.stages] == ["R0", "R1", "R2"]


def test_each_stage_draws_its_own_shuffle(tmp_path):
    seen: dict[int, list[tuple]] = {}

    class Recording(StagedTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            rows = [tuple(r) for r in inputs["input_ids"][:, :4].tolist()]
            seen.setdefault(self._active_stage.index, []).extend(rows)
            return super().training_step(model, inputs, *args, **kwargs)

    args = StagedTrainingArguments(
        output_dir=str(tmp_path),
        dt_variant="dt1",
        dt_budget="split",
        max_steps=16,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=5,
    )
    data = lm_dataset(64, 16, seed=4)
    Recording(model=tiny_llama(), args=args, train_dataset=data).train()
    assert len({tuple(seen[k]) for k in seen}) == 4  # no two stages replay the same batches
    assert len({row for rows in seen.values() for row in rows}) > 40  # of 64 rows, one epoch in total
    assert args.data_seed is None  # restored


@pytest.mark.parametrize(("variant", "epochs"), [("dt3", 2), ("dt1", 3)])
def test_no_two_stage_epochs_share_a_shuffle(tmp_path, variant, epochs):
    """Samplers shuffle epoch e with seed + e: with stage seeds one apart, stage k's epoch e would replay
    stage 0's epoch e + k batch for batch."""
    orders: dict[tuple[int, int], list[tuple]] = {}

    class Recording(StagedTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            key = (self._active_stage.index, self.state.global_step // 4)  # 16 rows, batch 4: 4 steps an epoch
            orders.setdefault(key, []).extend(tuple(r) for r in inputs["input_ids"][:, :4].tolist())
            return super().training_step(model, inputs, *args, **kwargs)

    data = lm_dataset(16, 16, seed=4)
    rows = sorted(tuple(r[:4]) for r in data["input_ids"])
    assert len(set(rows)) == 16
    args = StagedTrainingArguments(
        output_dir=str(tmp_path), dt_variant=variant, dt_budget="per_stage", num_train_epochs=epochs,
        per_device_train_batch_size=4, save_strategy="no", report_to=[], disable_tqdm=True, seed=3,
    )  # fmt: skip
    Recording(model=tiny_llama(), args=args, train_dataset=data).train()
    stages = {"dt3": 2, "dt1": 4}[variant]
    assert sorted(orders) == [(stage, epoch) for stage in range(stages) for epoch in range(epochs)]
    assert all(sorted(order) == rows for order in orders.values())  # every epoch sees every row once
    assert len({tuple(order) for order in orders.values()}) == stages * epochs


def test_after_training_the_state_and_later_logs_use_the_global_step(tmp_path):
    trainer = run(str(tmp_path / "out"), "dt1", steps=2, eval_strategy="no")
    assert trainer.state.global_step == 8  # 4 stages of 2 steps, not the last stage's own 2
    metrics = trainer.evaluate(lm_dataset(8, seed=2))
    assert trainer.state.log_history[-1]["step"] == 8 and "eval_loss" in metrics


def test_fsdp_is_refused_before_any_weights_load(monkeypatch):
    """Refused by the arguments, which a recipe parses before it loads the model."""
    with pytest.raises(ValueError, match="FSDP is not supported yet"):
        StagedTrainingArguments(output_dir="unused", fsdp="full_shard", report_to=[], use_cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match="FSDP is not supported yet"):
        StagedTrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
