"""Image-classification metrics, the confusion-matrix plot, VTAB-1k aggregates and the markdown report.

Pure functions over logits, labels and numbers: nothing here loads a model or a dataset, so every
number in a report can be checked by hand (see ``tests/vision/test_evaluate_vision.py``).

Two different "VTAB averages" are quoted in papers and they are not interchangeable: the mean over
the 19 tasks and the mean of the three group means (natural / specialized / structured). SNELL, for
example, reports 74.6 for the first and 76.9 for the second. ``vtab_aggregate`` computes both and the
report labels each one, so a comparison never mixes them up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets_builders.vision import VTAB_ALIASES, VTAB_GROUPS, resolve_vtab_task
from hf_tuning.io import atomic_output

__all__ = [
    "AGGREGATE_LABELS",
    "MAX_REPORT_CLASSES",
    "VTAB_ALIASES",
    "VTAB_GROUPS",
    "VTAB_TASKS",
    "classification_metrics",
    "format_vision_report",
    "most_confused",
    "plot_confusion_matrix",
    "vtab_aggregate",
    "vtab_group_of",
]

# The VTAB-1k task table, the other spellings of task names and their resolver (resolve_vtab_task) live with
# the data builders, so a name that reads a task's data also aggregates under that task.
VTAB_TASKS: tuple[str, ...] = tuple(task for tasks in VTAB_GROUPS.values() for task in tasks)
AGGREGATE_LABELS: dict[str, str] = {
    "mean_of_19_tasks": "mean over the 19 tasks (e.g. SNELL's 74.6)",
    "mean_of_group_means": "mean of the 3 group means (e.g. SNELL's 76.9)",
}
MAX_REPORT_CLASSES = 50  # per-class rows in the markdown; the JSON always has every class
ANNOTATE_MAX_CLASSES = 20  # beyond this the cell counts are unreadable
TICK_LABELS_MAX_CLASSES = 50  # beyond this the tick labels overlap into a black bar


# --------------------------------------------------------------------------- classification metrics


def _as_numpy_logits(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float64 numpy copy: bf16/fp16 tensors cannot go to numpy directly, and float64 keeps ties exact."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"logits must be 2-D (num_examples, num_classes), got shape {tuple(array.shape)}")
    if np.isnan(array).any():
        raise ValueError("logits contain NaN: the model's outputs are not usable (diverged weights or a bad input?)")
    return array


def _as_label_array(labels: Any, num_examples: int, num_classes: int) -> np.ndarray:
    """Integer class indices, one per example, each in [0, num_classes)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class index per example), got shape {tuple(array.shape)}")
    if len(array) != num_examples:
        raise ValueError(f"{len(array)} labels but {num_examples} rows of logits: they must match one to one")
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        elif array.size:
            raise ValueError(f"labels must be integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} label(s) outside [0, {num_classes}) (num_classes={num_classes}); "
            f"first: labels[{first}] = {int(array[first])}"
        )
    return array


def _label_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each true label when classes are sorted by logit, ties broken by the lower index.

    Rank 0 is exactly ``argmax`` (which returns the lowest index among tied maxima), so top-1 and top-k
    agree on ties. Counting beats sorting: O(N*C) and no sort-stability questions.
    """
    rows = np.arange(len(labels))
    true_logit = logits[rows, labels][:, None]
    above = (logits > true_logit).sum(axis=1)
    tied_before = ((logits == true_logit) & (np.arange(logits.shape[1])[None, :] < labels[:, None])).sum(axis=1)
    return above + tied_before


def classification_metrics(
    logits: torch.Tensor | np.ndarray,
    labels: Any,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy and the confusion matrix, all accuracies in percent (0-100).

    ``labels`` is any 1-D sequence, array or tensor of class indices. ``num_classes`` defaults to the
    number of logit columns (and must equal it when given). Ties in the logits go to the lowest class
    index, both for the prediction (``argmax``) and for the top-k ranking. With fewer than 5 classes
    "top5" is top-k with k = num_classes (so it is 100); ``top5_k`` always says which k was used.
    ``per_class[i]["accuracy"]`` is None for a class with no examples; such classes are left out of
    ``mean_per_class_accuracy``. Confusion matrix rows are the true class, columns the prediction.
    """
    scores = _as_numpy_logits(logits)
    count, columns = scores.shape
    if num_classes is None:
        num_classes = columns
    if num_classes != columns:
        raise ValueError(f"num_classes={num_classes} but the logits have {columns} columns")
    if num_classes < 1:
        raise ValueError("logits have no class columns")
    if class_names is None:
        class_names = [str(index) for index in range(num_classes)]
    elif len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if count == 0:
        raise ValueError("no examples to score (empty logits)")
    targets = _as_label_array(labels, count, num_classes)

    predictions = scores.argmax(axis=1)  # lowest index among tied maxima
    ranks = _label_ranks(scores, targets)
    k = min(5, num_classes)
    confusion = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    support = confusion.sum(axis=1)
    correct = np.diag(confusion)

    per_class = []
    for index, name in enumerate(class_names):
        accuracy = 100.0 * float(correct[index]) / float(support[index]) if support[index] else None
        per_class.append({"class": name, "index": index, "support": int(support[index]), "accuracy": accuracy})
    present = [row["accuracy"] for row in per_class if row["accuracy"] is not None]
    return {
        "top1": 100.0 * float((ranks == 0).mean()),
        "top5": 100.0 * float((ranks < k).mean()),
        "top5_k": k,
        "num_examples": int(count),
        "num_classes": int(num_classes),
        "mean_per_class_accuracy": float(np.mean(present)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def most_confused(
    confusion: list[list[int]] | np.ndarray, class_names: Sequence[str], count: int = 10
) -> list[dict[str, Any]]:
    """The largest off-diagonal cells (true -> predicted): where a classifier's errors concentrate."""
    matrix = np.asarray(confusion, dtype=np.int64)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.flatnonzero(off)
    # largest first; equal counts in row-major order, so the listing is deterministic
    order = flat[np.argsort(-off.flat[flat], kind="stable")][:count]
    rows = []
    for cell in order:
        true, predicted = divmod(int(cell), matrix.shape[1])
        support = int(matrix[true].sum())
        rows.append(
            {
                "true": class_names[true],
                "predicted": class_names[predicted],
                "count": int(matrix[true, predicted]),
                "percent_of_true": 100.0 * float(matrix[true, predicted]) / support,
            }
        )
    return rows


# --------------------------------------------------------------------------- confusion-matrix plot


def plot_confusion_matrix(
    confusion: list[list[int]] | np.ndarray,
    class_names: list[str],
    path: str | os.PathLike,
    *,
    normalize: bool = True,
    title: str = "",
) -> Path:
    """Write the confusion matrix as a PNG (atomically) and return its path.

    Colours are row-normalised by default (the fraction of each true class predicted as each class),
    so rare classes are as visible as common ones; the annotations stay raw counts. Counts are written
    in the cells up to 20 classes and the tick labels are dropped beyond 50, where they only overlap.
    Uses the Agg canvas directly, so no GUI backend and no global pyplot state are involved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(confusion, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"the confusion matrix must be square, got shape {tuple(matrix.shape)}")
    size = matrix.shape[0]
    if len(class_names) != size:
        raise ValueError(f"{len(class_names)} class names for a {size}x{size} confusion matrix")
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        colours = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
        vmax, colour_label = 1.0, "fraction of the true class"
    else:
        colours = matrix
        vmax, colour_label = max(float(matrix.max()), 1.0), "examples"

    side = float(min(max(4.0, 0.45 * size + 2.5), 40.0))
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(colours, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label=colour_label)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if title:
        axes.set_title(title)
    if size <= TICK_LABELS_MAX_CLASSES:
        axes.set_xticks(range(size))
        axes.set_yticks(range(size))
        axes.set_xticklabels(class_names, rotation=90 if size > 10 else 45, ha="center" if size > 10 else "right")
        axes.set_yticklabels(class_names)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if size <= ANNOTATE_MAX_CLASSES:
        for true in range(size):
            for predicted in range(size):
                dark = colours[true, predicted] > 0.5 * vmax
                axes.text(
                    predicted,
                    true,
                    str(int(matrix[true, predicted])),
                    ha="center",
                    va="center",
                    fontsize=8 if size > 10 else 10,
                    color="white" if dark else "black",
                )
    figure.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


# --------------------------------------------------------------------------- VTAB-1k


def vtab_group_of(task: str) -> str:
    """natural, specialized or structured, for a task name or any alias :func:`resolve_vtab_task` accepts."""
    task = resolve_vtab_task(task)
    return next(group for group, tasks in VTAB_GROUPS.items() if task in tasks)


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def vtab_aggregate(task_top1: Mapping[str, float]) -> dict[str, Any]:
    """Group means and both VTAB-1k averages from per-task top-1 accuracies (percent).

    ``mean_of_19_tasks`` weights every task equally (so the 8 structured tasks weigh most);
    ``mean_of_group_means`` weights every group equally. With tasks missing, both are over what is
    present, ``complete`` is False and ``missing`` lists the absent tasks: such numbers are not
    comparable to published ones. ``tasks`` holds the accepted scores under their canonical names.
    """
    if not task_top1:
        raise ValueError(f"no VTAB task results given; known tasks: {', '.join(VTAB_TASKS)}")
    scores: dict[str, float] = {}
    for name, value in task_top1.items():
        task = resolve_vtab_task(name)
        if task in scores:
            raise ValueError(f"VTAB task {task!r} given twice (as {name!r} and under another spelling)")
        value = float(value)
        if not math.isfinite(value) or not 0.0 <= value <= 100.0:
            raise ValueError(f"top-1 of {name!r} is {value}: expected a percentage in [0, 100]")
        scores[task] = value
    ordered = {task: scores[task] for task in VTAB_TASKS if task in scores}
    group_means = {
        group: _mean([scores[task] for task in tasks if task in scores]) for group, tasks in VTAB_GROUPS.items()
    }
    missing = [task for task in VTAB_TASKS if task not in scores]
    return {
        "group_means": group_means,
        "mean_of_19_tasks": _mean(list(ordered.values())),
        "mean_of_group_means": _mean([mean for mean in group_means.values() if mean is not None]),
        "complete": not missing,
        "missing": missing,
        "num_tasks": len(ordered),
        "tasks": ordered,
        "labels": dict(AGGREGATE_LABELS),
    }


# --------------------------------------------------------------------------- markdown report


def _pct(value: float | None, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _cell(text: Any) -> str:
    """Keep a class name inside one table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ") or " "


def _classification_lines(results: Mapping[str, Any]) -> list[str]:
    k = results.get("top5_k", 5)
    lines = [
        "## Accuracy",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| top-1 accuracy (%) | {_pct(results['top1'])} |",
        f"| top-{k} accuracy (%) | {_pct(results.get('top5'))} |",
        f"| mean per-class accuracy (%) | {_pct(results.get('mean_per_class_accuracy'))} |",
        f"| examples | {results['num_examples']} |",
        "",
    ]
    if k != 5:
        lines += [f'Only {k} classes, so the "top5" entry of the JSON is top-{k} accuracy.', ""]
    per_class = list(results.get("per_class", []))
    if per_class:
        shown = per_class[:MAX_REPORT_CLASSES]
        lines += ["## Per-class accuracy", "", "| # | class | support | accuracy (%) |", "|---:|---|---:|---:|"]
        lines += [
            f"| {row['index']} | {_cell(row['class'])} | {row['support']} | {_pct(row['accuracy'])} |" for row in shown
        ]
        if len(per_class) > len(shown):
            lines.append(f"\n... {len(per_class) - len(shown)} more classes (all of them are in the JSON report)")
        lines.append("")
    confusion = results.get("confusion_matrix")
    if confusion and per_class:
        pairs = most_confused(confusion, [row["class"] for row in per_class])
        if pairs:
            lines += [
                "## Most frequent confusions",
                "",
                "| true class | predicted as | examples | % of the true class |",
                "|---|---|---:|---:|",
            ]
            lines += [
                f"| {_cell(p['true'])} | {_cell(p['predicted'])} | {p['count']} | {_pct(p['percent_of_true'])} |"
                for p in pairs
            ]
            lines.append("")
    return lines


def _vtab_lines(aggregate: Mapping[str, Any]) -> list[str]:
    complete = aggregate.get("complete", False)
    tasks = aggregate.get("tasks", {})
    labels = {**AGGREGATE_LABELS, **aggregate.get("labels", {})}
    heading = "## VTAB-1k" if complete else "## VTAB-1k (partial)"
    lines = [heading, ""]
    if not complete:
        missing = aggregate.get("missing", [])
        lines += [
            f"**partial**: {len(missing)} of {len(VTAB_TASKS)} tasks missing ({', '.join(missing)}); "
            "the means below are over the tasks present and are not comparable to published VTAB-1k averages.",
            "",
        ]
    for group, names in VTAB_GROUPS.items():
        mean = aggregate["group_means"].get(group)
        present = sum(name in tasks for name in names)
        lines += [f"### {group} ({present}/{len(names)} tasks)", "", "| task | top-1 (%) |", "|---|---:|"]
        lines += [f"| {name} | {_pct(tasks.get(name))} |" for name in names]
        suffix = "" if present == len(names) else f", partial: {present}/{len(names)} tasks"
        lines += [f"| **{group} mean{suffix}** | **{_pct(mean)}** |", ""]
    partial = "" if complete else " (partial)"
    lines += [
        "### Aggregates",
        "",
        "| aggregate | top-1 (%) |",
        "|---|---:|",
        f"| {labels['mean_of_19_tasks']}{partial} | {_pct(aggregate.get('mean_of_19_tasks'))} |",
        f"| {labels['mean_of_group_means']}{partial} | {_pct(aggregate.get('mean_of_group_means'))} |",
        "",
        "The two aggregates are different averages: the first weights every task equally, the second every "
        "group equally. Compare each only with the same kind of number in a paper.",
        "",
    ]
    return lines


def format_vision_report(results: Mapping[str, Any]) -> str:
    """Markdown for one evaluation (``classification_metrics`` keys) and/or a VTAB aggregate.

    The aggregate is read from ``results["vtab"]`` or from ``results`` itself when it has
    ``group_means``; ``results["config"]`` (if any) is listed at the top.
    """
    vtab = results.get("vtab") if isinstance(results.get("vtab"), Mapping) else None
    if vtab is None and "group_means" in results:
        vtab = results
    lines = ["# Vision evaluation" if "top1" in results else "# VTAB-1k results", ""]
    config = results.get("config") or {}
    for key, value in config.items():
        if value is not None and not isinstance(value, (dict, list)):
            lines.append(f"- {key}: `{value}`")
    if config:
        lines.append("")
    if "top1" in results:
        lines += _classification_lines(results)
    if vtab is not None:
        lines += _vtab_lines(vtab)
    if "top1" not in results and vtab is None:
        raise ValueError("nothing to report: results have neither 'top1' nor a VTAB aggregate ('group_means')")
    return "\n".join(lines).rstrip() + "\n"
