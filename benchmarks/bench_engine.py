"""CPU benchmark of the staged-tuning engine against plain ``trl.SFTTrainer``.

In one process it trains a random-initialised Llama model (fp32, synthetic pre-tokenised data)
with plain ``trl.SFTTrainer`` and with ``StagedSFTTrainer`` under ``ost``, ``dt1`` and ``dt3``,
in LoRA and in full fine-tuning mode, and records for every run:

* the wall time of every optimizer step (``on_step_begin`` .. ``on_step_end``), the first
  ``--warmup-steps`` of every stage discarded;
* the exact bytes of the optimizer state at the end of every stage, with the stage's share of the
  trainable parameters;
* the process peak RSS (``VmHWM``), reset through ``/proc/self/clear_refs`` before each run;
* the logged losses (``ost`` must reproduce plain training);
* how many cores other processes used during every step (from ``/proc/stat``), so steps slowed by
  a shared machine can be told apart; a last ``plain-again`` run repeats the reference run to show
  the run-to-run noise.

Results go to ``<output-dir>/bench_engine_cpu.json`` and ``<output-dir>/bench_engine_cpu.md``.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_engine.py                  # ~5.5 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_engine.py --wait-idle 600  # start once others are idle
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_engine.py --quick          # smoke test (~40 s)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_tuning.sft import StagedSFTConfig, StagedSFTTrainer  # noqa: E402

RESULT_STEM = "bench_engine_cpu"
MIB = 1024**2
# a step during which other processes used at least this many cores counts as contended
CONTENDED_CORES = 0.1
# (label, staged variant or None for plain trl.SFTTrainer); "plain-again" repeats the reference run last, so
# its ratio to "plain" shows the run-to-run noise (and any drift) of this machine
RUNS: tuple[tuple[str, str | None], ...] = (
    ("plain", None), ("ost", "ost"), ("dt1", "dt1"), ("dt3", "dt3"), ("plain-again", None),
)
TARGETS = {
    "ost_step_time_within": 0.02,
    "ost_peak_rss_within": 0.01,
    "dt1_step_time_max_ratio": 0.8,
    "full_opt_state_proportional_tol": 0.01,
}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchSettings:
    """Everything that defines a benchmark run (stored with the results)."""

    hidden: int = 512
    layers: int = 12
    intermediate: int | None = None
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 32000
    steps: int = 12
    full_steps: int | None = None
    seq_len: int = 128
    batch_size: int = 4
    warmup_steps: int = 2
    modes: tuple[str, ...] = ("lora", "full")
    lora_rank: int = 16
    learning_rate: float = 1e-4
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int = 0
    output_dir: str = "benchmarks/results"
    quick: bool = False
    wait_idle_s: float = 0.0

    @property
    def ffn(self) -> int:
        """Intermediate size: as given, else 2.75x hidden (1408 for hidden 512)."""
        return self.intermediate or int(round(2.75 * self.hidden / 64) * 64)

    def steps_for(self, mode: str) -> int:
        return self.full_steps if mode == "full" and self.full_steps else self.steps


def parse_args(argv: list[str] | None = None) -> BenchSettings:
    """Command line -> :class:`BenchSettings`; ``--quick`` overrides the sizes for a smoke test."""
    d = BenchSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size (default %(default)s)")
    p.add_argument("--layers", type=int, default=d.layers, help="decoder layers (default %(default)s)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2.75x hidden)")
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per stage (default %(default)s)")
    p.add_argument("--full-steps", type=int, default=None, help="steps per stage in full mode (default: --steps)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps per stage left out of timings")
    p.add_argument("--modes", default=",".join(d.modes), help="comma-separated subset of lora,full")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--gradient-checkpointing", action="store_true", help="train with gradient checkpointing")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: usable cores)")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps per stage: a ~1 minute smoke test")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for other processes to leave the CPUs idle before starting")
    ns = p.parse_args(argv)
    modes = tuple(m.strip() for m in ns.modes.split(",") if m.strip())
    if not modes or any(m not in ("lora", "full") for m in modes):
        p.error(f"--modes must be a comma-separated subset of lora,full, got {ns.modes!r}")
    s = BenchSettings(
        hidden=ns.hidden, layers=ns.layers, intermediate=ns.intermediate, heads=ns.heads, kv_heads=ns.kv_heads,
        vocab=ns.vocab, steps=ns.steps, full_steps=ns.full_steps, seq_len=ns.seq_len, batch_size=ns.batch_size,
        warmup_steps=ns.warmup_steps, modes=modes, lora_rank=ns.lora_rank, learning_rate=ns.learning_rate,
        gradient_checkpointing=ns.gradient_checkpointing, seed=ns.seed, threads=ns.threads,
        output_dir=ns.output_dir, quick=ns.quick, wait_idle_s=ns.wait_idle,
    )
    if s.quick:
        s.hidden, s.layers, s.intermediate, s.heads, s.kv_heads = 128, 4, 352, 4, 2
        s.vocab, s.steps, s.full_steps, s.seq_len, s.batch_size, s.warmup_steps = 4000, 3, None, 64, 2, 1
    if min(s.steps_for(m) for m in s.modes) <= s.warmup_steps:
        p.error("--steps (and --full-steps) must exceed --warmup-steps, or no step would be timed")
    return s


# ---------------------------------------------------------------------------------------------
# Model, data, tokenizer (all offline)
# ---------------------------------------------------------------------------------------------
def build_model(s: BenchSettings) -> LlamaForCausalLM:
    """A random-initialised fp32 Llama; the same seed gives the same weights every time."""
    torch.manual_seed(s.seed)
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=max(s.seq_len, 128),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: TRL needs a processing_class with a pad token."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(60)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_dataset(s: BenchSettings) -> Dataset:
    """Pre-tokenised rows (input_ids, attention_mask) of repeated random 8-token motifs."""
    rows = max(64, 2 * s.batch_size * max(s.steps_for(m) for m in s.modes))
    generator = torch.Generator().manual_seed(s.seed)
    data = []
    for _ in range(rows):
        motif = torch.randint(4, s.vocab, (8,), generator=generator)
        ids = motif.repeat(s.seq_len // 8 + 1)[: s.seq_len].tolist()
        data.append({"input_ids": ids, "attention_mask": [1] * s.seq_len})
    return Dataset.from_list(data)


def lora_config(s: BenchSettings) -> LoraConfig:
    return LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap pages back to the kernel
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> int:
    """Collect garbage, reset the kernel's RSS high-water mark; returns the current RSS in bytes."""
    _release_memory()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS (VmHWM) since the last :func:`reset_peak_rss`, in bytes."""
    return _proc_status_kib("VmHWM") * 1024


@dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy and steal time, this process's CPU time (clock ticks) and a wall clock."""

    busy: int
    steal: int
    own: int
    wall: float

    @classmethod
    def now(cls) -> CpuSample:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        with open("/proc/self/stat", encoding="ascii") as handle:
            own = handle.read().rsplit(")", 1)[1].split()
        return cls(user + nice + system + irq + softirq, steal, int(own[11]) + int(own[12]), time.perf_counter())

    def foreign_cores(self, later: CpuSample) -> tuple[float, float]:
        """(cores used by other processes, cores stolen by the hypervisor) on average since ``self``."""
        ticks = os.sysconf("SC_CLK_TCK") * max(later.wall - self.wall, 1e-9)
        others = (later.busy - self.busy) - (later.own - self.own)
        return max(others, 0) / ticks, (later.steal - self.steal) / ticks


def wait_for_idle(limit_s: float, threshold: float = 0.15) -> float:
    """Wait up to ``limit_s`` seconds until other processes use under ``threshold`` cores; returns their use."""
    deadline = time.monotonic() + limit_s
    while True:
        first = CpuSample.now()
        time.sleep(2.0)
        others, _ = first.foreign_cores(CpuSample.now())
        if others < threshold or time.monotonic() >= deadline:
            return others
        print(f"[bench] other processes use {others:.2f} cores; waiting for an idle machine", flush=True)
        time.sleep(8.0)


def optimizer_state(optimizer: Any) -> tuple[int, int]:
    """(bytes of every tensor in optimizer.state, elements of the parameters it optimises)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    state_bytes = sum(
        value.nbytes for per_param in inner.state.values() for value in per_param.values()
        if isinstance(value, torch.Tensor)
    )
    param_numel = sum(p.numel() for group in inner.param_groups for p in group["params"])
    return state_bytes, param_numel


@dataclass
class StageRecord:
    """What one stage (one Trainer.train() phase) did."""

    index: int
    name: str
    trainable_params: int
    step_times_s: list[float] = field(default_factory=list)
    step_foreign_cores: list[float] = field(default_factory=list)
    rss_step_end_mib: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    optimizer_state_bytes: int = 0
    optimizer_param_numel: int = 0
    optimizer_class: str = ""


class BenchCallback(TrainerCallback):
    """Times every optimizer step and reads the optimizer state at the end of every stage."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.stages: list[StageRecord] = []
        self._t0 = 0.0
        self._cpu0: CpuSample | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stage = getattr(self.trainer, "_active_stage", None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if stage is None:
            self.stages.append(StageRecord(len(self.stages), "all", trainable))
        else:
            self.stages.append(StageRecord(stage.index, stage.name, trainable))

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu0 = CpuSample.now()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._t0
        self.stages[-1].step_times_s.append(elapsed)
        self.stages[-1].step_foreign_cores.append(self._cpu0.foreign_cores(CpuSample.now())[0])
        self.stages[-1].rss_step_end_mib.append(_proc_status_kib("VmRSS") / 1024)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.stages[-1].losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        record = self.stages[-1]
        if optimizer is not None:
            record.optimizer_state_bytes, record.optimizer_param_numel = optimizer_state(optimizer)
            record.optimizer_class = type(getattr(optimizer, "optimizer", optimizer)).__name__


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def training_args(s: BenchSettings, mode: str, variant: str | None, output_dir: str) -> SFTConfig:
    common: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=s.steps_for(mode),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=s.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        activation_checkpointing=s.gradient_checkpointing,
        disable_tqdm=True,
        use_cpu=True,
        seed=s.seed,
        max_length=s.seq_len,
        packing=False,
        dataloader_num_workers=0,
    )
    if variant is None:
        return SFTConfig(**common)
    return StagedSFTConfig(**common, dt_variant=variant, dt_budget="per_stage")


def timing_stats(times: list[float], foreign: list[float]) -> dict[str, Any]:
    """Mean/median/stdev of the timed steps, and the mean of the uncontended ones alone."""
    clean = [t for t, f in zip(times, foreign, strict=True) if f < CONTENDED_CORES]
    return {
        "mean_step_s": statistics.fmean(times),
        "median_step_s": statistics.median(times),
        "stdev_step_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "timed_steps": len(times),
        "clean_mean_step_s": statistics.fmean(clean) if clean else None,
        "clean_steps": len(clean),
    }


def run_one(s: BenchSettings, mode: str, label: str, variant: str | None, dataset: Dataset,
            tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Train one configuration from a fresh model; returns its timings and memory figures."""
    baseline = reset_peak_rss()
    started = time.perf_counter()
    cpu_start = CpuSample.now()
    callback = BenchCallback()
    with tempfile.TemporaryDirectory(prefix=f"bench-{mode}-{label}-") as out:
        model = build_model(s)
        total_params = sum(p.numel() for p in model.parameters())
        trainer_cls = SFTTrainer if variant is None else StagedSFTTrainer
        torch.manual_seed(s.seed)
        trainer = trainer_cls(
            model=model,
            args=training_args(s, mode, variant, out),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(s) if mode == "lora" else None,
            callbacks=[callback],
        )
        callback.trainer = trainer
        plan = getattr(trainer, "stage_plan", None)
        candidates = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        output = trainer.train()
        peak = peak_rss()
        others, steal = cpu_start.foreign_cores(CpuSample.now())
        wall = time.perf_counter() - started
        files = sorted(p.name for p in Path(out).rglob("*") if p.is_file())
        plan_dict = plan.to_dict() if plan is not None else None
        callback.trainer = None
        del trainer, model, plan
    after = reset_peak_rss()
    stages = [asdict(r) for r in callback.stages]
    w = s.warmup_steps
    for record in stages:
        record.update(timing_stats(record["step_times_s"][w:], record["step_foreign_cores"][w:]))
        record["share"] = record["trainable_params"] / candidates
        record["opt_bytes_per_param"] = record["optimizer_state_bytes"] / max(record["trainable_params"], 1)
    return {
        "mode": mode,
        "label": label,
        "trainer": "trl.SFTTrainer" if variant is None else f"StagedSFTTrainer(dt_variant={variant!r})",
        "variant": variant,
        "model_params": total_params,
        "trainable_candidates": candidates,
        "stages": stages,
        **timing_stats([t for r in stages for t in r["step_times_s"][w:]],
                       [f for r in stages for f in r["step_foreign_cores"][w:]]),
        "train_runtime_s": output.metrics.get("train_runtime"),
        "wall_s": wall,
        "non_step_s": wall - sum(t for r in callback.stages for t in r.step_times_s),
        "rss_before_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": peak - baseline,
        "rss_after_bytes": after,
        "foreign_cpu_cores": others,
        "steal_cpu_cores": steal,
        "final_loss": callback.stages[-1].losses[-1] if callback.stages[-1].losses else None,
        "output_files": files,
        "plan": plan_dict,
    }


def warm_up(s: BenchSettings, tokenizer: PreTrainedTokenizerFast) -> None:
    """Two-step runs of both trainer classes on a tiny model, so lazy imports, thread pools and
    one-off allocations are paid before anything is measured."""
    tiny = BenchSettings(hidden=64, layers=4, intermediate=128, heads=4, kv_heads=2, vocab=256, steps=2,
                         seq_len=16, batch_size=2, warmup_steps=0, modes=s.modes, seed=s.seed)
    data = build_dataset(tiny)
    for mode in s.modes:
        for label, variant in (("plain", None), ("dt3", "dt3")):
            run_one(tiny, mode, label, variant, data, tokenizer)


# ---------------------------------------------------------------------------------------------
# Analysis and reports
# ---------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio_ci(times: list[float], reference: list[float], z: float = 1.96) -> tuple[float, float] | None:
    """Approximate 95% interval of mean(times) / mean(reference) (delta method, independent samples)."""
    if len(times) < 2 or len(reference) < 2:
        return None
    a, b = statistics.fmean(times), statistics.fmean(reference)
    rel = ((statistics.stdev(times) / a) ** 2 / len(times) + (statistics.stdev(reference) / b) ** 2 / len(reference))
    ratio, half = a / b, z * (a / b) * rel**0.5
    return ratio - half, ratio + half


def _target(value: float | None, limit: float, around_one: bool = False) -> dict[str, Any]:
    """``value <= limit``, or ``|value - 1| <= limit`` with ``around_one``; ``met`` is None without a value."""
    if value is None:
        return {"value": None, "met": None}
    return {"value": value, "met": (abs(value - 1) if around_one else value) <= limit}


def analyse(s: BenchSettings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the plain trainer and the verdict on every target, per mode.

    Step-time targets are judged twice: on every timed step (the headline), and on the steps during
    which no other process used the CPUs (``clean``), since this machine is shared.
    """
    summary: dict[str, Any] = {}
    for mode in s.modes:
        by_label = {r["label"]: r for r in runs if r["mode"] == mode}
        plain = by_label["plain"]
        w = s.warmup_steps
        timed = {label: [t for st in r["stages"] for t in st["step_times_s"][w:]] for label, r in by_label.items()}
        reference_opt = plain["stages"][0]["optimizer_state_bytes"]
        for run in by_label.values():
            run["step_ratio"] = run["mean_step_s"] / plain["mean_step_s"]
            run["step_ratio_ci95"] = ratio_ci(timed[run["label"]], timed["plain"])
            run["median_step_ratio"] = run["median_step_s"] / plain["median_step_s"]
            run["clean_step_ratio"] = _ratio(run["clean_mean_step_s"], plain["clean_mean_step_s"])
            run["peak_rss_ratio"] = run["peak_rss_bytes"] / plain["peak_rss_bytes"]
            run["peak_rss_delta_ratio"] = run["peak_rss_delta_bytes"] / plain["peak_rss_delta_bytes"]
            for stage in run["stages"]:
                stage["step_ratio"] = stage["mean_step_s"] / plain["mean_step_s"]
                stage["clean_step_ratio"] = _ratio(stage["clean_mean_step_s"], plain["clean_mean_step_s"])
                stage["opt_share"] = _ratio(stage["optimizer_state_bytes"], reference_opt)
        ost, dt1 = by_label["ost"], by_label["dt1"]
        plain_losses = [x for st in plain["stages"] for x in st["losses"]]
        ost_losses = [x for st in ost["stages"] for x in st["losses"]]
        loss_diff = (max(abs(a - b) for a, b in zip(plain_losses, ost_losses, strict=True))
                     if len(plain_losses) == len(ost_losses) and plain_losses else None)
        proportional = [
            {"run": r["label"], "stage": st["index"], "share": st["share"], "opt_share": st["opt_share"],
             "error": abs(st["opt_share"] - st["share"]) / st["share"]}
            for r in by_label.values() for st in r["stages"]
        ]
        worst = max(p["error"] for p in proportional)
        step_tol, rss_tol = TARGETS["ost_step_time_within"], TARGETS["ost_peak_rss_within"]
        dt1_max = TARGETS["dt1_step_time_max_ratio"]
        targets = {
            "ost step time within 2% of plain": _target(ost["step_ratio"], step_tol, around_one=True),
            "ost step time within 2% of plain (uncontended steps)":
                _target(ost["clean_step_ratio"], step_tol, around_one=True),
            "ost peak RSS within 1% of plain": _target(ost["peak_rss_ratio"], rss_tol, around_one=True),
            "dt1 mean step <= 0.8x plain": _target(dt1["step_ratio"], dt1_max),
            "dt1 mean step <= 0.8x plain (uncontended steps)": _target(dt1["clean_step_ratio"], dt1_max),
            "optimizer state proportional to stage share (worst relative error)":
                {**_target(worst, TARGETS["full_opt_state_proportional_tol"]), "applies": mode == "full"},
        }
        again = by_label.get("plain-again")
        noise = None if again is None else {
            "step_ratio": again["step_ratio"], "clean_step_ratio": again["clean_step_ratio"],
            "peak_rss_ratio": again["peak_rss_ratio"],
        }
        summary[mode] = {
            "targets": targets,
            "ost_vs_plain_max_loss_diff": loss_diff,
            "plain_again_vs_plain": noise,
            "proportionality": proportional,
        }
    return summary


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_online": os.cpu_count(),
        "ram_gib": round(_meminfo_kib("MemTotal") / MIB, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "git": git_revision(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def git_revision() -> dict[str, Any]:
    """The commit measured, and whether hf_tuning/ differs from it (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "hf_tuning")
    modified = None if status is None else bool(status)
    return {"commit": git("rev-parse", "--short", "HEAD"), "hf_tuning_modified": modified}


def _meminfo_kib(key: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: tuple[float, float] | list[float] | None) -> str:
    return "" if interval is None else f"({interval[0]:.3f}-{interval[1]:.3f})"


def _sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _verdict(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return "n/a (no uncontended step)"
    if not target.get("applies", True):
        return f"{'holds' if target['met'] else 'does not hold'} (the target is set for full fine-tuning)"
    return "**met**" if target["met"] else "**NOT met**"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, one table of runs and one of stages per mode, targets."""
    s, machine, runs, summary = report["settings"], report["machine"], report["runs"], report["summary"]
    lines = [
        "# Staged-tuning engine benchmark (CPU)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores_usable']} usable cores ({machine['torch_threads']} torch "
        f"threads), {machine['ram_gib']} GiB RAM; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, trl {machine['trl']}, peft {machine['peft']}; {machine['date']}; "
        f"repository at {machine['git']['commit']}"
        f"{' with local changes in hf_tuning/' if machine['git']['hf_tuning_modified'] else ''}.",
        "",
        f"Model: random-init LlamaForCausalLM, hidden {s['hidden']}, {s['layers']} layers, intermediate "
        f"{report['intermediate']}, heads {s['heads']}/{s['kv_heads']} kv, vocab {s['vocab']}, fp32, untied head "
        f"({_params(runs[0]['model_params'])} parameters). Data: synthetic pre-tokenised, seq len {s['seq_len']}, "
        f"batch {s['batch_size']}. LoRA: r={s['lora_rank']}, all-linear. AdamW (default `optim`), constant LR, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}. Each stage runs the full "
        f"step budget (`dt_budget=per_stage`); the first {s['warmup_steps']} step(s) of every stage are left "
        "out of the step times. Runs in order plain, ost, dt1, dt3, plain-again (a control repeat of plain), "
        "each from a freshly seeded model, after a warm-up on a tiny model. The 95% CI of a step ratio is the "
        "delta-method interval over the timed steps (the steps treated as independent). Total benchmark wall "
        f"time {report['total_wall_s']:.0f} s.",
        "",
        "Columns: *uncontended* = only the timed steps during which other processes used under "
        f"{CONTENDED_CORES} cores (measured per step from /proc/stat; the machine is shared). Peak RSS = VmHWM "
        "after resetting it (clear_refs 5) before each run, model construction included; Δ = peak minus RSS at "
        "the reset. Non-step = run wall time minus all step times (model build, trainer and dataset set-up, "
        "stage switches). Other procs = average cores used by other processes over the whole run.",
        "",
    ]
    busy = [r for r in runs if r["foreign_cpu_cores"] > CONTENDED_CORES]
    if busy or report["foreign_cpu_cores_at_start"] > CONTENDED_CORES:
        worst = max([r["foreign_cpu_cores"] for r in runs] + [report["foreign_cpu_cores_at_start"]])
        lines += [
            f"**Warning:** other processes used the CPUs during {len(busy)} of {len(runs)} runs (up to {worst:.2f} "
            "cores on average); compare the uncontended columns.",
            "",
        ]
    for mode in s["modes"]:
        mode_runs = [r for r in runs if r["mode"] == mode]
        steps = len(mode_runs[0]["stages"][0]["step_times_s"])
        kind = "LoRA adapters" if mode == "lora" else "full fine-tuning"
        lines += [
            f"## {mode.upper()} ({kind}, {steps} steps per stage)",
            "",
            "| run | stages | mean step (s) | median (s) | stdev (s) | n | ratio vs plain (95% CI) "
            "| uncontended mean (s) | n | uncontended ratio | peak RSS (MiB) | peak ratio | Δ RSS (MiB) | Δ ratio "
            "| final loss | non-step (s) | other procs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mode_runs:
            lines.append(
                f"| {r['label']} | {len(r['stages'])} | {r['mean_step_s']:.3f} | {r['median_step_s']:.3f} "
                f"| {r['stdev_step_s']:.3f} | {r['timed_steps']} | {r['step_ratio']:.3f} {_ci(r['step_ratio_ci95'])} "
                f"| {_num(r['clean_mean_step_s'])} | {r['clean_steps']} | {_num(r['clean_step_ratio'])} "
                f"| {_mib(r['peak_rss_bytes'])} | {r['peak_rss_ratio']:.3f} | {_mib(r['peak_rss_delta_bytes'])} "
                f"| {r['peak_rss_delta_ratio']:.3f} | {_num(r['final_loss'], 4)} | {r['non_step_s']:.1f} "
                f"| {r['foreign_cpu_cores']:.2f} |"
            )
        lines += [
            "",
            "Per stage: share = the stage's trainable parameters / all trainable parameters; optimizer state read "
            "at the stage's end; opt share = its bytes / the plain run's optimizer bytes.",
            "",
            "| run | stage | name | trainable | share | mean step (s) | ratio vs plain | uncontended mean (s) "
            "| uncontended ratio | optimizer state (MiB) | bytes/param | opt share |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mode_runs:
            for st in r["stages"]:
                lines.append(
                    f"| {r['label']} | {st['index']} | {st['name']} | {_params(st['trainable_params'])} "
                    f"| {st['share']:.3f} | {st['mean_step_s']:.3f} | {st['step_ratio']:.3f} "
                    f"| {_num(st['clean_mean_step_s'])} | {_num(st['clean_step_ratio'])} "
                    f"| {_mib(st['optimizer_state_bytes'])} | {st['opt_bytes_per_param']:.3f} "
                    f"| {_num(st['opt_share'])} |"
                )
        info = summary[mode]
        lines += [
            "",
            f"ost vs plain, max |Δ loss| over the logged steps: {_sci(info['ost_vs_plain_max_loss_diff'])}.",
            "",
            "| target | value | verdict |",
            "|---|---|---|",
        ]
        for name, target in info["targets"].items():
            lines.append(f"| {name} | {_num(target['value'], 4)} | {_verdict(target)} |")
        noise = info["plain_again_vs_plain"]
        if noise is not None:
            lines += [
                "",
                f"Noise floor: the identical plain run repeated last gives step ratio {noise['step_ratio']:.3f} "
                f"(uncontended {_num(noise['clean_step_ratio'])}) and peak-RSS ratio {noise['peak_rss_ratio']:.3f} "
                "against the first; differences of that size are not resolved by this run.",
            ]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = parse_args(argv)
    threads = s.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    s.threads = threads
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    command = "HF_HUB_OFFLINE=1 " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    foreign_at_start = wait_for_idle(s.wait_idle_s)
    if foreign_at_start > 0.15:
        print(f"[bench] WARNING: other processes use {foreign_at_start:.2f} cores; timings will be noisy", flush=True)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    dataset = build_dataset(s)
    print(f"[bench] warm-up ({threads} threads)", flush=True)
    warm_up(s, tokenizer)
    runs = []
    for mode in s.modes:
        for label, variant in RUNS:
            t0 = time.perf_counter()
            run = run_one(s, mode, label, variant, dataset, tokenizer)
            runs.append(run)
            print(f"[bench] {mode:4s} {label:5s} mean step {run['mean_step_s']:.3f}s "
                  f"(uncontended {_num(run['clean_mean_step_s'])}s) "
                  f"peak RSS {_mib(run['peak_rss_bytes'])} MiB, other processes {run['foreign_cpu_cores']:.2f} "
                  f"cores ({time.perf_counter() - t0:.0f}s)", flush=True)
    report = {
        "command": command,
        "settings": asdict(s),
        "intermediate": s.ffn,
        "machine": machine_info(),
        "targets": TARGETS,
        "foreign_cpu_cores_at_start": foreign_at_start,
        "runs": runs,
        "total_wall_s": time.perf_counter() - started,
    }
    report["summary"] = analyse(s, runs)
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{RESULT_STEM}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(report)
    (out / f"{RESULT_STEM}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return report


if __name__ == "__main__":
    main()
