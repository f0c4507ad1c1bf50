"""Staged subspace tuning on ``transformers.Trainer``: one training phase per stage.

Every stage is a complete ``Trainer.train()`` phase over the same Trainer object, which is what
makes freezing hold everywhere:

* exactly the stage's parameters have ``requires_grad=True`` when the optimizer is built, so the
  optimizer, its state and (under DeepSpeed ZeRO) its flat fp32 partitions cover only them; the
  previous stage's optimizer state is freed, never carried over;
* the model is re-wrapped per stage (a fresh DDP reducer or DeepSpeed engine), so inactive
  parameters are never all-reduced, decayed or moved by stale momentum;
* the LR schedule, warmup included, restarts over the stage's own step budget;
* checkpoints go to ``output_dir/stage-K/checkpoint-N`` with a ``dt_state.json`` that lets
  ``resume_from_checkpoint`` continue mid-stage exactly.

Logs carry ``dt/stage`` and use a global step that runs on across stages, so TensorBoard and
W&B show one continuous curve.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from hf_tuning.arguments import StagedTuningArgumentsMixin
from hf_tuning.backward import BackwardStopper
from hf_tuning.callback import StagedTuningCallback
from hf_tuning.deepspeed_checks import check_deepspeed_config
from hf_tuning.deepspeed_release import unlink_engine
from hf_tuning.deepspeed_resume import restore_frozen_weights
from hf_tuning.families import BlocksNotFoundError, find_block_stack
from hf_tuning.io import atomic_write_json, read_json
from hf_tuning.records import STAGES_FILE, StageRecord, stage_report, step_offset
from hf_tuning.stages import Stage, StagePlan, build_stage_plan
from hf_tuning.timeline import TIMELINE_FILE, plot_stage_timeline

__all__ = ["StagedTrainerMixin", "StagedTrainer", "STATE_FILE", "stage_dir_name", "find_last_staged_checkpoint"]

logger = logging.getLogger(__name__)
STATE_FILE = "dt_state.json"
# stage k shuffles with data_seed + k * STAGE_SEED_STRIDE (see StagedTrainerMixin._seed_stage_shuffle)
STAGE_SEED_STRIDE = 1_000_003
_STAGE_DIR = re.compile(r"^stage-(\d+)$")
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def stage_dir_name(index: int) -> str:
    return f"stage-{index}"


def find_last_staged_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint of a staged run: highest stage, then highest step, among the
    checkpoints that hold their ``dt_state.json`` (written last, so a checkpoint interrupted while being
    saved is skipped for the one before it, not for a whole earlier stage)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    stages = sorted(
        (int(m.group(1)), child) for child in root.iterdir() if (m := _STAGE_DIR.match(child.name)) and child.is_dir()
    )
    for _, stage_dir in reversed(stages):
        checkpoints = sorted(
            (int(m.group(1)), child)
            for child in stage_dir.iterdir()
            if (m := _CHECKPOINT_DIR.match(child.name)) and child.is_dir()
        )
        for _, checkpoint in reversed(checkpoints):
            if (checkpoint / STATE_FILE).is_file():
                return str(checkpoint)
    return None


class StagedTrainerMixin:
    """Shared implementation of :class:`StagedTrainer` and :class:`~hf_tuning.StagedSFTTrainer`.

    Mix in before the Trainer class. The stage plan is built once, from the parameters that are
    trainable when the trainer is constructed (for PEFT models: the adapters and
    ``modules_to_save``); it is available as ``trainer.stage_plan`` before training.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        targs = self.args
        if not isinstance(targs, StagedTuningArgumentsMixin):
            raise TypeError(
                f"{type(self).__name__} needs StagedTrainingArguments / StagedSFTConfig (with the dt_* "
                f"fields), got {type(targs).__name__}"
            )
        if self.optimizer is not None or self.lr_scheduler is not None:
            raise ValueError(
                f"{type(self).__name__} builds a fresh optimizer and scheduler for every stage, so it cannot "
                "take prebuilt ones through optimizers=(...); use args.optim / optimizer_cls_and_kwargs / "
                "lr_scheduler_type instead"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and targs.world_size != launched:
            raise RuntimeError(
                f"launched with WORLD_SIZE={launched} but the Trainer runs on {targs.world_size} process(es) "
                f"({self.accelerator.distributed_type}); the replicas would train independently. On a machine "
                "without GPUs pass use_cpu=True"
            )
        if self.model_init is not None:
            raise ValueError(f"{type(self).__name__} does not support model_init; pass the model itself")
        if self.is_fsdp_enabled:  # the arguments refuse FSDP already; an accelerator set up for it is refused here
            raise ValueError(
                f"{type(self).__name__} does not support FSDP yet: it re-wraps the model for every stage, which "
                "FSDP's flat parameters do not allow. Launch with DeepSpeed ZeRO-3 instead "
                "(accelerate_configs/deepspeed_zero3.yaml) to shard the model"
            )
        if self.is_deepspeed_enabled:
            check_deepspeed_config(targs, self.accelerator.state.deepspeed_plugin.hf_ds_config)
            self._pristine_ds_config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.hf_ds_config.config)
        self.stage_plan: StagePlan = build_stage_plan(
            self.model,
            targs.dt_variant,
            order=targs.dt_order,
            seed=targs.seed,
            num_groups=targs.dt_num_groups,
            groups=targs.dt_groups,
            always_trainable=targs.dt_always_trainable,
            frozen=targs.dt_frozen,
        )
        self._candidates = self.stage_plan.partition.param_numel.keys()
        try:
            prefixes = [prefix for prefix, _, _ in find_block_stack(self.model).blocks]
        except BlocksNotFoundError:
            prefixes = []  # regex groups on an unregistered family: backward-stop is not applied
        self._backward = BackwardStopper(self.model, prefixes, self.stage_plan.partition.runs_before_blocks)
        self.stage_callback = StagedTuningCallback(backward=self._backward)
        self.add_callback(self.stage_callback)
        self.stage_records: list[StageRecord] = []  # one per finished stage, in order
        self._active_stage: Stage | None = None
        self._announced_stage: int | None = None  # the stage whose dt/stage_begin was logged
        if targs.dt_stage_init == "best":
            self._check_each_stage_gets_a_best_checkpoint()

    @property
    def _step_offset(self) -> int:
        """Global step at which the running stage started (the end of the last finished one)."""
        return step_offset(self.stage_records)

    # ---------------------------------------------------------------------------------------
    # Training loop over stages
    # ---------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Run every stage of the plan (or the remaining ones when resuming)."""
        args = self.args
        checkpoint, first_stage = self._resolve_resume(resume_from_checkpoint)
        self._announced_stage = None
        budgets = self._stage_budgets()
        loader_config = self.accelerator.dataloader_config
        saved = {"max_steps": args.max_steps, "data_seed": args.data_seed, "loader_seed": loader_config.data_seed}
        outputs: list[TrainOutput] = []
        try:
            for stage in self.stage_plan.stages[first_stage:]:
                self._enter_stage(stage, budgets[stage.index])
                self._seed_stage_shuffle(stage, saved["data_seed"], saved["loader_seed"])
                if checkpoint is not None and stage.index == first_stage and self.is_deepspeed_enabled:
                    # DeepSpeed's own state holds only what this stage trains (ZeRO-3, PEFT)
                    restore_frozen_weights(self.model, checkpoint, set(self._candidates) - set(stage.params))
                outputs.append(
                    super().train(
                        resume_from_checkpoint=checkpoint if stage.index == first_stage else None,
                        trial=trial,
                        ignore_keys_for_eval=ignore_keys_for_eval,
                        **kwargs,
                    )
                )
                self._leave_stage(stage, outputs[-1])
        finally:
            args.max_steps, args.data_seed = saved["max_steps"], saved["data_seed"]
            loader_config.data_seed = saved["loader_seed"]
            self._active_stage = None
            self._restore_trainable()
        # each stage's TrainerState counts its own steps; what follows (evaluate, save) logs on the run's axis
        self.state.global_step = self._step_offset
        return self._combined_output(outputs)

    def _enter_stage(self, stage: Stage, max_steps: int | None) -> None:
        args = self.args
        self._active_stage = stage
        if max_steps is not None:
            args.max_steps = max_steps
        self._apply_stage_mask(stage)
        # fresh optimizer, scheduler and wrapper: the Trainer rebuilds them from the current mask
        self._release_finished_stage()
        if self.is_deepspeed_enabled:
            config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
            config.clear()
            config.update(copy.deepcopy(self._pristine_ds_config))
        self.stage_callback.begin_stage(stage)
        logger.info(
            "dt stage %d/%d (%s): %s trainable parameters, groups %s",
            stage.index + 1,
            len(self.stage_plan),
            stage.name,
            f"{stage.num_params:,}",
            list(stage.groups),
        )

    def _release_finished_stage(self) -> None:
        """Drop every reference to the finished stage's optimizer, scheduler and DDP/DeepSpeed wrapper before the
        next stage builds its own. DeepSpeed allocates fp32 master weights and Adam moments when its engine is
        built, so anything still holding the old ones (the callback handler, the accelerator's lists, the engine's
        hooks on the model and its links from every parameter: :mod:`hf_tuning.deepspeed_release`) would make each
        stage switch hold both stages' state at once, exactly where full fine-tuning has the least room."""
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        self.accelerator.free_memory()  # destroys the DeepSpeed engine and forgets what the accelerator prepared
        if wrapped is not None:
            unlink_engine(wrapped.engine, self.model)
        self.optimizer, self.lr_scheduler = None, None
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = None, None
        self.model_wrapped = self.model
        self.deepspeed = None
        gc.collect()

    def _announce_stage(self) -> None:
        """Log ``dt/stage_begin`` once per stage, from inside ``train()``: after the callbacks' ``on_train_begin``
        (where TensorBoard, W&B and the others open their run in ``output_dir``) and through the stage's own
        ``TrainerState`` (which knows whether this process is rank 0). A stage resumed mid-way logged it before."""
        stage = self._active_stage
        if stage is None or self._announced_stage == stage.index:
            return
        self._announced_stage = stage.index
        if self.state.global_step == 0:
            self.log({"dt/stage_begin": stage.index, "dt/trainable_params": stage.num_params})

    def _seed_stage_shuffle(self, stage: Stage, data_seed: int | None, loader_seed: int | None) -> None:
        """Stage k > 0 shuffles with ``data_seed + k * STAGE_SEED_STRIDE``: otherwise every stage (each a fresh
        ``train()`` that re-seeds) would replay the same batches. The samplers shuffle epoch e with
        ``seed + e``, so consecutive stage seeds would make stage k's epoch e stage 0's epoch e + k; the stride
        keeps every (stage, epoch) order distinct for any realistic epoch count. Stage 0 keeps the user's
        seeds, so ``ost`` equals plain training."""
        if stage.index == 0:
            self.args.data_seed, self.accelerator.dataloader_config.data_seed = data_seed, loader_seed
            return
        seed = (data_seed if data_seed is not None else self.args.seed) + stage.index * STAGE_SEED_STRIDE
        self.args.data_seed = self.accelerator.dataloader_config.data_seed = seed

    def _leave_stage(self, stage: Stage, output: TrainOutput) -> None:
        record = self._stage_record(stage, output)
        # logged while the stage is still the last unfinished one, so the log's global step is its end
        self.log(
            {
                "dt/stage_end": stage.index,
                **({"dt/stage_train_loss": output.training_loss} if output.training_loss is not None else {}),
                **({"dt/stage_best_metric": record.best_metric} if record.best_metric is not None else {}),
            }
        )
        self.stage_records.append(record)
        if self.args.should_save:
            self._write_stage_report(complete=stage.index == len(self.stage_plan) - 1)

    def _stage_record(self, stage: Stage, output: TrainOutput) -> StageRecord:
        """What the stage that just ended did, from its TrainerState, its output and its log entries."""
        entries = self.stage_callback.stage_entries(stage.index)
        losses = [entry["loss"] for entry in entries if "loss" in entry]
        best, metric = self.state.best_metric, self.args.metric_for_best_model
        eval_losses = [entry["eval_loss"] for entry in entries if "eval_loss" in entry]
        if best is None and eval_losses:
            best, metric = min(eval_losses), "eval_loss"
        trained_now = self.state.global_step > self._initial_global_step  # else: resumed at its end
        ends_with = "last"
        if self.args.dt_stage_init == "best":
            if self.state.best_model_checkpoint is not None:
                ends_with = "best"
            else:
                logger.warning(
                    "dt_stage_init='best' but stage %d (%s) saved no evaluated checkpoint: the next stage starts "
                    "from its last weights (recorded in %s as ends_with='last')",
                    stage.index,
                    stage.name,
                    STAGES_FILE,
                )
        return StageRecord(
            index=stage.index,
            name=stage.name,
            groups=stage.groups,
            trainable_params=stage.num_params,
            steps=self.state.global_step,
            planned_steps=self.state.max_steps,
            start_step=self._step_offset,
            final_train_loss=losses[-1] if losses else None,
            train_loss_mean=output.training_loss if trained_now else None,
            best_metric=best,
            metric_for_best_model=metric,
            best_checkpoint=self.state.best_model_checkpoint,
            runtime_s=round(self.stage_callback.runtime_s, 3),
            backward_stops_at_block=self.stage_callback.lowest_block,
            ends_with=ends_with,
        )

    def stage_report(self, complete: bool = True) -> dict[str, Any]:
        """The content of ``dt_stages.json``: the plan, the ``dt_*`` settings and the finished stages."""
        settings = {
            "budget": self.args.dt_budget,
            "stage_init": self.args.dt_stage_init,
            "num_groups": self.args.dt_num_groups,
        }
        return stage_report(self.stage_plan, settings, self.stage_records, complete=complete)

    def _write_stage_report(self, complete: bool) -> None:
        """``dt_stages.json`` and ``dt_timeline.png``, after every stage: a crash never loses the report of
        the stages already finished."""
        output_dir = Path(self.args.output_dir)
        atomic_write_json(output_dir / STAGES_FILE, self.stage_report(complete))
        try:
            plot_stage_timeline(
                self.stage_records,
                self.stage_callback.log_history,
                output_dir / TIMELINE_FILE,
                title=f"{self.stage_plan.variant} ({len(self.stage_plan)} stages)",
            )
        except Exception as err:  # a plotting failure must never cost the run
            logger.warning("could not draw %s: %s", TIMELINE_FILE, err)

    def _apply_stage_mask(self, stage: Stage) -> None:
        active = set(stage.params)
        for name, param in self.model.named_parameters():
            if name in self._candidates:
                param.requires_grad_(name in active)

    def _restore_trainable(self) -> None:
        self._backward.restore()
        for name, param in self.model.named_parameters():
            if name in self._candidates:
                param.requires_grad_(True)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        self._announce_stage()
        # Resumed from the last checkpoint of a stage: transformers would take one more step past
        # max_steps (with a constant LR that changes the weights); the stage is already complete.
        if self._active_stage is not None and 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        # Loading a PEFT checkpoint (resume, best model) may flip requires_grad on adapters;
        # the optimizer must see exactly this stage's parameters.
        if self._active_stage is not None:
            self._apply_stage_mask(self._active_stage)
        return super().create_optimizer(*args, **kwargs)

    # ---------------------------------------------------------------------------------------
    # Budgets, logging, checkpoints
    # ---------------------------------------------------------------------------------------
    def _stage_budgets(self) -> list[int | None]:
        """Optimizer steps per stage: ``None`` (the args' own budget) under ``per_stage``."""
        count = len(self.stage_plan)
        if self.args.dt_budget == "per_stage" or count == 1:
            return [None] * count
        total = self._total_steps()
        if total < count:
            raise ValueError(
                f"dt_budget='split' divides {total} optimizer steps across {count} stages; that leaves a "
                "stage with no step. Raise num_train_epochs/max_steps or use dt_budget='per_stage'"
            )
        base, extra = divmod(total, count)
        return [base + (1 if i < extra else 0) for i in range(count)]

    def _total_steps(self) -> int:
        """The optimizer steps the arguments give one ``train()`` call (num_train_epochs or max_steps)."""
        dataloader = self.get_train_dataloader()
        total = self.set_initial_training_values(self.args, dataloader)[-1]
        self.accelerator.free_memory()
        return total

    def _check_each_stage_gets_a_best_checkpoint(self) -> None:
        """``dt_stage_init='best'`` starts each stage from the previous stage's best checkpoint. Under step-based
        evaluation a stage shorter than the first step that both evaluates and saves has none, and would
        silently start the next stage from its last weights: refuse that before any training."""
        args = self.args
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "steps" or self.train_dataset is None:
            return  # epoch evaluation runs at the end of every stage, however short
        save_strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        needed = args.save_steps if save_strategy == "steps" else args.eval_steps
        if needed is None or needed < 1:
            return  # a fraction of each stage's own steps: always inside the stage
        budgets = self._stage_budgets()
        total = self._total_steps() if None in budgets else 0
        steps = [budget or total for budget in budgets]
        short = [(stage.index, n) for stage, n in zip(self.stage_plan.stages, steps, strict=True) if n < needed]
        if short:
            listed = ", ".join(f"stage {index} ({n} steps)" for index, n in short)
            raise ValueError(
                f"dt_stage_init='best' needs every stage to evaluate and save at least once, but with "
                f"{'save_steps' if save_strategy == 'steps' else 'eval_steps'}={int(needed)} the first evaluated "
                f"checkpoint comes after the end of {listed}. Lower eval_steps/save_steps (a fraction such as 0.25 "
                "is taken of each stage's steps), use eval_strategy='epoch', or dt_stage_init='last'"
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Tag logs with the stage and report a global step that runs on across stages."""
        if self._active_stage is None:
            return super().log(logs, *args, **kwargs)
        logs = {**logs, "dt/stage": self._active_stage.index}
        self.state.global_step += self._step_offset
        try:
            super().log(logs, *args, **kwargs)
        finally:
            self.state.global_step -= self._step_offset

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        if self._active_stage is None:
            return run_dir
        return os.path.join(run_dir, stage_dir_name(self._active_stage.index))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self._active_stage is None:
            return super()._save_checkpoint(model, trial)
        # The Trainer deletes older checkpoints at the end of its save (save_total_limit); here that waits
        # until this checkpoint is complete, so a crash while saving always leaves a complete one behind.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            with self._frozen_parameters_saved():
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if not self.args.should_save:
            return
        run_dir = self._get_output_dir(trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._save_checkpoint_extras(folder)
        # written last: its presence marks the checkpoint complete (find_last_staged_checkpoint)
        atomic_write_json(
            folder / STATE_FILE,
            {
                "variant": self.stage_plan.variant,
                "fingerprint": self.stage_plan.fingerprint,
                "stage_index": self._active_stage.index,
                "stage_name": self._active_stage.name,
                "completed_stages": [record.to_dict() for record in self.stage_records],
                "completed_log_history": self.stage_callback.log_history,
            },
        )
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    @contextlib.contextmanager
    def _frozen_parameters_saved(self) -> Iterator[None]:
        """DeepSpeed saves PEFT weights with ``exclude_frozen_parameters=True``: without this the checkpoint would
        hold only the current stage's adapters, not those of earlier stages."""
        frozen = []
        if self.is_deepspeed_enabled:
            frozen = [p for n, p in self.model.named_parameters() if n in self._candidates and not p.requires_grad]
        for param in frozen:
            param.requires_grad_(True)
        try:
            yield
        finally:
            for param in frozen:
                param.requires_grad_(False)

    def _save_checkpoint_extras(self, folder: Path) -> None:
        """What a subclass adds to a checkpoint (the DiT trainer's EMA); runs on the saving process before the
        checkpoint is marked complete."""

    def _resolve_resume(self, resume: str | bool | None) -> tuple[str | None, int]:
        if resume is None or resume is False:
            self.stage_records = []
            self.stage_callback.restore([])
            return None, 0
        if resume is True:
            checkpoint = find_last_staged_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(
                    f"no staged checkpoint found under {self.args.output_dir}/stage-*/checkpoint-* "
                    f"(each holds a {STATE_FILE}); nothing to resume"
                )
        else:
            checkpoint = str(resume)
        state_path = Path(checkpoint) / STATE_FILE
        if not state_path.is_file():
            folder = Path(checkpoint)
            if _CHECKPOINT_DIR.match(folder.name) and _STAGE_DIR.match(folder.parent.name):
                raise ValueError(
                    f"{checkpoint} is incomplete: it was interrupted while being saved ({STATE_FILE}, written "
                    "last, is missing). Pass resume_from_checkpoint=True to resume from the newest complete "
                    f"checkpoint ({find_last_staged_checkpoint(folder.parent.parent) or 'there is none'})"
                )
            raise ValueError(
                f"{checkpoint} is not a checkpoint of a staged run: {STATE_FILE} is missing. Resume from "
                f"{self.args.output_dir}/stage-K/checkpoint-N or pass resume_from_checkpoint=True"
            )
        saved = read_json(state_path)
        if saved["fingerprint"] != self.stage_plan.fingerprint:
            raise ValueError(
                f"{checkpoint} was written by a different stage plan ({saved['variant']}, fingerprint "
                f"{saved['fingerprint']}) than this run's ({self.stage_plan.variant}, "
                f"{self.stage_plan.fingerprint}); resume with the same dt_* arguments and model"
            )
        self.stage_records = [StageRecord.from_dict(record) for record in saved["completed_stages"]]
        self.stage_callback.restore(saved["completed_log_history"])
        logger.info("resuming staged run at stage %d from %s", saved["stage_index"], checkpoint)
        return checkpoint, int(saved["stage_index"])

    def _combined_output(self, outputs: list[TrainOutput]) -> TrainOutput:
        total_steps = self._step_offset
        weighted = [(r.train_loss_mean, r.steps) for r in self.stage_records if r.train_loss_mean is not None]
        steps = sum(s for _, s in weighted)
        loss = sum(value * n for value, n in weighted) / steps if steps else 0.0
        metrics: dict[str, Any] = dict(outputs[-1].metrics) if outputs else {}
        metrics["train_runtime"] = sum(o.metrics.get("train_runtime", 0.0) for o in outputs)
        metrics["train_loss"] = loss
        metrics["dt_stages"] = len(self.stage_plan)
        return TrainOutput(global_step=total_steps, training_loss=loss, metrics=metrics)


class StagedTrainer(StagedTrainerMixin, Trainer):
    """``transformers.Trainer`` that optimises the model's subspaces stage by stage.

    Example::

        args = StagedTrainingArguments(output_dir="out", dt_variant="dt3", num_train_epochs=3)
        trainer = StagedTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        print(trainer.stage_plan.to_dict())
        trainer.train()
    """
