"""Training memory and step time of SNELL against LoRA and a dense-delta baseline; merged SNELL inference speed.

SNELL's claims: its high-rank sparse delta costs about LoRA's memory in training, because the dense delta of each
matrix is rebuilt in backward rather than stored (the optimizer holds only the factors, LoRA's count at the same
rank), far below sparse-tuning methods that keep a full delta per matrix; and, merged into the weights, it costs
nothing at inference. This benchmark trains a random-initialised ``vit_base_patch16_224`` (224x224 images,
``--num-classes`` classes) on one fixed random batch in each mode:

* ``lora``: PEFT LoRA (r 8, alpha 16, dropout as SNELL's) on every ``nn.Linear`` inside the blocks (PEFT adapts
  the fused qkv as one matrix: q, k and v share one pair of factors, 3,072 fewer parameters per block than r 8
  on each);
* ``snell8`` and ``snell32``: ``SNELLConfig(rank=8 / 32)`` on q, k, v, proj, fc1, fc2 (sparsity ``--sparsity``,
  the method's input dropout and delta drop-path 0.1), the dense delta checkpointed;
* ``snell8_stored``: SNELL-8 with ``checkpoint_delta=False``: what storing the dense deltas costs;
* ``dense_delta``: the baseline: a full trainable delta per matrix under a fixed random mask of density
  ``1 - sparsity`` (the delta, its gradient and AdamW's two moments are each one weight-sized tensor per matrix);

each in a fresh process, in palindromic order, with the measurements of :func:`benchmarks.harness.measure_training`
(peak RSS and its rise over the start of training, bytes saved for backward, step times with the other
processes' cores; with ``--device cuda`` also ``max_memory_allocated`` with the forward under bf16 autocast).
The training workers run with glibc's ``MALLOC_MMAP_THRESHOLD_`` at ``--malloc-mmap-threshold`` (128 KiB): every
tensor above it is mmapped and handed back to the kernel when freed, so the RSS peak follows the memory that is
live rather than heap glibc keeps. The memory target is on the *peak RSS* (weights, the trainable parameters,
activations, gradients, optimizer state: what the paper's figures count), the rise is shown beside it.

Inference (one more worker): the plain ViT, SNELL-8 merged into a deep copy of it, and the same SNELL unmerged,
in evaluation mode without autograd at batch ``--inference-batch-size``, in palindromic order, each timed over
``--iterations`` forwards (:func:`benchmarks.harness.time_forwards`); throughput ratios to the plain ViT with a
95% delta-method interval. Before timing, the merged model's logits are checked against the unmerged ones.

Targets (the issue's): SNELL peak rise <= 1.15x LoRA's, and below the dense-delta baseline's; merged SNELL
throughput >= 0.98x the plain ViT. Results: ``<output-dir>/bench_snell_cpu.json`` and ``.md``
(``bench_snell_cuda.*``; ``*_quick.*`` with ``--quick``).

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_snell                      # ~15 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_snell --device cuda        # bf16 autocast on a GPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_snell --quick --output-dir /tmp/snell   # ~40 s
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from benchmarks import harness

MODULE = "benchmarks.bench_snell"
LIBRARIES = ("torch", "timm", "peft")
MODES = ("lora", "snell8", "snell32", "snell8_stored", "dense_delta")
SNELL_MODES = ("snell8", "snell32")  # the modes the memory target is about
INFERENCE = ("plain", "snell_merged", "snell_unmerged")
NAMES = {
    "lora": "LoRA r8", "snell8": "SNELL-8", "snell32": "SNELL-32", "snell8_stored": "SNELL-8 (delta stored)",
    "dense_delta": "dense delta", "plain": "plain ViT", "snell_merged": "SNELL-8 merged",
    "snell_unmerged": "SNELL-8 unmerged",
}  # fmt: skip
INFERENCE_WORKER = "inference"
MODEL = "vit_base_patch16_224"
QUICK_MODEL = "vit_tiny_patch16_224"
QUICK_MODEL_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}


@dataclass
class SnellBenchSettings(harness.BenchmarkSettings):
    """Everything that defines a benchmark run (stored with the results); ``--quick`` shrinks the model, the
    batches, the steps and the repetitions (where not given)."""

    modes: list[str] = field(
        default_factory=lambda: list(MODES),
        metadata={"help": f"comma-separated subset of {','.join(MODES)}, with lora (the ratios are taken to it)"},
    )
    device: Literal["cpu", "cuda"] = field(
        default="cpu", metadata={"help": "cpu (fp32) or cuda (forward under bf16 autocast; adds max_memory_allocated)"}
    )
    batch_size: int | None = field(default=None, metadata={"help": "training images per step (default 16; quick 4)"})
    steps: int | None = field(default=None, metadata={"help": "timed training steps per run (default 2; quick 1)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "untimed steps before them (default 1; quick 0)"})
    repeats: int | None = field(default=None, metadata={"help": "runs per mode, palindromic (default 2; quick 1)"})
    concurrent_runs: int | None = field(
        default=None, metadata={"help": "training workers at once (default 1; quick 2: their step times contend)"}
    )
    inference_batch_size: int | None = field(
        default=None, metadata={"help": "images per forward (default 32; quick 4)"}
    )
    iterations: int | None = field(default=None, metadata={"help": "timed forwards per run (default 4; quick 2)"})
    inference_repeats: int | None = field(
        default=None, metadata={"help": "inference runs per configuration, palindromic (default 3; quick 1)"}
    )
    num_classes: int = 100
    learning_rate: float = 1e-3
    sparsity: float = 0.9
    lora_r: int = 8
    lora_alpha: int = 16
    dropout: float = field(default=0.1, metadata={"help": "input dropout of SNELL's deltas and of LoRA"})
    memory_limit: float = field(default=1.15, metadata={"help": "target: SNELL peak RSS / LoRA peak RSS at most"})
    malloc_mmap_threshold: int = field(
        default=131072,
        metadata={"help": "glibc MALLOC_MMAP_THRESHOLD_ of the training workers (0: glibc's default, heap kept)"},
    )
    throughput_target: float = field(default=0.98, metadata={"help": "target: merged SNELL / plain throughput"})
    quick: bool = field(
        default=False, metadata={"help": "a 4-block 64-wide ViT on 32x32 images, batch 4, 1 step, 1 run: a smoke test"}
    )

    def __post_init__(self) -> None:
        defaults = (4, 1, 0, 1, 2, 4, 2, 1) if self.quick else (16, 2, 1, 2, 1, 32, 4, 3)
        names = ("batch_size", "steps", "warmup_steps", "repeats", "concurrent_runs", "inference_batch_size",
                 "iterations", "inference_repeats")  # fmt: skip
        for name, default in zip(names, defaults):
            if getattr(self, name) is None:
                setattr(self, name, default)
        self.modes = harness.comma_list(self.modes, MODES, "--modes")
        if "lora" not in self.modes:
            raise ValueError("--modes must include lora: the memory target and the ratios are taken against it")
        if min(self.batch_size, self.steps, self.repeats, self.concurrent_runs, self.inference_batch_size) < 1:
            raise ValueError("batch sizes, --steps, --repeats and --concurrent-runs must be >= 1")
        if min(self.iterations, self.inference_repeats) < 1 or self.warmup_steps < 0:
            raise ValueError("--iterations and --inference-repeats must be >= 1, --warmup-steps >= 0")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")

    @property
    def result_stem(self) -> str:
        return f"bench_snell_{self.device}" + ("_quick" if self.quick else "")

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        return (QUICK_MODEL, dict(QUICK_MODEL_KWARGS)) if self.quick else (MODEL, {})


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------
class DenseDeltaLinear(nn.Module):
    """The baseline: a frozen linear layer plus a full trainable delta under a fixed random mask, as sparse
    tuning that keeps the whole delta per matrix holds it."""

    def __init__(self, base_layer: nn.Linear, density: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta = nn.Parameter(torch.zeros_like(base_layer.weight))
        self.register_buffer("mask", torch.rand(base_layer.weight.shape, generator=generator) < density)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(x, (self.delta * self.mask).to(x.dtype))


def plain_backbone(s: SnellBenchSettings) -> nn.Module:
    """The seeded ViT every mode starts from (the same weights in every process)."""
    from hf_tuning.vision import VisionModelArguments, load_vision_model

    name, kwargs = s.model_spec()
    torch.manual_seed(s.seed)
    return load_vision_model(VisionModelArguments(model_name_or_path=name, model_kwargs=kwargs), s.num_classes)


def build_model(s: SnellBenchSettings, mode: str) -> nn.Module:
    """The backbone in the trainable form of ``mode``."""
    from hf_tuning.tuners import SNELLConfig, get_petl_model
    from hf_tuning.vision.tuning import VisionTuningArguments, block_linear_names, prepare_for_tuning

    model = plain_backbone(s)
    if mode == "lora":
        tuning = VisionTuningArguments(tuning_mode="lora", lora_r=s.lora_r, lora_alpha=s.lora_alpha,
                                       lora_dropout=s.dropout)  # fmt: skip
        return prepare_for_tuning(model, tuning).to(s.device)
    if mode == "dense_delta":
        generator = torch.Generator().manual_seed(s.seed)
        model.requires_grad_(False)
        for name in block_linear_names(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, DenseDeltaLinear(getattr(parent, child), 1.0 - s.sparsity, generator))
        model.get_submodule("head").requires_grad_(True)
        return model.to(s.device)
    rank = 32 if mode == "snell32" else 8
    config = SNELLConfig(rank=rank, sparsity=s.sparsity, dropout=s.dropout, checkpoint_delta=mode != "snell8_stored")
    return get_petl_model(model, config).to(s.device)


# ---------------------------------------------------------------------------------------------
# The workers
# ---------------------------------------------------------------------------------------------
def measure_mode(s: SnellBenchSettings, mode: str) -> dict[str, Any]:
    """Build, reset the peak, train ``warmup_steps + steps`` steps on one fixed batch, read the peaks."""
    t0 = time.perf_counter()
    model = build_model(s, mode)
    build_s = time.perf_counter() - t0
    measured = harness.measure_classifier_training(
        model, batch_size=s.batch_size, img_size=s.model_spec()[1].get("img_size", 224), num_classes=s.num_classes,
        seed=s.seed, device=s.device, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, steps=s.steps,
    )  # fmt: skip
    return {**measured, "build_s": build_s}


def measure_inference(s: SnellBenchSettings) -> dict[str, Any]:
    """Plain ViT, merged and unmerged SNELL-8 (on a deep copy, the same backbone weights), palindromic."""
    from hf_tuning.tuners import SNELLConfig, get_petl_model

    plain = plain_backbone(s).to(s.device).eval()
    snell = get_petl_model(copy.deepcopy(plain), SNELLConfig(rank=8, sparsity=s.sparsity)).to(s.device).eval()
    generator = torch.Generator().manual_seed(s.seed + 1)
    with torch.no_grad():  # trained-looking factors, so the merge really changes the weights
        for delta in snell.deltas().values():
            for factors in (delta.in_factors, delta.out_factors):
                factors.copy_(torch.randn(factors.shape, generator=generator) * 0.1)
    size = s.model_spec()[1].get("img_size", 224)
    x = torch.randn(s.inference_batch_size, 3, size, size, generator=generator).to(s.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device == "cuda" else contextlib.nullcontext()

    def forward(model: nn.Module) -> Any:
        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast:
                return model(batch)

        return run

    with torch.no_grad():
        unmerged = snell(x).float()
        snell.merge()
        merged = snell(x).float()
    merge_error = float((merged - unmerged).abs().max())
    runs = []
    for config, rep in harness.palindrome(INFERENCE, s.inference_repeats):
        if config == "snell_unmerged":
            snell.unmerge()
        elif config == "snell_merged":
            snell.merge()
        model = plain if config == "plain" else snell
        timed = harness.time_forwards(forward(model), x, device=s.device, warmup=1, iterations=s.iterations,
                                      min_time_s=0.0)  # fmt: skip
        runs.append({"config": config, "rep": rep, **timed})
    return {"merge_max_abs_error": merge_error, "runs": runs}


def worker_main(s: SnellBenchSettings, mode: str) -> None:
    """Measure ``mode`` (or the inference configurations) and print the result as the last line of stdout."""
    with harness.benchmark_process(s.threads):
        result = measure_inference(s) if mode == INFERENCE_WORKER else measure_mode(s, mode)
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------
def summarise(s: dict[str, Any], runs: list[dict[str, Any]], inference: dict[str, Any]) -> dict[str, Any]:
    """Per mode: memory (max over repetitions), pooled step times, ratios to LoRA and to the dense delta; per
    inference configuration: throughput and its ratio to the plain ViT; the targets."""
    cuda = s["device"] == "cuda"
    per_mode: dict[str, dict[str, Any]] = {}
    for mode in s["modes"]:
        rs = [r for r in runs if r["mode"] == mode]
        times = harness.pool(rs, "step_times_s")
        per_mode[mode] = {
            "trainable_params": rs[0]["trainable_params"],
            "peak_rise_bytes": max(r["peak_rise_bytes"] for r in rs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "saved_activation_bytes": max(r["saved_activation_bytes"] for r in rs),
            "cuda_max_allocated_bytes": max(r["cuda_max_allocated_bytes"] for r in rs) if cuda else None,
            "step_times_s": times,
            **harness.timing_stats(times, harness.pool(rs, "step_foreign_cores")),
        }
    for m in per_mode.values():
        for ref in ("lora", "dense_delta"):
            base = per_mode.get(ref)
            for key in ("peak_rss_bytes", "peak_rise_bytes", "saved_activation_bytes", "cuda_max_allocated_bytes",
                        "mean_step_s"):  # fmt: skip
                m[f"{key}_to_{ref}"] = harness.ratio(m[key], base[key]) if base else None
    per_config: dict[str, dict[str, Any]] = {}
    for config in INFERENCE:
        times = harness.pool([r for r in inference["runs"] if r["config"] == config], "step_times_s")
        per_config[config] = {"step_times_s": times, "mean_step_s": sum(times) / len(times),
                              "images_per_s": s["inference_batch_size"] * len(times) / sum(times)}  # fmt: skip
    plain_times = per_config["plain"]["step_times_s"]
    for c in per_config.values():  # throughput ratio = inverse time ratio
        c["throughput_to_plain"] = harness.ratio(per_config["plain"]["mean_step_s"], c["mean_step_s"])
        interval = harness.ratio_ci(c["step_times_s"], plain_times)
        c["throughput_to_plain_ci95"] = None if interval is None else (1 / interval[1], 1 / interval[0])
    targets: dict[str, Any] = {}
    for mode in (x for x in SNELL_MODES if x in per_mode):
        targets[mode] = {"rss": harness.against_limit(per_mode[mode]["peak_rss_bytes_to_lora"], s["memory_limit"])}
        if "dense_delta" in per_mode:
            targets[mode]["below_dense"] = per_mode[mode]["peak_rss_bytes"] < per_mode["dense_delta"]["peak_rss_bytes"]
        if cuda:
            value = per_mode[mode]["cuda_max_allocated_bytes_to_lora"]
            targets[mode]["cuda"] = harness.against_limit(value, s["memory_limit"])
    merged = per_config["snell_merged"]
    targets["merged_throughput"] = {
        "value": merged["throughput_to_plain"],
        "met": merged["throughput_to_plain"] >= s["throughput_target"],
        "ci95": merged["throughput_to_plain_ci95"],
    }
    return {"modes": per_mode, "inference": per_config, "targets": targets,
            "merge_max_abs_error": inference["merge_max_abs_error"]}  # fmt: skip


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "not met")


def target_lines(report: dict[str, Any]) -> list[str]:
    s, targets = report["settings"], report["summary"]["targets"]
    lines = []
    for mode in SNELL_MODES:
        if mode not in targets:
            continue
        for measure, what in (("rss", "peak RSS"), ("cuda", "max_memory_allocated")):
            if measure in targets[mode]:
                t = targets[mode][measure]
                lines.append(f"* {NAMES[mode]} {what} / LoRA {what} <= {s['memory_limit']}: **{_verdict(t['met'])}** "
                             f"({harness.num(t['value'])})")  # fmt: skip
        if "below_dense" in targets[mode]:
            lines.append(
                f"* {NAMES[mode]} peak RSS below the dense delta's: **{_verdict(targets[mode]['below_dense'])}**"
            )
    t = targets["merged_throughput"]
    lines.append(f"* merged SNELL-8 throughput / plain ViT >= {s['throughput_target']}: **{_verdict(t['met'])}** "
                 f"({harness.with_ci(t['value'], t['ci95'])})")  # fmt: skip
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    s, summary, runs = report["settings"], report["summary"], report["runs"]
    cuda = s["device"] == "cuda"
    model = report["model"]
    order = ", ".join(f"{mode} {rep}" for mode, rep in report["schedule"])
    lines = [
        *harness.report_header(f"SNELL training memory and merged inference ({s['device']})", report, LIBRARIES),
        f"Set-up: `{model['timm_name']}` with {harness.as_tuples(model['model_kwargs'])}, random weights, "
        f"{harness.params(model['total_params'])} parameters, {s['num_classes']} classes, "
        f"{'fp32 weights, forward under bf16 autocast' if cuda else 'fp32'} on {s['device']}. Training: one fixed "
        f"random batch of {s['batch_size']} images of {model['img_size']}x{model['img_size']}, AdamW (lr "
        f"{s['learning_rate']}) over the trainable parameters, {s['warmup_steps']} untimed + {s['steps']} timed steps "
        f"per run, every run a fresh process, in the order {order}. SNELL: sparsity {s['sparsity']}, input dropout "
        f"{s['dropout']}, delta drop-path 0.1, on q, k, v, proj, fc1, fc2. LoRA: PEFT r={s['lora_r']}, "
        f"alpha={s['lora_alpha']}, dropout {s['dropout']}, on every `nn.Linear` inside the blocks (fused qkv as one). "
        f"Dense delta: a weight-sized trainable delta per matrix under a fixed mask of density {1 - s['sparsity']:.2f}. "
        f"Inference: batch {s['inference_batch_size']}, {s['iterations']} timed forwards per run after one untimed, "
        f"{s['inference_repeats']} runs per configuration in palindromic order, one process. Total wall time "
        f"{report['total_wall_s']:.0f} s"
        f"{' (quick mode: a tiny ViT, the numbers only show that the script works)' if s['quick'] else ''}.",
        "",
        "Columns: *peak RSS* = the training process's peak resident memory (VmHWM, reset once model, batch and "
        "optimizer are built; weights and trainable parameters included), the maximum over the repetitions; *peak "
        "rise* = peak RSS minus the RSS at that reset (activations, gradients, optimizer state, temporaries); "
        "*saved* = bytes of the new tensors autograd saves for backward in one forward; *step* = mean ± standard "
        "deviation of all timed steps. "
        + (
            f"glibc `MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']}` in the training workers, so freed tensors "
            "leave the RSS."
            if s.get("malloc_mmap_threshold")
            else "glibc's default allocator (freed heap stays in the RSS)."
        ),
        "",
        *harness.contention_warning(
            runs, report.get("foreign_cpu_cores_at_start", 0.0), "the time ratios are noisy (memory is not)."
        ),
        "## Targets",
        "",
        *target_lines(report),
        "",
        "## Training, per mode",
        "",
    ]
    header = ["mode", "trainable", "peak RSS (MiB)", "RSS / LoRA", "RSS / dense", "peak rise (MiB)", "rise / LoRA",
              "saved (MiB)", "saved / LoRA"]  # fmt: skip
    header += ["max allocated (MiB)", "allocated / LoRA"] if cuda else []
    header += ["step (s)", "step / LoRA"]
    rows = []
    for mode, m in summary["modes"].items():
        row = [NAMES[mode], harness.params(m["trainable_params"]), harness.mib(m["peak_rss_bytes"])]
        row += [harness.num(m["peak_rss_bytes_to_lora"]), harness.num(m["peak_rss_bytes_to_dense_delta"])]
        row += [harness.mib(m["peak_rise_bytes"]), harness.num(m["peak_rise_bytes_to_lora"])]
        row += [harness.mib(m["saved_activation_bytes"]), harness.num(m["saved_activation_bytes_to_lora"])]
        if cuda:
            row += [harness.mib(m["cuda_max_allocated_bytes"]), harness.num(m["cuda_max_allocated_bytes_to_lora"])]
        row += [f"{m['mean_step_s']:.3f} ± {m['stdev_step_s']:.3f}", harness.num(m["mean_step_s_to_lora"])]
        rows.append(row)
    lines += [*harness.table(header, rows), "", "## Inference", ""]
    lines += [f"Merged against unmerged logits: max abs difference {summary['merge_max_abs_error']:.2e}.", ""]
    rows = [
        [NAMES[c], f"{m['mean_step_s'] * 1000:.1f}", f"{m['images_per_s']:.1f}",
         harness.with_ci(m["throughput_to_plain"], m["throughput_to_plain_ci95"])]
        for c, m in summary["inference"].items()
    ]  # fmt: skip
    lines += [*harness.table(["configuration", "forward (ms)", "images/s", "throughput / plain"], rows), ""]
    run_rows = [
        [NAMES[r["mode"]], r["rep"], f"{r['start_s']:.0f}", harness.mib(r["peak_rise_bytes"]),
         harness.joined(r["step_times_s"], 2), f"{r['foreign_cpu_cores']:.2f}", harness.joined(r["losses"], 3)]
        for r in runs
    ]  # fmt: skip
    header = ["mode", "rep", "start (s)", "peak rise (MiB)", "steps (s)", "other procs", "losses"]
    lines += ["## Training runs in execution order", "", *harness.table(header, run_rows), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _progress(run: dict[str, Any], _waited: float) -> str:
    if "runs" in run:
        return f"[bench] inference: {len(run['runs'])} runs ({run['wall_s']:.0f}s)"
    return (
        f"[bench] {run['mode']:14s} rep {run['rep']}: peak RSS {harness.mib(run['peak_rss_bytes'])} MiB, step "
        f"{sum(run['step_times_s']) / len(run['step_times_s']):.2f} s ({run['wall_s']:.0f}s)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Every training mode in palindromic order, each in a fresh process, then the inference worker."""
    argv = sys.argv[1:] if argv is None else list(argv)
    mode, rest = harness.worker_mode(argv)
    if mode is not None:
        worker_main(harness.parse_settings(SnellBenchSettings, rest, __doc__), mode)
        return {}
    s = harness.parse_settings(SnellBenchSettings, argv, __doc__)
    schedule = harness.palindrome(s.modes, s.repeats)
    with harness.benchmark_session(s, MODULE, argv) as bench:
        print(f"[bench] {len(schedule)} training runs and the inference run on {s.device}, {s.threads} threads")
        with ThreadPoolExecutor(max_workers=s.concurrent_runs) as pool:
            env = {"MALLOC_MMAP_THRESHOLD_": str(s.malloc_mmap_threshold)} if s.malloc_mmap_threshold else {}
            futures = [pool.submit(harness.run_worker, MODULE, argv, s.threads, m, rep, env) for m, rep in schedule]
            for future in futures:
                run = bench.measure(_progress, future.result)
                run["start_s"] = run.pop("launched_at") - bench.started
        inference = harness.run_worker(MODULE, argv, s.threads, INFERENCE_WORKER, 1)
        print(_progress(inference, 0.0), flush=True)
        name, kwargs = s.model_spec()
        model = {"timm_name": name, "model_kwargs": kwargs, "img_size": kwargs.get("img_size", 224),
                 "total_params": sum(p.numel() for p in plain_backbone(s).parameters())}  # fmt: skip
        summary = summarise(asdict(s), bench.runs, inference)
        report = bench.report(schedule, LIBRARIES, s.device, setup={"model": model, "inference_runs": inference["runs"]},
                              summary=summary)  # fmt: skip
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(harness.save_report(out / f"{s.result_stem}.json", report, render_markdown))
    return report


if __name__ == "__main__":
    main()
