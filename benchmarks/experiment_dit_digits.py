"""Does chain of forgetting transfer a DiT better than plain fine-tuning? A CPU test on real digits.

    HF_HUB_OFFLINE=1 python -m benchmarks.experiment_dit_digits            # about 15 min on 2 idle cores
    HF_HUB_OFFLINE=1 python -m benchmarks.experiment_dit_digits --quick    # a smoke test, 1 min

(run as a module from the repository root).

1. scikit-learn's digits (real 8x8 scans) are exported as image folders: digits 0-4 (source) and 5-9
   (target); a small CNN classifier is trained on all ten digits for the feature space of the FID.
2. ``recipes/dit_chain_of_forgetting.py`` pretrains a tiny pixel-space DiT on digits 0-4
   (recipes/configs/dit_digits_pretrain.yaml), and a knowledge bank is sampled from it.
3. The pretrained DiT is transferred to digits 5-9 by plain fine-tuning (uniform t, no bank) and by
   chain of forgetting (power-law t, 6 of 32 samples from the bank), with the same steps, optimiser,
   EMA and seeds (recipes/configs/dit_digits_{finetune,chain_of_forgetting}.yaml); two ablations take
   one ingredient each: ``timesteps_only`` (power-law t, no bank) and ``bank_only`` (uniform t, bank).
4. Every run is scored the same way, by ``eval.evaluate_dit.sample_and_score`` (what ``eval/evaluate_dit.py``
   runs): ``--num-samples`` EMA samples with labels drawn from the target classes, DiT's sampler, FID
   against the held-out target test images in the classifier's features, k-NN precision/recall; and the
   share of samples the classifier reads as the intended digit.

Writes benchmarks/results/experiment_dit_digits.{json,md} and sample grids under
benchmarks/results/experiment_dit_digits/. Finished runs are kept in --work-dir and skipped when the
script is run again.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from datasets_builders.digits import export_digits
from datasets_builders.knowledge_bank import KnowledgeBankArguments, build_knowledge_bank
from eval.digits_classifier import load_digits_classifier, save_digits_classifier, train_digits_classifier
from eval.evaluate_dit import sample_and_score
from eval.fid import load_feature_extractor, load_image_folder
from hf_tuning.diffusion import SamplingArguments, load_run, sample_dit, save_image_grid
from hf_tuning.io import atomic_write_json, read_json

CONFIGS = harness.ROOT / "recipes" / "configs"
RESULTS = harness.ROOT / "benchmarks" / "results"
# arm -> (config, whether it reads the knowledge bank); the last two take one ingredient each (ablations)
ARMS = {
    "finetune": ("dit_digits_finetune.yaml", False),
    "chain_of_forgetting": ("dit_digits_chain_of_forgetting.yaml", True),
    "timesteps_only": ("dit_digits_chain_of_forgetting.yaml", False),
    "bank_only": ("dit_digits_finetune.yaml", True),
}
SOURCE_DIGITS, TARGET_DIGITS = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the pretrain config's")
    parser.add_argument("--transfer-steps", type=int, default=None, help="default: the transfer configs'")
    parser.add_argument("--bank-images", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=500, help="samples per run for FID")
    parser.add_argument("--sampling-steps", type=int, default=100, help="respaced DDPM steps (DiT: 250)")
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (tiny kernels: 1 is often fastest)")
    parser.add_argument("--work-dir", default="outputs/experiment_dit_digits")
    parser.add_argument("--output", default=str(RESULTS / "experiment_dit_digits"))
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps and samples: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.pretrain_steps = args.pretrain_steps or 30
        args.transfer_steps = args.transfer_steps or 10
        args.bank_images, args.num_samples, args.sampling_steps = 40, 64, 10
    return args


@functools.cache
def recipe(config: Path, output_dir: Path, overrides: dict[str, Any]) -> None:
    """Run recipes/dit_chain_of_forgetting.py in-process (one Python, no re-import per run)."""
    argv = ["--config", str(config), "--output_dir", str(output_dir)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    importlib.import_module("recipes.dit_chain_of_forgetting").main(argv)


def config_value(config: str, key: str) -> Any:
    import yaml

    return yaml.safe_load((CONFIGS / config).read_text(encoding="utf-8"))[key]


def class_accuracy(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, offset: int) -> float:
    """Share of samples the digits classifier reads as the digit their label asked for (the classifier prepares
    its input itself: one grey channel at its own size)."""
    with torch.no_grad():
        predicted = classifier(images).argmax(dim=1)
    return float((predicted == labels + offset).float().mean() * 100)


def sampling_settings(args: argparse.Namespace) -> SamplingArguments:
    """One evaluation protocol for every run."""
    return SamplingArguments(
        guidance_scale=args.guidance_scale,
        cfg_channels=1,
        num_inference_steps=args.sampling_steps,
        sampler="ddpm",
        sample_batch_size=500,
    )


def score(
    run_dir: Path,
    args: argparse.Namespace,
    extractor: Any,
    classifier: torch.nn.Module,
    reference: torch.Tensor,
    offset: int,
) -> dict[str, Any]:
    """The DiT evaluation's sampling and FID (one protocol for every run, noise seed 12345), plus the share of
    samples read as the asked digit; ``sampling_seconds`` covers all of it."""
    transformer, vae, config = load_run(run_dir)
    started = time.perf_counter()
    samples = sample_and_score(
        transformer,
        vae,
        config,
        num_samples=args.num_samples,
        sampling=sampling_settings(args),
        seed=12345,
        extractor=extractor,
        reference=reference,
        with_precision_recall=True,
    )
    result = dict(samples.scores)
    result["class_accuracy"] = class_accuracy(classifier, samples.images, samples.labels, offset)
    result["sampling_seconds"] = round(time.perf_counter() - started, 1)
    return result


def write_grid(run_dir: Path, args: argparse.Namespace, path: Path, per_class: int = 10) -> str:
    """One row per class, ``per_class`` samples each, same noise seed for every run."""
    transformer, vae, config = load_run(run_dir)
    settings = sampling_settings(args)
    labels = torch.arange(len(config["classes"])).repeat_interleave(per_class)
    images = sample_dit(
        transformer,
        labels,
        null_class=config["null_class"],
        guidance_scale=settings.guidance_scale,
        cfg_channels=settings.cfg_channels,
        num_inference_steps=settings.num_inference_steps,
        generator=torch.Generator().manual_seed(0),
        vae=vae,
    )
    save_image_grid(images, path, nrow=per_class)
    return str(path)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    table = {}
    for arm, results in runs.items():
        row: dict[str, Any] = {"n": len(results)}
        for key in ("fid", "precision", "recall", "class_accuracy"):
            values = [r[key] for r in results]
            mean, std = harness.mean_std(values)
            row[key] = {"mean": mean, "std": std, "values": values}
        table[arm] = row
    return table


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# DiT transfer on digits: chain of forgetting vs plain fine-tuning",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}`.",
        "",
        "Tiny pixel-space DiT ({layers} blocks, hidden {hidden}, {params:,} parameters) pretrained on digits 0-4 "
        "for {pretrain_steps} steps; transferred to digits 5-9 for {transfer_steps} steps, seeds {seeds}. "
        "Each run: {num_samples} EMA samples ({sampling_steps}-step DDPM with the learned variance, CFG "
        "{guidance}), FID against the {num_reference} held-out test images of digits 5-9 in the features of a "
        "digits CNN ({classifier_accuracy:.1f}% test accuracy on all ten digits). Lower FID is better.".format(
            **report["setup"]
        ),
        "",
        "Arms: `finetune` (uniform t, no bank), `chain_of_forgetting` (t ~ (t+1) on the target, t ~ (1000-t) on "
        "6 of 32 bank samples, retention weight 0.1), and two ablations with one ingredient each: "
        "`timesteps_only` (the power-law t, no bank) and `bank_only` (uniform t, with the bank).",
        "",
        "| model | FID | precision | recall | samples read as the asked digit (%) |",
        "|---|---|---|---|---|",
    ]
    for arm, row in report["table"].items():
        cells = [
            f"{row[k]['mean']:.2f} ± {row[k]['std']:.2f}" for k in ("fid", "precision", "recall", "class_accuracy")
        ]
        lines.append(f"| {arm} (n={row['n']}) | " + " | ".join(cells) + " |")
    source = report["pretrained"]
    lines += [
        "",
        f"Before transfer, the pretrained model's samples score FID {source['source']['fid']:.2f} against digits "
        f"0-4 (what it was trained on) and {source['target']['fid']:.2f} against digits 5-9. The knowledge bank "
        f"holds {report['setup']['bank_images']} of its samples.",
        "",
        "Sample grids (one row per class, the same noise for every model; seed-0 runs): "
        + ", ".join(f"`{Path(p).name}`" for p in report["grids"])
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 1. data and the FID feature space
    export_digits(work / "digits04", SOURCE_DIGITS)
    export_digits(work / "digits59", TARGET_DIGITS)
    features_dir = work / "digits_features"
    if not (features_dir / "feature_extractor.json").is_file():
        model, metrics = train_digits_classifier(seed=0)
        save_digits_classifier(model, features_dir, metrics)
    extractor = load_feature_extractor(features_dir)
    classifier, classifier_config = load_digits_classifier(features_dir)
    target_test = load_image_folder(work / "digits59" / "test", channels=1)
    source_test = load_image_folder(work / "digits04" / "test", channels=1)

    # 2. pretrain on 0-4 and sample the knowledge bank
    pretrain_dir = work / "pretrain"
    if not (pretrain_dir / "cof_config.json").is_file():
        overrides = {"data_dir": work / "digits04", "grid_samples": 0}
        if args.pretrain_steps:
            overrides["max_steps"] = args.pretrain_steps
        recipe(CONFIGS / "dit_digits_pretrain.yaml", pretrain_dir, overrides)
    bank_dir = work / f"bank_{args.bank_images}"
    transformer, _, pretrain_config = load_run(pretrain_dir)
    build_knowledge_bank(
        transformer,
        KnowledgeBankArguments(
            output_dir=str(bank_dir),
            num_images=args.bank_images,
            guidance_scale=args.guidance_scale,
            cfg_channels=1,
            num_inference_steps=args.sampling_steps,
            batch_size=250,
            seed=0,
        ),
        model_name=str(pretrain_dir),
    )
    pretrained_path = work / "pretrain_score.json"
    if not pretrained_path.is_file():
        atomic_write_json(
            pretrained_path,
            {
                "source": score(pretrain_dir, args, extractor, classifier, source_test, 0),
                "target": score(pretrain_dir, args, extractor, classifier, target_test, 5),
            },
        )
    pretrained = read_json(pretrained_path)

    # 3-4. transfer: every arm, every seed
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            config_name, uses_bank = ARMS[arm]
            run_dir = work / f"{arm}_seed{seed}"
            result_path = run_dir / "experiment_score.json"
            if not result_path.is_file():
                overrides = {
                    "seed": seed,
                    "data_dir": work / "digits59",
                    "model_name_or_path": pretrain_dir,
                    "bank_dir": bank_dir if uses_bank else "",
                    "grid_samples": 0,
                }
                if args.transfer_steps:
                    overrides["max_steps"] = args.transfer_steps
                recipe(CONFIGS / config_name, run_dir, overrides)
                result = score(run_dir, args, extractor, classifier, target_test, 5)
                result["train_seconds"] = read_json(run_dir / "all_results.json")["train_runtime"]
                atomic_write_json(result_path, result)
            runs[arm].append(read_json(result_path))
    grids = [write_grid(pretrain_dir, args, output / "pretrained_source.png")]
    grids += [write_grid(work / f"{arm}_seed{args.seeds[0]}", args, output / f"{arm}_samples.png") for arm in args.arms]

    config = transformer.config
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "command": "python -m benchmarks.experiment_dit_digits " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "layers": config.num_layers,
            "hidden": config.num_attention_heads * config.attention_head_dim,
            "params": sum(p.numel() for p in transformer.parameters()),
            "pretrain_steps": args.pretrain_steps or config_value("dit_digits_pretrain.yaml", "max_steps"),
            "transfer_steps": args.transfer_steps or config_value(ARMS["finetune"][0], "max_steps"),
            "seeds": args.seeds,
            "num_samples": args.num_samples,
            "sampling_steps": args.sampling_steps,
            "guidance": args.guidance_scale,
            "num_reference": len(target_test),
            "bank_images": args.bank_images,
            "classifier_accuracy": classifier_config["metrics"]["test_accuracy"]
            * (100 if classifier_config["metrics"]["test_accuracy"] <= 1 else 1),
            "pretrain_classes": pretrain_config["classes"],
        },
        "pretrained": pretrained,
        "table": summarise(runs),
        "runs": runs,
        "grids": grids,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    harness.save_report(output.with_suffix(".json"), report, markdown)
    print(json.dumps(report["table"], indent=2))
    return report


if __name__ == "__main__":
    main()
