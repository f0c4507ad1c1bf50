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
with a delta-method 95% interval (the helpers of ``bench_engine.py``).

Results: ``<output-dir>/bench_dit_cpu.{json,md}`` (``bench_dit_cuda.*`` on a GPU).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dit.py                  # ~1.5 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dit.py --wait-idle 600  # start once others are idle
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dit.py --threads 1      # on a machine shared with others
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dit.py --quick          # smoke test, ~25 s

Expected full-run time (6 runs of 30 steps of batch 32), an estimate from timing the pieces at full size
with one torch thread on this repository's 2-core Xeon while other jobs used the machine: DiT forward and
backward ~0.25 s, VAE encode of 32 images ~0.13 s, AdamW, EMA and loss a few tens of ms, so ~0.4 s per
step and ~75 s of steps, plus ~1 s of set-up per run, ~3 s of data, ~15 s of imports and the warm-up:
~1.5-2 min with one thread, somewhat less with two idle cores. ``--quick`` takes ~10 s after ~15 s of imports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from benchmarks.bench_engine import (  # noqa: E402
    CONTENDED_CORES,
    MIB,
    CpuSample,
    peak_rss,
    ratio_ci,
    reset_peak_rss,
    timing_stats,
    wait_for_idle,
)
from benchmarks.bench_sft import schedule  # noqa: E402
from benchmarks.bench_vision import _read_commit  # noqa: E402
from datasets_builders.diffusion import DiffusionDataArguments, load_target_dataset  # noqa: E402
from datasets_builders.knowledge_bank import cache_bank_latents  # noqa: E402
from hf_tuning.diffusion import (  # noqa: E402
    ChainOfForgettingConfig,
    ChainOfForgettingTrainer,
    KnowledgeBank,
    bank_batch_size,
    check_vae_matches,
)
from hf_tuning.io import atomic_write_json, atomic_write_text  # noqa: E402

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
class DitBenchSettings:
    """Everything that defines a benchmark run (stored with the results)."""

    steps: int = 30
    warmup_steps: int = 5
    batch_size: int = 32
    bank_fraction: float = 0.2
    repeats: int = 2
    target_classes: int = 4
    bank_images: int = 64
    learning_rate: float = 1e-4
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    output_dir: str = "benchmarks/results"
    quick: bool = False
    wait_idle_s: float = 0.0

    @property
    def spec(self) -> ModelSpec:
        return QUICK if self.quick else FULL


def parse_args(argv: list[str] | None = None) -> DitBenchSettings:
    """Command line -> :class:`DitBenchSettings`; ``--quick`` shrinks the model and the step count."""
    d = DitBenchSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {d.steps}; quick 3)")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help=f"steps per run not timed (default {d.warmup_steps}; quick 1)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step, target + bank (default 32)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="runs per arm, in palindromic order (default 2)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: usable cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--quick", action="store_true", help="tiny DiT and VAE, 3 steps per run: a smoke test")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for other processes to leave the CPUs idle before starting",
    )
    ns = p.parse_args(argv)
    quick_steps, quick_warmup = (3, 1) if ns.quick else (d.steps, d.warmup_steps)
    device = ns.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    s = DitBenchSettings(
        steps=quick_steps if ns.steps is None else ns.steps,
        warmup_steps=quick_warmup if ns.warmup_steps is None else ns.warmup_steps,
        batch_size=ns.batch_size,
        repeats=ns.repeats,
        bank_images=16 if ns.quick else d.bank_images,
        seed=ns.seed,
        threads=ns.threads,
        device=device,
        output_dir=ns.output_dir,
        quick=ns.quick,
        wait_idle_s=ns.wait_idle,
    )
    if s.warmup_steps < 0 or s.steps <= s.warmup_steps:
        p.error("--steps must exceed --warmup-steps (>= 0), or no step would be timed")
    if s.repeats < 1:
        p.error("--repeats must be >= 1")
    if bank_batch_size(s.batch_size, s.bank_fraction) < 1:
        p.error(f"--batch-size {s.batch_size} leaves no bank sample (int(B * {s.bank_fraction}) = 0); use >= 5")
    return s


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
        output_dir=output_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        cof_timesteps="uniform" if arm == BASELINE else "power",
        cof_bank_fraction=s.bank_fraction,
        learning_rate=s.learning_rate,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        use_cpu=s.device == "cpu",
        seed=s.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
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


class DitBenchCallback(TrainerCallback):
    """Times each optimizer step and the pieces of it that the arms do differently.

    ``instrument`` wraps ``trainer.encode`` and the bank's ``batch`` on the instances, so the timing is
    of the trainer's own code paths: a call with ``labels`` encodes the target part of the batch, one
    without them the bank part; ``batch`` reads bank samples (PNG decode, or moments from memory).
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.clock = Stopwatch(cuda)
        self.record = StepRecord()
        self._pending: list[tuple[str, Any, Any]] = []
        self._t0 = 0.0
        self._last_end = 0.0
        self._cpu0: CpuSample | None = None

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

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_end = time.perf_counter()  # the first gap holds the loader's set-up: a warm-up step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self._pending.clear()
        self._cpu0 = CpuSample.now()
        self._t0 = time.perf_counter()
        self.record.data_times_s.append(self._t0 - self._last_end)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        end = time.perf_counter()
        rec = self.record
        rec.step_times_s.append(end - self._t0)
        rec.foreign_cores.append(self._cpu0.foreign_cores(CpuSample.now())[0])
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


def reset_peak_memory(device: str) -> int:
    """Reset the peak counters (RSS always, CUDA's on a GPU); returns the RSS now, the run's baseline."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return reset_peak_rss()


def run_one(
    s: DitBenchSettings,
    arm: str,
    vae: torch.nn.Module,
    target_dir: Path,
    bank_dir: Path,
    rep: int = 1,
) -> dict[str, Any]:
    """Train one arm (repetition ``rep``) from a freshly seeded DiT; returns its measurements."""
    rss_before = reset_peak_memory(s.device)
    started = time.perf_counter()
    cpu_start = CpuSample.now()
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
        peak = peak_rss()
        cuda_peak = torch.cuda.max_memory_allocated() if s.device == "cuda" else None
        others, steal = cpu_start.foreign_cores(CpuSample.now())
        wall = time.perf_counter() - started
        del trainer, model
    rec, w = callback.record, s.warmup_steps
    timed = timing_stats(rec.step_times_s[w:], rec.foreign_cores[w:])
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
        "wall_s": wall,
        "non_step_s": wall - sum(rec.step_times_s),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": peak - rss_before,
        "cuda_max_allocated_bytes": cuda_peak,
        "peak_memory_bytes": cuda_peak if cuda_peak is not None else peak,
        "foreign_cpu_cores": others,
        "steal_cpu_cores": steal,
        "final_loss": rec.losses[-1] if rec.losses else None,
    }


def park_heap() -> None:
    """``gc.freeze`` everything alive now, so the garbage collections the trainer and ``reset_peak_rss``
    trigger do not walk the ~10^6 objects of torch, transformers and diffusers (tenths of a second each),
    and no automatic full collection of them lands inside a timed step."""
    gc.collect()
    gc.freeze()


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
def _pool(runs: list[dict[str, Any]], key: str, w: int) -> list[float]:
    """The timed values of ``key`` over ``runs``, each run's first ``w`` steps left out."""
    return [x for r in runs for x in r[key][w:]]


def _verdict(ratio: float, ci: tuple[float, float] | None, limit: float) -> dict[str, Any]:
    """``ratio <= limit``; ``resolved`` when the whole 95% interval lies on the same side of the limit."""
    met = ratio <= limit
    resolved = None if ci is None else (ci[1] <= limit if met else ci[0] > limit)
    return {"limit": limit, "ratio": ratio, "ci95": ci, "met": met, "resolved": resolved}


def analyse(s: DitBenchSettings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: pooled step times and their ratio to ``finetune`` (95% CI), memory ratios, encode time.

    Speed ratios pool the timed steps of all repetitions (the palindromic order cancels linear drift);
    memory ratios are the mean of the per-repetition ratios to ``finetune``'s run of the same repetition.
    """
    w = s.warmup_steps
    by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["rep"]) for arm in ARMS}
    base_runs = by_arm[BASELINE]
    base_by_rep = {r["rep"]: r for r in base_runs}
    base_times = _pool(base_runs, "step_times_s", w)
    base_stats = timing_stats(base_times, _pool(base_runs, "foreign_cores", w))
    arms: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        times = _pool(rs, "step_times_s", w)
        stats = timing_stats(times, _pool(rs, "foreign_cores", w))
        encode = [a + b for a, b in zip(_pool(rs, "encode_target_s", w), _pool(rs, "encode_bank_s", w), strict=True)]
        clean, base_clean = stats["clean_mean_step_s"], base_stats["clean_mean_step_s"]
        arms[arm] = {
            "arm": arm,
            "description": ARM_DESCRIPTIONS[arm],
            "target_per_batch": rs[0]["target_per_batch"],
            "bank_per_batch": rs[0]["bank_per_batch"],
            **stats,
            "images_per_s": s.batch_size / stats["mean_step_s"],
            "step_time_ratio": stats["mean_step_s"] / base_stats["mean_step_s"],
            "step_time_ratio_ci95": None if arm == BASELINE else ratio_ci(times, base_times),
            "median_step_time_ratio": stats["median_step_s"] / base_stats["median_step_s"],
            "clean_step_time_ratio": clean / base_clean if clean and base_clean else None,
            "paired_step_time_ratios": [r["mean_step_s"] / base_by_rep[r["rep"]]["mean_step_s"] for r in rs],
            "rep_spread_step": rs[-1]["mean_step_s"] / rs[0]["mean_step_s"],
            "mean_encode_s": statistics.fmean(encode),
            "mean_encode_target_s": statistics.fmean(_pool(rs, "encode_target_s", w)),
            "mean_encode_bank_s": statistics.fmean(_pool(rs, "encode_bank_s", w)),
            "mean_bank_read_s": statistics.fmean(_pool(rs, "bank_read_s", w)),
            "encode_share": statistics.fmean(encode) / stats["mean_step_s"],
            "mean_data_s": statistics.fmean(_pool(rs, "data_times_s", w)) if _pool(rs, "data_times_s", w) else None,
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in rs],
            "peak_memory_ratio": statistics.fmean(
                r["peak_memory_bytes"] / base_by_rep[r["rep"]]["peak_memory_bytes"] for r in rs
            ),
            "peak_rss_bytes": [r["peak_rss_bytes"] for r in rs],
            "peak_rss_delta_bytes": [r["peak_rss_delta_bytes"] for r in rs],
            "peak_rss_delta_ratio": statistics.fmean(
                r["peak_rss_delta_bytes"] / base_by_rep[r["rep"]]["peak_rss_delta_bytes"] for r in rs
            ),
            "final_loss": [r["final_loss"] for r in rs],
            "foreign_cpu_cores": [r["foreign_cpu_cores"] for r in rs],
        }
    base = arms[BASELINE]
    # what caching predicts: finetune's step minus the encode of the images the bank now supplies as moments
    saved = base["mean_encode_s"] * arms[TARGET_ARM]["bank_per_batch"] / s.batch_size
    predicted = (base["mean_step_s"] - saved) / base["mean_step_s"]
    target = arms[TARGET_ARM]
    return {
        "arms": arms,
        "baseline_mean_step_s": base_stats["mean_step_s"],
        "predicted_cached_ratio": predicted,
        "target": {
            "arm": TARGET_ARM,
            **_verdict(target["step_time_ratio"], target["step_time_ratio_ci95"], TARGET_MAX_RATIO),
        },
    }


# ---------------------------------------------------------------------------------------------
# Machine and report
# ---------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    """CPU (and GPU), cores, memory and library versions, so results from different machines are told apart.

    ``bench_engine.machine_info`` asks ``git`` in a subprocess for the commit; this one reads ``.git``
    directly, and adds diffusers and the GPU."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as handle:
        total_kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    info = {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_online": os.cpu_count(),
        "ram_gib": round(total_kib / MIB, 1),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "commit": _read_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    return info


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def _ci(interval: tuple[float, float] | list[float] | None) -> str:
    return "" if interval is None else f" ({interval[0]:.3f}-{interval[1]:.3f})"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def target_sentence(summary: dict[str, Any]) -> str:
    """The verdict on the issue's target, with the interval and whether the noise leaves it open."""
    t = summary["target"]
    verdict = "**met**" if t["met"] else "**NOT met**"
    if t["resolved"] is False:
        verdict += " (not resolved: the 95% interval crosses the limit)"
    elif t["resolved"] is None:
        verdict += " (no interval: too few timed steps)"
    return (
        f"Target: {TARGET_ARM} step time <= {TARGET_MAX_RATIO:.2f}x finetune. Measured "
        f"{t['ratio']:.3f}x{_ci(t['ci95'])}: {verdict}."
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
    predicted = summary["predicted_cached_ratio"]
    within = "within" if predicted <= TARGET_MAX_RATIO else "above"
    read_only = 1 + uncached["mean_bank_read_s"] / base["mean_step_s"]
    text = (
        "Expected: every arm runs the DiT forward and backward on the same "
        f"{batch} latents, the same AdamW step and EMA update, so chain of forgetting changes only where the "
        f"latents come from and adds a few small tensor operations (the bank's timesteps and null labels, the "
        f"split loss). With cached bank latents it encodes {batch - bank} images instead of {batch} and samples "
        f"{bank} latents from stored moments, so it should be slightly *faster* than plain fine-tuning: finetune "
        f"spends {_ms(base['mean_encode_s'])} ms of its {_ms(base['mean_step_s'])} ms step in the VAE "
        f"({base['encode_share']:.0%}), which predicts {predicted:.3f}x, {within} the {TARGET_MAX_RATIO:.2f}x "
        f"target. Without the cache the bank's {bank} PNGs are decoded ({_ms(uncached['mean_bank_read_s'])} ms "
        f"per step, {read_only:.3f}x by itself) and encoded in a second, smaller VAE call "
        f"({_ms(uncached['mean_encode_bank_s'])} ms, against {_ms(cached['mean_encode_bank_s'])} ms for sampling "
        "from cached moments), so it should land near 1.0x, a little above. Peak memory should not change: the "
        "model, gradients, optimizer state and EMA copy are the same, and the bank adds at most a small "
        f"no-grad VAE call or a few kilobytes of moments. Measured: cof_cached {cached['step_time_ratio']:.3f}x"
        f"{_ci(cached['step_time_ratio_ci95'])}, cof_uncached {uncached['step_time_ratio']:.3f}x"
        f"{_ci(uncached['step_time_ratio_ci95'])} (medians {cached['median_step_time_ratio']:.3f}x and "
        f"{uncached['median_step_time_ratio']:.3f}x); peak memory / finetune {memory}. Repeating an arm changed "
        f"its mean step by a factor {min(spreads):.3f}-{max(spreads):.3f} (rep 2 / rep 1) and the 95% intervals "
        f"are up to ±{widest:.3f} wide: a difference smaller than that is not resolved by this run."
    )
    if s["quick"]:
        text += " (Quick mode: a tiny model and 3 steps per run; these numbers only show that the script works.)"
    return ["## Reading the numbers", "", text, ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: set-up, the table of arms, the target verdict, the runs, the reading."""
    s, machine, runs, summary = report["settings"], report["machine"], report["runs"], report["summary"]
    model, arms = report["model"], summary["arms"]
    cuda = s["device"] == "cuda"
    memory = "CUDA max allocated" if cuda else "RSS"
    order = ", ".join(arm for arm, _ in schedule(ARMS, s["repeats"]))
    device = f"GPU {machine['gpu']}; " if cuda else ""
    lines = [
        f"# Chain of forgetting vs plain DiT fine-tuning: step time and memory ({'CUDA' if cuda else 'CPU'})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {device}{machine['cpu']}, {machine['cores_usable']} usable cores ({machine['torch_threads']} "
        f"torch threads), {machine['ram_gib']} GiB RAM; Python {machine['python']}, torch {machine['torch']}, "
        f"diffusers {machine['diffusers']}, transformers {machine['transformers']}; {machine['date']}; commit "
        f"{machine['commit'] or 'unknown'}.",
        "",
        f"Set-up: random-init latent DiT ({_params(model['dit_parameters'])} parameters: hidden {model['hidden']}, "
        f"{model['layers']} layers, patch {model['patch_size']}, learned sigma, {model['label_rows']} label rows + "
        f"null) on {model['latent_shape']} latents of a random-init frozen `AutoencoderKL` "
        f"({_params(model['vae_encoder_parameters'])} encoder parameters, blocks {model['vae_channels']}) of "
        f"{model['image_size']} px RGB PNGs; fp32; target: {s['target_classes']} classes of synthetic images, "
        f"bank: {s['bank_images']} PNGs with `cache_bank_latents`. Batch {s['batch_size']} (cof: "
        f"{arms['cof_cached']['target_per_batch']} target + {arms['cof_cached']['bank_per_batch']} bank), AdamW, "
        f"constant LR {s['learning_rate']}, EMA every step. {s['steps']} steps per run, the first "
        f"{s['warmup_steps']} not timed; runs in the order {order}, each from a freshly seeded DiT, after a "
        f"warm-up at tiny size. Total wall time {report['total_wall_s']:.0f} s"
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
    busy = [r for r in runs if r["foreign_cpu_cores"] > CONTENDED_CORES]
    if not cuda and (busy or report["foreign_cpu_cores_at_start"] > CONTENDED_CORES):
        worst = max([r["foreign_cpu_cores"] for r in runs] + [report["foreign_cpu_cores_at_start"]])
        lines += [
            f"**Warning:** other processes used the CPUs during {len(busy)} of {len(runs)} runs (up to {worst:.2f} "
            "cores on average); the speed ratios are noisy (the ratios of uncontended steps alone are in the JSON).",
            "",
        ]
    lines += [
        "| arm | batch (target + bank) | ms/step median | ms/step mean | / finetune (95% CI) | median / finetune "
        f"| VAE ms/step | bank read ms/step | data ms/step | peak {memory} (MiB) | peak / finetune "
        "| Δ peak RSS / finetune | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        peaks = ", ".join(_mib(x) for x in a["peak_memory_bytes"])
        lines.append(
            f"| {name} | {a['target_per_batch']} + {a['bank_per_batch']} | {_ms(a['median_step_s'])} "
            f"| {_ms(a['mean_step_s'])} | {a['step_time_ratio']:.3f}{_ci(a['step_time_ratio_ci95'])} "
            f"| {a['median_step_time_ratio']:.3f} | {_ms(a['mean_encode_s'])} | {_ms(a['mean_bank_read_s'])} "
            f"| {_ms(a['mean_data_s'])} | {peaks} | {a['peak_memory_ratio']:.3f} | {a['peak_rss_delta_ratio']:.3f} "
            f"| {a['images_per_s']:.1f} |"
        )
    lines += ["", target_sentence(summary), "", "Arms:", ""]
    lines += [f"* `{name}`: {ARM_DESCRIPTIONS[name]}" for name in ARMS]
    lines += [
        "",
        "## Runs in execution order",
        "",
        "| arm | rep | start (s) | ms/step mean | stdev (ms) | n | VAE ms/step | peak RSS (MiB) | Δ RSS (MiB) "
        "| final loss | non-step (s) | other procs | steal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append(
            f"| {r['arm']} | {r['rep']} | {r['start_s']:.0f} | {_ms(r['mean_step_s'])} | {_ms(r['stdev_step_s'])} "
            f"| {r['timed_steps']} | {_ms(r['mean_encode_s'])} | {_mib(r['peak_rss_bytes'])} "
            f"| {_mib(r['peak_rss_delta_bytes'])} | {loss} | {r['non_step_s']:.1f} | {r['foreign_cpu_cores']:.2f} "
            f"| {r['steal_cpu_cores']:.2f} |"
        )
    lines += ["", *reading_the_numbers(report)]
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
        f"{_ms(run['mean_encode_s'])} ms, peak {_mib(run['peak_memory_bytes'])} MiB, other processes "
        f"{run['foreign_cpu_cores']:.2f} cores ({seconds:.0f}s)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the arms in palindromic order, analyse, write ``bench_dit_<device>.{json,md}``; returns the report."""
    s = parse_args(argv)
    previous_threads = torch.get_num_threads()
    s.threads = s.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(s.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="bench-dit-") as tmp:
            warnings.simplefilter("ignore")
            foreign_at_start = wait_for_idle(s.wait_idle_s) if s.wait_idle_s > 0 else 0.0
            if foreign_at_start > 0.15:
                print(f"[bench] WARNING: other processes use {foreign_at_start:.2f} cores; timings will be noisy")
            started = time.perf_counter()
            root = Path(tmp)
            print(f"[bench] data and warm-up ({s.device}, {s.threads} threads)", flush=True)
            vae = build_vae(s.spec, s.seed)
            target_dir = write_target_folder(root / "target", s)
            bank_dir = write_bank_folder(root / "bank", s, vae)
            model = describe_models(s, vae)
            park_heap()
            warm_up(s, root / "warmup")
            park_heap()  # what the warm-up imported lazily (matplotlib for the stage timeline)
            runs = []
            for arm, rep in schedule(ARMS, s.repeats):
                t0 = time.perf_counter()
                run = run_one(s, arm, vae, target_dir, bank_dir, rep=rep)
                run["start_s"] = t0 - started
                runs.append(run)
                print(_progress(run, time.perf_counter() - t0), flush=True)
            summary = analyse(s, runs)
            report = {
                "command": command,
                "settings": asdict(s),
                "machine": machine_info(s.device),
                "model": model,
                "schedule": [list(x) for x in schedule(ARMS, s.repeats)],
                "foreign_cpu_cores_at_start": foreign_at_start,
                "runs": runs,
                "summary": summary,
                "total_wall_s": time.perf_counter() - started,
            }
    finally:
        gc.unfreeze()
        torch.set_num_threads(previous_threads)
    stem = f"{RESULT_STEM}_{s.device}"
    out = Path(s.output_dir)
    atomic_write_json(out / f"{stem}.json", report)
    markdown = render_markdown(report)
    atomic_write_text(out / f"{stem}.md", markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
