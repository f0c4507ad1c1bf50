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
cancels drift that is linear in time (the shared measurement and statistics helpers are in
``benchmarks/harness.py``). Results: ``<output-dir>/bench_vision_cpu.json`` and ``<output-dir>/bench_vision_cpu.md``.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_vision                  # ~5-6 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_vision --wait-idle 600  # start once others are idle
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_vision --quick          # smoke test: tiny models (~40 s)

Expected full-run time (24 runs, 56 stages, 672 steps of batch 32): a timing sample at full size with
one torch thread, on this repository's 2-core Xeon while another job kept the other core busy, gave
~0.9 s per ViT step and ~0.4 s per Swin step for ost (dt1 stages ~30% less), i.e. ~6.5 min of steps,
plus ~0.3 s of set-up per stage (mostly the timeline PNG the staged trainer draws after every stage) and
~30 s of imports and warm-up: ~7 min on one core, ~5-6 min with both cores idle. With the cores busy with other
work two torch threads can be many times slower than one (they wait on each other): use ``--wait-idle``,
or ``--threads 1`` on a shared machine.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from benchmarks import harness
from hf_tuning import StagedTrainingArguments
from hf_tuning.stages import StagePlan
from hf_tuning.vision import (
    StagedImageClassificationTrainer,
    VisionModelArguments,
    VisionTuningArguments,
    load_vision_model,
    prepare_for_tuning,
)

RESULT_STEM = "bench_vision_cpu"
LIBRARIES = ("torch", "timm", "transformers", "peft")
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
class VisionBenchSettings(harness.BenchmarkSettings):
    """Everything that defines a benchmark run (stored with the results); ``--quick`` shrinks models, batch
    and steps (where not given)."""

    steps: int | None = field(default=None, metadata={"help": "optimizer steps per stage (default 12; quick 3)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "steps per stage not timed (default 2; quick 1)"})
    batch_size: int | None = field(default=None, metadata={"help": "images per step (default 32; quick 8)"})
    repeats: int = field(default=2, metadata={"help": "runs per variant, in palindromic order"})
    archs: list[str] = field(
        default_factory=lambda: list(ARCHS), metadata={"help": "comma-separated subset of vit,swin"}
    )
    modes: list[str] = field(
        default_factory=lambda: list(MODES), metadata={"help": "comma-separated subset of full,lora"}
    )
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": "comma-separated subset of ost,dt1,dt3 (with ost)"}
    )
    num_classes: int = 10
    lora_rank: int = 8
    learning_rate: float = 1e-4
    quick: bool = field(default=False, metadata={"help": "tiny models, batch 8, 3 steps per stage: a smoke test"})

    def __post_init__(self) -> None:
        steps, warmup, batch = (3, 1, 8) if self.quick else (12, 2, 32)
        self.steps = steps if self.steps is None else self.steps
        self.warmup_steps = warmup if self.warmup_steps is None else self.warmup_steps
        self.batch_size = batch if self.batch_size is None else self.batch_size
        self.archs = harness.comma_list(self.archs, tuple(ARCHS), "--archs")
        self.modes = harness.comma_list(self.modes, MODES, "--modes")
        self.variants = harness.comma_list(self.variants, VARIANTS, "--variants")
        if "ost" not in self.variants:
            raise ValueError("--variants must include ost: every ratio is taken against it")
        if self.steps <= self.warmup_steps or self.warmup_steps < 0:
            raise ValueError("--steps must exceed --warmup-steps (>= 0), or no step would be timed")
        if self.repeats < 1 or self.batch_size < 1:
            raise ValueError("--repeats and --batch-size must be >= 1")


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
        **harness.trainer_kwargs(s, output_dir, s.steps, lr_scheduler_type="constant", warmup_steps=0),
        dt_variant=variant,
        dt_budget="per_stage",
    )


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
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


class VisionBenchCallback(harness.StepTimer):
    """Times every optimizer step, reads the optimizer state at each stage's end and the stage's peak RSS.

    The RSS high-water mark is reset when a stage starts, so a stage's peak is its own; the run's peak
    is the highest of the stage peaks and the peak before the first stage (model build, trainer set-up).
    """

    def __init__(self, plan: StagePlan) -> None:
        super().__init__()
        self.plan = plan
        self.stages: list[StageMeasure] = []
        self.run_peak = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.run_peak = max(self.run_peak, harness.peak_rss())
        rss = harness.reset_peak_rss()
        stage = self.plan.stages[len(self.stages)]  # stages run in plan order (no resume here)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else -1
        self.stages.append(
            StageMeasure(
                stage.index, stage.name, _stage_blocks(self.plan, stage.groups), stage.num_params, trainable, rss
            )
        )

    def step_timed(self, seconds: float, other_cores: float, steal_cores: float) -> None:
        self.stages[-1].step_times_s.append(seconds)
        self.stages[-1].step_foreign_cores.append(other_cores)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.stages:
            self.stages[-1].losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        record = self.stages[-1]
        record.peak_rss_bytes = harness.peak_rss()
        self.run_peak = max(self.run_peak, record.peak_rss_bytes)
        if optimizer is not None:
            record.optimizer = harness.optimizer_state(optimizer)


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
    meter = harness.RunMeter().start()
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
        meter.stop()
        run_peak = max(callback.run_peak, meter.peak_rss_bytes)
        del trainer, model
    after = harness.reset_peak_rss()
    baseline = meter.rss_before_bytes
    w = s.warmup_steps
    stages = []
    for measure in callback.stages:
        record = asdict(measure)
        optimizer = record.pop("optimizer")
        record.update(optimizer)
        record["share"] = measure.trainable_params / candidates
        record.update(harness.timing_stats(measure.step_times_s[w:], measure.step_foreign_cores[w:]))
        record["images_per_s"] = s.batch_size / record["mean_step_s"]
        record["peak_rss_delta_bytes"] = measure.peak_rss_bytes - baseline
        stages.append(record)
    timed = harness.timing_stats(harness.pool(stages, "step_times_s", w), harness.pool(stages, "step_foreign_cores", w))
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
        "wall_s": meter.wall_s,
        "non_step_s": meter.wall_s - sum(t for m in callback.stages for t in m.step_times_s),
        "rss_before_bytes": baseline,
        "peak_rss_bytes": run_peak,
        "peak_rss_delta_bytes": run_peak - baseline,
        "rss_after_bytes": after,
        "foreign_cpu_cores": meter.foreign_cpu_cores,
        "steal_cpu_cores": meter.steal_cpu_cores,
        "final_loss": callback.stages[-1].losses[-1] if callback.stages[-1].losses else None,
        "plan": plan,
    }


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
    ost_times = harness.pool(harness.stages_of(ost_runs), "step_times_s", w)
    ost_stats = harness.timing_stats(ost_times, harness.pool(harness.stages_of(ost_runs), "step_foreign_cores", w))
    ost_stage = ost_runs[0]["stages"][0]
    ost_opt, ost_moments = ost_stage["optimizer_state_bytes"], ost_stage["optimizer_moment_bytes"]
    ost_stages = [{**r["stages"][0], "rep": r["rep"]} for r in ost_runs]  # ost trains in one stage

    def speed(times: list[float], foreign: list[float]) -> dict[str, Any]:
        stats = harness.timing_stats(times, foreign)
        return {
            **stats,
            "images_per_s": batch / stats["mean_step_s"],
            "images_per_s_ratio": ost_stats["mean_step_s"] / stats["mean_step_s"],
            "images_per_s_ratio_ci95": harness.ratio_ci(ost_times, times),  # mean(ost step) / mean(step)
            "clean_images_per_s_ratio": harness.ratio(ost_stats["clean_mean_step_s"], stats["clean_mean_step_s"]),
        }

    variants: dict[str, Any] = {}
    for variant, rs in reps.items():
        v: dict[str, Any] = {"variant": variant, "reps": [r["rep"] for r in rs]}
        v.update(
            speed(
                harness.pool(harness.stages_of(rs), "step_times_s", w),
                harness.pool(harness.stages_of(rs), "step_foreign_cores", w),
            )
        )
        v.update(
            {
                "paired_images_per_s_ratios": harness.paired_ratios(ost_runs, rs, "mean_step_s"),  # ost step / step
                "rep_spread_step": harness.ratio(rs[-1]["mean_step_s"], rs[0]["mean_step_s"]),
                "peak_rss_bytes": [r["peak_rss_bytes"] for r in rs],
                "peak_rss_ratio": statistics.fmean(harness.paired_ratios(rs, ost_runs, "peak_rss_bytes")),
                "peak_rss_delta_bytes": [r["peak_rss_delta_bytes"] for r in rs],
                "peak_rss_delta_ratio": statistics.fmean(harness.paired_ratios(rs, ost_runs, "peak_rss_delta_bytes")),
                "final_loss": [r["final_loss"] for r in rs],
                "foreign_cpu_cores": [r["foreign_cpu_cores"] for r in rs],
            }
        )
        stages = []
        for first in rs[0]["stages"]:
            k = first["index"]
            per_rep = [{**next(st for st in r["stages"] if st["index"] == k), "rep": r["rep"]} for r in rs]
            st = {key: first[key] for key in ("index", "name", "trains", "trainable_params", "share")}
            st.update(
                speed(
                    harness.pool(harness.stages_of(rs, k), "step_times_s", w),
                    harness.pool(harness.stages_of(rs, k), "step_foreign_cores", w),
                )
            )
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
                    "peak_rss_ratio": statistics.fmean(harness.paired_ratios(per_rep, ost_stages, "peak_rss_bytes")),
                    "peak_rss_delta_bytes": [x["peak_rss_delta_bytes"] for x in per_rep],
                    "peak_rss_delta_ratio": statistics.fmean(
                        harness.paired_ratios(per_rep, ost_stages, "peak_rss_delta_bytes")
                    ),
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


def _dt1_speed_sentence(stages: list[dict[str, Any]]) -> str:
    """Whether dt1's images/s ratio rises stage by stage; a dip whose 95% intervals overlap is called noise."""
    ratios = [st["images_per_s_ratio"] for st in stages]
    text = f"dt1 images/s / ost per stage = {harness.joined(ratios, 2, '/')}"
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
                ratios = harness.joined([st["optimizer_ratio"] for st in stages], sep="/")
                shares = harness.joined([st["share"] for st in stages], sep="/")
                parts.append(
                    f"{name} optimizer bytes / ost = {ratios} vs parameter share {shares} (exp_avg/exp_avg_sq bytes "
                    f"alone: worst relative deviation {worst:.1e})"
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
# Report (a function of the saved JSON)
# ---------------------------------------------------------------------------------------------
def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, one table per backbone and mode, runs, expected vs measured."""
    s, runs, summary = report["settings"], report["runs"], report["summary"]
    order = ", ".join(variant for variant, _ in report["schedule"])
    lines = [
        *harness.report_header("Staged tuning of vision backbones (CPU)", report, LIBRARIES),
        f"Set-up: random-init timm backbones, fp32, synthetic images ({s['num_classes']} classes), batch "
        f"{s['batch_size']}, AdamW (default `optim`), constant LR {s['learning_rate']}, LoRA r={s['lora_rank']} on "
        f"every block projection; the modules after the last block that `prepare_for_tuning` leaves trainable "
        f"(head, final norm) train in every stage. Every stage runs {s['steps']} steps (`dt_budget=per_stage`); "
        f"the first {s['warmup_steps']} step(s) of every stage are not timed. "
        f"Per backbone and mode the runs go in the order {order}, each from a freshly seeded model, after a "
        f"warm-up at tiny size. Total wall time {report['total_wall_s']:.0f} s"
        f"{' (quick mode: tiny models, numbers only show that the script works)' if s['quick'] else ''}.",
        "",
        *(
            f"* {arch}: `{spec['timm_name']}` with {harness.as_tuples(spec['model_kwargs'])}"
            for arch, spec in report["archs"].items()
        ),
        "",
        "Columns: *share* = the stage's trainable parameters / all trainable parameters (ost's); *img/s* over the "
        "timed steps of all repetitions, with the ratio to ost (95% delta-method interval); *optimizer* = bytes of "
        "every tensor in the optimizer state at the stage's end, and its ratio to ost's; *peak RSS* = VmHWM since "
        "the stage's start (reset through clear_refs), *Δ* = that peak minus the RSS at the start of the run, "
        "both as the mean of the per-repetition ratios to ost.",
        "",
        *harness.contention_warning(
            runs,
            report["foreign_cpu_cores_at_start"],
            "the speed ratios are noisy (see the uncontended ratios in the JSON).",
        ),
    ]
    for arch, per_mode in summary.items():
        for mode, info in per_mode.items():
            kind = "LoRA" if mode == "lora" else "full fine-tuning"
            lines += [
                f"## {arch} - {kind} ({harness.params(info['model_params'])} parameters, "
                f"{harness.params(info['trainable_params'])} trainable; ost {info['ost_images_per_s']:.1f} img/s)",
                "",
                *harness.table(
                    ["variant", "stage", "trains", "share", "img/s", "img/s / ost", "optimizer (MiB)"]
                    + ["optimizer / ost", "peak RSS (MiB)", "peak RSS / ost", "Δ peak / ost"],
                    [
                        [name, f"{st['index']} {st['name']}", st["trains"], f"{st['share']:.3f}"]
                        + [
                            f"{st['images_per_s']:.1f}",
                            harness.with_ci(st["images_per_s_ratio"], st["images_per_s_ratio_ci95"], 2),
                        ]
                        + [harness.optimizer_mib(st), f"{st['optimizer_ratio']:.3f}"]
                        + [harness.mib(statistics.fmean(st["peak_rss_bytes"])), f"{st['peak_rss_ratio']:.3f}"]
                        + [f"{st['peak_rss_delta_ratio']:.3f}"]
                        for name, v in info["variants"].items()
                        for st in v["stages"]
                    ],
                ),
                "",
                *harness.table(
                    ["variant", "img/s (all stages)", "img/s / ost", "per repetition", "rep 2 / rep 1 step"]
                    + ["run peak RSS (MiB)", "run peak / ost", "run Δ peak / ost"],
                    [
                        [
                            name,
                            f"{v['images_per_s']:.1f}",
                            harness.with_ci(v["images_per_s_ratio"], v["images_per_s_ratio_ci95"], 2),
                        ]
                        + [harness.joined(v["paired_images_per_s_ratios"], 2), harness.num(v["rep_spread_step"])]
                        + [", ".join(harness.mib(x) for x in v["peak_rss_bytes"]), f"{v['peak_rss_ratio']:.3f}"]
                        + [f"{v['peak_rss_delta_ratio']:.3f}"]
                        for name, v in info["variants"].items()
                    ],
                ),
                "",
            ]
    lines += [
        "## Runs in execution order",
        "",
        *harness.table(
            ["backbone", "mode", "variant", "rep", "start (s)", "stages", "img/s", "mean step (s)", "stdev (s)", "n"]
            + ["peak RSS (MiB)", "Δ (MiB)", "final loss", "non-step (s)", "other procs", "steal"],
            [
                [r["arch"], r["mode"], r["variant"], r["rep"], f"{r['start_s']:.0f}", len(r["stages"])]
                + [f"{r['images_per_s']:.1f}", f"{r['mean_step_s']:.3f}", f"{r['stdev_step_s']:.3f}", r["timed_steps"]]
                + [
                    harness.mib(r["peak_rss_bytes"]),
                    harness.mib(r["peak_rss_delta_bytes"]),
                    harness.num(r["final_loss"], 4),
                ]
                + [f"{r['non_step_s']:.1f}", f"{r['foreign_cpu_cores']:.2f}", f"{r['steal_cpu_cores']:.2f}"]
                for r in runs
            ],
        ),
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
def _progress(run: dict[str, Any], seconds: float) -> str:
    return (
        f"[bench] {run['arch']:4s} {run['mode']:4s} {run['variant']} rep {run['rep']}: {run['images_per_s']:.1f} "
        f"img/s, peak RSS {harness.mib(run['peak_rss_bytes'])} MiB, other processes {run['foreign_cpu_cores']:.2f} "
        f"cores ({seconds:.0f}s)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every backbone, mode and variant in palindromic order, analyse, write the JSON and markdown."""
    s = harness.parse_settings(VisionBenchSettings, argv, __doc__)
    with harness.benchmark_session(s, "benchmarks.bench_vision", argv) as bench:
        harness.park_heap()
        print(f"[bench] warm-up ({s.threads} threads)", flush=True)
        warm_up(s)
        harness.park_heap()  # what the warm-up imported lazily (peft, matplotlib)
        schedule = harness.palindrome(s.variants, s.repeats)
        for arch in s.archs:
            dataset = build_dataset(s, arch)
            for mode in s.modes:
                for variant, rep in schedule:
                    bench.measure(_progress, run_one, s, arch, mode, variant, dataset, rep=rep)
        archs = {
            arch: {"timm_name": ARCHS[arch].timm_name, "model_kwargs": ARCHS[arch].model_kwargs(s.quick)}
            for arch in s.archs
        }
        summary = analyse(s, bench.runs)
        report = bench.report(
            schedule,
            LIBRARIES,
            setup={"archs": archs},
            summary=summary,
            expected_vs_measured=expected_vs_measured(s, summary),
        )
    print(harness.save_report(Path(s.output_dir) / f"{RESULT_STEM}.json", report, render_markdown))
    return report


if __name__ == "__main__":
    main()
