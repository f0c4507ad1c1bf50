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
  a shared machine can be told apart.

The speed of a shared virtual machine drifts over minutes, so every configuration runs twice, in the
palindromic order plain, ost, dt1, dt3, dt3, dt1, ost, plain (per mode): the two repetitions of every
configuration sit symmetrically around the middle of the sequence, so pooling them cancels any drift
that is linear in time. Ratios to plain come from the pooled timed steps of both repetitions (with the
median of the two paired per-repetition ratios beside them), and the ratio between the two repetitions
of a configuration is reported as the run-to-run spread.

Results go to ``<output-dir>/bench_engine_cpu.json`` and ``<output-dir>/bench_engine_cpu.md``.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_engine.py                  # ~9 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_engine.py --wait-idle 600  # start once others are idle
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_engine.py --quick          # smoke test (~1 min)
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
import re
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
from hf_tuning.llm.sft import StagedSFTConfig, StagedSFTTrainer  # noqa: E402

RESULT_STEM = "bench_engine_cpu"
MIB = 1024**2
# a step during which other processes used at least this many cores counts as contended
CONTENDED_CORES = 0.1
# (label, staged variant or None for plain trl.SFTTrainer), in the order of the first half of the palindrome
CONFIGS: tuple[tuple[str, str | None], ...] = (("plain", None), ("ost", "ost"), ("dt1", "dt1"), ("dt3", "dt3"))
# (label, variant, repetition): ABCD-DCBA, so both repetitions of a configuration are symmetric about the middle
SCHEDULE: tuple[tuple[str, str | None, int], ...] = tuple(
    [(label, variant, 1) for label, variant in CONFIGS] + [(label, variant, 2) for label, variant in reversed(CONFIGS)]
)
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
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
    steps: int = 10
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
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other processes to leave the CPUs idle before starting",
    )
    ns = p.parse_args(argv)
    modes = tuple(m.strip() for m in ns.modes.split(",") if m.strip())
    if not modes or any(m not in ("lora", "full") for m in modes):
        p.error(f"--modes must be a comma-separated subset of lora,full, got {ns.modes!r}")
    s = BenchSettings(
        hidden=ns.hidden,
        layers=ns.layers,
        intermediate=ns.intermediate,
        heads=ns.heads,
        kv_heads=ns.kv_heads,
        vocab=ns.vocab,
        steps=ns.steps,
        full_steps=ns.full_steps,
        seq_len=ns.seq_len,
        batch_size=ns.batch_size,
        warmup_steps=ns.warmup_steps,
        modes=modes,
        lora_rank=ns.lora_rank,
        learning_rate=ns.learning_rate,
        gradient_checkpointing=ns.gradient_checkpointing,
        seed=ns.seed,
        threads=ns.threads,
        output_dir=ns.output_dir,
        quick=ns.quick,
        wait_idle_s=ns.wait_idle,
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
    return LoraConfig(
        r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


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
        value.nbytes
        for per_param in inner.state.values()
        for value in per_param.values()
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
    trainable_layers: list[int] = field(default_factory=list)
    embeddings_trained: bool = False
    head_trained: bool = False
    step_times_s: list[float] = field(default_factory=list)
    step_foreign_cores: list[float] = field(default_factory=list)
    step_steal_cores: list[float] = field(default_factory=list)
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
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        index, name = (len(self.stages), "all") if stage is None else (stage.index, stage.name)
        layers = sorted({int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))})
        self.stages.append(
            StageRecord(
                index,
                name,
                trainable,
                trainable_layers=layers,
                embeddings_trained=any("embed_tokens" in n for n in names),
                head_trained=any("lm_head" in n for n in names),
            )
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu0 = CpuSample.now()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._t0
        self.stages[-1].step_times_s.append(elapsed)
        others, steal = self._cpu0.foreign_cores(CpuSample.now())
        self.stages[-1].step_foreign_cores.append(others)
        self.stages[-1].step_steal_cores.append(steal)
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


def run_one(
    s: BenchSettings,
    mode: str,
    label: str,
    variant: str | None,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerFast,
    rep: int = 1,
) -> dict[str, Any]:
    """Train one configuration (repetition ``rep``) from a fresh model; returns its timings and memory figures."""
    baseline = reset_peak_rss()
    started = time.perf_counter()
    cpu_start = CpuSample.now()
    callback = BenchCallback()
    with tempfile.TemporaryDirectory(prefix=f"bench-{mode}-{label}-{rep}-") as out:
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
        "rep": rep,
        "trainer": "trl.SFTTrainer" if variant is None else f"StagedSFTTrainer(dt_variant={variant!r})",
        "variant": variant,
        "model_params": total_params,
        "trainable_candidates": candidates,
        "stages": stages,
        **timing_stats(
            [t for r in stages for t in r["step_times_s"][w:]], [f for r in stages for f in r["step_foreign_cores"][w:]]
        ),
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
    tiny = BenchSettings(
        hidden=64,
        layers=4,
        intermediate=128,
        heads=4,
        kv_heads=2,
        vocab=256,
        steps=2,
        seq_len=16,
        batch_size=2,
        warmup_steps=0,
        modes=s.modes,
        seed=s.seed,
    )
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
    rel = (statistics.stdev(times) / a) ** 2 / len(times) + (statistics.stdev(reference) / b) ** 2 / len(reference)
    ratio, half = a / b, z * (a / b) * rel**0.5
    return ratio - half, ratio + half


def _target(
    value: float | None, limit: float, around_one: bool = False, ci: tuple[float, float] | None = None
) -> dict[str, Any]:
    """``value <= limit``, or ``|value - 1| <= limit`` with ``around_one``; ``met`` is None without a value.

    ``resolved`` says whether the whole 95% interval ``ci`` (when given) falls on the same side of the limit
    as the value, i.e. whether the verdict survives the measurement noise.
    """
    if value is None:
        return {"value": None, "met": None, "ci95": ci, "resolved": None}

    def ok(x: float) -> bool:
        return (abs(x - 1) if around_one else x) <= limit

    met = ok(value)
    resolved = None
    if ci is not None:
        lo, hi = ci
        if around_one:
            resolved = (lo >= 1 - limit and hi <= 1 + limit) if met else (lo > 1 + limit or hi < 1 - limit)
        else:
            resolved = ok(hi) if met else not ok(lo)
    return {"value": value, "met": met, "ci95": ci, "resolved": resolved}


def step_matmul_flops(
    s: BenchSettings, mode: str, trained_layers: list[int], embeddings_trained: bool, head_trained: bool
) -> dict[str, float]:
    """Matmul flops per token of one training step of the benchmark Llama: forward, and backward given what trains.

    Backward runs from the loss down to the lowest trained block only: every block on the way computes the
    gradient of its input (as many flops as its forward, attention twice), trained blocks also their weight
    gradients (the LoRA A/B matrices in LoRA mode, the base weights in full mode); the lowest trained block
    skips the input gradient of q/k/v when nothing below it trains. The output head's input gradient is
    needed whenever anything trains, its weight gradient only when the head itself trains. Norms, softmax,
    activations, the loss and the optimizer step are left out.
    """
    h, f, seq, vocab, n_layers = s.hidden, s.ffn, s.seq_len, s.vocab, s.layers
    kv = s.kv_heads * (h // s.heads)
    rank = s.lora_rank if mode == "lora" else 0
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # q k v o gate up down
    base = sum(2 * i * o for i, o in linears)
    lora = sum(2 * rank * (i + o) for i, o in linears)
    attention = 4 * seq * h  # QK^T and AV per token, the causal mask not exploited
    layer_forward = base + lora + attention
    head = 2 * h * vocab
    forward = n_layers * layer_forward + head
    lowest = -1 if embeddings_trained else min(trained_layers, default=n_layers)
    trained = set(trained_layers)
    backward = (head if lowest < n_layers else 0) + (head if head_trained else 0)
    for index in range(max(lowest, 0), n_layers):
        backward += base + lora + 2 * attention + ((lora if rank else base) if index in trained else 0)
        if index == lowest:
            backward -= sum(2 * i * o + 2 * i * rank for i, o in linears[:3])
    return {
        "forward": forward,
        "head_input_grad": head if lowest < n_layers else 0,
        "backward": backward,
        "step": forward + backward,
    }


def _pool(runs: list[dict[str, Any]], key: str, w: int, stage: int | None = None) -> list[float]:
    """The timed values (``step_times_s`` or ``step_foreign_cores``) of ``runs``, warm-up steps left out."""
    return [x for r in runs for st in r["stages"] if stage is None or st["index"] == stage for x in st[key][w:]]


def analyse(s: BenchSettings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled ratios to the plain trainer, repetition spread and the verdict on every target, per mode.

    Step-time ratios use the timed steps of both repetitions of a configuration pooled (which cancels
    linear drift, thanks to the palindromic order); they are judged twice: on every timed step (the
    headline), and on the steps during which no other process used the CPUs (``clean``).
    """
    summary: dict[str, Any] = {}
    w = s.warmup_steps
    for mode in s.modes:
        reps = {
            label: sorted((r for r in runs if r["mode"] == mode and r["label"] == label), key=lambda r: r["rep"])
            for label, _ in CONFIGS
        }
        plain_runs = reps["plain"]
        plain_times = _pool(plain_runs, "step_times_s", w)
        plain = timing_stats(plain_times, _pool(plain_runs, "step_foreign_cores", w))
        by_rep = {r["rep"]: r for r in plain_runs}
        reference_opt = plain_runs[0]["stages"][0]["optimizer_state_bytes"]
        plain_flops = step_matmul_flops(s, mode, **_trainables(plain_runs[0]["stages"][0]))
        for run in (r for r in runs if r["mode"] == mode):
            ref = by_rep[run["rep"]]
            run["step_ratio_same_rep"] = run["mean_step_s"] / ref["mean_step_s"]
            run["peak_rss_ratio_same_rep"] = run["peak_rss_bytes"] / ref["peak_rss_bytes"]
        configs: dict[str, Any] = {}
        for label, rs in reps.items():
            times = _pool(rs, "step_times_s", w)
            c: dict[str, Any] = {"label": label, "reps": [r["rep"] for r in rs], "trainer": rs[0]["trainer"]}
            c.update(timing_stats(times, _pool(rs, "step_foreign_cores", w)))
            paired = [r["mean_step_s"] / by_rep[r["rep"]]["mean_step_s"] for r in rs]
            peak_ratios = [r["peak_rss_ratio_same_rep"] for r in rs]
            delta_ratios = [r["peak_rss_delta_bytes"] / by_rep[r["rep"]]["peak_rss_delta_bytes"] for r in rs]
            c.update(
                {
                    "step_ratio": c["mean_step_s"] / plain["mean_step_s"],
                    "step_ratio_ci95": ratio_ci(times, plain_times),
                    "median_step_ratio": c["median_step_s"] / plain["median_step_s"],
                    "clean_step_ratio": _ratio(c["clean_mean_step_s"], plain["clean_mean_step_s"]),
                    "paired_step_ratios": paired,
                    "median_of_paired_step_ratios": statistics.median(paired),
                    "rep_spread_step": _ratio(rs[-1]["mean_step_s"], rs[0]["mean_step_s"]),
                    "rep_spread_clean_step": _ratio(rs[-1]["clean_mean_step_s"], rs[0]["clean_mean_step_s"]),
                    "rep_spread_peak_rss": rs[-1]["peak_rss_bytes"] / rs[0]["peak_rss_bytes"],
                    "peak_rss_bytes": [r["peak_rss_bytes"] for r in rs],
                    "peak_rss_ratios": peak_ratios,
                    "peak_rss_mean_ratio": statistics.fmean(peak_ratios),
                    "peak_rss_delta_bytes": [r["peak_rss_delta_bytes"] for r in rs],
                    "peak_rss_delta_ratios": delta_ratios,
                    "peak_rss_delta_mean_ratio": statistics.fmean(delta_ratios),
                    "foreign_cpu_cores": [r["foreign_cpu_cores"] for r in rs],
                }
            )
            stages = []
            for first in rs[0]["stages"]:
                k = first["index"]
                stage_times = _pool(rs, "step_times_s", w, stage=k)
                st = {
                    key: first[key]
                    for key in (
                        "index",
                        "name",
                        "trainable_params",
                        "share",
                        "trainable_layers",
                        "embeddings_trained",
                        "head_trained",
                    )
                }
                st.update(timing_stats(stage_times, _pool(rs, "step_foreign_cores", w, stage=k)))
                opt = [x["optimizer_state_bytes"] for r in rs for x in r["stages"] if x["index"] == k]
                flops = step_matmul_flops(s, mode, **_trainables(first))
                st.update(
                    {
                        "step_ratio": st["mean_step_s"] / plain["mean_step_s"],
                        "step_ratio_ci95": ratio_ci(stage_times, plain_times),
                        "clean_step_ratio": _ratio(st["clean_mean_step_s"], plain["clean_mean_step_s"]),
                        "optimizer_state_bytes": opt[0],
                        "optimizer_state_same_in_reps": len(set(opt)) == 1,
                        "opt_bytes_per_param": first["opt_bytes_per_param"],
                        "opt_share": _ratio(opt[0], reference_opt),
                        "flop_ratio": flops["step"] / plain_flops["step"],
                    }
                )
                stages.append(st)
            c["stages"] = stages
            c["flop_ratio"] = statistics.fmean(st["flop_ratio"] for st in stages)
            configs[label] = c
        ost, dt1 = configs["ost"], configs["dt1"]

        def losses(run: dict[str, Any]) -> list[float]:
            return [x for st in run["stages"] for x in st["losses"]]

        def max_diff(a: list[float], b: list[float]) -> float | None:
            return max(abs(x - y) for x, y in zip(a, b, strict=True)) if a and len(a) == len(b) else None

        ost_diffs = [max_diff(losses(p), losses(o)) for p in plain_runs for o in reps["ost"]]
        loss_diff = None if None in ost_diffs or not ost_diffs else max(ost_diffs)
        plain_diff = max_diff(losses(plain_runs[0]), losses(plain_runs[-1]))
        proportional = [
            {
                "run": r["label"],
                "rep": r["rep"],
                "stage": st["index"],
                "share": st["share"],
                "opt_share": st["optimizer_state_bytes"] / reference_opt,
                "error": abs(st["optimizer_state_bytes"] / reference_opt - st["share"]) / st["share"],
            }
            for rs in reps.values()
            for r in rs
            for st in r["stages"]
        ]
        worst = max(p["error"] for p in proportional)
        step_tol, rss_tol = TARGETS["ost_step_time_within"], TARGETS["ost_peak_rss_within"]
        dt1_max = TARGETS["dt1_step_time_max_ratio"]
        targets = {
            "ost step time within 2% of plain": _target(ost["step_ratio"], step_tol, True, ost["step_ratio_ci95"]),
            "ost step time within 2% of plain (uncontended steps)": _target(
                ost["clean_step_ratio"], step_tol, around_one=True
            ),
            "ost peak RSS within 1% of plain (mean of the per-repetition ratios)": _target(
                ost["peak_rss_mean_ratio"], rss_tol, around_one=True
            ),
            "dt1 mean step <= 0.8x plain": _target(dt1["step_ratio"], dt1_max, ci=dt1["step_ratio_ci95"]),
            "dt1 mean step <= 0.8x plain (uncontended steps)": _target(dt1["clean_step_ratio"], dt1_max),
            "optimizer state proportional to stage share (worst relative error)": {
                **_target(worst, TARGETS["full_opt_state_proportional_tol"]),
                "applies": mode == "full",
            },
        }
        summary[mode] = {
            "configs": configs,
            "targets": targets,
            "ost_vs_plain_max_loss_diff": loss_diff,
            "plain_rep2_vs_rep1_max_loss_diff": plain_diff,
            "rep_spread_step": {label: c["rep_spread_step"] for label, c in configs.items()},
            "plain_step_flops_per_token": plain_flops,
            "dt1_flop_ratio": dt1["flop_ratio"],
            "forward_and_head_flop_share": (plain_flops["forward"] + plain_flops["head_input_grad"])
            / plain_flops["step"],
            "proportionality": proportional,
        }
    return summary


def _trainables(stage: dict[str, Any]) -> dict[str, Any]:
    """The arguments of :func:`step_matmul_flops` for a recorded stage."""
    return {
        "trained_layers": stage["trainable_layers"],
        "embeddings_trained": stage["embeddings_trained"],
        "head_trained": stage["head_trained"],
    }


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
    verdict = "**met**" if target["met"] else "**NOT met**"
    if target.get("resolved") is False:
        verdict += " (not resolved: the 95% CI crosses the limit)"
    return verdict


def _pair(values: list[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _layers(stage: dict[str, Any]) -> str:
    layers = stage["trainable_layers"]
    contiguous = len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
    text = f"{layers[0]}-{layers[-1]}" if contiguous else (",".join(map(str, layers)) or "none")
    extras = [name for name, flag in (("embed", stage["embeddings_trained"]), ("head", stage["head_trained"])) if flag]
    return " + ".join([text, *extras])


def reading_the_numbers(report: dict[str, Any]) -> list[str]:
    """The short explanation closing the report: dt1's flop bound under LoRA, and the measured spread."""
    s, summary = report["settings"], report["summary"]
    parts = []
    if "lora" in summary:
        info = summary["lora"]
        dt1 = info["configs"]["dt1"]
        depths = ", ".join(str(s["layers"] - min(st["trainable_layers"], default=s["layers"])) for st in dt1["stages"])
        flops = info["plain_step_flops_per_token"]
        parts.append(
            "(a) Under LoRA the base weights are frozen, so back-propagating through a block only computes the "
            "gradient of its input (about the matmul flops of its forward pass) plus the small adapter gradients, "
            "and the forward pass and the output head's input gradient are paid in every stage whatever trains: "
            f"for this model they are {info['forward_and_head_flop_share']:.0%} of the matmul flops of a plain LoRA "
            f"step ({flops['step'] / 1e6:.0f} MFLOP per token; the untied {s['vocab']}-word head alone "
            f"{2 * s['hidden'] * s['vocab'] / 1e6:.0f} MFLOP each way), so no staged variant can go below "
            f"{info['forward_and_head_flop_share']:.2f}x plain. dt1 only saves the input gradients of the blocks "
            f"below the trained group (its stages still back-propagate through {depths} of the {s['layers']} "
            f"blocks), so by matmul flops its best possible mean step is {dt1['flop_ratio']:.2f}x plain, "
            f"{'above' if dt1['flop_ratio'] > TARGETS['dt1_step_time_max_ratio'] else 'within'} the "
            f"{TARGETS['dt1_step_time_max_ratio']}x target before any overhead (measured {dt1['step_ratio']:.3f}; "
            "column *flop estimate*, which leaves out norms, activations, the loss and the optimizer step, the last "
            "negligible under LoRA)."
        )
        if "full" in summary:
            full = summary["full"]["configs"]["dt1"]
            parts.append(
                "In full fine-tuning frozen blocks also skip their weight gradients (and the optimizer updates only "
                f"the stage's share, not counted), so the matmul estimate for dt1 is {full['flop_ratio']:.2f}x "
                f"(measured {full['step_ratio']:.3f})."
            )
    spreads = {mode: info["rep_spread_step"] for mode, info in summary.items()}
    flat = [v for per_mode in spreads.values() for v in per_mode.values() if v is not None]
    plain = ", ".join(f"{mode} {per_mode['plain']:.3f}" for mode, per_mode in spreads.items())
    cis = [
        c["step_ratio_ci95"]
        for info in summary.values()
        for c in info["configs"].values()
        if c["label"] != "plain" and c["step_ratio_ci95"]
    ]
    widest = max(((hi - lo) / 2 for lo, hi in cis), default=0.0)
    runs = report["runs"]
    quiet = max(r["foreign_cpu_cores"] for r in runs) < CONTENDED_CORES
    parts.append(
        f"(b) Repeating a configuration changed its mean step time by a factor {min(flat):.3f}-{max(flat):.3f} "
        f"(rep 2 / rep 1; plain: {plain}), while other processes used at most "
        f"{max(r['foreign_cpu_cores'] for r in runs):.2f} cores during any run and the hypervisor took up to "
        f"{max(r['steal_cpu_cores'] for r in runs):.2f} cores from this virtual machine (steal column)"
        f"{': the spread comes from the machine itself, not from other processes' if quiet else ''}. "
        "The palindromic order cancels drift that is linear in time, so the "
        "pooled ratios are not biased by it, but faster fluctuations remain: the 95% intervals are up to "
        f"±{widest:.3f} wide, and a ratio that lies closer than that to 1 or to a target limit (for example "
        "ost's 2%) is not resolved by this run."
    )
    return ["## Reading the numbers", "", " ".join(parts), ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, runs, pooled configurations and stages per mode, targets."""
    s, machine, runs, summary = report["settings"], report["machine"], report["runs"], report["summary"]
    order = ", ".join(f"{label}" for label, _, _ in SCHEDULE)
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
        f"out of the step times. Per mode the runs go in the palindromic order {order}, each from a freshly "
        "seeded model, after a warm-up on a tiny model; pooling the two repetitions of a configuration cancels "
        "machine-speed drift that is linear in time. Ratios to plain use the pooled timed steps of both "
        "repetitions; their 95% CI is the delta-method interval over those steps (treated as independent). "
        "*Paired ratios* = mean step of repetition i / mean step of plain's repetition i. Total benchmark wall "
        f"time {report['total_wall_s']:.0f} s.",
        "",
        "Columns: *uncontended* = only the timed steps during which other processes used under "
        f"{CONTENDED_CORES} cores (measured per step from /proc/stat; the machine is shared). Peak RSS = VmHWM "
        "after resetting it (clear_refs 5) before each run, model construction included; Δ = peak minus RSS at "
        "the reset. Non-step = run wall time minus all step times (model build, trainer and dataset set-up, "
        "stage switches). Other procs = average cores used by other processes over the whole run; steal = average "
        "cores the hypervisor took from this virtual machine over the run (not seen by the uncontended filter). *Flop estimate* = "
        "matmul flops per token of the step relative to plain (see Reading the numbers). *Spread* = repetition 2 / "
        "repetition 1.",
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
        info = summary[mode]
        steps = len(mode_runs[0]["stages"][0]["step_times_s"])
        kind = "LoRA adapters" if mode == "lora" else "full fine-tuning"
        lines += [
            f"## {mode.upper()} ({kind}, {steps} steps per stage, every configuration twice)",
            "",
            "Runs in execution order:",
            "",
            "| run | rep | start (s) | stages | mean step (s) | median (s) | stdev (s) | n | uncontended mean (s) | n "
            "| ratio vs plain, same rep | peak RSS (MiB) | Δ RSS (MiB) | final loss | non-step (s) | other procs "
            "| steal |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mode_runs:
            lines.append(
                f"| {r['label']} | {r['rep']} | {r['start_s']:.0f} | {len(r['stages'])} | {r['mean_step_s']:.3f} "
                f"| {r['median_step_s']:.3f} | {r['stdev_step_s']:.3f} | {r['timed_steps']} "
                f"| {_num(r['clean_mean_step_s'])} | {r['clean_steps']} | {r['step_ratio_same_rep']:.3f} "
                f"| {_mib(r['peak_rss_bytes'])} | {_mib(r['peak_rss_delta_bytes'])} | {_num(r['final_loss'], 4)} "
                f"| {r['non_step_s']:.1f} | {r['foreign_cpu_cores']:.2f} | {r['steal_cpu_cores']:.2f} |"
            )
        lines += [
            "",
            "Configurations, both repetitions pooled:",
            "",
            "| config | n | mean step (s) | ratio vs plain (95% CI) | paired ratios | median of paired "
            "| uncontended ratio | flop estimate | step spread | peak RSS ratio per rep | peak RSS mean ratio "
            "| Δ RSS mean ratio | peak RSS spread |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in info["configs"].values():
            lines.append(
                f"| {c['label']} | {c['timed_steps']} | {c['mean_step_s']:.3f} "
                f"| {c['step_ratio']:.3f} {_ci(c['step_ratio_ci95'])} | {_pair(c['paired_step_ratios'])} "
                f"| {c['median_of_paired_step_ratios']:.3f} | {_num(c['clean_step_ratio'])} | {c['flop_ratio']:.3f} "
                f"| {_num(c['rep_spread_step'])} | {_pair(c['peak_rss_ratios'])} | {c['peak_rss_mean_ratio']:.3f} "
                f"| {c['peak_rss_delta_mean_ratio']:.3f} | {c['rep_spread_peak_rss']:.3f} |"
            )
        lines += [
            "",
            "Per stage, both repetitions pooled (within a run the stages keep their order, so a stage's pooled "
            "time still carries the drift over its offset inside the run): share = the stage's trainable "
            "parameters / all trainable parameters; optimizer state read at the stage's end (identical in both "
            "repetitions unless marked); opt share = its bytes / the plain run's optimizer bytes.",
            "",
            "| config | stage | name | trains | trainable | share | n | mean step (s) | ratio vs plain (95% CI) "
            "| uncontended ratio | flop estimate | optimizer state (MiB) | bytes/param | opt share |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in info["configs"].values():
            for st in c["stages"]:
                same = "" if st["optimizer_state_same_in_reps"] else " (differs between reps)"
                lines.append(
                    f"| {c['label']} | {st['index']} | {st['name']} | {_layers(st)} "
                    f"| {_params(st['trainable_params'])} | {st['share']:.3f} | {st['timed_steps']} "
                    f"| {st['mean_step_s']:.3f} | {st['step_ratio']:.3f} {_ci(st['step_ratio_ci95'])} "
                    f"| {_num(st['clean_step_ratio'])} | {st['flop_ratio']:.3f} "
                    f"| {_mib(st['optimizer_state_bytes'])}{same} | {st['opt_bytes_per_param']:.3f} "
                    f"| {_num(st['opt_share'])} |"
                )
        spread = ", ".join(f"{label} {_num(v)}" for label, v in info["rep_spread_step"].items())
        lines += [
            "",
            f"ost vs plain, max |Δ loss| over the logged steps (every pair of repetitions): "
            f"{_sci(info['ost_vs_plain_max_loss_diff'])}; plain repetition 2 vs 1: "
            f"{_sci(info['plain_rep2_vs_rep1_max_loss_diff'])}.",
            "",
            f"Run-to-run spread (mean step of repetition 2 / repetition 1): {spread}.",
            "",
            "| target | value | 95% CI | verdict |",
            "|---|---|---|---|",
        ]
        for name, target in info["targets"].items():
            lines.append(f"| {name} | {_num(target['value'], 4)} | {_ci(target.get('ci95'))} | {_verdict(target)} |")
        lines.append("")
    lines += reading_the_numbers(report)
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
        for label, variant, rep in SCHEDULE:
            t0 = time.perf_counter()
            run = run_one(s, mode, label, variant, dataset, tokenizer, rep=rep)
            run["start_s"] = t0 - started
            runs.append(run)
            print(
                f"[bench] {mode:4s} {label:5s} rep {rep} mean step {run['mean_step_s']:.3f}s "
                f"(uncontended {_num(run['clean_mean_step_s'])}s) "
                f"peak RSS {_mib(run['peak_rss_bytes'])} MiB, other processes {run['foreign_cpu_cores']:.2f} "
                f"cores ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    report = {
        "command": command,
        "settings": asdict(s),
        "intermediate": s.ffn,
        "machine": machine_info(),
        "targets": TARGETS,
        "schedule": [[label, rep] for label, _, rep in SCHEDULE],
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
