"""Sample a DiT run and score it: FID (and optionally k-NN precision/recall) against real target images.

    python eval/evaluate_dit.py --run_dir outputs/dit-digits-cof --reference_dir data/digits59/test \\
        --feature_extractor outputs/digits_features --num_samples 1000 --output outputs/dit-digits-cof/fid.json

The run's EMA weights (``transformer_ema/``) and its ``cof_config.json`` say what to sample: labels
are drawn uniformly from the run's target classes, and the sampler settings default to the run's
(DiT's 250-step DDPM with the learned variance unless the run chose otherwise); every one of them
can be overridden here. Fix ``--num_samples``, the reference set and the sampler identically for
every arm of a comparison: FID is biased by the sample count.

The CLI is a thin wrapper: :class:`DitEvalSettings` and :class:`SamplingOverrides` hold its options,
:func:`evaluate_run` takes them and returns what it writes, and :func:`sample_and_score` samples a loaded
run and scores the samples against reference images (a folder's batches or a tensor), for experiments.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.common import parse_settings, pick_device
from eval.fid import compute_fid, iter_image_folder, load_feature_extractor
from hf_tuning.diffusion.runs import SamplingArguments, load_run, sample_run
from hf_tuning.diffusion.sampling import save_image_grid, to_pil_image
from hf_tuning.io import atomic_output, atomic_write_json

__all__ = [
    "DitEvalSettings",
    "DitSamples",
    "SamplingOverrides",
    "evaluate_run",
    "main",
    "parse_args",
    "run_sampling",
    "sample_and_score",
    "write_samples",
]

GRID_SAMPLES = 64  # the grid shows the first samples: enough to judge, small enough to look at


@dataclass
class DitEvalSettings:
    """Which run to sample, how many samples, what to score them against and where the results go."""

    run_dir: str = field(metadata={"help": "output_dir of recipes/dit_chain_of_forgetting.py"})
    subfolder: str = field(default="transformer_ema", metadata={"help": "weights to sample (default: the EMA)"})
    reference_dir: str | None = field(
        default=None, metadata={"help": "folder of real target images (recursively); omit to only sample"}
    )
    feature_extractor: str | None = field(
        default=None, metadata={"help": "anything eval.fid.load_feature_extractor accepts"}
    )
    kind: str | None = field(default=None, metadata={"help": "feature extractor kind, when it cannot be detected"})
    num_samples: int = field(default=1000, metadata={"help": "images sampled and scored"})
    seed: int = field(default=0, metadata={"help": "seed of the labels and the sampling noise"})
    precision_recall: bool = field(default=False, metadata={"help": "also report k-NN precision and recall"})
    samples_dir: str | None = field(default=None, metadata={"help": "also write every sample as a PNG here"})
    grid: str | None = field(
        default=None, metadata={"help": "PNG grid of the first 64 samples (default: run_dir/eval_samples.png)"}
    )
    output: str | None = field(default=None, metadata={"help": "JSON result (default: run_dir/fid.json)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, ..."})

    def __post_init__(self) -> None:
        if (self.reference_dir is None) != (self.feature_extractor is None):
            raise ValueError("--reference_dir and --feature_extractor go together (FID needs both)")
        if self.num_samples < 1:
            raise ValueError("--num_samples must be positive")


# Every SamplingArguments field as an optional override (None: the run's own setting), generated from the
# library's dataclass so a new sampler setting is an option here without a second list to keep in step.
SamplingOverrides = dataclasses.make_dataclass(
    "SamplingOverrides",
    [
        (item.name, type(item.default) | None, field(default=None, metadata=dict(item.metadata)))
        for item in fields(SamplingArguments)
    ],
)
SamplingOverrides.__module__ = __name__
SamplingOverrides.__doc__ = "Sampler settings that replace the run's own (``None`` keeps the run's)."


@dataclass
class DitSamples:
    """What :func:`sample_and_score` returns: the samples, how they were drawn, and their scores."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # (N,) target-class indices
    sampling: SamplingArguments
    sampling_seconds: float
    scores: dict[str, Any] | None  # eval.fid.compute_fid's result; None without reference images


def parse_args(argv: Sequence[str] | None = None) -> tuple[DitEvalSettings, Any]:
    """The command line as ``(DitEvalSettings, SamplingOverrides)``; a bad value exits with a usage error."""
    settings, overrides = parse_settings(
        (DitEvalSettings, SamplingOverrides), argv, description=__doc__.split("\n\n")[0]
    )
    return settings, overrides


def run_sampling(run_config: Mapping[str, Any], overrides: Any = None) -> SamplingArguments:
    """The run's own sampler settings (``cof_config.json``) with the non-None ``overrides`` (a
    :class:`SamplingOverrides` or a mapping) applied."""
    given = overrides if isinstance(overrides, Mapping) else asdict(overrides) if overrides is not None else {}
    return SamplingArguments(
        **{**run_config.get("sampling", {}), **{key: value for key, value in given.items() if value is not None}}
    )


def sample_and_score(
    transformer: nn.Module,
    vae: nn.Module | None,
    run_config: Mapping[str, Any],
    *,
    num_samples: int,
    sampling: SamplingArguments,
    seed: int = 0,
    extractor: Any = None,
    reference: Any = None,
    with_precision_recall: bool = False,
    device: str | torch.device = "cpu",
) -> DitSamples:
    """``num_samples`` samples of a loaded run (labels uniform over its target classes) and, given an extractor
    and ``reference`` images (a tensor or an iterable of batches), their FID against them."""
    if (extractor is None) != (reference is None):
        raise ValueError("extractor and reference go together (FID needs both)")
    started = time.perf_counter()
    images, labels = sample_run(
        transformer,
        vae,
        num_samples=num_samples,
        num_classes=len(run_config["classes"]),
        null_class=run_config["null_class"],
        sampling=sampling,
        seed=seed,
        device=device,
    )
    seconds = time.perf_counter() - started
    scores = None
    if extractor is not None:
        scores = compute_fid(extractor, reference, images, with_precision_recall=with_precision_recall)
    return DitSamples(images, labels, sampling, seconds, scores)


def write_samples(images: torch.Tensor, labels: torch.Tensor, folder: Path) -> None:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / f"class_{int(label)}" / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            to_pil_image(image).save(tmp, format="PNG")


def evaluate_run(settings: DitEvalSettings, overrides: Any = None) -> dict[str, Any]:
    """Load the run, sample it, write the grid (and the samples), score against the reference folder and write
    the JSON result (``run_dir/fid.json`` by default); returns that result."""
    device = pick_device(settings.device)
    transformer, vae, config = load_run(settings.run_dir, subfolder=settings.subfolder, device=device)
    extractor = reference = None
    if settings.reference_dir:
        extractor = load_feature_extractor(settings.feature_extractor, device, kind=settings.kind)
        reference = iter_image_folder(settings.reference_dir, channels=config["image_channels"])
    samples = sample_and_score(
        transformer,
        vae,
        config,
        num_samples=settings.num_samples,
        sampling=run_sampling(config, overrides),
        seed=settings.seed,
        extractor=extractor,
        reference=reference,
        with_precision_recall=settings.precision_recall,
        device=device,
    )
    result: dict[str, Any] = {
        "run_dir": str(settings.run_dir),
        "weights": settings.subfolder,
        "num_samples": settings.num_samples,
        "seed": settings.seed,
        "sampling": asdict(samples.sampling),
        "sampling_seconds": round(samples.sampling_seconds, 2),
        "class_counts": torch.bincount(samples.labels, minlength=len(config["classes"])).tolist(),
    }
    run_dir = Path(settings.run_dir)
    save_image_grid(
        samples.images[:GRID_SAMPLES], Path(settings.grid) if settings.grid else run_dir / "eval_samples.png"
    )
    if settings.samples_dir:
        write_samples(samples.images, samples.labels, Path(settings.samples_dir))
    if samples.scores is not None:
        result.update(samples.scores, reference_dir=str(settings.reference_dir))
    atomic_write_json(Path(settings.output) if settings.output else run_dir / "fid.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    result = evaluate_run(*parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
