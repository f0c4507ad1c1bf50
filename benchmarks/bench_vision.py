"""CPU benchmark of staged tuning on vision backbones: images/s and memory per stage against ``ost``.

In one process it trains small random-initialised timm backbones (a ViT and a Swin, fp32) on
synthetic in-memory images with ``StagedImageClassificationTrainer`` under ``ost``, ``dt1`` and ``dt3``,
in full fine-tuning and in LoRA mode, every stage for the same ``--steps`` (``dt_budget=per_stage``),
and records per stage:

* images/s over the timed steps (``on_step_begin`` .. ``on_step_end``; the first ``--warmup-steps`` of
  every stage left out) and its ratio to ``ost`` of the same backbone and mode;
* the stage's share of the trainable parameters;
* the exact bytes of the optimizer state at the stage's end, split into per-element state (AdamW's
  ``exp_avg`` / ``exp_avg_sq``) and the rest (the scalar ``step`` tensors), with their ratios to ``ost``;
* the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` at the stage's start) and its rise
  above the RSS at the start of the run, with ratios to ``ost``; the run's own peak (model build
  included) beside it.

What the paper leads one to expect, and the report checks: in full fine-tuning the optimizer state
of a stage is proportional to its parameter share, and later ``dt1`` stages run faster, because
backward stops at the lowest block the stage trains.

The speed of a shared virtual machine drifts, so per backbone and mode the variants run in the
palindromic order ost, dt1, dt3, dt3, dt1, ost (``--repeats 2``); pooling both repetitions of a variant
cancels drift that is linear in time, as in ``bench_engine.py`` (whose measurement helpers this script
imports). Results: ``<output-dir>/bench_vision_cpu.json`` and ``<output-dir>/bench_vision_cpu.md``.

Usage::

    .venv/bin/python benchmarks/bench_vision.py                  # ~5-6 min on 2 idle cores (see below)
    .venv/bin/python benchmarks/bench_vision.py --wait-idle 600  # start once other processes are idle
    .venv/bin/python benchmarks/bench_vision.py --quick          # smoke test: tiny models, 3 steps (~40 s)

Expected full-run time (24 runs, 56 stages, 672 steps of batch 32): a timing sample at full size with
one torch thread, on this repository's 2-core Xeon while another job kept the other core busy, gave
~0.9 s per ViT step and ~0.4 s per Swin step for ost (dt1 stages ~30% less), i.e. ~6.5 min of steps,
plus ~0.3 s of set-up per stage (mostly the timeline PNG the staged trainer draws after every stage) and
~30 s of imports and warm-up: ~7 min on one core, ~5-6 min with both cores idle. With the cores busy with other
work two torch threads can be many times slower than one (they wait on each other): use ``--wait-idle``,
or ``--threads 1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from benchmarks.bench_engine import (  # noqa: E402
    CONTENDED_CORES,
    MIB,
    CpuSample,
    peak_rss,
    ratio_ci,
    reset_peak_rss,
    timing_stats,
    wait_for_idle,
)
from benchmarks.bench_sft import schedule  # noqa: E402
from hf_tuning import StagedTrainingArguments  # noqa: E402
from hf_tuning.io import atomic_write_json, atomic_write_text  # noqa: E402
from hf_tuning.stages import StagePlan  # noqa: E402
from hf_tuning.vision import (  # noqa: E402
    StagedImageClassificationTrainer,
    VisionModelArguments,
    VisionTuningArguments,
    load_vision_model,
    prepare_for_tuning,
)

RESULT_STEM = "bench_vision_cpu"
MODES = ("full", "lora")
VARIANTS = ("ost", "dt1", "dt3")


@dataclass(frozen=True)
class ArchSpec:
    """A timm architecture and the ``create_model`` overrides that make it CPU-sized."""

    timm_name: str
    kwargs: dict[str, Any]
    quick_kwargs: dict[str, Any]

    def model_kwargs(self, quick: bool) -> dict[str, Any]:
        return dict(self.quick_kwargs if quick else self.kwargs)


# ViT-Ti (192 wide, 12 blocks) on 32x32 images in 4x4 patches; Swin-T's (2, 2, 6, 2) layout at half width
# (48) on 64x64 images with 4x4 windows. Quick: a few blocks, 16-32 wide, for a smoke test
ARCHS: dict[str, ArchSpec] = {
    "vit": ArchSpec(
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3},
        {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2},
    ),
    "swin": ArchSpec(
        "swin_tiny_patch4_window7_224",
        {"img_size": 64, "window_size": 4, "embed_dim": 48, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
        {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4)},
    ),
}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class VisionBenchSettings:
    """Everything that defines a benchmark run (stored with the results)."""

    steps: int = 12
    warmup_steps: int = 2
    batch_size: int = 32
    repeats: int = 2
    archs: tuple[str, ...] = tuple(ARCHS)
    modes: tuple[str, ...] = MODES
    variants: tuple[str, ...] = VARIANTS
    num_classes: int = 10
    lora_rank: int = 8
    learning_rate: float = 1e-4
    seed: int = 0
    threads: int = 0
    output_dir: str = "benchmarks/results"
    quick: bool = False
    wait_idle_s: float = 0.0


def _choices(p: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not chosen or any(x not in allowed for x in chosen):
        p.error(f"{flag} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return chosen


def parse_args(argv: list[str] | None = None) -> VisionBenchSettings:
    """Command line -> :class:`VisionBenchSettings`; ``--quick`` shrinks models, batch and steps."""
    d = VisionBenchSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per stage (default {d.steps})")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help=f"steps per stage not timed (default {d.warmup_steps})"
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"images per step (default {d.batch_size})")
    p.add_argument("--repeats", type=int, default=d.repeats, help="runs per variant, in palindromic order (default 2)")
    p.add_argument("--archs", default=",".join(d.archs), help="comma-separated subset of vit,swin")
    p.add_argument("--modes", default=",".join(d.modes), help="comma-separated subset of full,lora")
    p.add_argument("--variants", default=",".join(d.variants), help="comma-separated subset of ost,dt1,dt3 (with ost)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: usable cores)")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--quick", action="store_true", help="tiny models, batch 8, 3 steps per stage: a smoke test")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other processes to leave the CPUs idle before starting",
    )
    ns = p.parse_args(argv)
    variants = _choices(p, "--variants", ns.variants, VARIANTS)
    if "ost" not in variants:
        p.error("--variants must include ost: every ratio is taken against it")
    quick = (3, 1, 8) if ns.quick else (d.steps, d.warmup_steps, d.batch_size)
    s = VisionBenchSettings(
        steps=quick[0] if ns.steps is None else ns.steps,
        warmup_steps=quick[1] if ns.warmup_steps is None else ns.warmup_steps,
        batch_size=quick[2] if ns.batch_size is None else ns.batch_size,
        repeats=ns.repeats,
        archs=_choices(p, "--archs", ns.archs, tuple(ARCHS)),
        modes=_choices(p, "--modes", ns.modes, MODES),
        variants=variants,
        lora_rank=ns.lora_rank,
        learning_rate=ns.learning_rate,
        seed=ns.seed,
        threads=ns.threads,
        output_dir=ns.output_dir,
        quick=ns.quick,
        wait_idle_s=ns.wait_idle,
    )
    if s.steps <= s.warmup_steps or s.warmup_steps < 0:
        p.error("--steps must exceed --warmup-steps (>= 0), or no step would be timed")
    if s.repeats < 1 or s.batch_size < 1:
        p.error("--repeats and --batch-size must be >= 1")
    return s


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------
class SyntheticImages(Dataset):
    """Seeded random images and labels held in memory, so data loading costs next to nothing."""

    def __init__(self, count: int, size: int, num_classes: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, size, size, generator=generator)
        self.labels = torch.randint(0, num_classes, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.images[index], "labels": int(self.labels[index])}


def build_dataset(s: VisionBenchSettings, arch: str, quick: bool | None = None) -> SyntheticImages:
    """Exactly one epoch per stage, so no stage crosses an epoch boundary."""
    size = ARCHS[arch].model_kwargs(s.quick if quick is None else quick)["img_size"]
    return SyntheticImages(s.batch_size * s.steps, size, s.num_classes, s.seed)


def build_model(s: VisionBenchSettings, arch: str, mode: str, quick: bool | None = None) -> torch.nn.Module:
    """A random-initialised fp32 backbone with the mode's parameters trainable; same seed, same weights."""
    spec = ARCHS[arch]
    torch.manual_seed(s.seed)
    args = VisionModelArguments(
        model_name_or_path=spec.timm_name, model_kwargs=spec.model_kwargs(s.quick if quick is None else quick)
    )
    model = load_vision_model(args, s.num_classes).float()
    tuning = VisionTuningArguments(tuning_mode=mode, lora_r=s.lora_rank, lora_alpha=2 * s.lora_rank)
    return prepare_for_tuning(model, tuning)


def training_args(s: VisionBenchSettings, variant: str, output_dir: str) -> StagedTrainingArguments:
    return StagedTrainingArguments(
        output_dir=output_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=s.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        use_cpu=True,
        seed=s.seed,
        dataloader_num_workers=0,
        dt_variant=variant,
        dt_budget="per_stage",
    )


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def optimizer_state_breakdown(optimizer: Any) -> dict[str, Any]:
    """Bytes of every tensor in ``optimizer.state``, split into per-element state (a tensor shaped like its
    parameter: ``exp_avg``, ``exp_avg_sq``) and the rest (``step`` scalars), which is not proportional to size."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    total = per_element = tensors = 0
    for param, per_param in inner.state.items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                total += value.nbytes
                tensors += 1
                if key != "step" and value.shape == param.shape:
                    per_element += value.nbytes
    return {
        "optimizer_state_bytes": total,
        "optimizer_moment_bytes": per_element,
        "optimizer_other_bytes": total - per_element,
        "optimizer_state_tensors": tensors,
        "optimizer_params_with_state": len(inner.state),
        "optimizer_param_numel": sum(p.numel() for group in inner.param_groups for p in group["params"]),
        "optimizer_class": type(inner).__name__,
    }


def _stage_blocks(plan: StagePlan, groups: tuple[str, ...]) -> str:
    """What a stage trains, in words: its groups' blocks (the head trains in every stage)."""
    if plan.partition is None:
        return "all"
    blocks = {g.name: g.blocks for g in plan.partition.groups}
    return "; ".join(str(blocks.get(g, g)) for g in groups)


@dataclass
class StageMeasure:
    """What one stage (one ``Trainer.train()`` phase) did."""

    index: int
    name: str
    trains: str
    trainable_params: int
    requires_grad_params: int
    rss_begin_bytes: int
    step_times_s: list[float] = field(default_factory=list)
    step_foreign_cores: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)


class VisionBenchCallback(TrainerCallback):
    """Times every optimizer step, reads the optimizer state at each stage's end and the stage's peak RSS.

    The RSS high-water mark is reset when a stage starts, so a stage's peak is its own; the run's peak
    is the highest of the stage peaks and the peak before the first stage (model build, trainer set-up).
    """

    def __init__(self, plan: StagePlan) -> None:
        self.plan = plan
        self.stages: list[StageMeasure] = []
        self.run_peak = 0
        self._t0 = 0.0
        self._cpu0: CpuSample | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.run_peak = max(self.run_peak, peak_rss())
        rss = reset_peak_rss()
        stage = self.plan.stages[len(self.stages)]  # stages run in plan order (no resume here)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else -1
        self.stages.append(
            StageMeasure(
                stage.index, stage.name, _stage_blocks(self.plan, stage.groups), stage.num_params, trainable, rss
            )
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu0 = CpuSample.now()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._t0
        self.stages[-1].step_times_s.append(elapsed)
        self.stages[-1].step_foreign_cores.append(self._cpu0.foreign_cores(CpuSample.now())[0])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.stages:
            self.stages[-1].losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        record = self.stages[-1]
        record.peak_rss_bytes = peak_rss()
        self.run_peak = max(self.run_peak, record.peak_rss_bytes)
        if optimizer is not None:
            record.optimizer = optimizer_state_breakdown(optimizer)


def run_one(
    s: VisionBenchSettings,
    arch: str,
    mode: str,
    variant: str,
    dataset: Dataset,
    rep: int = 1,
    quick: bool | None = None,
) -> dict[str, Any]:
    """Train one configuration (repetition ``rep``) from a freshly seeded model; returns its measurements."""
    baseline = reset_peak_rss()
    started = time.perf_counter()
    cpu_start = CpuSample.now()
    with tempfile.TemporaryDirectory(prefix=f"bench-vision-{arch}-{mode}-{variant}-{rep}-") as out:
        model = build_model(s, arch, mode, quick)
        total_params = sum(p.numel() for p in model.parameters())
        candidates = sum(p.numel() for p in model.parameters() if p.requires_grad)
        torch.manual_seed(s.seed)
        trainer = StagedImageClassificationTrainer(
            model=model, args=training_args(s, variant, out), train_dataset=dataset
        )
        callback = VisionBenchCallback(trainer.stage_plan)
        trainer.add_callback(callback)
        plan = trainer.stage_plan.to_dict()
        trainer.train()
        run_peak = max(callback.run_peak, peak_rss())
        others, steal = cpu_start.foreign_cores(CpuSample.now())
        wall = time.perf_counter() - started
        del trainer, model
    after = reset_peak_rss()
    w = s.warmup_steps
    stages = []
    for measure in callback.stages:
        record = asdict(measure)
        optimizer = record.pop("optimizer")
        record.update(optimizer)
        record["share"] = measure.trainable_params / candidates
        record.update(timing_stats(measure.step_times_s[w:], measure.step_foreign_cores[w:]))
        record["images_per_s"] = s.batch_size / record["mean_step_s"]
        record["peak_rss_delta_bytes"] = measure.peak_rss_bytes - baseline
        stages.append(record)
    timed = timing_stats(
        [t for m in callback.stages for t in m.step_times_s[w:]],
        [f for m in callback.stages for f in m.step_foreign_cores[w:]],
    )
    return {
        "arch": arch,
        "mode": mode,
        "variant": variant,
        "rep": rep,
        "model_params": total_params,
        "trainable_params": candidates,
        "stages": stages,
        **timed,
        "images_per_s": s.batch_size / timed["mean_step_s"],
        "wall_s": wall,
        "non_step_s": wall - sum(t for m in callback.stages for t in m.step_times_s),
        "rss_before_bytes": baseline,
        "peak_rss_bytes": run_peak,
        "peak_rss_delta_bytes": run_peak - baseline,
        "rss_after_bytes": after,
        "foreign_cpu_cores": others,
        "steal_cpu_cores": steal,
        "final_loss": callback.stages[-1].losses[-1] if callback.stages[-1].losses else None,
        "plan": plan,
    }


def park_heap() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``).

    Each ``gc.collect()`` (the staged trainer and accelerate run two per stage, ``reset_peak_rss`` one) would
    otherwise walk the ~10^6 objects of torch, transformers and timm, ~0.4 s each, and an automatic full
    collection inside a timed step would distort it. Models and trainers built later are collected as usual.
    """
    gc.collect()
    gc.freeze()


def warm_up(s: VisionBenchSettings) -> None:
    """A two-step dt3 run per mode of the first backbone at quick size, so lazy imports (peft, matplotlib),
    thread pools and one-off allocations are paid before anything is measured (shape-specific first-call
    costs are what each stage's untimed warm-up steps are for)."""
    tiny = VisionBenchSettings(steps=2, warmup_steps=0, batch_size=4, seed=s.seed, lora_rank=s.lora_rank)
    data = build_dataset(tiny, s.archs[0], quick=True)
    for mode in s.modes:
        run_one(tiny, s.archs[0], mode, "dt3", data, quick=True)


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------
def _pool(runs: list[dict[str, Any]], key: str, w: int, stage: int | None = None) -> list[float]:
    """The timed values (``step_times_s`` or ``step_foreign_cores``) of ``runs``, warm-up steps left out."""
    return [x for r in runs for st in r["stages"] if stage is None or st["index"] == stage for x in st[key][w:]]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mean_paired(values: list[tuple[float, float]]) -> float:
    """Mean of a / b over (a, b) pairs of the same repetition."""
    return statistics.fmean(a / b for a, b in values)


def analyse_group(s: VisionBenchSettings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and stage of one backbone and mode: pooled images/s and every ratio to ``ost``.

    Speed ratios come from the timed steps of all repetitions pooled (drift cancels by the palindromic
    order), with a delta-method 95% interval; memory ratios are the mean of the per-repetition ratios to
    ``ost``'s run of the same repetition. Optimizer bytes are read from repetition 1 (flagged if the
    repetitions differ).
    """
    w, batch = s.warmup_steps, s.batch_size
    reps = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["rep"]) for v in s.variants}
    ost_runs = reps["ost"]
    ost_by_rep = {r["rep"]: r for r in ost_runs}
    ost_times = _pool(ost_runs, "step_times_s", w)
    ost_stats = timing_stats(ost_times, _pool(ost_runs, "step_foreign_cores", w))
    ost_stage = ost_runs[0]["stages"][0]
    ost_opt, ost_moments = ost_stage["optimizer_state_bytes"], ost_stage["optimizer_moment_bytes"]
    ost_stage_of = {r["rep"]: r["stages"][0] for r in ost_runs}

    def speed(times: list[float], foreign: list[float]) -> dict[str, Any]:
        stats = timing_stats(times, foreign)
        ci = ratio_ci(ost_times, times)  # mean(ost step) / mean(step) = images/s ratio
        return {
            **stats,
            "images_per_s": batch / stats["mean_step_s"],
            "images_per_s_ratio": ost_stats["mean_step_s"] / stats["mean_step_s"],
            "images_per_s_ratio_ci95": ci,
            "clean_images_per_s_ratio": _ratio(ost_stats["clean_mean_step_s"], stats["clean_mean_step_s"]),
        }

    variants: dict[str, Any] = {}
    for variant, rs in reps.items():
        v: dict[str, Any] = {"variant": variant, "reps": [r["rep"] for r in rs]}
        v.update(speed(_pool(rs, "step_times_s", w), _pool(rs, "step_foreign_cores", w)))
        v.update(
            {
                "paired_images_per_s_ratios": [ost_by_rep[r["rep"]]["mean_step_s"] / r["mean_step_s"] for r in rs],
                "rep_spread_step": _ratio(rs[-1]["mean_step_s"], rs[0]["mean_step_s"]),
                "peak_rss_bytes": [r["peak_rss_bytes"] for r in rs],
                "peak_rss_ratio": _mean_paired(
                    [(r["peak_rss_bytes"], ost_by_rep[r["rep"]]["peak_rss_bytes"]) for r in rs]
                ),
                "peak_rss_delta_bytes": [r["peak_rss_delta_bytes"] for r in rs],
                "peak_rss_delta_ratio": _mean_paired(
                    [(r["peak_rss_delta_bytes"], ost_by_rep[r["rep"]]["peak_rss_delta_bytes"]) for r in rs]
                ),
                "final_loss": [r["final_loss"] for r in rs],
                "foreign_cpu_cores": [r["foreign_cpu_cores"] for r in rs],
            }
        )
        stages = []
        for first in rs[0]["stages"]:
            k = first["index"]
            per_rep = [next(st for st in r["stages"] if st["index"] == k) for r in rs]
            st = {key: first[key] for key in ("index", "name", "trains", "trainable_params", "share")}
            st.update(speed(_pool(rs, "step_times_s", w, stage=k), _pool(rs, "step_foreign_cores", w, stage=k)))
            peaks = [(x["peak_rss_bytes"], ost_stage_of[r["rep"]]["peak_rss_bytes"]) for x, r in zip(per_rep, rs)]
            deltas = [
                (x["peak_rss_delta_bytes"], ost_stage_of[r["rep"]]["peak_rss_delta_bytes"]) for x, r in zip(per_rep, rs)
            ]
            moment_ratio = first["optimizer_moment_bytes"] / ost_moments
            st.update(
                {
                    "optimizer_state_bytes": first["optimizer_state_bytes"],
                    "optimizer_moment_bytes": first["optimizer_moment_bytes"],
                    "optimizer_other_bytes": first["optimizer_other_bytes"],
                    "optimizer_class": first["optimizer_class"],
                    "optimizer_state_same_in_reps": len({x["optimizer_state_bytes"] for x in per_rep}) == 1,
                    "optimizer_ratio": first["optimizer_state_bytes"] / ost_opt,
                    "optimizer_moment_ratio": moment_ratio,
                    "optimizer_moment_ratio_vs_share_error": abs(moment_ratio - first["share"]) / first["share"],
                    "optimizer_bytes_per_param": first["optimizer_state_bytes"] / first["trainable_params"],
                    "peak_rss_bytes": [x["peak_rss_bytes"] for x in per_rep],
                    "peak_rss_ratio": _mean_paired(peaks),
                    "peak_rss_delta_bytes": [x["peak_rss_delta_bytes"] for x in per_rep],
                    "peak_rss_delta_ratio": _mean_paired(deltas),
                }
            )
            stages.append(st)
        v["stages"] = stages
        variants[variant] = v
    first_run = ost_runs[0]
    return {
        "model_params": first_run["model_params"],
        "trainable_params": first_run["trainable_params"],
        "ost_images_per_s": batch / ost_stats["mean_step_s"],
        "ost_optimizer_state_bytes": ost_opt,
        "variants": variants,
    }


def analyse(s: VisionBenchSettings, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``summary[arch][mode]`` from :func:`analyse_group`."""
    return {
        arch: {mode: analyse_group(s, [r for r in runs if r["arch"] == arch and r["mode"] == mode]) for mode in s.modes}
        for arch in s.archs
    }


def _series(values: list[float], digits: int = 3) -> str:
    return "/".join(f"{v:.{digits}f}" for v in values)


def _dt1_speed_sentence(stages: list[dict[str, Any]]) -> str:
    """Whether dt1's images/s ratio rises stage by stage; a dip whose 95% intervals overlap is called noise."""
    ratios = [st["images_per_s_ratio"] for st in stages]
    text = f"dt1 images/s / ost per stage = {_series(ratios, 2)}"
    dips = []
    for before, after in zip(stages, stages[1:]):
        if after["images_per_s_ratio"] < before["images_per_s_ratio"]:
            a, b = before["images_per_s_ratio_ci95"], after["images_per_s_ratio_ci95"]
            overlap = a is not None and b is not None and b[1] >= a[0]
            dips.append(f"stage {after['index']} below stage {before['index']}{' within noise' if overlap else ''}")
    if not dips:
        text += ", rising stage by stage as expected (backward stops at the active stage)"
    else:
        text += f", not rising at every stage ({', '.join(dips)}; expected: later stages faster)"
    return text + f"; last / first stage {ratios[-1] / ratios[0]:.2f}x"


def expected_vs_measured(s: VisionBenchSettings, summary: dict[str, Any]) -> list[str]:
    """One sentence per backbone and mode: optimizer bytes against parameter share, and whether the
    dt1 stages speed up stage by stage as backward gets shorter."""
    lines = []
    for arch, per_mode in summary.items():
        for mode, info in per_mode.items():
            variants = info["variants"]
            parts = []
            for name in (v for v in s.variants if v != "ost"):
                stages = variants[name]["stages"]
                worst = max(st["optimizer_moment_ratio_vs_share_error"] for st in stages)
                parts.append(
                    f"{name} optimizer bytes / ost = {_series([st['optimizer_ratio'] for st in stages])} vs parameter "
                    f"share {_series([st['share'] for st in stages])} (exp_avg/exp_avg_sq bytes alone: worst relative "
                    f"deviation {worst:.1e})"
                )
            if "dt1" in variants:
                parts.append(_dt1_speed_sentence(variants["dt1"]["stages"]))
            others = [name for name in s.variants if name != "ost"]
            if others:
                peaks = ", ".join(f"{name} {variants[name]['peak_rss_delta_ratio']:.2f}" for name in others)
                parts.append(f"run peak RSS above start / ost: {peaks}")
            lines.append(f"* **{arch} {mode}**: " + "; ".join(parts) + ".")
    return lines


# ---------------------------------------------------------------------------------------------
# Machine and report
# ---------------------------------------------------------------------------------------------
def _read_commit() -> str | None:
    """The checked-out commit, read from ``.git`` directly (no git process is started)."""
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text(encoding="utf-8").split(":", 1)[1].strip())
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        common = git / "commondir"
        base = (git / common.read_text(encoding="utf-8").strip()).resolve() if common.is_file() else git
        for folder in (git, base):
            if (folder / ref).is_file():
                return (folder / ref).read_text(encoding="utf-8").strip()[:12]
        packed = base / "packed-refs"
        for line in packed.read_text(encoding="utf-8").splitlines() if packed.is_file() else []:
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except (OSError, IndexError):
        return None
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and library versions, so results from different machines are told apart."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as handle:
        total_kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    return {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_online": os.cpu_count(),
        "ram_gib": round(total_kib / MIB, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": _read_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: tuple[float, float] | list[float] | None) -> str:
    return "" if interval is None else f" ({interval[0]:.2f}-{interval[1]:.2f})"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, one table per backbone and mode, runs, expected vs measured."""
    s, machine, runs, summary = report["settings"], report["machine"], report["runs"], report["summary"]
    settings = VisionBenchSettings(**{**s, **{k: tuple(s[k]) for k in ("archs", "modes", "variants")}})
    order = ", ".join(v for v, _ in schedule(settings.variants, settings.repeats))
    lines = [
        "# Staged tuning of vision backbones (CPU)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores_usable']} usable cores ({machine['torch_threads']} torch threads), "
        f"{machine['ram_gib']} GiB RAM; Python {machine['python']}, torch {machine['torch']}, timm {machine['timm']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}; {machine['date']}; commit "
        f"{machine['commit'] or 'unknown'}.",
        "",
        f"Set-up: random-init timm backbones, fp32, synthetic images ({s['num_classes']} classes), batch "
        f"{s['batch_size']}, AdamW (default `optim`), constant LR {s['learning_rate']}, LoRA r={s['lora_rank']} on "
        f"every block projection; the modules after the last block that `prepare_for_tuning` leaves trainable "
        f"(head, final norm) train in every stage. Every stage runs {s['steps']} steps (`dt_budget=per_stage`); "
        f"the first {s['warmup_steps']} step(s) of every stage are not timed. "
        f"Per backbone and mode the runs go in the order {order}, each from a freshly seeded model, after a "
        f"warm-up at tiny size. Total wall time {report['total_wall_s']:.0f} s"
        f"{' (quick mode: tiny models, numbers only show that the script works)' if s['quick'] else ''}.",
        "",
    ]
    for arch, spec in report["archs"].items():
        lines.append(f"* {arch}: `{spec['timm_name']}` with {spec['model_kwargs']}")
    lines += [
        "",
        "Columns: *share* = the stage's trainable parameters / all trainable parameters (ost's); *img/s* over the "
        "timed steps of all repetitions, with the ratio to ost (95% delta-method interval); *optimizer* = bytes of "
        "every tensor in the optimizer state at the stage's end, and its ratio to ost's; *peak RSS* = VmHWM since "
        "the stage's start (reset through clear_refs), *Δ* = that peak minus the RSS at the start of the run, "
        "both as the mean of the per-repetition ratios to ost.",
        "",
    ]
    busy = [r for r in runs if r["foreign_cpu_cores"] > CONTENDED_CORES]
    if busy or report["foreign_cpu_cores_at_start"] > CONTENDED_CORES:
        worst = max([r["foreign_cpu_cores"] for r in runs] + [report["foreign_cpu_cores_at_start"]])
        lines += [
            f"**Warning:** other processes used the CPUs during {len(busy)} of {len(runs)} runs (up to {worst:.2f} "
            "cores on average); the speed ratios are noisy (see the uncontended ratios in the JSON).",
            "",
        ]
    for arch, per_mode in summary.items():
        for mode, info in per_mode.items():
            kind = "LoRA" if mode == "lora" else "full fine-tuning"
            lines += [
                f"## {arch} - {kind} ({_params(info['model_params'])} parameters, "
                f"{_params(info['trainable_params'])} trainable; ost {info['ost_images_per_s']:.1f} img/s)",
                "",
                "| variant | stage | trains | share | img/s | img/s / ost | optimizer (MiB) | optimizer / ost "
                "| peak RSS (MiB) | peak RSS / ost | Δ peak / ost |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for name, v in info["variants"].items():
                for st in v["stages"]:
                    same = "" if st["optimizer_state_same_in_reps"] else " (differs between reps)"
                    lines.append(
                        f"| {name} | {st['index']} {st['name']} | {st['trains']} | {st['share']:.3f} "
                        f"| {st['images_per_s']:.1f} | {st['images_per_s_ratio']:.2f}{_ci(st['images_per_s_ratio_ci95'])} "
                        f"| {_mib(st['optimizer_state_bytes'])}{same} | {st['optimizer_ratio']:.3f} "
                        f"| {_mib(statistics.fmean(st['peak_rss_bytes']))} | {st['peak_rss_ratio']:.3f} "
                        f"| {st['peak_rss_delta_ratio']:.3f} |"
                    )
            lines += [
                "",
                "| variant | img/s (all stages) | img/s / ost | per repetition | rep 2 / rep 1 step | run peak RSS (MiB) "
                "| run peak / ost | run Δ peak / ost |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for name, v in info["variants"].items():
                lines.append(
                    f"| {name} | {v['images_per_s']:.1f} | {v['images_per_s_ratio']:.2f}{_ci(v['images_per_s_ratio_ci95'])} "
                    f"| {', '.join(f'{x:.2f}' for x in v['paired_images_per_s_ratios'])} | {_num(v['rep_spread_step'])} "
                    f"| {', '.join(_mib(x) for x in v['peak_rss_bytes'])} | {v['peak_rss_ratio']:.3f} "
                    f"| {v['peak_rss_delta_ratio']:.3f} |"
                )
            lines.append("")
    lines += [
        "## Runs in execution order",
        "",
        "| backbone | mode | variant | rep | start (s) | stages | img/s | mean step (s) | stdev (s) | n "
        "| peak RSS (MiB) | Δ (MiB) | final loss | non-step (s) | other procs | steal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r['variant']} | {r['rep']} | {r['start_s']:.0f} | {len(r['stages'])} "
            f"| {r['images_per_s']:.1f} | {r['mean_step_s']:.3f} | {r['stdev_step_s']:.3f} | {r['timed_steps']} "
            f"| {_mib(r['peak_rss_bytes'])} | {_mib(r['peak_rss_delta_bytes'])} | {_num(r['final_loss'], 4)} "
            f"| {r['non_step_s']:.1f} | {r['foreign_cpu_cores']:.2f} | {r['steal_cpu_cores']:.2f} |"
        )
    lines += [
        "",
        "## Expected vs measured",
        "",
        "Expected: in full fine-tuning the optimizer state of a stage is proportional to its parameter share "
        "(AdamW keeps two fp32 tensors per parameter, plus a 4-byte step scalar per tensor); later dt1 stages "
        "run faster, since backward stops at the lowest block the stage trains.",
        "",
        *report["expected_vs_measured"],
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = parse_args(argv)
    previous_threads = torch.get_num_threads()
    s.threads = s.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(s.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    command = " ".join(shlex.quote(a) for a in [sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    try:
        foreign_at_start = wait_for_idle(s.wait_idle_s) if s.wait_idle_s > 0 else 0.0
        if foreign_at_start > 0.15:
            print(f"[bench] WARNING: other processes use {foreign_at_start:.2f} cores; timings will be noisy")
        started = time.perf_counter()
        park_heap()
        print(f"[bench] warm-up ({s.threads} threads)", flush=True)
        warm_up(s)
        park_heap()  # what the warm-up imported lazily (peft, matplotlib)
        runs = []
        for arch in s.archs:
            dataset = build_dataset(s, arch)
            for mode in s.modes:
                for variant, rep in schedule(s.variants, s.repeats):
                    t0 = time.perf_counter()
                    run = run_one(s, arch, mode, variant, dataset, rep=rep)
                    run["start_s"] = t0 - started
                    runs.append(run)
                    print(
                        f"[bench] {arch:4s} {mode:4s} {variant} rep {rep}: {run['images_per_s']:.1f} img/s, peak RSS "
                        f"{_mib(run['peak_rss_bytes'])} MiB, other processes {run['foreign_cpu_cores']:.2f} cores "
                        f"({time.perf_counter() - t0:.0f}s)",
                        flush=True,
                    )
        summary = analyse(s, runs)
        report = {
            "command": command,
            "settings": asdict(s),
            "machine": machine_info(),
            "archs": {
                arch: {"timm_name": ARCHS[arch].timm_name, "model_kwargs": ARCHS[arch].model_kwargs(s.quick)}
                for arch in s.archs
            },
            "schedule": [list(x) for x in schedule(s.variants, s.repeats)],
            "foreign_cpu_cores_at_start": foreign_at_start,
            "runs": runs,
            "summary": summary,
            "expected_vs_measured": expected_vs_measured(s, summary),
            "total_wall_s": time.perf_counter() - started,
        }
    finally:
        gc.unfreeze()
        torch.set_num_threads(previous_threads)
    out = Path(s.output_dir)
    atomic_write_json(out / f"{RESULT_STEM}.json", report)
    markdown = render_markdown(report)
    atomic_write_text(out / f"{RESULT_STEM}.md", markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
