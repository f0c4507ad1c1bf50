"""Sample a DiT run and score it: FID (and optionally k-NN precision/recall) against real target images.

    python eval/evaluate_dit.py --run_dir outputs/dit-digits-cof --reference_dir data/digits59/test \\
        --feature_extractor outputs/digits_features --num_samples 1000 --output outputs/dit-digits-cof/fid.json

The run's EMA weights (``transformer_ema/``) and its ``cof_config.json`` say what to sample: labels
are drawn uniformly from the run's target classes, and the sampler settings default to the run's
(DiT's 250-step DDPM with the learned variance unless the run chose otherwise); every one of them
can be overridden here. Fix ``--num_samples``, the reference set and the sampler identically for
every arm of a comparison: FID is biased by the sample count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from eval.fid import compute_fid, iter_image_folder, load_feature_extractor
from hf_tuning.diffusion.runs import SamplingArguments, load_run, sample_run
from hf_tuning.diffusion.sampling import save_image_grid, to_pil_image
from hf_tuning.io import atomic_output, atomic_write_json

__all__ = ["evaluate_run", "main", "parse_args", "write_samples"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="output_dir of recipes/dit_chain_of_forgetting.py")
    parser.add_argument("--subfolder", default="transformer_ema", help="weights to sample (default: the EMA)")
    parser.add_argument("--reference_dir", help="folder of real target images (recursively); omit to only sample")
    parser.add_argument("--feature_extractor", help="anything eval.fid.load_feature_extractor accepts")
    parser.add_argument("--kind", default=None, help="feature extractor kind, when it cannot be detected")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision_recall", action="store_true")
    parser.add_argument("--samples_dir", help="also write every sample as a PNG here")
    parser.add_argument("--grid", help="PNG grid of the first 64 samples (default: run_dir/eval_samples.png)")
    parser.add_argument("--output", help="JSON result (default: run_dir/fid.json)")
    for item in fields(SamplingArguments):
        parser.add_argument(f"--{item.name}", type=type(item.default), default=None, help=item.metadata.get("help"))
    args = parser.parse_args(argv)
    if (args.reference_dir is None) != (args.feature_extractor is None):
        parser.error("--reference_dir and --feature_extractor go together (FID needs both)")
    if args.num_samples < 1:
        parser.error("--num_samples must be positive")
    return args


def write_samples(images: torch.Tensor, labels: torch.Tensor, folder: Path) -> None:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / f"class_{int(label)}" / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            to_pil_image(image).save(tmp, format="PNG")


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer, vae, config = load_run(args.run_dir, subfolder=args.subfolder, device=device)
    settings = {**config.get("sampling", {})}
    settings.update(
        {
            item.name: getattr(args, item.name)
            for item in fields(SamplingArguments)
            if getattr(args, item.name) is not None
        }
    )
    sampling = SamplingArguments(**settings)
    started = time.perf_counter()
    images, labels = sample_run(
        transformer,
        vae,
        num_samples=args.num_samples,
        num_classes=len(config["classes"]),
        null_class=config["null_class"],
        sampling=sampling,
        seed=args.seed,
        device=device,
    )
    result: dict[str, Any] = {
        "run_dir": str(args.run_dir),
        "weights": args.subfolder,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "sampling": asdict(sampling),
        "sampling_seconds": round(time.perf_counter() - started, 2),
        "class_counts": torch.bincount(labels, minlength=len(config["classes"])).tolist(),
    }
    run_dir = Path(args.run_dir)
    save_image_grid(images[:64], Path(args.grid) if args.grid else run_dir / "eval_samples.png")
    if args.samples_dir:
        write_samples(images, labels, Path(args.samples_dir))
    if args.reference_dir:
        extractor = load_feature_extractor(args.feature_extractor, device, kind=args.kind)
        reference = iter_image_folder(args.reference_dir, channels=config["image_channels"])
        result.update(
            compute_fid(extractor, reference, images, with_precision_recall=args.precision_recall),
            reference_dir=str(args.reference_dir),
        )
    atomic_write_json(Path(args.output) if args.output else run_dir / "fid.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    result = evaluate_run(parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
