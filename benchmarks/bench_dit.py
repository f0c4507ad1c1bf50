"""Step time and memory of chain of forgetting against plain DiT fine-tuning, in one process.

The question (from the issue): what does chain of forgetting cost per optimizer step over plain
fine-tuning, and does it stay within **1.05x** the step time of plain fine-tuning when the knowledge
bank's VAE latents are cached? Three arms train the same random-initialised latent DiT (fp32) with the
same frozen ``AutoencoderKL``, batch, optimizer and EMA, all through ``ChainOfForgettingTrainer``:

* ``finetune``: plain fine-tuning, ``cof_timesteps="uniform"`` and no bank: all 32 images of a batch
  come from the target image folder and are encoded by the VAE on the fly;
* ``cof_cached``: power-law timesteps and a knowledge bank: 26 target images encoded on the fly plus
  ``int(32 * 0.2) = 6`` bank samples drawn from the cached VAE moments (``latents.safetensors``);
* ``cof_uncached``: the same, but the 6 bank images are read from their PNGs and encoded on the fly.

Every arm runs the DiT on 32 latents per step, so the only work chain of forgetting changes is where the
latents come from (and a few small tensor operations of the split loss): with cached bank latents it
encodes fewer images than plain fine-tuning, without them it decodes 6 PNGs and makes a second, smaller
VAE call per step.

Measured per arm: the wall time of every optimizer step (``on_step_begin`` .. ``on_step_end`` of a
``TrainerCallback``, added after the trainer's EMA callback so the EMA update is inside; the target
batch is fetched by the data loader before ``on_step_begin``: that gap, with the logging after a step,
is timed apart as *data*), the first ``--warmup-steps`` of every run left out; the time spent in
``trainer.encode`` (VAE or cached moments) and in reading bank samples, inside those steps; and the peak memory: on CPU the peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` at the start of each run, model build included), on
CUDA ``torch.cuda.max_memory_allocated`` (reset likewise; steps are then timed after
``torch.cuda.synchronize()``, the encode time with CUDA events).

A shared virtual machine drifts, so the arms run in the palindromic order finetune, cof_cached,
cof_uncached, cof_uncached, cof_cached, finetune (``--repeats 2``), each from a freshly seeded model,
and the ratios to ``finetune`` pool the timed steps of both repetitions (drift linear in time cancels),
with a delta-method 95% interval (the shared helpers of ``benchmarks/harness.py``).

Results: ``<output-dir>/bench_dit_cpu.{json,md}`` (``bench_dit_cuda.*`` on a GPU).

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_dit                  # ~1.5 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_dit --wait-idle 600  # start once others are idle
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_dit --threads 1      # on a machine shared with others
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_dit --quick          # smoke test, ~25 s

Expected full-run time (6 runs of 30 steps of batch 32), an estimate from timing the pieces at full size
with one torch thread on this repository's 2-core Xeon while other jobs used the machine: DiT forward and
backward ~0.25 s, VAE encode of 32 images ~0.13 s, AdamW, EMA and loss a few tens of ms, so ~0.4 s per
step and ~75 s of steps, plus ~1 s of set-up per run, ~3 s of data, ~15 s of imports and the warm-up:
~1.5-2 min with one thread, somewhat less with two idle cores. ``--quick`` takes ~10 s after ~15 s of imports.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers.trainer_callback import PrinterCallback

from benchmarks import harness
from datasets_builders.diffusion import DiffusionDataArguments, load_target_dataset
from datasets_builders.knowledge_bank import cache_bank_latents
from hf_tuning.diffusion import (
    ChainOfForgettingConfig,
    ChainOfForgettingTrainer,
    KnowledgeBank,
    bank_batch_size,
    check_vae_matches,
)

LIBRARIES = ("torch", "diffusers", "transformers")
RESULT_STEM = "bench_dit"
ARMS = ("finetune", "cof_cached", "cof_uncached")
BASELINE = "finetune"
TARGET_ARM = "cof_cached"
TARGET_MAX_RATIO = 1.05  # the target: cof_cached step time <= 1.05x finetune
ARM_DESCRIPTIONS = {
    "finetune": "uniform t, no bank: all images from the target, encoded on the fly",
    "cof_cached": "power t + bank: bank latents sampled from cached VAE moments",
    "cof_uncached": "power t + bank: bank PNGs read and encoded on the fly",
}


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the latent DiT and its VAE.

    The full size keeps the VAE encode near the share of a step it has in the real setting: DiT-XL/2-256
    costs ~119 GFLOP per image forward (~360 with backward), the SD VAE encoder ~135 GFLOP per 256 px
    image, i.e. ~27% of a plain fine-tuning step. Here (32 px RGB, 3 VAE blocks -> 4x8x8 latents, 16
    tokens) the encode is ~25-30% of a CPU step, so the saving of cached bank latents is not
    understated by an unrealistically cheap VAE.
    """

    image_size: int
    vae_channels: tuple[int, ...]
    hidden: int
    heads: int
    layers: int
    patch_size: int = 2
    latent_channels: int = 4
    label_rows: int = 10  # num_embeds_ada_norm: 10 classes + the null row

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


FULL = ModelSpec(image_size=32, vae_channels=(32, 64, 128), hidden=192, heads=3, layers=6)
QUICK = ModelSpec(image_size=16, vae_channels=(32, 32), hidden=32, heads=2, layers=2)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class DitBenchSettings(harness.BenchmarkSettings):
    """Everything that defines a benchmark run (stored with the results); ``--quick`` shrinks the model, the
    bank and the step count (where not given)."""

    steps: int | None = field(default=None, metadata={"help": "optimizer steps per run (default 30; quick 3)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "steps per run not timed (default 5; quick 1)"})
    batch_size: int = field(default=32, metadata={"help": "images per step, target + bank"})
    bank_fraction: float = 0.2
    repeats: int = field(default=2, metadata={"help": "runs per arm, in palindromic order"})
    target_classes: int = 4
    bank_images: int | None = field(default=None, metadata={"help": "bank PNGs (default 64; quick 16)"})
    learning_rate: float = 1e-4
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: CUDA when available"})
    quick: bool = field(default=False, metadata={"help": "tiny DiT and VAE, 3 steps per run: a smoke test"})

    def __post_init__(self) -> None:
        steps, warmup, bank = (3, 1, 16) if self.quick else (30, 5, 64)
        self.steps = steps if self.steps is None else self.steps
        self.warmup_steps = warmup if self.warmup_steps is None else self.warmup_steps
        self.bank_images = bank if self.bank_images is None else self.bank_images
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if self.warmup_steps < 0 or self.steps <= self.warmup_steps:
            raise ValueError("--steps must exceed --warmup-steps (>= 0), or no step would be timed")
        if self.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        if bank_batch_size(self.batch_size, self.bank_fraction) < 1:
            raise ValueError(
                f"--batch-size {self.batch_size} leaves no bank sample (int(B * {self.bank_fraction}) = 0); use >= 5"
            )

    @property
    def spec(self) -> ModelSpec:
        return QUICK if self.quick else FULL


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------
def _smooth_images(count: int, size: int, seed: int, tint: np.ndarray | None = None) -> list[Image.Image]:
    """RGB images that compress and decode like pictures (a bicubic-upscaled 4x4 colour grid plus a
    little noise), not like incompressible noise, so reading a bank PNG costs what a real one would."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(grid, mode="RGB").resize((size, size), Image.Resampling.BICUBIC))
        pixels = base.astype(np.float32) + rng.normal(0, 6, size=base.shape)
        if tint is not None:
            pixels = 0.7 * pixels + 0.3 * tint
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"))
    return images


def write_target_folder(root: Path, s: DitBenchSettings) -> Path:
    """``root/train/class_<k>/<i>.png``: enough images that no run crosses an epoch boundary."""
    per_class = -(-s.batch_size * s.steps // s.target_classes)
    rng = np.random.default_rng(s.seed)
    for k in range(s.target_classes):
        folder = root / "train" / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.integers(0, 256, size=3).astype(np.float32)
        for i, image in enumerate(_smooth_images(per_class, s.spec.image_size, s.seed + 1 + k, tint)):
            image.save(folder / f"{i:05d}.png")
    return root


def write_bank_folder(root: Path, s: DitBenchSettings, vae: torch.nn.Module) -> Path:
    """A folder of bank PNGs (as the reference code's ``pretrained_images/``) and its cached VAE moments."""
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_smooth_images(s.bank_images, s.spec.image_size, s.seed + 1000)):
        image.save(root / f"{i:05d}.png")
    cache_bank_latents(root, vae, image_size=s.spec.image_size, channels=3, device=s.device)
    return root


def build_vae(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """A random-initialised frozen ``AutoencoderKL`` (only its encoder is used in training)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=32,
        sample_size=spec.image_size,
    )
    return vae.requires_grad_(False).eval()


def build_dit(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """A random-initialised class-conditional DiT with learned sigma; the same seed gives the same weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=2 * spec.latent_channels,
        num_layers=spec.layers,
        num_attention_heads=spec.heads,
        attention_head_dim=spec.hidden // spec.heads,
        patch_size=spec.patch_size,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=spec.label_rows,
    ).float()


def training_args(s: DitBenchSettings, arm: str, output_dir: str) -> ChainOfForgettingConfig:
    """Identical optimisation for every arm; only the timestep mode differs (and the bank, passed apart)."""
    return ChainOfForgettingConfig(
        **harness.trainer_kwargs(s, output_dir, s.steps, use_cpu=s.device == "cpu", dataloader_pin_memory=False),
        cof_timesteps="uniform" if arm == BASELINE else "power",
        cof_bank_fraction=s.bank_fraction,
    )


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
class Stopwatch:
    """Interval timing that does not stall a GPU: CUDA events there (read once the step is synchronised),
    ``perf_counter`` on the CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Elapsed seconds; on CUDA only after the events completed (the callback synchronises first)."""
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


@dataclass
class StepRecord:
    """Per-step series of one run (warm-up steps included; the analysis drops them)."""

    step_times_s: list[float] = field(default_factory=list)
    data_times_s: list[float] = field(default_factory=list)
    foreign_cores: list[float] = field(default_factory=list)
    encode_target_s: list[float] = field(default_factory=list)
    encode_bank_s: list[float] = field(default_factory=list)
    bank_read_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


class DitBenchCallback(harness.StepTimer):
    """Times each optimizer step and the pieces of it that the arms do differently.

    ``instrument`` wraps ``trainer.encode`` and the bank's ``batch`` on the instances, so the timing is
    of the trainer's own code paths: a call with ``labels`` encodes the target part of the batch, one
    without them the bank part; ``batch`` reads bank samples (PNG decode, or moments from memory).
    """

    def __init__(self, cuda: bool) -> None:
        super().__init__(cuda)
        self.clock = Stopwatch(cuda)
        self.record = StepRecord()
        self._pending: list[tuple[str, Any, Any]] = []
        self._last_end = 0.0

    def instrument(self, trainer: ChainOfForgettingTrainer) -> None:
        encode = trainer.encode

        def timed_encode(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            start = self.clock.mark()
            latents = encode(inputs)
            self._pending.append(("target" if "labels" in inputs else "bank", start, self.clock.mark()))
            return latents

        trainer.encode = timed_encode  # type: ignore[method-assign]
        bank = trainer.knowledge_bank
        if bank is not None:
            read = bank.batch

            def timed_batch(indices: list[int]) -> dict[str, torch.Tensor]:
                start = time.perf_counter()  # a CPU-side read: wall time is what it costs
                batch = read(indices)
                self._pending.append(("read", start, time.perf_counter()))
                return batch

            bank.batch = timed_batch  # type: ignore[method-assign]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_end = time.perf_counter()  # the first gap holds the loader's set-up: a warm-up step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_step_begin(args, state, control, **kwargs)
        self._pending.clear()
        self.record.data_times_s.append(self._t0 - self._last_end)

    def step_timed(self, seconds: float, other_cores: float, steal_cores: float) -> None:
        rec = self.record
        rec.step_times_s.append(seconds)
        rec.foreign_cores.append(other_cores)
        totals = {"target": 0.0, "bank": 0.0, "read": 0.0}
        for kind, start, stop in self._pending:
            totals[kind] += stop - start if kind == "read" else self.clock.seconds(start, stop)
        rec.encode_target_s.append(totals["target"])
        rec.encode_bank_s.append(totals["bank"])
        rec.bank_read_s.append(totals["read"])
        self._pending.clear()
        self._last_end = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.record.losses.append(float(logs["loss"]))


def run_one(
    s: DitBenchSettings,
    arm: str,
    vae: torch.nn.Module,
    target_dir: Path,
    bank_dir: Path,
    rep: int = 1,
) -> dict[str, Any]:
    """Train one arm (repetition ``rep``) from a freshly seeded DiT; returns its measurements."""
    meter = harness.RunMeter(s.device).start()
    spec = s.spec
    data_args = DiffusionDataArguments(data_dir=str(target_dir), image_size=spec.image_size, image_channels=3)
    dataset = load_target_dataset(data_args)
    bank = None
    if arm != BASELINE:
        bank = KnowledgeBank(bank_dir, image_size=spec.image_size, channels=3, use_cached_latents=arm == "cof_cached")
        if bank.has_latents != (arm == "cof_cached"):
            raise RuntimeError(f"{arm}: the bank {'lacks' if arm == 'cof_cached' else 'has'} cached latents")
    with tempfile.TemporaryDirectory(prefix=f"bench-dit-{arm}-{rep}-") as out:
        model = build_dit(spec, s.seed)
        check_vae_matches(vae, model, image_size=spec.image_size, image_channels=3)
        trainer = ChainOfForgettingTrainer(
            model=model, args=training_args(s, arm, out), train_dataset=dataset, vae=vae, knowledge_bank=bank
        )
        trainer.remove_callback(PrinterCallback)  # the per-step log lines: printed between steps, only noise
        callback = DitBenchCallback(cuda=s.device == "cuda")
        callback.instrument(trainer)
        trainer.add_callback(callback)  # after the EMA callback: the EMA update is inside the timed step
        composition = (trainer.target_batch_size, trainer.bank_batch)
        trainer.train()
        meter.stop()
        del trainer, model
    rec, w = callback.record, s.warmup_steps
    timed = harness.timing_stats(rec.step_times_s[w:], rec.foreign_cores[w:])
    encode = [a + b for a, b in zip(rec.encode_target_s[w:], rec.encode_bank_s[w:], strict=True)]
    return {
        "arm": arm,
        "rep": rep,
        "target_per_batch": composition[0],
        "bank_per_batch": composition[1],
        "bank_cached_latents": arm == "cof_cached",
        **asdict(rec),
        **timed,
        "images_per_s": s.batch_size / timed["mean_step_s"],
        "mean_data_s": statistics.fmean(rec.data_times_s[w:]) if rec.data_times_s[w:] else None,
        "mean_encode_s": statistics.fmean(encode),
        "mean_encode_target_s": statistics.fmean(rec.encode_target_s[w:]),
        "mean_encode_bank_s": statistics.fmean(rec.encode_bank_s[w:]),
        "mean_bank_read_s": statistics.fmean(rec.bank_read_s[w:]),
        "wall_s": meter.wall_s,
        "non_step_s": meter.wall_s - sum(rec.step_times_s),
        "rss_before_bytes": meter.rss_before_bytes,
        "peak_rss_bytes": meter.peak_rss_bytes,
        "peak_rss_delta_bytes": meter.peak_rss_bytes - meter.rss_before_bytes,
        "cuda_max_allocated_bytes": meter.cuda_max_allocated_bytes,
        "peak_memory_bytes": meter.peak_memory_bytes,
        "foreign_cpu_cores": meter.foreign_cpu_cores,
        "steal_cpu_cores": meter.steal_cpu_cores,
        "final_loss": rec.losses[-1] if rec.losses else None,
    }


def warm_up(s: DitBenchSettings, root: Path) -> None:
    """Two steps of ``cof_uncached`` at quick size, so lazy imports, thread pools and one-off allocations
    (every code path: VAE encode, PNG decode, the bank split) are paid before anything is measured."""
    tiny = DitBenchSettings(
        steps=2, warmup_steps=0, batch_size=s.batch_size, bank_images=8, seed=s.seed, device=s.device, quick=True
    )
    vae = build_vae(tiny.spec, tiny.seed)
    target = write_target_folder(root / "warmup-target", tiny)
    bank = write_bank_folder(root / "warmup-bank", tiny, vae)
    run_one(tiny, "cof_uncached", vae, target, bank)


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------
def analyse(s: DitBenchSettings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: pooled step times and their ratio to ``finetune`` (95% CI), memory ratios, encode time.

    Speed ratios pool the timed steps of all repetitions (the palindromic order cancels linear drift);
    memory ratios are the mean of the per-repetition ratios to ``finetune``'s run of the same repetition.
    """
    w = s.warmup_steps
    by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["rep"]) for arm in ARMS}
    base_runs = by_arm[BASELINE]
    base_times = harness.pool(base_runs, "step_times_s", w)
    base_stats = harness.timing_stats(base_times, harness.pool(base_runs, "foreign_cores", w))
    arms: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        times = harness.pool(rs, "step_times_s", w)
        stats = harness.timing_stats(times, harness.pool(rs, "foreign_cores", w))
        encode_target, encode_bank = harness.pool(rs, "encode_target_s", w), harness.pool(rs, "encode_bank_s", w)
        encode = [a + b for a, b in zip(encode_target, encode_bank, strict=True)]
        data = harness.pool(rs, "data_times_s", w)
        clean, base_clean = stats["clean_mean_step_s"], base_stats["clean_mean_step_s"]
        arms[arm] = {
            "arm": arm,
            "description": ARM_DESCRIPTIONS[arm],
            "target_per_batch": rs[0]["target_per_batch"],
            "bank_per_batch": rs[0]["bank_per_batch"],
            **stats,
            "images_per_s": s.batch_size / stats["mean_step_s"],
            "step_time_ratio": stats["mean_step_s"] / base_stats["mean_step_s"],
            "step_time_ratio_ci95": None if arm == BASELINE else harness.ratio_ci(times, base_times),
            "median_step_time_ratio": stats["median_step_s"] / base_stats["median_step_s"],
            "clean_step_time_ratio": harness.ratio(clean, base_clean),
            "paired_step_time_ratios": harness.paired_ratios(rs, base_runs, "mean_step_s"),
            "rep_spread_step": rs[-1]["mean_step_s"] / rs[0]["mean_step_s"],
            "mean_encode_s": statistics.fmean(encode),
            "mean_encode_target_s": statistics.fmean(encode_target),
            "mean_encode_bank_s": statistics.fmean(encode_bank),
            "mean_bank_read_s": statistics.fmean(harness.pool(rs, "bank_read_s", w)),
            "encode_share": statistics.fmean(encode) / stats["mean_step_s"],
            "mean_data_s": statistics.fmean(data) if data else None,
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in rs],
            "peak_memory_ratio": statistics.fmean(harness.paired_ratios(rs, base_runs, "peak_memory_bytes")),
            "peak_rss_bytes": [r["peak_rss_bytes"] for r in rs],
            "peak_rss_delta_bytes": [r["peak_rss_delta_bytes"] for r in rs],
            "peak_rss_delta_ratio": statistics.fmean(harness.paired_ratios(rs, base_runs, "peak_rss_delta_bytes")),
            "final_loss": [r["final_loss"] for r in rs],
            "foreign_cpu_cores": [r["foreign_cpu_cores"] for r in rs],
        }
    base = arms[BASELINE]
    # what caching predicts: finetune's step minus the encode of the images the bank now supplies as moments
    saved = base["mean_encode_s"] * arms[TARGET_ARM]["bank_per_batch"] / s.batch_size
    predicted = (base["mean_step_s"] - saved) / base["mean_step_s"]
    target = arms[TARGET_ARM]
    verdict = harness.against_limit(target["step_time_ratio"], TARGET_MAX_RATIO, ci=target["step_time_ratio_ci95"])
    return {
        "arms": arms,
        "baseline_mean_step_s": base_stats["mean_step_s"],
        "predicted_cached_ratio": predicted,
        "target": {
            "arm": TARGET_ARM,
            "limit": TARGET_MAX_RATIO,
            "ratio": verdict["value"],
            **{key: verdict[key] for key in ("ci95", "met", "resolved")},
        },
    }


# ---------------------------------------------------------------------------------------------
# Report (a function of the saved JSON)
# ---------------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def _times(value: float, interval: list[float] | None) -> str:
    """``1.012x (0.990-1.034)``: a ratio to finetune with its 95% interval when there is one."""
    return f"{value:.3f}x" + (f" {harness.ci(interval)}" if interval is not None else "")


def target_sentence(summary: dict[str, Any]) -> str:
    """The verdict on the issue's target, with the interval and whether the noise leaves it open."""
    t = summary["target"]
    verdict = "**met**" if t["met"] else "**NOT met**"
    if t["resolved"] is False:
        verdict += " (not resolved: the 95% interval crosses the limit)"
    elif t["resolved"] is None:
        verdict += " (no interval: too few timed steps)"
    return (
        f"Target: {t['arm']} step time <= {t['limit']:.2f}x finetune. Measured {_times(t['ratio'], t['ci95'])}: "
        f"{verdict}."
    )


def reading_the_numbers(report: dict[str, Any]) -> list[str]:
    """Expected against measured, in a paragraph: what chain of forgetting adds to a step and what it saves."""
    s, summary = report["settings"], report["summary"]
    arms, batch = summary["arms"], s["batch_size"]
    base, cached, uncached = arms[BASELINE], arms["cof_cached"], arms["cof_uncached"]
    bank = cached["bank_per_batch"]
    spreads = [a["rep_spread_step"] for a in arms.values()]
    cis = [a["step_time_ratio_ci95"] for a in arms.values() if a["step_time_ratio_ci95"]]
    widest = max(((hi - lo) / 2 for lo, hi in cis), default=0.0)
    memory = ", ".join(
        f"{name} {arms[name]['peak_memory_ratio']:.3f} (above the start: {arms[name]['peak_rss_delta_ratio']:.3f})"
        for name in ARMS
        if name != BASELINE
    )
    predicted, limit = summary["predicted_cached_ratio"], summary["target"]["limit"]
    within = "within" if predicted <= limit else "above"
    read_only = 1 + uncached["mean_bank_read_s"] / base["mean_step_s"]
    text = (
        "Expected: every arm runs the DiT forward and backward on the same "
        f"{batch} latents, the same AdamW step and EMA update, so chain of forgetting changes only where the "
        f"latents come from and adds a few small tensor operations (the bank's timesteps and null labels, the "
        f"split loss). With cached bank latents it encodes {batch - bank} images instead of {batch} and samples "
        f"{bank} latents from stored moments, so it should be slightly *faster* than plain fine-tuning: finetune "
        f"spends {_ms(base['mean_encode_s'])} ms of its {_ms(base['mean_step_s'])} ms step in the VAE "
        f"({base['encode_share']:.0%}), which predicts {predicted:.3f}x, {within} the {limit:.2f}x "
        f"target. Without the cache the bank's {bank} PNGs are decoded ({_ms(uncached['mean_bank_read_s'])} ms "
        f"per step, {read_only:.3f}x by itself) and encoded in a second, smaller VAE call "
        f"({_ms(uncached['mean_encode_bank_s'])} ms, against {_ms(cached['mean_encode_bank_s'])} ms for sampling "
        "from cached moments), so it should land near 1.0x, a little above. Peak memory should not change: the "
        "model, gradients, optimizer state and EMA copy are the same, and the bank adds at most a small "
        "no-grad VAE call or a few kilobytes of moments. Measured: cof_cached "
        f"{_times(cached['step_time_ratio'], cached['step_time_ratio_ci95'])}, cof_uncached "
        f"{_times(uncached['step_time_ratio'], uncached['step_time_ratio_ci95'])} (medians "
        f"{cached['median_step_time_ratio']:.3f}x and "
        f"{uncached['median_step_time_ratio']:.3f}x); peak memory / finetune {memory}. Repeating an arm changed "
        f"its mean step by a factor {min(spreads):.3f}-{max(spreads):.3f} (rep 2 / rep 1) and the 95% intervals "
        f"are up to ±{widest:.3f} wide: a difference smaller than that is not resolved by this run."
    )
    if s["quick"]:
        text += " (Quick mode: a tiny model and 3 steps per run; these numbers only show that the script works.)"
    return ["## Reading the numbers", "", text, ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, the table of arms, the target verdict, the runs, the reading."""
    s, runs, summary = report["settings"], report["runs"], report["summary"]
    model, arms = report["model"], summary["arms"]
    cuda = s["device"] == "cuda"
    memory = "CUDA max allocated" if cuda else "RSS"
    order = ", ".join(arm for arm, _ in report["schedule"])
    title = f"Chain of forgetting vs plain DiT fine-tuning: step time and memory ({'CUDA' if cuda else 'CPU'})"
    lines = [
        *harness.report_header(title, report, LIBRARIES),
        f"Set-up: random-init latent DiT ({harness.params(model['dit_parameters'])} parameters: hidden "
        f"{model['hidden']}, {model['layers']} layers, patch {model['patch_size']}, learned sigma, "
        f"{model['label_rows']} label rows + null) on {model['latent_shape']} latents of a random-init frozen "
        f"`AutoencoderKL` ({harness.params(model['vae_encoder_parameters'])} encoder parameters, blocks "
        f"{harness.as_tuples(model['vae_channels'])}) of {model['image_size']} px RGB PNGs; fp32; target: "
        f"{s['target_classes']} classes of synthetic images, bank: {s['bank_images']} PNGs with `cache_bank_latents`. "
        f"Batch {s['batch_size']} (cof: {arms['cof_cached']['target_per_batch']} target + "
        f"{arms['cof_cached']['bank_per_batch']} bank), AdamW, constant LR {s['learning_rate']}, EMA every step. "
        f"{s['steps']} steps per run, the first {s['warmup_steps']} not timed; runs in the order {order}, each from a "
        f"freshly seeded DiT, after a warm-up at tiny size. Total wall time {report['total_wall_s']:.0f} s"
        f"{' (quick mode: tiny models, numbers only show that the script works)' if s['quick'] else ''}.",
        "",
        "Columns: *ms/step* over the timed steps of all repetitions (on_step_begin .. on_step_end: forward, "
        "backward, optimizer, EMA); *data* = the gap between steps (the data loader's fetch of the target "
        "batch, the logging); "
        "*/ finetune* = mean step time / finetune's, with its 95% delta-method interval; *VAE* = time in "
        "`trainer.encode` (VAE on the fly, or sampling cached moments) per step; *bank read* = reading bank "
        f"samples (PNG decode or moments) per step; *peak* = peak {memory} of the run (reset at its start, model "
        "build included; one value per repetition), with the mean of the per-repetition ratios to finetune; "
        "*Δ peak RSS* = the run's peak RSS minus its RSS at the start (libraries and the shared VAE left out), "
        "as the mean per-repetition ratio to finetune; images/s counts all "
        f"{s['batch_size']} images of a step.",
        "",
    ]
    if not cuda:
        advice = "the speed ratios are noisy (the ratios of uncontended steps alone are in the JSON)."
        lines += harness.contention_warning(runs, report["foreign_cpu_cores_at_start"], advice)
    lines += [
        *harness.table(
            ["arm", "batch (target + bank)", "ms/step median", "ms/step mean", "/ finetune (95% CI)"]
            + ["median / finetune", "VAE ms/step", "bank read ms/step", "data ms/step", f"peak {memory} (MiB)"]
            + ["peak / finetune", "Δ peak RSS / finetune", "images/s"],
            [
                [name, f"{a['target_per_batch']} + {a['bank_per_batch']}", _ms(a["median_step_s"])]
                + [_ms(a["mean_step_s"]), harness.with_ci(a["step_time_ratio"], a["step_time_ratio_ci95"])]
                + [f"{a['median_step_time_ratio']:.3f}", _ms(a["mean_encode_s"]), _ms(a["mean_bank_read_s"])]
                + [_ms(a["mean_data_s"]), ", ".join(harness.mib(x) for x in a["peak_memory_bytes"])]
                + [f"{a['peak_memory_ratio']:.3f}", f"{a['peak_rss_delta_ratio']:.3f}", f"{a['images_per_s']:.1f}"]
                for name, a in arms.items()
            ],
        ),
        "",
        target_sentence(summary),
        "",
        "Arms:",
        "",
        *(f"* `{name}`: {a['description']}" for name, a in arms.items()),
        "",
        "## Runs in execution order",
        "",
        *harness.table(
            ["arm", "rep", "start (s)", "ms/step mean", "stdev (ms)", "n", "VAE ms/step", "peak RSS (MiB)"]
            + ["Δ RSS (MiB)", "final loss", "non-step (s)", "other procs", "steal"],
            [
                [r["arm"], r["rep"], f"{r['start_s']:.0f}", _ms(r["mean_step_s"]), _ms(r["stdev_step_s"])]
                + [
                    r["timed_steps"],
                    _ms(r["mean_encode_s"]),
                    harness.mib(r["peak_rss_bytes"]),
                    harness.mib(r["peak_rss_delta_bytes"]),
                ]
                + [harness.num(r["final_loss"], 4), f"{r['non_step_s']:.1f}", f"{r['foreign_cpu_cores']:.2f}"]
                + [f"{r['steal_cpu_cores']:.2f}"]
                for r in runs
            ],
        ),
        "",
        *reading_the_numbers(report),
    ]
    return "\n".join(lines)


def describe_models(s: DitBenchSettings, vae: torch.nn.Module) -> dict[str, Any]:
    """Sizes of the DiT and VAE measured, for the report."""
    spec = s.spec
    dit = build_dit(spec, s.seed)
    described = {
        **asdict(spec),
        "latent_shape": f"{spec.latent_channels}x{spec.latent_size}x{spec.latent_size}",
        "dit_parameters": sum(p.numel() for p in dit.parameters()),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "vae_encoder_parameters": sum(p.numel() for p in vae.encoder.parameters())
        + sum(p.numel() for p in vae.quant_conv.parameters()),
    }
    del dit
    return described


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _progress(run: dict[str, Any], seconds: float) -> str:
    return (
        f"[bench] {run['arm']:12s} rep {run['rep']}: {_ms(run['median_step_s'])} ms/step median, VAE "
        f"{_ms(run['mean_encode_s'])} ms, peak {harness.mib(run['peak_memory_bytes'])} MiB, other processes "
        f"{run['foreign_cpu_cores']:.2f} cores ({seconds:.0f}s)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the arms in palindromic order, analyse, write ``bench_dit_<device>.{json,md}``; returns the report."""
    s = harness.parse_settings(DitBenchSettings, argv, __doc__)
    with (
        harness.benchmark_session(s, "benchmarks.bench_dit", argv) as bench,
        tempfile.TemporaryDirectory(prefix="bench-dit-") as tmp,
    ):
        root = Path(tmp)
        print(f"[bench] data and warm-up ({s.device}, {s.threads} threads)", flush=True)
        vae = build_vae(s.spec, s.seed)
        target_dir = write_target_folder(root / "target", s)
        bank_dir = write_bank_folder(root / "bank", s, vae)
        model = describe_models(s, vae)
        harness.park_heap()
        warm_up(s, root / "warmup")
        harness.park_heap()  # what the warm-up imported lazily (matplotlib for the stage timeline)
        schedule = harness.palindrome(ARMS, s.repeats)
        for arm, rep in schedule:
            bench.measure(_progress, run_one, s, arm, vae, target_dir, bank_dir, rep=rep)
        summary = analyse(s, bench.runs)
        report = bench.report(schedule, LIBRARIES, s.device, setup={"model": model}, summary=summary)
    print(harness.save_report(Path(s.output_dir) / f"{RESULT_STEM}_{s.device}.json", report, render_markdown))
    return report


if __name__ == "__main__":
    main()
