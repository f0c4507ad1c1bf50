"""Inference throughput and FLOPs of DyT's efficient path against the plain ViT-B/16 it is built on.

DyT's claim at inference is compute: per block a router sends only some patch tokens through the frozen MLP
(about two thirds of a ViT-B block's FLOPs), and the efficient path gathers those tokens, runs the MLP on them
alone and scatters the result back. This benchmark builds a random-initialised ``vit_base_patch16_224``
(224x224 images, 1000 classes) once and a deep copy of it with ``DyTConfig(bottleneck=16)``, so both hold the
same backbone weights, and compares three configurations in evaluation mode without autograd:

* ``plain``: the timm ViT's own forward;
* ``dyt``: DyT's efficient path (``model(x)``: MLP on the kept tokens only);
* ``dyt_masked``: DyT's masked path (``model(x, dispatch="masked")``: MLP on every token, times the gate; the same
  logits), i.e. the router and adapter's cost without the skipping.

The routers are at their random init (truncated normal 0.02, zero bias), which keeps about half the patch
tokens. The keep rate is measured on the benchmark batch; should its mean fall outside 0.45-0.55, each router's
bias is shifted, in block order within one forward, by minus the median of its logits (so each block keeps
half, and later blocks see the shifted stream), and the report says so.

Measured, at every ``--batch-sizes`` (default 1 and 32) on one fixed batch of ``randn`` images:

* FLOPs per image with ``torch.utils.flop_counter.FlopCounterMode``, split by module into the MLPs, DyT's
  routers and adapters, and the rest (patch embedding, attention, head). FlopCounterMode counts 2 FLOPs per
  multiply-accumulate, so ViT-B/16's 17.58 GFLOPs in the DyT paper (fvcore, which counts MACs) read ~35.1 here;
  the ratio to the plain ViT does not depend on the convention;
* throughput: ``--warmup`` untimed forwards, then timed ones until both ``--iterations`` and ``--min-time-s``
  are reached, each with the cores other processes used meanwhile; runs in palindromic order (``--repeats``) so
  linear drift cancels; speed-ups to the plain ViT with a 95% delta-method interval; the minor page faults per
  forward (at batch 32 a ViT-B forward zero-fills ~600k fresh pages, as glibc returns the large activations to
  the kernel when they are freed: time outside the FLOPs, and a source of spread between forwards);
* where the time goes: one forward per configuration under ``torch.profiler``, self time per operator grouped
  into matmuls, attention, DyT's gather/scatter (``nonzero``, ``index_select``, ``index_copy``) and the rest.

Targets (the issue's): throughput at the largest batch (32) >= 1.25x the plain ViT; FLOPs <= 0.75 of it.
With ``--device cuda`` the forwards run under bf16 autocast with ``torch.cuda.synchronize()`` around every timed
forward, and the profile reads device time; that path has been checked by reading only (no GPU here).
Results: ``<output-dir>/bench_dyt_cpu.json`` and ``.md`` (``bench_dyt_cuda.*``; ``*_quick.*`` with ``--quick``).

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_dyt                     # ~7 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_dyt --device cuda       # bf16 autocast on a GPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_dyt --quick --output-dir /tmp/dyt   # ~15 s
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from benchmarks import harness

MODULE = "benchmarks.bench_dyt"
LIBRARIES = ("torch", "timm")
CONFIGS = ("plain", "dyt", "dyt_masked")
NAMES = {"plain": "plain ViT", "dyt": "DyT (efficient)", "dyt_masked": "DyT (masked)"}
MODEL = "vit_base_patch16_224"
# a ViT small enough for a smoke test: 32x32 images in 8x8 patches, 4 blocks 64 wide
QUICK_MODEL = "vit_tiny_patch16_224"
QUICK_MODEL_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}
KEEP_BAND = (0.45, 0.55)  # mean keep rate accepted as "about half" without touching the routers
# operator -> group, for the profile; anything else is "other"
GATHER_OPS = ("aten::nonzero", "aten::index_select", "aten::index_copy", "aten::index_copy_")
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
              "aten::cudnn_convolution", "aten::_convolution")  # fmt: skip
GROUPS = ("matmul", "attention", "gather_scatter", "other")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class DyTBenchSettings(harness.BenchmarkSettings):
    """Everything that defines a benchmark run (stored with the results); ``--quick`` shrinks the model, the
    batches, the iterations and the repetitions (where not given)."""

    device: Literal["cpu", "cuda"] = field(default="cpu", metadata={"help": "cpu (fp32) or cuda (bf16 autocast)"})
    batch_sizes: list[int] | None = field(
        default=None, metadata={"help": "batch sizes (default 1 32; quick 1 4); targets at the largest"}
    )
    warmup: int | None = field(default=None, metadata={"help": "untimed forwards per run (default 1)"})
    iterations: int | None = field(
        default=None, metadata={"help": "timed forwards per run, at least (default 3; quick 2)"}
    )
    min_time_s: float | None = field(
        default=None, metadata={"help": "timed forwards continue until this long (default 5; quick 0)"}
    )
    repeats: int | None = field(
        default=None, metadata={"help": "runs per configuration, palindromic (default 4; quick 1)"}
    )
    bottleneck: int = 16
    num_classes: int = 1000
    speedup_target: float = field(default=1.25, metadata={"help": "target: DyT throughput / plain at least this"})
    flops_limit: float = field(default=0.75, metadata={"help": "target: DyT FLOPs / plain at most this"})
    quick: bool = field(
        default=False, metadata={"help": "a 4-block 64-wide ViT on 32x32 images, batches 1 and 4, 1 run: a smoke test"}
    )

    def __post_init__(self) -> None:
        batches, iterations, min_time, repeats = ([1, 4], 2, 0.0, 1) if self.quick else ([1, 32], 3, 5.0, 4)
        self.batch_sizes = sorted(set(batches if self.batch_sizes is None else self.batch_sizes))
        self.warmup = 1 if self.warmup is None else self.warmup
        self.iterations = iterations if self.iterations is None else self.iterations
        self.min_time_s = min_time if self.min_time_s is None else self.min_time_s
        self.repeats = repeats if self.repeats is None else self.repeats
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive, got {self.batch_sizes}")
        if self.warmup < 0 or self.iterations < 1 or self.min_time_s < 0:
            raise ValueError("--warmup and --min-time-s must be >= 0 and --iterations >= 1")
        if self.repeats < 1 or self.bottleneck < 1:
            raise ValueError("--repeats and --bottleneck must be >= 1")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")

    @property
    def result_stem(self) -> str:
        return f"bench_dyt_{self.device}" + ("_quick" if self.quick else "")

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        """The timm architecture and its ``create_model`` overrides."""
        return (QUICK_MODEL, dict(QUICK_MODEL_KWARGS)) if self.quick else (MODEL, {})


# ---------------------------------------------------------------------------------------------
# Models, routers, FLOPs, profile
# ---------------------------------------------------------------------------------------------
def build_models(s: DyTBenchSettings) -> tuple[nn.Module, nn.Module]:
    """The seeded plain ViT and DyT on a deep copy of it (DyT registers its modules inside the blocks)."""
    import timm

    from hf_tuning.tuners import DyTConfig, get_petl_model

    name, kwargs = s.model_spec()
    torch.manual_seed(s.seed)
    plain = timm.create_model(name, num_classes=s.num_classes, **kwargs)
    dyt = get_petl_model(copy.deepcopy(plain), DyTConfig(bottleneck=s.bottleneck))
    return plain.to(s.device).eval(), dyt.to(s.device).eval()


def forwards(s: DyTBenchSettings, plain: nn.Module, dyt: nn.Module) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Per configuration, one inference forward (no autograd; bf16 autocast on CUDA)."""

    def wrap(forward: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device == "cuda" else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                return forward(x)

        return run

    return {"plain": wrap(plain), "dyt": wrap(dyt), "dyt_masked": wrap(lambda x: dyt(x, dispatch="masked"))}


def keep_rates(dyt: nn.Module) -> dict[str, Any]:
    """The last forward's fraction of patch tokens sent through the MLPs, mean and per block."""
    return {"mean": dyt.keep_rate().item(), "per_block": [g.float().mean().item() for g in dyt.last_gates]}


def balance_routers(dyt: nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> None:
    """Shift every router's bias by minus the median of its logits on ``x``, in block order within one forward
    (the hook also shifts the logits it returns, so later blocks see the stream they will see from now on):
    each block then keeps about half its tokens."""
    from hf_tuning.tuners.dyt.layer import TokenRouter

    def shift(router: nn.Module, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        median = logits.float().median()
        router.proj.bias.data -= median.to(router.proj.bias.dtype)
        return logits - median.to(logits.dtype)

    handles = [m.register_forward_hook(shift) for m in dyt.modules() if isinstance(m, TokenRouter)]
    try:
        run(x)
    finally:
        for handle in handles:
            handle.remove()


def count_flops(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> dict[str, Any]:
    """FLOPs of one forward (FlopCounterMode: 2 per multiply-accumulate), in total, by operator, and by module:
    the MLPs, DyT's routers and adapters, the rest."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run(x)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    leaf = {name: n for name, n in by_module.items() if name.rsplit(".", 1)[-1] in ("mlp", "dyt_router", "dyt_adapter")}
    total = counter.get_total_flops()
    mlp = sum(n for name, n in leaf.items() if name.endswith(".mlp"))
    method = sum(n for name, n in leaf.items() if not name.endswith(".mlp"))
    return {
        "flops": total,
        "mlp_flops": mlp,
        "router_adapter_flops": method,
        "other_flops": total - mlp - method,
        "by_operator": {str(op): n for op, n in counter.get_flop_counts()["Global"].items()},
    }


def profile(run: Callable[[torch.Tensor], Any], x: torch.Tensor, cuda: bool) -> dict[str, float]:
    """Seconds of one forward per operator group (self time of the aten operators: CPU time, or on CUDA the
    device time of the kernels each launched), so a missed speed-up can be traced to the MLPs that ran, the
    attention that always runs, or DyT's own gather and scatter."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as prof:
        run(x)
        if cuda:
            torch.cuda.synchronize()
    seconds = dict.fromkeys(GROUPS, 0.0)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):  # kernels (counted under the operator that launched them), markers
            continue
        group = "gather_scatter" if event.key in GATHER_OPS else "matmul" if event.key in MATMUL_OPS else "other"
        group = "attention" if "attention" in event.key else group
        seconds[group] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
    return seconds


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_run(s: DyTBenchSettings, run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> dict[str, Any]:
    """The timed forwards of one run (:func:`benchmarks.harness.time_forwards` with this benchmark's settings)."""
    return harness.time_forwards(run, x, device=s.device, warmup=s.warmup, iterations=s.iterations,
                                 min_time_s=s.min_time_s)  # fmt: skip


def summarise(s: dict[str, Any], runs: list[dict[str, Any]], flops: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch size and configuration: pooled forward times, throughput, speed-up to the plain ViT (with its
    interval and per repetition), FLOPs per image and their ratio; the two targets at the largest batch."""
    rows = []
    for batch in s["batch_sizes"]:
        of = {c: [r for r in runs if r["batch_size"] == batch and r["config"] == c] for c in CONFIGS}
        plain_times = harness.pool(of["plain"], "step_times_s")
        plain_flops = next(f for f in flops if f["batch_size"] == batch and f["config"] == "plain")["flops"]
        for config in CONFIGS:
            times = harness.pool(of[config], "step_times_s")
            stats = harness.timing_stats(times, harness.pool(of[config], "step_foreign_cores"))
            counted = next(f for f in flops if f["batch_size"] == batch and f["config"] == config)
            clean = stats["clean_mean_step_s"]
            rows.append({
                "batch_size": batch, "config": config, **stats,
                "images_per_s": batch / stats["mean_step_s"],
                "clean_images_per_s": batch / clean if clean else None,
                "speedup": harness.ratio(harness.mean_std(plain_times)[0], stats["mean_step_s"]),
                "speedup_ci95": harness.ratio_ci(plain_times, times),
                "speedup_per_rep": [1 / x for x in harness.paired_ratios(of[config], of["plain"], "mean_step_s")],
                "gflops_per_image": counted["flops"] / batch / 1e9,
                "flops_to_plain": counted["flops"] / plain_flops,
                "minor_faults_per_forward": harness.mean_std([r["minor_faults_per_forward"] for r in of[config]])[0],
            })  # fmt: skip
    batch = max(s["batch_sizes"])
    top = next(r for r in rows if r["batch_size"] == batch and r["config"] == "dyt")
    speedup, interval, goal = top["speedup"], top["speedup_ci95"], s["speedup_target"]
    resolved = None if interval is None else (interval[0] >= goal if speedup >= goal else interval[1] < goal)
    targets = {
        "batch_size": batch,
        "speedup": {"value": speedup, "met": speedup >= goal, "ci95": interval, "resolved": resolved},
        "flops": harness.against_limit(top["flops_to_plain"], s["flops_limit"]),
    }
    return {"rows": rows, "targets": targets}


# ---------------------------------------------------------------------------------------------
# Report (a function of the saved JSON)
# ---------------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _verdict(target: dict[str, Any]) -> str:
    return "n/a" if target["met"] is None else ("met" if target["met"] else "not met")


def target_lines(report: dict[str, Any]) -> list[str]:
    s, t = report["settings"], report["summary"]["targets"]
    speed, flops = t["speedup"], t["flops"]
    side = "below" if speed["met"] else "above"
    noise = "" if speed["resolved"] is not False else f", but its 95% interval reaches {side} {s['speedup_target']}"
    return [
        f"* DyT (efficient) throughput at batch {t['batch_size']} >= {s['speedup_target']}x the plain ViT: "
        f"**{_verdict(speed)}** ({harness.with_ci(speed['value'], speed['ci95'], 2)}x{noise})",
        f"* DyT (efficient) FLOPs <= {s['flops_limit']} of the plain ViT: **{_verdict(flops)}** "
        f"({harness.num(flops['value'])}; the paper: 12.54 / 17.58 = {12.54 / 17.58:.3f})",
    ]


def observations(report: dict[str, Any]) -> list[str]:
    """What the tables say: the keep rate and how it was obtained, how much of the FLOPs saving became speed,
    where the efficient path's time goes, and what the router and adapter cost."""
    s, summary, routers = report["settings"], report["summary"], report["routers"]
    batch = summary["targets"]["batch_size"]
    row = {(r["batch_size"], r["config"]): r for r in summary["rows"]}
    init, low, high = routers["keep_rate_at_init"], *routers["keep_band"]
    lines = [
        f"* Routers: at their random init they keep {init['mean']:.3f} of the patch tokens of the batch of {batch} "
        f"(blocks from {min(init['per_block']):.3f} to {max(init['per_block']):.3f}); "
        + (
            f"outside {low}-{high}, so each router's bias was shifted by minus the median of its logits, block "
            "after block in one forward (see the keep-rate table)."
            if routers["balanced"]
            else f"within {low}-{high}, so the biases stay at zero."
        )
    ]
    prof = {(p["batch_size"], p["config"]): p["seconds"] for p in report["profile"]}
    flops = {(f["batch_size"], f["config"]): f for f in report["flops"]}

    def matmul_flops(batch: int, config: str) -> int:
        return sum(n for op, n in flops[(batch, config)]["by_operator"].items() if "attention" not in op)

    for b in s["batch_sizes"]:
        dyt, masked = row[(b, "dyt")], row[(b, "dyt_masked")]
        ideal, speedup = 1 / dyt["flops_to_plain"], dyt["speedup"]
        gained = (
            f"{(speedup - 1) / (ideal - 1):.0%} of that gain"
            if speedup > 1 and ideal > 1
            else "slower than the plain ViT"
        )
        reps = dyt["speedup_per_rep"]
        spread = f" (per repetition {min(reps):.2f}-{max(reps):.2f}x)" if len(reps) > 1 else ""
        base = row[(b, "plain")]
        drift = (
            ": with slightly more FLOPs than the plain ViT, a speed-up above 1 is not compute but the spread of the "
            f"forward times (plain ViT: ±{base['stdev_step_s'] / base['mean_step_s']:.0%} per forward) and the "
            "configurations' different page faults (below)"
            if masked["speedup"] > 1
            else ""
        )
        lines.append(
            f"* Batch {b}: DyT's efficient path does {dyt['flops_to_plain']:.3f} of the plain ViT's FLOPs, which at "
            f"an equal FLOP rate would give {ideal:.2f}x; measured {speedup:.2f}x{spread}, {gained}. The masked path "
            f"(router and adapter, no skipping) runs at {masked['speedup']:.2f}x the plain ViT for "
            f"{masked['flops_to_plain']:.3f} of its FLOPs{drift}."
        )
        plain, gated = prof[(b, "plain")], prof[(b, "dyt")]
        faults = ", ".join(f"{NAMES[c]} {row[(b, c)]['minor_faults_per_forward']:,.0f}" for c in CONFIGS)
        lines.append(
            f"  * Where the time goes (one profiled forward each, so indicative only: a single plain forward varies by "
            f"±{base['stdev_step_s'] / base['mean_step_s']:.0%} here; DyT's efficient path against the plain ViT): "
            f"matmuls {_ms(gated['matmul'])} against {_ms(plain['matmul'])} ms, "
            f"{gated['matmul'] / plain['matmul']:.3f} of the time for "
            f"{matmul_flops(b, 'dyt') / matmul_flops(b, 'plain'):.3f} of the matmul FLOPs; attention "
            f"{_ms(gated['attention'])} against {_ms(plain['attention'])} ms; the other operators "
            f"{_ms(gated['other'])} against {_ms(plain['other'])} ms; DyT's gather/scatter "
            f"{_ms(gated['gather_scatter'])} ms ({gated['gather_scatter'] / sum(gated.values()):.1%} of its forward)."
            " Minor page faults per forward (zero-filled pages of the freed and re-allocated activations, part of the "
            f"other operators' time): {faults}."
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """Set-up, targets, the main table, keep rates per block, the profile, observations and the runs."""
    s, summary, model, routers = report["settings"], report["summary"], report["model"], report["routers"]
    cuda = s["device"] == "cuda"
    order = ", ".join(f"{NAMES[c]} b{b} {rep}" for c, b, rep in report["schedule"])
    lines = [
        *harness.report_header(
            f"DyT inference throughput and FLOPs against the plain ViT ({s['device']})", report, LIBRARIES
        ),  # fmt: skip
        f"Set-up: `{model['timm_name']}` with {harness.as_tuples(model['model_kwargs'])}, random weights, "
        f"{harness.params(model['total_params'])} parameters, {s['num_classes']} classes, "
        f"{'fp32 weights under bf16 autocast' if cuda else 'fp32'} on {s['device']}, evaluation mode under "
        f"`torch.no_grad()`; DyT (`DyTConfig(bottleneck={s['bottleneck']})`, {harness.params(model['dyt_params'])} "
        "added parameters) on a deep copy of the same ViT. Inputs: the first *batch* images of one fixed `randn` "
        f"batch of {max(s['batch_sizes'])} images of {model['img_size']}x{model['img_size']}. Per run "
        f"{s['warmup']} untimed forward(s), then timed forwards until at least {s['iterations']} and "
        f"{s['min_time_s']:g} s; runs in the order {order}. Total wall time {report['total_wall_s']:.0f} s"
        f"{' (quick mode: a tiny ViT, the numbers only show that the script works)' if s['quick'] else ''}.",
        "",
        "Columns: *forward* = mean ± standard deviation of all timed forwards of all repetitions; *images/s* = "
        "batch / mean forward (*uncontended*: over the forwards during which other processes used under "
        f"{harness.CONTENDED_CORES} cores); *speed-up* = plain ViT's mean forward / this one's, with a 95% "
        "delta-method interval, and per repetition (paired with the plain run of the same repetition). *GFLOPs* "
        "per image from `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-accumulate: "
        "the paper's 17.58 GFLOPs for ViT-B/16 (fvcore, multiply-accumulates) read ~35.1 here, and the ratio to "
        "the plain ViT is the same in both conventions (paper: 12.54 / 17.58 = 0.713). *MLP* and *router+adapter* "
        "are the FLOPs inside those modules. *keep* = fraction of patch tokens sent through the MLPs on that batch.",
        "",
        *harness.contention_warning(
            report["runs"], report.get("foreign_cpu_cores_at_start", 0.0), "the speed-ups are noisy (FLOPs are not)."
        ),
        "## Targets",
        "",
        *target_lines(report),
        "",
        "## Throughput and FLOPs",
        "",
    ]
    keep = {k["batch_size"]: k["mean"] for k in routers["keep_rate"]}
    flops = {(f["batch_size"], f["config"]): f for f in report["flops"]}
    header = ["batch", "configuration", "images/s", "uncontended images/s", "forward (ms)", "speed-up",
              "per rep", "GFLOPs / image", "MLP", "router+adapter", "FLOPs / plain", "keep"]  # fmt: skip
    rows = []
    for r in summary["rows"]:
        f, b, plain = flops[(r["batch_size"], r["config"])], r["batch_size"], r["config"] == "plain"
        rows.append([
            b, NAMES[r["config"]], f"{r['images_per_s']:.2f}", harness.num(r["clean_images_per_s"], 2),
            f"{_ms(r['mean_step_s'])} ± {_ms(r['stdev_step_s'])}",
            "1 (reference)" if plain else harness.with_ci(r["speedup"], r["speedup_ci95"]),
            "" if plain else harness.joined(r["speedup_per_rep"]), f"{r['gflops_per_image']:.3f}", f"{f['mlp_flops'] / b / 1e9:.3f}",
            f"{f['router_adapter_flops'] / b / 1e9:.3f}", f"{r['flops_to_plain']:.3f}",
            "1 (all)" if plain else f"{keep[b]:.3f}",
        ])  # fmt: skip
    lines += [*harness.table(header, rows), ""]
    depth = len(routers["keep_rate"][0]["per_block"])
    keep_rows = [["at init", max(s["batch_sizes"]), f"{routers['keep_rate_at_init']['mean']:.3f}",
                  *(f"{x:.2f}" for x in routers["keep_rate_at_init"]["per_block"])]]  # fmt: skip
    keep_rows += [["benchmarked", k["batch_size"], f"{k['mean']:.3f}", *(f"{x:.2f}" for x in k["per_block"])]
                  for k in routers["keep_rate"]]  # fmt: skip
    lines += [
        "## Keep rate per block",
        "",
        "Router biases: "
        + (
            "shifted by minus the median of each block's logits (see Observations)."
            if routers["balanced"]
            else "zero, as initialised."
        )
        + " The efficient and masked paths give the same logits: largest absolute difference "
        + ", ".join(
            f"{g['max_abs_logit_difference']:.1e} at batch {g['batch_size']}" for g in routers["dyt_vs_masked_logits"]
        )
        + ".",
        "",
        *harness.table(["routers", "batch", "mean", *(f"block {i}" for i in range(depth))], keep_rows),
        "",
        "## Where the time goes",
        "",
        "One forward per configuration under `torch.profiler`: self "
        + ("device time of the kernels each aten operator launched" if cuda else "CPU time of the aten operators")
        + ", in milliseconds. *matmul*: `addmm`, `mm`, `bmm`, convolution; *attention*: the fused attention; "
        "*gather/scatter*: `nonzero`, `index_select`, `index_copy`; *other*: the rest (norms, GELU, adds, copies).",
        "",
    ]
    prof_rows = [[p["batch_size"], NAMES[p["config"]], *(_ms(p["seconds"][g]) for g in GROUPS),
                  _ms(sum(p["seconds"].values()))] for p in report["profile"]]  # fmt: skip
    lines += [*harness.table(["batch", "configuration", *GROUPS, "total"], prof_rows), ""]
    lines += ["## Observations", "", *observations(report), ""]
    run_rows = [[NAMES[r["config"]], r["batch_size"], r["rep"], f"{r['start_s']:.0f}", len(r["step_times_s"]),
                 ", ".join(_ms(x) for x in r["step_times_s"][:8]) + (" ..." if len(r["step_times_s"]) > 8 else ""),
                 f"{r['minor_faults_per_forward']:,.0f}", f"{r['foreign_cpu_cores']:.2f}", f"{r['steal_cpu_cores']:.2f}"]
                for r in report["runs"]]  # fmt: skip
    header = ["configuration", "batch", "rep", "start (s)", "forwards", "forward times (ms)", "page faults / forward",
              "other procs", "steal"]  # fmt: skip
    lines += ["## Runs in execution order", "", *harness.table(header, run_rows), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _progress(run: dict[str, Any], seconds: float) -> str:
    return (
        f"[bench] {run['config']:10s} b{run['batch_size']:<3d} rep {run['rep']}: "
        f"{run['batch_size'] / run['mean_step_s']:.2f} images/s over {len(run['step_times_s'])} forwards, other "
        f"processes {run['foreign_cpu_cores']:.2f} cores ({seconds:.0f}s)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build, check the routers, count FLOPs, time in palindromic order, profile; write the JSON and markdown."""
    argv = sys.argv[1:] if argv is None else list(argv)
    s = harness.parse_settings(DyTBenchSettings, argv, __doc__)
    items = [(config, batch) for batch in s.batch_sizes for config in CONFIGS]
    schedule = [(config, batch, rep) for (config, batch), rep in harness.palindrome(items, s.repeats)]
    with harness.benchmark_session(s, MODULE, argv) as bench:
        print(f"[bench] {len(schedule)} runs on {s.device}, {s.threads} threads", flush=True)
        plain, dyt = build_models(s)
        run = forwards(s, plain, dyt)
        size = s.model_spec()[1].get("img_size", 224)
        generator = torch.Generator().manual_seed(s.seed)
        pixels = torch.randn(max(s.batch_sizes), 3, size, size, generator=generator).to(s.device)

        run["dyt"](pixels)
        at_init = keep_rates(dyt)
        balanced = not KEEP_BAND[0] <= at_init["mean"] <= KEEP_BAND[1]
        if balanced:
            balance_routers(dyt, run["dyt_masked"], pixels)
        flops, keep, logits_gap = [], [], []
        for batch in s.batch_sizes:
            for config in CONFIGS:
                flops.append({"batch_size": batch, "config": config, **count_flops(run[config], pixels[:batch])})
                if config == "dyt":
                    keep.append({"batch_size": batch, **keep_rates(dyt)})
            gap = (run["dyt"](pixels[:batch]).float() - run["dyt_masked"](pixels[:batch]).float()).abs().max()
            logits_gap.append({"batch_size": batch, "max_abs_logit_difference": gap.item()})
        print(f"[bench] keep rate {at_init['mean']:.3f} at init; FLOPs counted", flush=True)

        for config, batch, rep in schedule:
            bench.measure(_progress, lambda c=config, b=batch, r=rep: {
                "config": c, "batch_size": b, "rep": r, **time_run(s, run[c], pixels[:b])})  # fmt: skip
        profiles = [
            {"batch_size": b, "config": c, "seconds": profile(run[c], pixels[:b], s.device == "cuda")}
            for b in s.batch_sizes
            for c in CONFIGS
        ]
        name, kwargs = s.model_spec()
        model = {
            "timm_name": name,
            "model_kwargs": kwargs,
            "img_size": size,
            "total_params": sum(p.numel() for p in plain.parameters()),
            "dyt_params": sum(p.numel() for p in dyt.method_parameters()),
        }
        routers = {"keep_band": KEEP_BAND, "keep_rate_at_init": at_init, "balanced": balanced, "keep_rate": keep,
                   "dyt_vs_masked_logits": logits_gap}  # fmt: skip
        report = bench.report(
            schedule, LIBRARIES, s.device, setup={"model": model, "routers": routers},
            flops=flops, profile=profiles, summary=summarise(asdict(s), bench.runs, flops),
        )  # fmt: skip
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(harness.save_report(out / f"{s.result_stem}.json", report, render_markdown))
    return report


if __name__ == "__main__":
    main()
