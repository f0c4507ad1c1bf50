"""Which tuning mode transfers best? Every mode of the image recipe on real digits: full fine-tuning, LoRA, the
adapter, DTL, DTL+, DyT, SNELL and SNELLA, each with ``ost`` and under the best DT variant.

The setting of the staged-tuning digits experiment (``benchmarks/experiment_vision_digits.py``): a small
ViT and a small Swin are pretrained from scratch on scikit-learn's digits 0-4 (the same pretraining code
and cache), then transferred to digits 5-9 with a new head, in each tuning mode, with ``ost`` (one stage).

One protocol for every mode, fixed before any run:

1. learning rate: each mode's rate is picked from ``--learning-rates`` by the top-1 on the target's
   *validation* split (seed 0, final epoch); the test split plays no part in the choice;
2. with that rate, ``--seeds`` runs per mode, each scored once, at the final epoch, on the held-out *test*
   split by the recipe's own evaluation (no best-epoch picking);
3. the same epochs, batch, schedule (cosine, no warmup), weight decay, preprocessing (no augmentation) and
   stochastic depth (the architecture's default: none for the ViT, 0.1 for the Swin) everywhere. On the
   ViT, DTL's prefix-feature cache is on: it is exact there and only saves time.

4. the DT rows (``--dt-variant``, default ``dt2`` with the ``split`` budget: the best DT variant of the
   staged-tuning digits experiment at the same number of steps as ``ost``) reuse each mode's ``ost`` rate;
   DTL on the Swin has none (its maps sit in the last two stages, so ``dt2``'s first stage has nothing to train).

DyT (with and without distillation; it has no Swin form) also records its measured keep rate and its FLOPs per
image against the plain backbone's, on the scored split. Per arch and mode, one more run (seed 0, test, ``ost``,
the same as the scored one) measures what the mode costs: the training memory it adds (the bytes autograd saves
for backward in one forward of a training batch, plus gradients and AdamW's two moments of the trainable
parameters, fp32) and the inference throughput of the trained model in the form one deploys (LoRA and SNELL
merged into the weights, DyT's efficient path) against a plain backbone of the same architecture timed in the
same process. Every run goes through
``recipes/image_classification_dt.py``; finished runs are kept as JSON under
``<output-dir>/experiment_petl/`` and skipped on a rerun. Results: ``<output-dir>/experiment_petl_digits.
{json,md,png}``. Run it as a module from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiment_petl_digits            # ~1 h on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiment_petl_digits --quick    # smoke test
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from benchmarks.experiment_vision_digits import ARCHS, _common_argv, _load_recipe, pretrain
from datasets_builders.digits import export_digits
from hf_tuning.io import atomic_write_json, read_json

MODES: dict[str, list[str]] = {  # each mode's recipe settings; the learning rate is chosen on validation
    "full": ["--tuning_mode", "full"],
    "lora": ["--tuning_mode", "lora", "--lora_r", "8", "--lora_alpha", "16"],
    "adapter": ["--tuning_mode", "adapter"],
    "dtl": ["--tuning_mode", "dtl", "--dtl_rank", "2"],
    "dtl_plus": ["--tuning_mode", "dtl_plus", "--dtl_rank", "2", "--dtl_kernel_size", "3"],
    "dyt": ["--tuning_mode", "dyt", "--dyt_bottleneck", "16", "--dyt_target_rate", "0.5"],
    "dyt_distill": [
        "--tuning_mode",
        "dyt",
        "--dyt_bottleneck",
        "16",
        "--dyt_target_rate",
        "0.5",
        "--dyt_distillation",
        "true",
    ],
    "snell": ["--tuning_mode", "snell", "--snell_rank", "8"],
    "snella": ["--tuning_mode", "snella", "--snell_rank", "8"],
}
ONLY_ON = {"dyt": ("vit",), "dyt_distill": ("vit",)}  # DyT has no Swin form
# DTL's default maps on a Swin sit in its last two stages only: dt2's first group (stage 0) would train nothing,
# which the engine refuses, so the staged rows skip it there
NO_DT_ON = {"dtl": ("swin",), "dtl_plus": ("swin",)}
# DTL's prefix-feature cache (exact, only faster) where nothing random runs in front of it: the ViT has no
# drop-path, while the Swin keeps timm's default 0.1 in every mode (one protocol), which the cache refuses.
CACHE_ARCHS = ("vit",)
RUNS_DIR = "experiment_petl"
STEM = "experiment_petl_digits"


@dataclass
class PetlExperimentSettings:
    """The experiment's options (``--dash-case`` or ``--snake_case``)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = field(default=10, metadata={"help": "training epochs of every transfer run"})
    pretrain_epochs: int = 40
    batch_size: int = 32
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2])
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    dt_variant: str = field(default="dt2", metadata={"help": "the DT variant of the staged rows ('' for none)"})
    dt_budget: str = field(default="split", metadata={"help": "its budget: split (ost's steps) or per_stage"})
    dt_modes: list[str] = field(
        default_factory=lambda: [m for m in MODES if m != "dyt_distill"],
        metadata={"help": "the modes also run under --dt-variant"},
    )
    cost_batch: int = field(default=64, metadata={"help": "images per forward when timing inference"})
    work_dir: str = str(harness.ROOT / "outputs/experiment_vision_digits")
    output_dir: str = str(harness.ROOT / "benchmarks/results")
    quick: bool = field(default=False, metadata={"help": "1 seed, 1 epoch, 1 rate, ViT only: a smoke test"})

    def __post_init__(self) -> None:
        self.archs = harness.comma_list(self.archs, list(ARCHS), "--archs")
        self.modes = harness.comma_list(self.modes, list(MODES), "--modes")
        self.dt_modes = [m for m in harness.comma_list(self.dt_modes, list(MODES), "--dt-modes") if m in self.modes]
        if self.dt_budget not in ("split", "per_stage"):
            raise ValueError(f"--dt-budget must be split or per_stage, got {self.dt_budget!r}")
        if self.quick:
            self.seeds, self.epochs, self.pretrain_epochs = self.seeds[:1], 1, 1
            self.learning_rates, self.archs = self.learning_rates[-1:], self.archs[:1]


def transfer(recipe: Any, arch: str, mode: str, lr: float, seed: int, split: str, s: PetlExperimentSettings,
             target: Path, backbone: Path, variant: str = "ost", costs: bool = False) -> dict[str, Any]:  # fmt: skip
    """One transfer run, scored on ``split`` (val or test) at its final epoch; with ``costs``, also what the
    trained mode costs in training memory and inference speed."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = _common_argv(arch, target, Path(tmp), seed=seed, batch_size=s.batch_size)
        argv += ["--eval_split", split, "--checkpoint", str(backbone), "--dt_variant", variant]
        argv += ["--dt_budget", s.dt_budget] if variant != "ost" else []
        argv += ["--num_train_epochs", str(s.epochs), "--learning_rate", str(lr), *MODES[mode]]
        if mode.startswith("dtl") and arch in CACHE_ARCHS:
            argv += ["--dtl_cache_prefix_features", "true"]
        start = time.perf_counter()
        result = recipe.main(argv)
        plan = result["trainer"].stage_plan
        run = {
            "arch": arch, "mode": mode, "variant": variant, "learning_rate": lr, "seed": seed, "split": split,
            "top1": result["eval"]["eval_top1"], "loss": result["eval"]["eval_loss"],
            "trainable_params": plan.partition.numel(plan.partition.trainable),
            "steps": sum(r.steps for r in result["trainer"].stage_records),
            "wall_seconds": time.perf_counter() - start,
        }  # fmt: skip
        if mode.startswith("dyt"):
            run.update(_inference_cost(result["trainer"]))
        if costs:
            run.update(_costs(result["trainer"], arch, s.cost_batch))
        return run


def _costs(trainer: Any, arch: str, batch: int) -> dict[str, float]:
    """Training memory the mode adds and its inference throughput (deployable form) against a plain backbone."""
    import timm
    import torch.nn.functional as F  # noqa: N812

    from hf_tuning.vision import logits_of

    model = trainer.model
    train = trainer.train_dataset
    x = torch.stack([train[i]["pixel_values"] for i in range(trainer.args.per_device_train_batch_size)])
    y = torch.stack([torch.as_tensor(train[i]["labels"]) for i in range(len(x))])
    model.train()
    existing = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x, y]}
    saved = harness.saved_activation_bytes(lambda: F.cross_entropy(logits_of(model(x)), y), existing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    if hasattr(model, "merge"):  # SNELL
        model.merge()
    elif hasattr(model, "merge_adapter"):  # PEFT LoRA
        model.merge_adapter()
    evaluated = trainer.eval_dataset
    images = torch.stack([evaluated[i % len(evaluated)]["pixel_values"] for i in range(batch)])
    spec = ARCHS[arch]
    plain = timm.create_model(spec["model_name_or_path"], num_classes=5, **spec["model_kwargs"]).eval()
    speed = {}
    for (label, net), _ in harness.palindrome([("plain", plain), ("model", model)], repeats=2):

        def run(images: torch.Tensor, net: Any = net) -> Any:
            with torch.no_grad():
                return logits_of(net(images))

        timed = harness.time_forwards(run, images, device="cpu", warmup=1, iterations=3, min_time_s=0.0)
        speed.setdefault(label, []).extend(timed["step_times_s"])
    return {
        "saved_activation_bytes": saved,
        "gradient_and_optimizer_bytes": 3 * 4 * trainable,
        "images_per_s": batch * len(speed["model"]) / sum(speed["model"]),
        "plain_images_per_s": batch * len(speed["plain"]) / sum(speed["plain"]),
    }


def _inference_cost(trainer: Any) -> dict[str, float]:
    """DyT's measured keep rate on the evaluated split and its FLOPs per image (``FlopCounterMode``, 2 per
    multiply-add) against the plain backbone's, both on that split's images in evaluation mode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = trainer.model.eval()
    dataset = trainer.eval_dataset
    images = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])

    def flops(forward: Any) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(images)
        return counter.get_total_flops()

    dyt = flops(model)
    keep = float(model.keep_rate())
    plain = flops(model.get_base_model())
    return {"keep_rate": keep, "flops_per_image": dyt / len(images), "plain_flops_per_image": plain / len(images)}


def _run(runs_dir: Path, name: str, make: Any) -> dict[str, Any]:
    record = runs_dir / f"{name}.json"
    if record.is_file():  # resumable: finished runs are kept
        return read_json(record)
    run = make()
    atomic_write_json(record, run)
    print(f"{name}: top-1 {run['top1']:.2f} ({run['wall_seconds']:.0f} s)", flush=True)
    return run


def _key(run: dict[str, Any]) -> str:
    """``arch/mode`` for ``ost`` runs, ``arch/mode@variant`` for the staged ones."""
    variant = run.get("variant", "ost")
    return f"{run['arch']}/{run['mode']}" + ("" if variant == "ost" else f"@{variant}")


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``arch/mode`` (and ``arch/mode@variant``): the rate chosen on the ``ost`` validation runs, the test
    top-1 of every seed at that rate, mean and std (None before any test run: the experiment asks for the
    chosen rate first), and the mode's measured costs where its cost run exists."""
    summary: dict[str, dict[str, Any]] = {}
    scored = [r for r in runs if "kind" not in r]
    for key in sorted({_key(r) for r in scored}):
        arch, mode = key.split("@")[0].split("/")
        val = {r["learning_rate"]: r["top1"] for r in scored if _key(r) == f"{arch}/{mode}" and r["split"] == "val"}
        if not val:
            continue
        chosen = max(val, key=lambda lr: (val[lr], -lr))  # ties: the smaller rate
        test = [r for r in scored if _key(r) == key and r["split"] == "test" and r["learning_rate"] == chosen]
        mean, std = harness.mean_std([r["top1"] for r in test]) if test else (None, None)
        summary[key] = {
            "validation_top1": {str(lr): v for lr, v in sorted(val.items())},
            "learning_rate": chosen,
            "top1": [r["top1"] for r in sorted(test, key=lambda r: r["seed"])],
            "mean": mean,
            "std": std,
            "trainable_params": test[0]["trainable_params"] if test else None,
            "steps": test[0]["steps"] if test else None,
        }
        if test and "keep_rate" in test[0]:
            summary[key]["keep_rate"] = harness.mean_std([r["keep_rate"] for r in test])
            summary[key]["flops_ratio"] = harness.mean_std(
                [r["flops_per_image"] / r["plain_flops_per_image"] for r in test]
            )
            summary[key]["mflops_per_image"] = statistics.fmean(r["flops_per_image"] for r in test) / 1e6
        cost = next((r for r in runs if r.get("kind") == "costs" and _key(r) == f"{arch}/{mode}"), None)
        if cost is not None:
            summary[key]["training_memory_bytes"] = (
                cost["saved_activation_bytes"] + cost["gradient_and_optimizer_bytes"]
            )
            summary[key]["images_per_s"] = cost["images_per_s"]
            summary[key]["throughput_to_plain"] = cost["images_per_s"] / cost["plain_images_per_s"]
    return summary


def _row_keys(summary: dict[str, dict[str, Any]], arch: str) -> list[str]:
    """The scored rows of ``arch`` in table order: every mode, its DT row right after it."""
    keys = []
    for mode in MODES:
        keys += [k for k in summary if k.split("@")[0] == f"{arch}/{mode}" and summary[k]["top1"]]
    return keys


def _label(key: str) -> str:
    mode, _, variant = key.split("/")[1].partition("@")
    return f"{mode} + {variant}" if variant else mode


def _cost_cells(entry: dict[str, Any], key: str) -> list[str]:
    if "@" in key or "training_memory_bytes" not in entry:
        return ["", ""]
    return [f"{entry['training_memory_bytes'] / harness.MIB:.1f}", f"{entry['throughput_to_plain']:.2f}"]


def render_markdown(report: dict[str, Any]) -> str:
    """The report's markdown: a function of its saved JSON."""
    meta, summary = report["meta"], report["summary"]
    staged = f"`{meta['dt_variant']}` ({meta['dt_budget']} budget)" if meta.get("dt_variant") else "none"
    lines = [
        "# Tuning modes on real images: digits 0-4 -> 5-9",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, timm {meta['timm']}. Transfer with `ost`, "
        f"{meta['epochs']} epochs at batch {meta['batch_size']}, cosine schedule without warmup, weight decay 0.05, "
        "no augmentation. Each mode's learning rate was chosen from "
        f"{', '.join(f'{lr:g}' for lr in meta['learning_rates'])} by validation top-1 (seed 0); the score is top-1 (%) "
        f"at the final epoch on the held-out test split ({meta['target_test_images']} images), mean ± std over "
        f"{meta['seeds']} seeds. Staged rows: {staged}, at the mode's `ost` rate (none for DTL on the Swin, whose "
        "maps sit in its last two stages: the variant's first stage would have nothing to train).",
        "",
        "Costs (one run per arch and mode, `ost`): *training memory* = bytes autograd saves for backward in one "
        f"forward of a batch of {meta['batch_size']} plus gradients and AdamW's two moments of the trainable "
        "parameters (fp32); *throughput / plain* = images per second of the trained model in its deployed form "
        "(LoRA and SNELL merged into the weights, DyT's efficient path) over a plain backbone of the same "
        f"architecture, timed in the same process at batch {meta.get('cost_batch', 64)} (CPU, noisy to a few %).",
        "",
        "Source-task test top-1 of the pretrained backbones: "
        + ", ".join(f"{a} {v:.1f}" for a, v in report["pretrained"].items()),
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    archs = [a for a in ARCHS if _row_keys(summary, a)]
    if archs:
        lines += ["## All modes", ""]
        header = ["mode"]
        for arch in archs:
            header += [f"{arch} top-1", f"{arch} params", f"{arch} train memory (MiB)", f"{arch} throughput / plain"]
        rows = []
        labels = list(dict.fromkeys(_label(k) for a in archs for k in _row_keys(summary, a)))
        for label in labels:
            row = [label]
            for arch in archs:
                key = next((k for k in _row_keys(summary, arch) if _label(k) == label), None)
                if key is None:
                    row += ["", "", "", ""]
                    continue
                entry = summary[key]
                row += [f"{entry['mean']:.2f} ± {entry['std']:.2f}", f"{entry['trainable_params']:,}"]
                row += _cost_cells(entry, key)
            rows.append(row)
        lines += [*harness.table(header, rows), ""]
    for arch in archs:
        lines += [f"## {arch}", ""]
        header = ["mode", "test top-1", "seeds", "learning rate", "validation top-1 by rate", "trainable params",
                  "steps", "keep rate", "FLOPs / plain"]  # fmt: skip
        rows = []
        for key in _row_keys(summary, arch):
            entry = summary[key]
            rows.append([
                _label(key),
                f"**{entry['mean']:.2f} ± {entry['std']:.2f}**",
                ", ".join(f"{v:.1f}" for v in entry["top1"]),
                f"{entry['learning_rate']:g}",
                ", ".join(f"{float(lr):g}: {v:.1f}" for lr, v in entry["validation_top1"].items()) if "@" not in key else "",
                f"{entry['trainable_params']:,}",
                entry["steps"],
                f"{entry['keep_rate'][0]:.3f} ± {entry['keep_rate'][1]:.3f}" if "keep_rate" in entry else "",
                f"{entry['flops_ratio'][0]:.3f} ({entry['mflops_per_image']:.2f} MFLOPs)" if "flops_ratio" in entry else "",
            ])  # fmt: skip
        lines += [*harness.table(header, rows), ""]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in ARCHS if _row_keys(summary, a)]
    fig, axes = plt.subplots(len(archs), 1, figsize=(12, 3.8 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs):
        keys = _row_keys(summary, arch)
        entries = [summary[k] for k in keys]
        colors = ["tab:orange" if "@" in k else "tab:blue" for k in keys]
        ax.bar(range(len(keys)), [e["mean"] for e in entries], yerr=[e["std"] for e in entries], capsize=3,
               color=colors, alpha=0.85)  # fmt: skip
        for i, entry in enumerate(entries):
            ax.text(i, 2, f"{entry['trainable_params']:,}", ha="center", va="bottom", fontsize=6, color="white",
                    rotation=90)  # fmt: skip
        ax.set_xticks(range(len(keys)), [_label(k) for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("target test top-1 (%)")
        ax.set_title(f"{arch}: digits 0-4 -> 5-9 (blue: ost; orange: staged; numbers: trainable parameters)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = harness.parse_settings(PetlExperimentSettings, argv, __doc__)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work, output = Path(s.work_dir), Path(s.output_dir)
    source, target = work / "digits_0_4", work / "digits_5_9"
    export_digits(source, [0, 1, 2, 3, 4], seed=0)
    counts = export_digits(target, [5, 6, 7, 8, 9], seed=0)
    recipe = _load_recipe()
    stem = f"{STEM}_quick" if s.quick else STEM
    runs_dir = output / (f"{RUNS_DIR}_quick" if s.quick else RUNS_DIR)
    runs: list[dict[str, Any]] = []
    pretrained: dict[str, float] = {}
    for arch in s.archs:
        backbone = pretrain(recipe, arch, source, work, s.pretrain_epochs, s.batch_size)
        pretrained[arch] = read_json(backbone.parent / "pretrain.json")["source_test_top1"]
        for mode in s.modes:
            if arch not in ONLY_ON.get(mode, (arch,)):
                continue
            for lr in s.learning_rates:
                name = f"{arch}-{mode}-lr{lr:g}-val-seed0-e{s.epochs}"
                runs.append(
                    _run(runs_dir, name, partial(transfer, recipe, arch, mode, lr, 0, "val", s, target, backbone))
                )
            chosen = summarise([r for r in runs if (r["arch"], r["mode"]) == (arch, mode)])[f"{arch}/{mode}"]
            lr = chosen["learning_rate"]
            for seed in s.seeds:
                name = f"{arch}-{mode}-lr{lr:g}-test-seed{seed}-e{s.epochs}"
                runs.append(
                    _run(runs_dir, name, partial(transfer, recipe, arch, mode, lr, seed, "test", s, target, backbone))
                )
            name = f"{arch}-{mode}-lr{lr:g}-costs-e{s.epochs}"
            cost = partial(transfer, recipe, arch, mode, lr, 0, "test", s, target, backbone, costs=True)
            runs.append({**_run(runs_dir, name, cost), "kind": "costs"})
            if s.dt_variant and mode in s.dt_modes and arch not in NO_DT_ON.get(mode, ()):
                for seed in s.seeds:
                    name = f"{arch}-{mode}-{s.dt_variant}-{s.dt_budget}-lr{lr:g}-test-seed{seed}-e{s.epochs}"
                    make = partial(transfer, recipe, arch, mode, lr, seed, "test", s, target, backbone, s.dt_variant)
                    runs.append(_run(runs_dir, name, make))
    import timm

    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "command": harness.command_line("benchmarks.experiment_petl_digits", argv),
        "target_test_images": counts["test"],
        **{k: v for k, v in asdict(s).items() if k not in ("work_dir", "output_dir", "seeds")},
        "seeds": len(s.seeds),
        "archs_config": {a: ARCHS[a] for a in s.archs},
        "modes_config": {m: MODES[m] for m in s.modes},
        "dt_modes": s.dt_modes,
    }
    summary = summarise(runs)
    report = {"meta": meta, "pretrained": pretrained, "summary": summary, "runs": runs}
    markdown = harness.save_report(output / f"{stem}.json", report, render_markdown)
    plot(summary, output / f"{stem}.png")
    print(markdown)
    return report


if __name__ == "__main__":
    main()
