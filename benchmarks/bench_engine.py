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
of a configuration is reported as the run-to-run spread. The shared machinery (memory and CPU readings,
schedule, statistics, report writing) is in ``benchmarks/harness.py``.

Results go to ``<output-dir>/bench_engine_cpu.json`` and ``<output-dir>/bench_engine_cpu.md``.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_engine                  # ~9 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_engine --wait-idle 600  # start once others are idle
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_engine --quick          # smoke test (~1 min)
"""

from __future__ import annotations

import re
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from benchmarks import harness
from hf_tuning.llm.sft import StagedSFTConfig, StagedSFTTrainer

RESULT_STEM = "bench_engine_cpu"
LIBRARIES = ("torch", "transformers", "trl", "peft")
MODES = ("lora", "full")
# label -> staged variant (None: plain trl.SFTTrainer), in the order of the first half of the palindrome
CONFIGS: dict[str, str | None] = {"plain": None, "ost": "ost", "dt1": "dt1", "dt3": "dt3"}
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
class BenchSettings(harness.BenchmarkSettings):
    """Everything that defines a benchmark run (stored with the results); ``--quick`` overrides the sizes."""

    hidden: int = field(default=512, metadata={"help": "hidden size"})
    layers: int = field(default=12, metadata={"help": "decoder layers"})
    intermediate: int | None = field(default=None, metadata={"help": "MLP size (default 2.75x hidden)"})
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 32000
    steps: int = field(default=10, metadata={"help": "optimizer steps per stage"})
    full_steps: int | None = field(default=None, metadata={"help": "steps per stage in full mode (default: --steps)"})
    seq_len: int = 128
    batch_size: int = 4
    warmup_steps: int = field(default=2, metadata={"help": "steps per stage left out of timings"})
    modes: list[str] = field(
        default_factory=lambda: list(MODES), metadata={"help": "comma-separated subset of lora,full"}
    )
    lora_rank: int = 16
    learning_rate: float = 1e-4
    gradient_checkpointing: bool = field(default=False, metadata={"help": "train with gradient checkpointing"})
    quick: bool = field(default=False, metadata={"help": "tiny model, 3 steps per stage: a ~1 minute smoke test"})

    def __post_init__(self) -> None:
        self.modes = harness.comma_list(self.modes, MODES, "--modes")
        if self.quick:
            self.hidden, self.layers, self.intermediate, self.heads, self.kv_heads = 128, 4, 352, 4, 2
            self.vocab, self.steps, self.full_steps, self.seq_len, self.batch_size = 4000, 3, None, 64, 2
            self.warmup_steps = 1
        if min(self.steps_for(m) for m in self.modes) <= self.warmup_steps:
            raise ValueError("--steps (and --full-steps) must exceed --warmup-steps, or no step would be timed")

    @property
    def ffn(self) -> int:
        """Intermediate size: as given, else 2.75x hidden (1408 for hidden 512)."""
        return self.intermediate or int(round(2.75 * self.hidden / 64) * 64)

    def steps_for(self, mode: str) -> int:
        return self.full_steps if mode == "full" and self.full_steps else self.steps


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


class BenchCallback(harness.StepTimer):
    """Times every optimizer step and reads the optimizer state at the end of every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Any = None
        self.stages: list[StageRecord] = []

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

    def step_timed(self, seconds: float, other_cores: float, steal_cores: float) -> None:
        record = self.stages[-1]
        record.step_times_s.append(seconds)
        record.step_foreign_cores.append(other_cores)
        record.step_steal_cores.append(steal_cores)
        record.rss_step_end_mib.append(harness.rss_bytes() / harness.MIB)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.stages[-1].losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        record = self.stages[-1]
        if optimizer is not None:
            held = harness.optimizer_state(optimizer)
            record.optimizer_state_bytes = held["optimizer_state_bytes"]
            record.optimizer_param_numel = held["optimizer_param_numel"]
            record.optimizer_class = held["optimizer_class"]


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def training_args(s: BenchSettings, mode: str, variant: str | None, output_dir: str) -> SFTConfig:
    common = harness.trainer_kwargs(
        s,
        output_dir,
        s.steps_for(mode),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        activation_checkpointing=s.gradient_checkpointing,
        max_length=s.seq_len,
        packing=False,
    )
    if variant is None:
        return SFTConfig(**common)
    return StagedSFTConfig(**common, dt_variant=variant, dt_budget="per_stage")


def run_one(
    s: BenchSettings,
    mode: str,
    label: str,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerFast,
    rep: int = 1,
) -> dict[str, Any]:
    """Train one configuration (repetition ``rep``) from a fresh model; returns its timings and memory figures."""
    variant = CONFIGS[label]
    meter = harness.RunMeter().start()
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
        meter.stop()
        files = sorted(p.name for p in Path(out).rglob("*") if p.is_file())
        plan_dict = plan.to_dict() if plan is not None else None
        callback.trainer = None
        del trainer, model, plan
    after = harness.reset_peak_rss()
    stages = [asdict(r) for r in callback.stages]
    w = s.warmup_steps
    for record in stages:
        record.update(harness.timing_stats(record["step_times_s"][w:], record["step_foreign_cores"][w:]))
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
        **harness.timing_stats(harness.pool(stages, "step_times_s", w), harness.pool(stages, "step_foreign_cores", w)),
        "train_runtime_s": output.metrics.get("train_runtime"),
        "wall_s": meter.wall_s,
        "non_step_s": meter.wall_s - sum(t for r in callback.stages for t in r.step_times_s),
        "rss_before_bytes": meter.rss_before_bytes,
        "peak_rss_bytes": meter.peak_rss_bytes,
        "peak_rss_delta_bytes": meter.peak_rss_bytes - meter.rss_before_bytes,
        "rss_after_bytes": after,
        "foreign_cpu_cores": meter.foreign_cpu_cores,
        "steal_cpu_cores": meter.steal_cpu_cores,
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
        for label in ("plain", "dt3"):
            run_one(tiny, mode, label, data, tokenizer)


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------
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
            for label in CONFIGS
        }
        plain_runs = reps["plain"]
        plain_times = harness.pool(harness.stages_of(plain_runs), "step_times_s", w)
        plain = harness.timing_stats(plain_times, harness.pool(harness.stages_of(plain_runs), "step_foreign_cores", w))
        plain_of = harness.by_rep(plain_runs)
        reference_opt = plain_runs[0]["stages"][0]["optimizer_state_bytes"]
        plain_flops = step_matmul_flops(s, mode, **_trainables(plain_runs[0]["stages"][0]))
        for run in (r for r in runs if r["mode"] == mode):
            ref = plain_of[run["rep"]]
            run["step_ratio_same_rep"] = run["mean_step_s"] / ref["mean_step_s"]
            run["peak_rss_ratio_same_rep"] = run["peak_rss_bytes"] / ref["peak_rss_bytes"]
        configs: dict[str, Any] = {}
        for label, rs in reps.items():
            times = harness.pool(harness.stages_of(rs), "step_times_s", w)
            c: dict[str, Any] = {"label": label, "reps": [r["rep"] for r in rs], "trainer": rs[0]["trainer"]}
            c.update(harness.timing_stats(times, harness.pool(harness.stages_of(rs), "step_foreign_cores", w)))
            paired = harness.paired_ratios(rs, plain_runs, "mean_step_s")
            peak_ratios = [r["peak_rss_ratio_same_rep"] for r in rs]
            delta_ratios = harness.paired_ratios(rs, plain_runs, "peak_rss_delta_bytes")
            c.update(
                {
                    "step_ratio": c["mean_step_s"] / plain["mean_step_s"],
                    "step_ratio_ci95": harness.ratio_ci(times, plain_times),
                    "median_step_ratio": c["median_step_s"] / plain["median_step_s"],
                    "clean_step_ratio": harness.ratio(c["clean_mean_step_s"], plain["clean_mean_step_s"]),
                    "paired_step_ratios": paired,
                    "median_of_paired_step_ratios": statistics.median(paired),
                    "rep_spread_step": harness.ratio(rs[-1]["mean_step_s"], rs[0]["mean_step_s"]),
                    "rep_spread_clean_step": harness.ratio(rs[-1]["clean_mean_step_s"], rs[0]["clean_mean_step_s"]),
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
                stage_times = harness.pool(harness.stages_of(rs, k), "step_times_s", w)
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
                st.update(
                    harness.timing_stats(stage_times, harness.pool(harness.stages_of(rs, k), "step_foreign_cores", w))
                )
                opt = [x["optimizer_state_bytes"] for r in rs for x in r["stages"] if x["index"] == k]
                flops = step_matmul_flops(s, mode, **_trainables(first))
                st.update(
                    {
                        "step_ratio": st["mean_step_s"] / plain["mean_step_s"],
                        "step_ratio_ci95": harness.ratio_ci(stage_times, plain_times),
                        "clean_step_ratio": harness.ratio(st["clean_mean_step_s"], plain["clean_mean_step_s"]),
                        "optimizer_state_bytes": opt[0],
                        "optimizer_state_same_in_reps": len(set(opt)) == 1,
                        "opt_bytes_per_param": first["opt_bytes_per_param"],
                        "opt_share": harness.ratio(opt[0], reference_opt),
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
            "ost step time within 2% of plain": harness.against_limit(
                ost["step_ratio"], step_tol, True, ost["step_ratio_ci95"]
            ),
            "ost step time within 2% of plain (uncontended steps)": harness.against_limit(
                ost["clean_step_ratio"], step_tol, around_one=True
            ),
            "ost peak RSS within 1% of plain (mean of the per-repetition ratios)": harness.against_limit(
                ost["peak_rss_mean_ratio"], rss_tol, around_one=True
            ),
            "dt1 mean step <= 0.8x plain": harness.against_limit(dt1["step_ratio"], dt1_max, ci=dt1["step_ratio_ci95"]),
            "dt1 mean step <= 0.8x plain (uncontended steps)": harness.against_limit(dt1["clean_step_ratio"], dt1_max),
            "optimizer state proportional to stage share (worst relative error)": {
                **harness.against_limit(worst, TARGETS["full_opt_state_proportional_tol"]),
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


# ---------------------------------------------------------------------------------------------
# Report (a function of the saved JSON)
# ---------------------------------------------------------------------------------------------
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


def _layers(stage: dict[str, Any]) -> str:
    layers = stage["trainable_layers"]
    contiguous = len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
    text = f"{layers[0]}-{layers[-1]}" if contiguous else (",".join(map(str, layers)) or "none")
    extras = [name for name, flag in (("embed", stage["embeddings_trained"]), ("head", stage["head_trained"])) if flag]
    return " + ".join([text, *extras])


def reading_the_numbers(report: dict[str, Any]) -> list[str]:
    """The short explanation closing the report: dt1's flop bound under LoRA, and the measured spread."""
    s, summary, targets = report["settings"], report["summary"], report["targets"]
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
            f"{'above' if dt1['flop_ratio'] > targets['dt1_step_time_max_ratio'] else 'within'} the "
            f"{targets['dt1_step_time_max_ratio']}x target before any overhead (measured {dt1['step_ratio']:.3f}; "
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
    quiet = max(r["foreign_cpu_cores"] for r in runs) < harness.CONTENDED_CORES
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
    s, runs, summary = report["settings"], report["runs"], report["summary"]
    order = ", ".join(label for label, _ in report["schedule"])
    lines = [
        *harness.report_header("Staged-tuning engine benchmark (CPU)", report, LIBRARIES),
        f"Model: random-init LlamaForCausalLM, hidden {s['hidden']}, {s['layers']} layers, intermediate "
        f"{report['intermediate']}, heads {s['heads']}/{s['kv_heads']} kv, vocab {s['vocab']}, fp32, untied head "
        f"({harness.params(runs[0]['model_params'])} parameters). Data: synthetic pre-tokenised, seq len "
        f"{s['seq_len']}, batch {s['batch_size']}. LoRA: r={s['lora_rank']}, all-linear. AdamW (default `optim`), "
        f"constant LR, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}. Each stage runs the "
        f"full step budget (`dt_budget=per_stage`); the first {s['warmup_steps']} step(s) of every stage are left out "
        f"of the step times. Per mode the runs go in the palindromic order {order}, each from a freshly "
        "seeded model, after a warm-up on a tiny model; pooling the two repetitions of a configuration cancels "
        "machine-speed drift that is linear in time. Ratios to plain use the pooled timed steps of both "
        "repetitions; their 95% CI is the delta-method interval over those steps (treated as independent). "
        "*Paired ratios* = mean step of repetition i / mean step of plain's repetition i. Total benchmark wall "
        f"time {report['total_wall_s']:.0f} s.",
        "",
        "Columns: *uncontended* = only the timed steps during which other processes used under "
        f"{harness.CONTENDED_CORES} cores (measured per step from /proc/stat; the machine is shared). Peak RSS = "
        "VmHWM after resetting it (clear_refs 5) before each run, model construction included; Δ = peak minus RSS at "
        "the reset. Non-step = run wall time minus all step times (model build, trainer and dataset set-up, "
        "stage switches). Other procs = average cores used by other processes over the whole run; steal = average "
        "cores the hypervisor took from this virtual machine over the run (not seen by the uncontended filter). "
        "*Flop estimate* = matmul flops per token of the step relative to plain (see Reading the numbers). "
        "*Spread* = repetition 2 / repetition 1.",
        "",
        *harness.contention_warning(runs, report["foreign_cpu_cores_at_start"], "compare the uncontended columns."),
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
            *harness.table(
                ["run", "rep", "start (s)", "stages", "mean step (s)", "median (s)", "stdev (s)", "n"]
                + ["uncontended mean (s)", "n", "ratio vs plain, same rep", "peak RSS (MiB)", "Δ RSS (MiB)"]
                + ["final loss", "non-step (s)", "other procs", "steal"],
                [
                    [r["label"], r["rep"], f"{r['start_s']:.0f}", len(r["stages"]), f"{r['mean_step_s']:.3f}"]
                    + [f"{r['median_step_s']:.3f}", f"{r['stdev_step_s']:.3f}", r["timed_steps"]]
                    + [harness.num(r["clean_mean_step_s"]), r["clean_steps"], f"{r['step_ratio_same_rep']:.3f}"]
                    + [
                        harness.mib(r["peak_rss_bytes"]),
                        harness.mib(r["peak_rss_delta_bytes"]),
                        harness.num(r["final_loss"], 4),
                    ]
                    + [f"{r['non_step_s']:.1f}", f"{r['foreign_cpu_cores']:.2f}", f"{r['steal_cpu_cores']:.2f}"]
                    for r in mode_runs
                ],
            ),
            "",
            "Configurations, both repetitions pooled:",
            "",
            *harness.table(
                ["config", "n", "mean step (s)", "ratio vs plain (95% CI)", "paired ratios", "median of paired"]
                + ["uncontended ratio", "flop estimate", "step spread", "peak RSS ratio per rep"]
                + ["peak RSS mean ratio", "Δ RSS mean ratio", "peak RSS spread"],
                [
                    [c["label"], c["timed_steps"], f"{c['mean_step_s']:.3f}"]
                    + [harness.with_ci(c["step_ratio"], c["step_ratio_ci95"]), harness.joined(c["paired_step_ratios"])]
                    + [f"{c['median_of_paired_step_ratios']:.3f}", harness.num(c["clean_step_ratio"])]
                    + [
                        f"{c['flop_ratio']:.3f}",
                        harness.num(c["rep_spread_step"]),
                        harness.joined(c["peak_rss_ratios"]),
                    ]
                    + [f"{c['peak_rss_mean_ratio']:.3f}", f"{c['peak_rss_delta_mean_ratio']:.3f}"]
                    + [f"{c['rep_spread_peak_rss']:.3f}"]
                    for c in info["configs"].values()
                ],
            ),
            "",
            "Per stage, both repetitions pooled (within a run the stages keep their order, so a stage's pooled "
            "time still carries the drift over its offset inside the run): share = the stage's trainable "
            "parameters / all trainable parameters; optimizer state read at the stage's end (identical in both "
            "repetitions unless marked); opt share = its bytes / the plain run's optimizer bytes.",
            "",
            *harness.table(
                ["config", "stage", "name", "trains", "trainable", "share", "n", "mean step (s)"]
                + ["ratio vs plain (95% CI)", "uncontended ratio", "flop estimate", "optimizer state (MiB)"]
                + ["bytes/param", "opt share"],
                [
                    [c["label"], st["index"], st["name"], _layers(st), harness.params(st["trainable_params"])]
                    + [f"{st['share']:.3f}", st["timed_steps"], f"{st['mean_step_s']:.3f}"]
                    + [harness.with_ci(st["step_ratio"], st["step_ratio_ci95"]), harness.num(st["clean_step_ratio"])]
                    + [f"{st['flop_ratio']:.3f}", harness.optimizer_mib(st)]
                    + [f"{st['opt_bytes_per_param']:.3f}", harness.num(st["opt_share"])]
                    for c in info["configs"].values()
                    for st in c["stages"]
                ],
            ),
            "",
            f"ost vs plain, max |Δ loss| over the logged steps (every pair of repetitions): "
            f"{_sci(info['ost_vs_plain_max_loss_diff'])}; plain repetition 2 vs 1: "
            f"{_sci(info['plain_rep2_vs_rep1_max_loss_diff'])}.",
            "",
            "Run-to-run spread (mean step of repetition 2 / repetition 1): "
            + ", ".join(f"{label} {harness.num(v)}" for label, v in info["rep_spread_step"].items())
            + ".",
            "",
            *harness.table(
                ["target", "value", "95% CI", "verdict"],
                [
                    [name, harness.num(t["value"], 4), harness.ci(t.get("ci95")), _verdict(t)]
                    for name, t in info["targets"].items()
                ],
            ),
            "",
        ]
    lines += reading_the_numbers(report)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _progress(run: dict[str, Any], seconds: float) -> str:
    return (
        f"[bench] {run['mode']:4s} {run['label']:5s} rep {run['rep']} mean step {run['mean_step_s']:.3f}s "
        f"(uncontended {harness.num(run['clean_mean_step_s'])}s) "
        f"peak RSS {harness.mib(run['peak_rss_bytes'])} MiB, other processes {run['foreign_cpu_cores']:.2f} "
        f"cores ({seconds:.0f}s)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every configuration in palindromic order per mode, analyse, write the JSON and markdown reports."""
    s = harness.parse_settings(BenchSettings, argv, __doc__)
    with harness.benchmark_session(s, "benchmarks.bench_engine", argv) as bench:
        tokenizer = build_tokenizer()
        dataset = build_dataset(s)
        print(f"[bench] warm-up ({s.threads} threads)", flush=True)
        warm_up(s, tokenizer)
        schedule = harness.palindrome(tuple(CONFIGS), 2)
        for mode in s.modes:
            for label, rep in schedule:
                bench.measure(_progress, run_one, s, mode, label, dataset, tokenizer, rep=rep)
        setup = {"intermediate": s.ffn, "targets": TARGETS}
        report = bench.report(schedule, LIBRARIES, setup=setup, summary=analyse(s, bench.runs))
    print(harness.save_report(Path(s.output_dir) / f"{RESULT_STEM}.json", report, render_markdown))
    return report


if __name__ == "__main__":
    main()
