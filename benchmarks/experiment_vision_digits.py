"""Does staged tuning transfer better? A real-image test on scikit-learn's digits.

The paper's central claim is that tuning subspaces one after another (DT1-DT4) transfers a
pretrained vision model better than tuning everything at once (OST). Here, on data nobody here
made (the 1,797 handwritten 8x8 digits bundled with scikit-learn):

1. a small ViT and a small Swin are pretrained from scratch on digits 0-4;
2. each is transferred to digits 5-9 (new head) with ``ost`` and ``dt1``..``dt4``, in full
   fine-tuning and LoRA, under the ``per_stage`` budget (every stage gets ost's epochs, as in the
   paper) and the ``split`` budget (ost's epochs divided across the stages: equal compute);
3. every run is scored the same way: top-1 at the final epoch on the held-out test split
   (no best-epoch picking on test), by the recipe's own evaluation of the model it trained.

Every run goes through ``recipes/image_classification_dt.py``. Results: ``<output-dir>/
experiment_vision_digits.{json,md,png}``; per-run JSON under ``<output-dir>/experiment_vision/``.
Run it as a module from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiment_vision_digits            # ~35 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiment_vision_digits --quick    # smoke test
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from datasets_builders.digits import export_digits
from hf_tuning.io import atomic_write_json, read_json

VARIANTS = ("ost", "dt1", "dt2", "dt3", "dt4")
BUDGETS = ("per_stage", "split")
ARCHS: dict[str, dict[str, Any]] = {
    # 16 px input: ViT with 4x4 patches (16 tokens); Swin with 2x2 patches, 4 stages (8x8 .. 1x1 tokens)
    "vit": {
        "model_name_or_path": "vit_tiny_patch16_224",
        "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 8, "num_heads": 4},
    },
    "swin": {
        "model_name_or_path": "swin_tiny_patch4_window7_224",
        "model_kwargs": {
            "img_size": 16,
            "patch_size": 2,
            "window_size": 4,
            "embed_dim": 32,
            "depths": [2, 2, 2, 2],
            "num_heads": [2, 2, 4, 4],
        },
    },
}
MODES = {"full": {"learning_rate": 1e-3}, "lora": {"learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16}}


def _load_recipe():
    return importlib.import_module("recipes.image_classification_dt")


def _common_argv(arch: str, data_dir: Path, output_dir: Path, seed: int, batch_size: int) -> list[str]:
    spec = ARCHS[arch]
    return [
        "--model_name_or_path", spec["model_name_or_path"],
        "--model_kwargs", json.dumps(spec["model_kwargs"]),
        "--image_mean", "0.5", "0.5", "0.5",
        "--image_std", "0.5", "0.5", "0.5",
        "--crop_pct", "1.0",
        "--data_format", "imagefolder",
        "--data_dir", str(data_dir),
        "--eval_split", "test",
        "--cache_images", "true",
        "--train_crop", "false",
        "--hflip", "0.0",
        "--per_device_train_batch_size", str(batch_size),
        "--per_device_eval_batch_size", "256",
        "--weight_decay", "0.05",
        "--lr_scheduler_type", "cosine",
        "--warmup_steps", "0",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "1000",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--use_cpu", "true",
        "--seed", str(seed),
        "--output_dir", str(output_dir),
    ]  # fmt: skip


def pretrain(recipe, arch: str, data_dir: Path, work: Path, epochs: int, batch_size: int) -> Path:
    """Train ``arch`` from scratch on the source digits; return a backbone-only checkpoint."""
    out = work / f"pretrain-{arch}"
    backbone = out / "backbone.safetensors"
    if backbone.is_file():
        return backbone
    argv = _common_argv(arch, data_dir, out, seed=0, batch_size=batch_size)
    argv += ["--dt_variant", "ost", "--num_train_epochs", str(epochs), "--learning_rate", "1e-3"]
    result = recipe.main(argv)
    model = result["trainer"].model
    from safetensors.torch import save_file

    from hf_tuning.vision import classifier_head

    head_name, _ = classifier_head(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(f"{head_name}.")}
    save_file(state, str(backbone))
    atomic_write_json(out / "pretrain.json", {"source_test_top1": result["eval"]["eval_top1"], "epochs": epochs})
    return backbone


def transfer(recipe, arch: str, mode: str, variant: str, budget: str, seed: int, args, backbone: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        argv = _common_argv(arch, args.target_dir, Path(tmp), seed=seed, batch_size=args.batch_size)
        argv += ["--checkpoint", str(backbone), "--tuning_mode", mode, "--dt_variant", variant]
        argv += ["--dt_budget", budget, "--num_train_epochs", str(args.epochs)]
        for key, value in MODES[mode].items():
            argv += [f"--{key}", str(value)]
        start = time.perf_counter()
        result = recipe.main(argv)
        records = result["trainer"].stage_records
        return {
            "arch": arch,
            "mode": mode,
            "variant": variant,
            "budget": budget,
            "seed": seed,
            "test_top1": result["eval"]["eval_top1"],
            "test_loss": result["eval"]["eval_loss"],
            "steps": sum(r.steps for r in records),
            "stages": len(records),
            "wall_seconds": time.perf_counter() - start,
        }


def summarise(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per ``arch/mode/variant/budget``: the top-1 of every seed, their mean and std, and the steps trained."""
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = f"{run['arch']}/{run['mode']}/{run['variant']}/{run['budget']}"
        table.setdefault(key, {"top1": [], "steps": run["steps"]})["top1"].append(run["test_top1"])
    return {
        k: dict(zip(("mean", "std"), harness.mean_std(v["top1"])), steps=v["steps"], top1=v["top1"])
        for k, v in table.items()
    }


def render_markdown(report: dict) -> str:
    """The report's markdown: a function of its saved JSON (meta, pretrained scores, summary)."""
    meta, pretrained, summary = report["meta"], report["pretrained"], report["summary"]
    lines = [
        "# Staged tuning on real images: digits 0-4 -> 5-9",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, timm {meta['timm']}. {meta['seeds']} seeds per cell, "
        f"{meta['epochs']} epochs per stage (per_stage) or in total (split), batch {meta['batch_size']}. "
        "Score: top-1 (%) at the final epoch on the held-out target test split "
        f"({meta['target_test_images']} images), mean ± std over seeds.",
        "",
        "Source-task test top-1 of the pretrained backbones: "
        + ", ".join(f"{a} {v:.1f}" for a, v in pretrained.items()),
        "",
    ]
    for arch in ARCHS:
        for mode in MODES:
            ost = summary.get(f"{arch}/{mode}/ost/per_stage")
            if ost is None:
                continue
            lines += [
                f"## {arch}, {mode}",
                "",
                f"ost: **{ost['mean']:.2f} ± {ost['std']:.2f}** ({ost['steps']} steps)",
                "",
            ]
            lines += [
                "| variant | per_stage top-1 | steps | Δ vs ost | split top-1 | steps | Δ vs ost |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for variant in VARIANTS[1:]:
                cells = []
                for budget in BUDGETS:
                    entry = summary.get(f"{arch}/{mode}/{variant}/{budget}")
                    if entry is None:
                        cells += ["-", "-", "-"]
                        continue
                    mean = entry["mean"]
                    cells += [f"{mean:.2f} ± {entry['std']:.2f}", str(entry["steps"]), f"{mean - ost['mean']:+.2f}"]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(a, m) for a in ARCHS for m in MODES]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=False)
    for ax, (arch, mode) in zip(axes, panels):
        for offset, budget in ((-0.18, "per_stage"), (0.18, "split")):
            xs, means, stds = [], [], []
            for i, variant in enumerate(VARIANTS):
                entry = summary.get(f"{arch}/{mode}/{variant}/{'per_stage' if variant == 'ost' else budget}")
                if entry is not None:
                    xs.append(i + (0 if variant == "ost" else offset))
                    means.append(entry["mean"])
                    stds.append(entry["std"])
            ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, label=budget)
        ax.set_xticks(range(len(VARIANTS)), VARIANTS)
        ax.set_title(f"{arch}, {mode}")
        ax.set_ylabel("target test top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per stage (per_stage) or in total (split)")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--work-dir", type=Path, default=harness.ROOT / "outputs/experiment_vision_digits")
    parser.add_argument("--output-dir", type=Path, default=harness.ROOT / "benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, ViT full only: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.pretrain_epochs = args.seeds[:1], 1, 1
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    source_dir, args.target_dir = args.work_dir / "digits_0_4", args.work_dir / "digits_5_9"
    export_digits(source_dir, [0, 1, 2, 3, 4], seed=0)
    target_counts = export_digits(args.target_dir, [5, 6, 7, 8, 9], seed=0)
    recipe = _load_recipe()
    runs_dir = args.output_dir / ("experiment_vision_quick" if args.quick else "experiment_vision")
    runs: list[dict] = []
    pretrained: dict[str, float] = {}
    for arch in args.archs:
        backbone = pretrain(recipe, arch, source_dir, args.work_dir, args.pretrain_epochs, args.batch_size)
        pretrained[arch] = read_json(backbone.parent / "pretrain.json")["source_test_top1"]
        for mode in args.modes:
            for variant in args.variants:
                for budget in BUDGETS if variant != "ost" else ("per_stage",):
                    if budget not in args.budgets and variant != "ost":
                        continue
                    for seed in args.seeds:
                        record = runs_dir / f"{arch}-{mode}-{variant}-{budget}-seed{seed}-e{args.epochs}.json"
                        if record.is_file():  # resumable: finished runs are kept
                            runs.append(read_json(record))
                            continue
                        run = transfer(recipe, arch, mode, variant, budget, seed, args, backbone)
                        atomic_write_json(record, run)
                        runs.append(run)
                        print(f"{record.stem}: top-1 {run['test_top1']:.2f} ({run['wall_seconds']:.0f} s)", flush=True)
    import timm

    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "seeds": len(args.seeds),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "target_test_images": target_counts["test"],
        "pretrain_epochs": args.pretrain_epochs,
        "archs": ARCHS,
        "modes": MODES,
    }
    summary = summarise(runs)
    stem = "experiment_vision_digits_quick" if args.quick else "experiment_vision_digits"
    report = {"meta": meta, "pretrained": pretrained, "summary": summary, "runs": runs}
    markdown = harness.save_report(args.output_dir / f"{stem}.json", report, render_markdown)
    plot(summary, args.output_dir / f"{stem}.png")
    print(markdown)
    return {"summary": summary, "runs": runs, "pretrained": pretrained}


if __name__ == "__main__":
    main()
