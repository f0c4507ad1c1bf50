"""Evaluate a trained image classifier on a data split, or aggregate VTAB-1k task results.

For each ``--model_dir`` (a recipe output folder): the classifier is loaded, the split is read with
the model's own eval preprocessing (timm data config), the logits are collected in batches and scored
(top-1, top-5, per-class accuracy, confusion matrix). Writes ``eval_vision.json``, ``eval_vision.md``
and ``confusion_matrix.png`` to ``--output_dir`` (default: the model folder).

    python eval/evaluate_vision.py --model_dir outputs/vit-dtd --data_format vtab --data_dir data/vtab-1k --task dtd
    python eval/evaluate_vision.py --vtab_results outputs/vit-*/eval_vision.json --output_dir outputs/vtab

The second form reads one JSON per task (each with ``task`` and ``top1``, which ``eval_vision.json``
has for VTAB tasks) and writes ``eval_vtab.json`` and ``eval_vtab.md`` with the group means and both
VTAB averages. ``evaluate_classifier`` takes a model and a DataLoader, so it works without the CLI.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from eval.vision_metrics import (
    canonical_vtab_task,
    classification_metrics,
    format_vision_report,
    plot_confusion_matrix,
    vtab_aggregate,
    vtab_group_of,
)
from hf_tuning.io import atomic_write_json, atomic_write_text, read_json

__all__ = [
    "collect_logits",
    "evaluate_classifier",
    "load_vtab_results",
    "main",
    "parse_args",
    "write_reports",
    "write_vtab_reports",
]

RESULTS_JSON = "eval_vision.json"
REPORT_MD = "eval_vision.md"
CONFUSION_PNG = "confusion_matrix.png"
VTAB_JSON = "eval_vtab.json"
VTAB_MD = "eval_vtab.md"
DATA_FORMATS = ("imagefolder", "vtab", "fgvc", "fewshot")
DEFAULT_SPLITS = {"imagefolder": "val", "vtab": "test", "fgvc": "test", "fewshot": "test"}


# --------------------------------------------------------------------------- evaluation


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a forward pass: timm returns a tensor, transformers an output object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned {type(output).__name__}; expected a logits tensor or an object with .logits")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, labels) from a collated batch: the dataset's dicts, or (images, labels) pairs."""
    if isinstance(batch, Mapping):
        return batch["pixel_values"], torch.as_tensor(batch["labels"])
    images, labels = batch
    return images, torch.as_tensor(labels)


def input_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating weights, so a bf16/fp16 model gets inputs it can multiply."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def collect_logits(
    model: torch.nn.Module, loader: Iterable[Any], device: str | torch.device = "cpu", *, desc: str = "evaluating"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, on the CPU) and labels of a loader, in its order, under inference mode.

    The model is put in eval mode for the pass (dropout and batch-norm statistics frozen) and its
    previous mode restored afterwards; it is expected to be on ``device`` already.
    """
    device = torch.device(device)
    dtype = input_dtype(model)
    was_training = model.training
    logits_parts: list[torch.Tensor] = []
    label_parts: list[torch.Tensor] = []
    model.eval()
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        with torch.inference_mode():
            for batch in tqdm(loader, total=total, desc=desc, unit="batch", disable=None):
                images, labels = split_batch(batch)
                images = images.to(device, dtype=dtype if images.is_floating_point() else None, non_blocking=True)
                logits = logits_of(model(images))
                if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
                    raise ValueError(
                        f"the model returned logits of shape {tuple(logits.shape)} for a batch of "
                        f"{images.shape[0]} images; expected (batch, num_classes)"
                    )
                logits_parts.append(logits.float().cpu())
                label_parts.append(labels.reshape(-1).long().cpu())
    finally:
        model.train(was_training)
    if not logits_parts:
        raise ValueError("the data loader yielded no batches: the split is empty")
    return torch.cat(logits_parts), torch.cat(label_parts)


def evaluate_classifier(
    model: torch.nn.Module,
    loader: Iterable[Any],
    num_classes: int,
    class_names: list[str] | None,
    device: str | torch.device = "cpu",
    *,
    label_map: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Score a classifier on every example of ``loader``: ``classification_metrics`` plus timing.

    ``label_map[i]`` is the model's index of the dataset's class ``i``, for a split whose classes are
    the model's in another order (None: the same order).
    """
    started = time.perf_counter()
    logits, labels = collect_logits(model, loader, device)
    seconds = time.perf_counter() - started
    if label_map is not None:
        labels = torch.as_tensor(list(label_map), dtype=torch.long)[labels]
    results = classification_metrics(logits, labels, num_classes=num_classes, class_names=class_names)
    results["eval_seconds"] = seconds
    results["images_per_second"] = results["num_examples"] / max(seconds, 1e-9)
    return results


# --------------------------------------------------------------------------- reports


def write_reports(results: dict[str, Any], output_dir: str | Path, *, title: str = "") -> tuple[Path, Path, Path]:
    """Write ``eval_vision.json`` (every class, full precision), ``eval_vision.md`` and the confusion PNG."""
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / RESULTS_JSON, output_dir / REPORT_MD
    names = [row["class"] for row in results["per_class"]]
    png_path = plot_confusion_matrix(results["confusion_matrix"], names, output_dir / CONFUSION_PNG, title=title)
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, format_vision_report(results))
    return json_path, md_path, png_path


def load_vtab_results(paths: Sequence[str | Path]) -> dict[str, float]:
    """Task -> top-1 from one JSON per task (``task`` at the top level or in ``config``; ``top1`` in percent)."""
    scores: dict[str, float] = {}
    sources: dict[str, Path] = {}
    for path in map(Path, paths):
        data = read_json(path)
        task = data.get("task") or (data.get("config") or {}).get("task")
        if not task or "top1" not in data:
            raise ValueError(f"{path}: a VTAB result file needs 'task' and 'top1' entries")
        canonical = canonical_vtab_task(str(task))  # raises on an unknown name, listing the known ones
        if canonical in sources:
            raise ValueError(f"VTAB task {canonical!r} appears in both {sources[canonical]} and {path}")
        sources[canonical] = path
        scores[canonical] = float(data["top1"])
    return scores


def write_vtab_reports(paths: Sequence[str | Path], output_dir: str | Path) -> tuple[dict[str, Any], Path, Path]:
    """Aggregate per-task result files into ``eval_vtab.json`` and ``eval_vtab.md``."""
    aggregate = vtab_aggregate(load_vtab_results(paths))
    results = {"config": {"result_files": len(paths)}, "sources": [str(p) for p in paths], "vtab": aggregate}
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / VTAB_JSON, output_dir / VTAB_MD
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, format_vision_report(results))
    return results, json_path, md_path


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", nargs="+", action="extend", default=None, help="recipe output folder(s)")
    parser.add_argument("--data_format", choices=DATA_FORMATS, default="imagefolder")
    parser.add_argument("--data_dir", default=None, help="root of the image data")
    parser.add_argument("--task", default=None, help="VTAB task, FGVC dataset or few-shot dataset name")
    parser.add_argument("--split", default=None, help="default: test (vtab, fgvc, fewshot) or val (imagefolder)")
    parser.add_argument("--shots", type=int, default=None, help="few-shot only: shots per class of the split")
    parser.add_argument("--seed", type=int, default=None, help="few-shot only: the seed of the split")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default: each model folder")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument(
        "--vtab_results", nargs="+", default=None, help="aggregate these per-task JSON files instead of evaluating"
    )
    args = parser.parse_args(argv)
    if args.vtab_results:
        if args.model_dir:
            parser.error("--vtab_results aggregates existing results; it cannot be combined with --model_dir")
        if args.output_dir is None:
            parser.error("--output_dir is required with --vtab_results")
        return args
    if not args.model_dir:
        parser.error("--model_dir is required (or --vtab_results to aggregate VTAB results)")
    if args.data_dir is None:
        parser.error("--data_dir is required")
    if args.data_format == "imagefolder" and args.task is not None:
        parser.error("--task is for vtab, fgvc and fewshot data; an image folder has no tasks")
    if args.data_format != "imagefolder" and args.task is None:
        parser.error(f"--task is required with --data_format {args.data_format}")
    if args.data_format != "fewshot" and (args.shots is not None or args.seed is not None):
        parser.error("--shots and --seed are for --data_format fewshot")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    args.split = args.split or DEFAULT_SPLITS[args.data_format]
    names = [Path(m).resolve().name for m in args.model_dir]
    if args.output_dir is not None and len(names) > 1 and len(set(names)) < len(names):
        parser.error("several --model_dir share a folder name, so their reports would overwrite each other")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_split(args: argparse.Namespace, model_classes: Sequence[str]) -> Any:
    """The ``ImageSplit`` the arguments name, through ``datasets_builders.vision``.

    An image folder is read with the model's class list, so its labels are the model's indices even when
    a class has no folder in this split (otherwise every later label would shift by one).
    """
    from datasets_builders.vision import few_shot_split, fgvc_split, image_folder_split, vtab_split

    if args.data_format == "imagefolder":
        return image_folder_split(args.data_dir, args.split, classes=list(model_classes))
    if args.data_format == "vtab":
        return vtab_split(args.data_dir, args.task, args.split)
    if args.data_format == "fgvc":
        return fgvc_split(args.data_dir, args.task, args.split)
    return few_shot_split(args.data_dir, args.task, args.split, shots=args.shots, seed=args.seed)


def match_classes(model_classes: Sequence[str], split_classes: Sequence[str]) -> list[int] | None:
    """Map the split's label indices onto the model's: None when they agree, a permutation when only
    the order differs; an error when the class counts differ (the predictions could not be scored).
    """
    model_classes, split_classes = [str(c) for c in model_classes], [str(c) for c in split_classes]
    if len(model_classes) != len(split_classes):
        raise ValueError(
            f"the model has {len(model_classes)} classes but the split has {len(split_classes)}: "
            "was it trained on this dataset?"
        )
    if model_classes == split_classes:
        return None
    if sorted(model_classes) == sorted(split_classes) and len(set(model_classes)) == len(model_classes):
        position = {name: index for index, name in enumerate(model_classes)}
        return [position[name] for name in split_classes]
    print(
        "warning: the split's class names differ from the model's; assuming the same order "
        f"(model: {model_classes[:3]}..., split: {split_classes[:3]}...)",
        file=sys.stderr,
    )
    return None


def evaluate_run(model_dir: Path, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """Load one trained classifier, score it on the split and write its three reports."""
    from torch.utils.data import DataLoader

    from datasets_builders.vision import ImageClassificationDataset, build_image_transform
    from hf_tuning.vision import load_trained_classifier

    device = pick_device(args.device)
    classifier = load_trained_classifier(model_dir)
    model = classifier.model.to(device)
    class_names = [str(name) for name in classifier.class_names]
    split = load_split(args, class_names)
    label_map = match_classes(class_names, split.classes)
    dataset = ImageClassificationDataset(split, build_image_transform(classifier.data_config, train=False))
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    results = evaluate_classifier(model, loader, len(class_names), class_names, device, label_map=label_map)
    config = {
        "model_dir": str(model_dir),
        "data_format": args.data_format,
        "data_dir": str(args.data_dir),
        "task": args.task,
        "split": args.split,
        "shots": args.shots,
        "seed": args.seed,
        "source": str(getattr(split, "source", "")) or None,
        "batch_size": args.batch_size,
        "device": str(device),
        "labels_reordered": label_map is not None,
    }
    header: dict[str, Any] = {"config": config}
    if args.data_format == "vtab":  # top-level "task" and "top1": the file feeds --vtab_results directly
        try:
            group = vtab_group_of(args.task)
        except ValueError:  # a task the data builder knows but the VTAB table does not: still report it
            group = None
        header.update({"task": args.task, "vtab_group": group})
    results = {**header, **results}
    title = f"{model_dir.name}: {args.task or Path(args.data_dir).name} ({args.split})"
    paths = write_reports(results, output_dir, title=title)
    print(
        f"{model_dir}: top-1 {results['top1']:.2f}%, top-{results['top5_k']} {results['top5']:.2f}%, "
        f"mean per-class {results['mean_per_class_accuracy']:.2f}% on {results['num_examples']} images"
    )
    print("\n".join(f"wrote {path}" for path in paths))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vtab_results:
        results, json_path, md_path = write_vtab_reports(args.vtab_results, args.output_dir)
        aggregate = results["vtab"]
        state = "complete" if aggregate["complete"] else f"partial, missing {', '.join(aggregate['missing'])}"
        print(
            f"VTAB-1k ({state}): {aggregate['labels']['mean_of_19_tasks']}: {aggregate['mean_of_19_tasks']:.2f}; "
            f"{aggregate['labels']['mean_of_group_means']}: {aggregate['mean_of_group_means']:.2f}"
        )
        print(f"wrote {json_path}\nwrote {md_path}")
        return 0
    several = len(args.model_dir) > 1
    for model_dir in map(Path, args.model_dir):
        if args.output_dir is None:
            output_dir = model_dir
        else:
            output_dir = Path(args.output_dir) / model_dir.resolve().name if several else Path(args.output_dir)
        evaluate_run(model_dir, args, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
