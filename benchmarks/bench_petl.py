"""Training peak memory and step time of DTL, DTL+, LoRA and full fine-tuning on one ViT-B/16.

DTL's claim is memory: its side network needs no gradient through the frozen blocks in front of the first
add-back, so those blocks store no activations (and ``dtl_no_grad_prefix`` runs them without autograd
altogether), while LoRA back-propagates through every block to reach its matrices. This benchmark trains a
random-initialised ``vit_base_patch16_224`` (224x224 images, ``--num-classes`` classes) on one fixed random
batch in each tuning mode of :func:`hf_tuning.vision.prepare_for_tuning`:

* ``full``: every weight; ``lora``: PEFT LoRA (r 8, alpha 16) on every ``nn.Linear`` inside the blocks;
* ``dtl`` and ``dtl_plus``: the side network of ``hf_tuning/tuners/dtl`` (rank 2; DTL+ with a 3x3 depthwise
  convolution), default blocks (maps on all 12, add-back after blocks 6-11);
* ``dtl_autograd``: DTL with ``dtl_no_grad_prefix=False``, relying on autograd alone as the reference code does,
  so the report shows what the no-grad prefix adds;

and records per run, from the reset of the peak counters after model, batch and AdamW (lr 1e-3) are built:

* the peak RSS rise above the RSS at that reset (activations, gradients, optimizer state and temporaries of
  ``--warmup-steps`` + ``--steps`` training steps), and the absolute peak RSS; with ``--device cuda`` also
  ``torch.cuda.max_memory_allocated()`` with the forward under bf16 autocast, the DTL paper's own measure;
* the time of every step (forward, cross-entropy, backward, ``optimizer.step``, ``zero_grad``) and the cores
  other processes used meanwhile;
* after the timed steps, the bytes of the new tensors autograd saves for backward in one forward
  (``torch.autograd.graph.saved_tensors_hooks``): the part of the rise that depends on the mode's graph alone.

Every run is a fresh process (this module with a hidden ``--worker MODE`` option, printing one JSON line), so
one mode's heap never inflates another's peak RSS. The parent runs the modes in palindromic order (full, lora,
dtl, dtl_plus, dtl_autograd, dtl_autograd, ..., full with ``--repeats 2``) so that drift of a shared machine's
speed cancels in the pooled step times. Memory is per mode the maximum over the repetitions; speed the mean of
all timed steps. Both are reported as ratios to LoRA and to full fine-tuning of the same invocation, with the
issue's target: DTL (and DTL+) peak rise / LoRA peak rise <= 0.6. Results: ``<output-dir>/bench_petl_cpu.json``
and ``.md`` (``bench_petl_cuda.*`` with ``--device cuda``; ``*_quick.*`` with ``--quick``).

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_petl                      # ~8 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_petl --device cuda        # bf16 autocast on a GPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_petl --quick --output-dir /tmp/petl   # ~30-40 s

Expected full-run time, measured on this repository's 2-core Xeon with 2 torch threads: 7 min 49 s (10 runs of
5 steps of batch 16; a full or LoRA step ~8 s, a DTL step ~4 s; ~8 s of imports per worker). ``--quick`` spends
nearly all its time importing torch, timm, transformers and peft in its five workers (~8 s of CPU each), so
it runs two at a time (``--concurrent-runs``): ~30 s on idle cores, ~40 s with another job on one of them.

What the CPU RSS measures: the rise also counts heap that glibc's malloc keeps after tensors are freed (chunks
under its dynamic mmap threshold), which depends on each mode's pattern of allocations. In the committed run
LoRA's rise (3.2 GiB) exceeds full fine-tuning's (2.8 GiB) although both save the same 1.8 GiB for backward and
full also holds gradients and AdamW moments of all 86M weights; one step after one warm-up step with
``MALLOC_MMAP_THRESHOLD_=131072`` (every tensor mmapped, returned to the kernel when freed) gave rises of 2.5 GiB
(full), 1.9 GiB (LoRA) and 0.75 GiB (DTL) against 2.8, 3.1 and 1.3 GiB with the default allocator: full then
highest, and DTL / LoRA ~0.4 either way (0.39, 0.41). ``saved`` (the graph alone) is the allocator-free figure.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks import harness

MODULE = "benchmarks.bench_petl"
LIBRARIES = ("torch", "timm", "transformers", "peft")
MODES = ("full", "lora", "dtl", "dtl_plus", "dtl_autograd")
DTL_MODES = ("dtl", "dtl_plus")  # the modes the target is about
MODEL = "vit_base_patch16_224"
# a ViT small enough for a smoke test: 32x32 images in 8x8 patches, 4 blocks 64 wide
QUICK_MODEL = "vit_tiny_patch16_224"
QUICK_MODEL_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class PetlBenchSettings(harness.BenchmarkSettings):
    """Everything that defines a benchmark run (stored with the results); ``--quick`` shrinks the model, the
    batch, the steps and the repetitions (where not given)."""

    modes: list[str] = field(
        default_factory=lambda: list(MODES),
        metadata={"help": f"comma-separated subset of {','.join(MODES)}, with lora (every ratio is taken to it)"},
    )
    device: Literal["cpu", "cuda"] = field(
        default="cpu", metadata={"help": "cpu (fp32) or cuda (forward under bf16 autocast; adds max_memory_allocated)"}
    )
    batch_size: int | None = field(default=None, metadata={"help": "images per step (default 16; quick 4)"})
    steps: int | None = field(default=None, metadata={"help": "timed training steps per run (default 4; quick 1)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "untimed steps before them (default 1; quick 0)"})
    repeats: int | None = field(
        default=None, metadata={"help": "runs per mode, in palindromic order (default 2; quick 1)"}
    )
    concurrent_runs: int | None = field(
        default=None,
        metadata={
            "help": "worker processes at once (default 1; quick 2): above 1 the runs' step times contend with each "
            "other (their memory, per process, does not); it saves the ~7 s of imports per worker in a smoke test"
        },
    )
    num_classes: int = 100
    learning_rate: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    dtl_rank: int = 2
    dtl_kernel_size: int = 3
    memory_limit: float = field(default=0.6, metadata={"help": "target: DTL peak rise / LoRA peak rise at most this"})
    quick: bool = field(
        default=False, metadata={"help": "a 4-block 64-wide ViT on 32x32 images, batch 4, 1 step, 1 run: a smoke test"}
    )

    def __post_init__(self) -> None:
        batch, steps, warmup, repeats, concurrent = (4, 1, 0, 1, 2) if self.quick else (16, 4, 1, 2, 1)
        self.batch_size = batch if self.batch_size is None else self.batch_size
        self.steps = steps if self.steps is None else self.steps
        self.warmup_steps = warmup if self.warmup_steps is None else self.warmup_steps
        self.repeats = repeats if self.repeats is None else self.repeats
        self.concurrent_runs = concurrent if self.concurrent_runs is None else self.concurrent_runs
        self.modes = harness.comma_list(self.modes, MODES, "--modes")
        if "lora" not in self.modes:
            raise ValueError("--modes must include lora: the memory target and the ratios are taken against it")
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError("--steps must be >= 1 and --warmup-steps >= 0")
        if self.repeats < 1 or self.batch_size < 1:
            raise ValueError("--repeats and --batch-size must be >= 1")
        if self.concurrent_runs < 1:
            raise ValueError("--concurrent-runs must be >= 1")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")

    @property
    def result_stem(self) -> str:
        return f"bench_petl_{self.device}" + ("_quick" if self.quick else "")

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        """The timm architecture and its ``create_model`` overrides."""
        return (QUICK_MODEL, dict(QUICK_MODEL_KWARGS)) if self.quick else (MODEL, {})


# ---------------------------------------------------------------------------------------------
# The worker: one mode, in a process of its own
# ---------------------------------------------------------------------------------------------
def build_model(s: PetlBenchSettings, mode: str) -> torch.nn.Module:
    """The seeded backbone (the same weights in every mode) in the trainable form of ``mode``."""
    from hf_tuning.vision import VisionModelArguments, VisionTuningArguments, load_vision_model, prepare_for_tuning

    name, kwargs = s.model_spec()
    torch.manual_seed(s.seed)
    model = load_vision_model(VisionModelArguments(model_name_or_path=name, model_kwargs=kwargs), s.num_classes)
    tuning = VisionTuningArguments(
        tuning_mode="dtl" if mode == "dtl_autograd" else mode,
        lora_r=s.lora_r,
        lora_alpha=s.lora_alpha,
        dtl_rank=s.dtl_rank,
        dtl_kernel_size=s.dtl_kernel_size,
        dtl_no_grad_prefix=mode != "dtl_autograd",
    )
    return prepare_for_tuning(model, tuning).to(s.device)


def measure_mode(s: PetlBenchSettings, mode: str) -> dict[str, Any]:
    """Build, reset the peak, train ``warmup_steps + steps`` steps on one fixed batch, read the peaks."""
    t0 = time.perf_counter()
    model = build_model(s, mode)
    build_s = time.perf_counter() - t0
    measured = harness.measure_classifier_training(
        model, batch_size=s.batch_size, img_size=s.model_spec()[1].get("img_size", 224), num_classes=s.num_classes,
        seed=s.seed, device=s.device, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, steps=s.steps,
    )  # fmt: skip
    result: dict[str, Any] = {**measured, "build_s": build_s}
    if hasattr(model, "map_blocks"):  # a DTL model: where its side network reads and writes back
        result["dtl_map_blocks"] = list(model.map_blocks)
        result["dtl_add_after_blocks"] = list(model.add_after_blocks)
    return result


def worker_main(s: PetlBenchSettings, mode: str) -> None:
    """Measure ``mode`` and print the result as the last line of stdout, for the parent to parse."""
    with harness.benchmark_process(s.threads):
        result = measure_mode(s, mode)
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------
def summarise(s: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: memory (max over repetitions) and pooled step times, each with its ratios to LoRA and full;
    the memory target of the DTL modes."""
    cuda = s["device"] == "cuda"
    per_mode: dict[str, dict[str, Any]] = {}
    for mode in s["modes"]:
        rs = [r for r in runs if r["mode"] == mode]
        times = harness.pool(rs, "step_times_s")
        m: dict[str, Any] = {
            "trainable_params": rs[0]["trainable_params"],
            "total_params": rs[0]["total_params"],
            "peak_rise_bytes": max(r["peak_rise_bytes"] for r in rs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "saved_activation_bytes": max(r["saved_activation_bytes"] for r in rs),
            "cuda_max_allocated_bytes": max(r["cuda_max_allocated_bytes"] for r in rs) if cuda else None,
            "step_times_s": times,
            **harness.timing_stats(times, harness.pool(rs, "step_foreign_cores")),
        }
        per_mode[mode] = m
    for m in per_mode.values():
        for ref in ("lora", "full"):
            base = per_mode.get(ref)
            for key in ("peak_rise_bytes", "saved_activation_bytes", "cuda_max_allocated_bytes", "mean_step_s"):
                m[f"{key}_to_{ref}"] = harness.ratio(m[key], base[key]) if base else None
            m[f"step_to_{ref}_ci95"] = harness.ratio_ci(m["step_times_s"], base["step_times_s"]) if base else None
    limit = s["memory_limit"]
    targets = {}
    for mode in (x for x in DTL_MODES if x in per_mode):
        targets[mode] = {"rss": harness.against_limit(per_mode[mode]["peak_rise_bytes_to_lora"], limit)}
        if cuda:
            targets[mode]["cuda"] = harness.against_limit(per_mode[mode]["cuda_max_allocated_bytes_to_lora"], limit)
    return {"modes": per_mode, "targets": targets}


# ---------------------------------------------------------------------------------------------
# Report (a function of the saved JSON)
# ---------------------------------------------------------------------------------------------
MODE_NAMES = {"full": "full", "lora": "LoRA", "dtl": "DTL", "dtl_plus": "DTL+", "dtl_autograd": "DTL (autograd)"}


def _verdict(target: dict[str, Any]) -> str:
    return "n/a" if target["met"] is None else ("met" if target["met"] else "not met")


def target_lines(report: dict[str, Any]) -> list[str]:
    """The issue's target, one line per DTL mode and memory measure."""
    limit, lines = report["settings"]["memory_limit"], []
    measures = {"rss": "peak rise", "cuda": "max_memory_allocated"}
    for mode, per_measure in report["summary"]["targets"].items():
        for measure, target in per_measure.items():
            name, what = MODE_NAMES[mode], measures[measure]
            lines.append(
                f"* {name} {what} / LoRA {what} <= {limit}: **{_verdict(target)}** ({harness.num(target['value'])})"
            )
    return lines


def observations(summary: dict[str, Any]) -> list[str]:
    """What the per-mode table says about the two questions it can raise: what the no-grad prefix adds over
    autograd alone, and (when it happens) why full fine-tuning's RSS rise can fall below LoRA's."""
    modes, lines = summary["modes"], []
    if "dtl" in modes and "dtl_autograd" in modes:
        dtl, auto = modes["dtl"], modes["dtl_autograd"]
        same = dtl["saved_activation_bytes"] == auto["saved_activation_bytes"]
        lines.append(
            f"* No-grad prefix: DTL saves {harness.mib(dtl['saved_activation_bytes'])} MiB for backward, DTL under "
            f"autograd alone {harness.mib(auto['saved_activation_bytes'])} MiB (peak rise "
            f"{harness.mib(dtl['peak_rise_bytes'])} vs {harness.mib(auto['peak_rise_bytes'])} MiB). "
            + (
                "Nothing in front of the first add-back requires a gradient, so autograd records no graph there "
                "either: the frozen prefix stores no activations with or without `dtl_no_grad_prefix`."
                if same
                else "The difference is what autograd keeps of the frozen prefix."
            )
        )
    if "full" in modes and modes["full"]["peak_rise_bytes"] < modes["lora"]["peak_rise_bytes"]:
        full, lora = modes["full"], modes["lora"]
        lines.append(
            f"* Full fine-tuning's peak rise ({harness.mib(full['peak_rise_bytes'])} MiB) is below LoRA's "
            f"({harness.mib(lora['peak_rise_bytes'])} MiB) although it also holds gradients and AdamW moments of "
            f"every weight, and both save the same for backward ({harness.mib(full['saved_activation_bytes'])} vs "
            f"{harness.mib(lora['saved_activation_bytes'])} MiB): the RSS also counts heap that glibc's malloc keeps "
            "after tensors are freed, which depends on each mode's pattern of allocations (see the module docstring "
            "for a run with `MALLOC_MMAP_THRESHOLD_` fixed)."
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """Set-up, the target, the per-mode table and the runs in execution order."""
    s, summary, runs = report["settings"], report["summary"], report["runs"]
    cuda = s["device"] == "cuda"
    modes = summary["modes"]
    dtl_run = next((r for r in runs if "dtl_map_blocks" in r), None)
    blocks = (
        f" (maps on blocks {harness.joined(dtl_run['dtl_map_blocks'], 0)}, add-back after blocks "
        f"{harness.joined(dtl_run['dtl_add_after_blocks'], 0)})"
        if dtl_run
        else ""
    )
    model = report["model"]
    precision = "fp32 weights, forward under bf16 autocast" if cuda else "fp32"
    order = ", ".join(f"{mode} {rep}" for mode, rep in report["schedule"])
    lines = [
        *harness.report_header(
            f"Training memory and step time of DTL, DTL+, LoRA and full ({s['device']})", report, LIBRARIES
        ),
        f"Set-up: `{model['timm_name']}` with {harness.as_tuples(model['model_kwargs'])}, random weights, "
        f"{harness.params(model['total_params'])} parameters, {s['num_classes']} classes, {precision} on "
        f"{s['device']}; one fixed random batch of {s['batch_size']} images of {model['img_size']}x"
        f"{model['img_size']}; AdamW (lr {s['learning_rate']}) over the trainable parameters. LoRA: PEFT, "
        f"r={s['lora_r']}, alpha={s['lora_alpha']}, on every `nn.Linear` inside the blocks. DTL: rank "
        f"{s['dtl_rank']}{blocks}; DTL+ adds a {s['dtl_kernel_size']}x{s['dtl_kernel_size']} depthwise convolution; "
        "DTL (autograd) is DTL with `dtl_no_grad_prefix=False` (the frozen prefix under autograd, as in the "
        f"reference code). Every run is a fresh process: {s['warmup_steps']} untimed + {s['steps']} timed steps "
        f"(forward, cross-entropy, backward, AdamW step), in the order {order}"
        + (
            f", {s['concurrent_runs']} processes at a time (so their step times contend with each other)"
            if s["concurrent_runs"] > 1
            else ""
        )
        + ". Total wall time "
        f"{report['total_wall_s']:.0f} s"
        f"{' (quick mode: a tiny ViT, the numbers only show that the script works)' if s['quick'] else ''}.",
        "",
        "Columns: *peak rise* = peak RSS (VmHWM, reset through clear_refs once model, batch and optimizer are built) "
        "minus the RSS at that reset: activations, gradients, optimizer state and temporaries of training; the "
        "maximum over the repetitions. *saved* = bytes of the new tensors autograd saves for backward in one "
        "forward (`saved_tensors_hooks`; parameters, buffers and the batch left out). "
        + (
            "*max allocated* = `torch.cuda.max_memory_allocated()` (weights included), the maximum over the "
            "repetitions. "
            if cuda
            else ""
        )
        + "*step* = mean ± standard deviation of all timed steps of all repetitions; its ratio to LoRA with a "
        "95% delta-method interval.",
        "",
        *harness.contention_warning(
            runs, report.get("foreign_cpu_cores_at_start", 0.0), "the step-time ratios are noisy (memory is not)."
        ),
        "## Target",
        "",
        *target_lines(report),
        "",
        "## Per mode",
        "",
    ]
    header = ["mode", "trainable", "peak rise (MiB)", "rise / LoRA", "rise / full", "saved (MiB)", "saved / LoRA"]
    if cuda:
        header += ["max allocated (MiB)", "allocated / LoRA", "allocated / full"]
    header += ["step (s)", "step / LoRA", "step / full"]
    rows = []
    for mode, m in modes.items():
        row = [MODE_NAMES[mode], harness.params(m["trainable_params"]), harness.mib(m["peak_rise_bytes"])]
        row += [harness.num(m["peak_rise_bytes_to_lora"]), harness.num(m["peak_rise_bytes_to_full"])]
        row += [harness.mib(m["saved_activation_bytes"]), harness.num(m["saved_activation_bytes_to_lora"])]
        if cuda:
            row += [harness.mib(m["cuda_max_allocated_bytes"]), harness.num(m["cuda_max_allocated_bytes_to_lora"])]
            row += [harness.num(m["cuda_max_allocated_bytes_to_full"])]
        row += [f"{m['mean_step_s']:.3f} ± {m['stdev_step_s']:.3f}"]
        row += [harness.with_ci(m["mean_step_s_to_lora"], m["step_to_lora_ci95"])]
        row += [harness.num(m["mean_step_s_to_full"])]
        rows.append(row)
    lines += [*harness.table(header, rows), ""]
    run_header = ["mode", "rep", "start (s)", "RSS before (MiB)", "peak RSS (MiB)", "peak rise (MiB)"]
    run_header += ["max allocated (MiB)"] if cuda else []
    run_header += ["steps (s)", "other procs", "steal", "losses"]
    run_rows = []
    for r in runs:
        row = [MODE_NAMES[r["mode"]], r["rep"], f"{r['start_s']:.0f}", harness.mib(r["rss_before_bytes"])]
        row += [harness.mib(r["peak_rss_bytes"]), harness.mib(r["peak_rise_bytes"])]
        row += [harness.mib(r["cuda_max_allocated_bytes"])] if cuda else []
        row += [harness.joined(r["step_times_s"], 2), f"{r['foreign_cpu_cores']:.2f}", f"{r['steal_cpu_cores']:.2f}"]
        row += [harness.joined(r["losses"], 3)]
        run_rows.append(row)
    notes = observations(summary)
    lines += ["## Observations", "", *notes, ""] if notes else []
    lines += ["## Runs in execution order", "", *harness.table(run_header, run_rows), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _progress(run: dict[str, Any], _waited: float) -> str:
    return (
        f"[bench] {run['mode']:12s} rep {run['rep']}: peak rise {harness.mib(run['peak_rise_bytes'])} MiB, step "
        f"{sum(run['step_times_s']) / len(run['step_times_s']):.2f} s, other processes "
        f"{run['foreign_cpu_cores']:.2f} cores ({run['wall_s']:.0f}s)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every mode in palindromic order, each in a fresh process; analyse; write the JSON and markdown."""
    argv = sys.argv[1:] if argv is None else list(argv)
    mode, rest = harness.worker_mode(argv)
    if mode is not None:
        worker_main(harness.parse_settings(PetlBenchSettings, rest, __doc__), mode)
        return {}
    s = harness.parse_settings(PetlBenchSettings, argv, __doc__)
    schedule = harness.palindrome(s.modes, s.repeats)
    with harness.benchmark_session(s, MODULE, argv) as bench:
        print(f"[bench] {len(schedule)} runs on {s.device}, {s.threads} threads", flush=True)
        with ThreadPoolExecutor(max_workers=s.concurrent_runs) as pool:  # 1: one after the other, in order
            futures = [pool.submit(harness.run_worker, MODULE, argv, s.threads, mode, rep) for mode, rep in schedule]
            for future in futures:
                run = bench.measure(_progress, future.result)
                run["start_s"] = run.pop("launched_at") - bench.started  # when it started, not when it was awaited
        name, kwargs = s.model_spec()
        # the backbone's own parameters: what full fine-tuning trains (LoRA and DTL add theirs to the total)
        full = next((r for r in bench.runs if r["mode"] == "full"), bench.runs[0])
        model = {
            "timm_name": name,
            "model_kwargs": kwargs,
            "img_size": kwargs.get("img_size", 224),
            "total_params": full["total_params"],
        }
        settings = asdict(s)
        report = bench.report(
            schedule, LIBRARIES, s.device, setup={"model": model}, summary=summarise(settings, bench.runs)
        )
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(harness.save_report(out / f"{s.result_stem}.json", report, render_markdown))
    return report


if __name__ == "__main__":
    main()
