"""Evaluate a trained image classifier on a data split, or aggregate VTAB-1k task results.

For each ``--model_dir`` (a recipe output folder): the classifier is loaded, the split is read with
the model's own eval preprocessing (timm data config), the logits are collected in batches and scored
(top-1, top-5, per-class accuracy, confusion matrix). Writes ``eval_vision.json``, ``eval_vision.md``
and ``confusion_matrix.png`` to ``--output_dir`` (default: the model folder).

    python eval/evaluate_vision.py --model_dir outputs/vit-dtd --data_format vtab --data_dir data/vtab-1k --task dtd
    python eval/evaluate_vision.py --vtab_results outputs/vit-*/eval_vision.json --output_dir outputs/vtab

The second form reads one JSON per task (each with ``task`` and ``top1``, which ``eval_vision.json``
has for VTAB tasks) and writes ``eval_vtab.json`` and ``eval_vtab.md`` with the group means and both
VTAB averages.

The CLI is a thin wrapper: :class:`VisionEvalSettings` holds its options and the functions take values.
``evaluate_classifier`` scores a model on a DataLoader, ``evaluate_run`` a trained run's folder on the
settings' split (read by ``datasets_builders.image_classification.read_split``, as the recipe reads it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datasets_builders.image_classification import DATA_FORMATS, DEFAULT_SPLITS, read_split
from datasets_builders.vision import ImageClassificationDataset, build_image_transform, resolve_vtab_task
from eval.common import parse_settings, pick_device
from eval.vision_metrics import (
    classification_metrics,
    format_vision_report,
    plot_confusion_matrix,
    vtab_aggregate,
    vtab_group_of,
)
from hf_tuning.io import atomic_write_json, atomic_write_text, read_json
from hf_tuning.vision.backbones import logits_of

__all__ = [
    "VisionEvalSettings",
    "collect_logits",
    "evaluate_classifier",
    "evaluate_run",
    "evaluate_runs",
    "load_split",
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


# --------------------------------------------------------------------------- evaluation


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
    previous mode restored afterwards; it is expected to be on ``device`` already. The logits are read from the
    output as the trainer reads them (``hf_tuning.vision.logits_of``: a tensor, ``.logits``, a mapping, a tuple).
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
        canonical = resolve_vtab_task(str(task))  # raises on an unknown name, listing the known ones
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


# --------------------------------------------------------------------------- settings


@dataclass
class VisionEvalSettings:
    """Which trained classifiers to score on which split, or which VTAB task results to aggregate.

    ``model_dir`` is what :func:`evaluate_runs` (and the CLI) evaluate; :func:`evaluate_run` takes its folder
    as an argument and reads only the split and run settings from here.
    """

    model_dir: list[str] | None = field(default=None, metadata={"help": "recipe output folder(s)", "action": "extend"})
    data_format: str = field(
        default="imagefolder",
        metadata={"help": "layout of the image data", "choices": list(DATA_FORMATS)},
    )
    data_dir: str | None = field(default=None, metadata={"help": "root of the image data"})
    task: str | None = field(default=None, metadata={"help": "VTAB task, FGVC dataset or few-shot dataset name"})
    split: str | None = field(
        default=None, metadata={"help": "default: test (vtab, fgvc, fewshot) or val (imagefolder)"}
    )
    shots: int | None = field(default=None, metadata={"help": "few-shot only: shots per class of the split"})
    seed: int | None = field(default=None, metadata={"help": "few-shot only: the seed of the split"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    output_dir: str | None = field(default=None, metadata={"help": "default: each model folder"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, ..."})
    vtab_results: list[str] | None = field(
        default=None, metadata={"help": "aggregate these per-task JSON files instead of evaluating"}
    )

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"--data_format {self.data_format!r} is not one of {', '.join(DATA_FORMATS)}")
        if self.vtab_results:
            if self.model_dir:
                raise ValueError("--vtab_results aggregates existing results; it cannot be combined with --model_dir")
            if self.output_dir is None:
                raise ValueError("--output_dir is required with --vtab_results")
            return
        if not self.model_dir:
            raise ValueError("--model_dir is required (or --vtab_results to aggregate VTAB results)")
        if self.data_dir is None:
            raise ValueError("--data_dir is required")
        if self.data_format == "imagefolder" and self.task is not None:
            raise ValueError("--task is for vtab, fgvc and fewshot data; an image folder has no tasks")
        if self.data_format != "imagefolder" and self.task is None:
            raise ValueError(f"--task is required with --data_format {self.data_format}")
        if self.data_format != "fewshot" and (self.shots is not None or self.seed is not None):
            raise ValueError("--shots and --seed are for --data_format fewshot")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be at least 1")
        if self.num_workers < 0:
            raise ValueError("--num_workers must be at least 0")
        self.split = self.split or DEFAULT_SPLITS[self.data_format][1]
        names = [Path(m).resolve().name for m in self.model_dir]
        if self.output_dir is not None and len(names) > 1 and len(set(names)) < len(names):
            raise ValueError("several --model_dir share a folder name, so their reports would overwrite each other")

    def report_dir(self, model_dir: str | Path) -> Path:
        """Where ``model_dir``'s reports go: the model folder, ``--output_dir``, or a subfolder of it per model."""
        if self.output_dir is None:
            return Path(model_dir)
        several = len(self.model_dir or []) > 1
        return Path(self.output_dir) / Path(model_dir).resolve().name if several else Path(self.output_dir)


def parse_args(argv: Sequence[str] | None = None) -> VisionEvalSettings:
    """The command line as :class:`VisionEvalSettings`; a bad combination exits with a usage error."""
    (settings,) = parse_settings(VisionEvalSettings, argv, description=__doc__.split("\n\n")[0])
    return settings


# --------------------------------------------------------------------------- trained runs


def load_split(settings: VisionEvalSettings, model_classes: Sequence[str]) -> Any:
    """The ``ImageSplit`` the settings name, read as the recipe reads its evaluation split.

    The model's class list fixes the labels: an image folder's labels are the model's indices even when a
    class has no folder in this split (otherwise every later label would shift by one).
    """
    return read_split(
        settings.data_format,
        settings.data_dir,
        settings.task,
        settings.split,
        classes=list(model_classes),
        shots=settings.shots,
        seed=settings.seed,
    )


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


def evaluate_run(
    model_dir: str | Path, settings: VisionEvalSettings, output_dir: str | Path | None = None
) -> dict[str, Any]:
    """Load one trained classifier, score it on the settings' split and write its three reports to
    ``output_dir`` (default: the model folder); returns the results as written to ``eval_vision.json``."""
    from torch.utils.data import DataLoader

    from hf_tuning.vision import load_trained_classifier

    model_dir = Path(model_dir)
    output_dir = model_dir if output_dir is None else Path(output_dir)
    device = pick_device(settings.device)
    classifier = load_trained_classifier(model_dir)
    model = classifier.model.to(device)
    if hasattr(model, "merge"):  # SNELL / SNELLA: fold the deltas into the weights, the plain model's cost
        model.merge()
    class_names = [str(name) for name in classifier.class_names]
    split = load_split(settings, class_names)
    label_map = match_classes(class_names, split.classes)
    dataset = ImageClassificationDataset(split, build_image_transform(classifier.data_config, train=False))
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
    )
    results = evaluate_classifier(model, loader, len(class_names), class_names, device, label_map=label_map)
    config = {
        "model_dir": str(model_dir),
        "data_format": settings.data_format,
        "data_dir": str(settings.data_dir),
        "task": settings.task,
        "split": settings.split,
        "shots": settings.shots,
        "seed": settings.seed,
        "source": str(getattr(split, "source", "")) or None,
        "batch_size": settings.batch_size,
        "device": str(device),
        "labels_reordered": label_map is not None,
    }
    header: dict[str, Any] = {"config": config}
    if settings.data_format == "vtab":  # top-level "task" and "top1": the file feeds --vtab_results directly
        header.update({"task": settings.task, "vtab_group": vtab_group_of(settings.task)})
    results = {**header, **results}
    title = f"{model_dir.name}: {settings.task or Path(settings.data_dir).name} ({settings.split})"
    paths = write_reports(results, output_dir, title=title)
    print(
        f"{model_dir}: top-1 {results['top1']:.2f}%, top-{results['top5_k']} {results['top5']:.2f}%, "
        f"mean per-class {results['mean_per_class_accuracy']:.2f}% on {results['num_examples']} images"
    )
    print("\n".join(f"wrote {path}" for path in paths))
    return results


def evaluate_runs(settings: VisionEvalSettings) -> list[dict[str, Any]]:
    """Every ``model_dir`` of the settings, each with its reports in :meth:`VisionEvalSettings.report_dir`."""
    return [evaluate_run(m, settings, settings.report_dir(m)) for m in settings.model_dir or []]


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    if settings.vtab_results:
        results, json_path, md_path = write_vtab_reports(settings.vtab_results, settings.output_dir)
        aggregate = results["vtab"]
        state = "complete" if aggregate["complete"] else f"partial, missing {', '.join(aggregate['missing'])}"
        print(
            f"VTAB-1k ({state}): {aggregate['labels']['mean_of_19_tasks']}: {aggregate['mean_of_19_tasks']:.2f}; "
            f"{aggregate['labels']['mean_of_group_means']}: {aggregate['mean_of_group_means']:.2f}"
        )
        print(f"wrote {json_path}\nwrote {md_path}")
        return 0
    evaluate_runs(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
