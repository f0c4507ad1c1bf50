"""Vision evaluation: hand-computed metrics, ties, VTAB aggregates, the PNG, the report and the CLI."""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

vision_metrics = importlib.import_module("eval.vision_metrics")
evaluate_vision = importlib.import_module("eval.evaluate_vision")

classification_metrics = vision_metrics.classification_metrics
vtab_aggregate = vision_metrics.vtab_aggregate
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 5 examples, 3 classes. Predictions (argmax): 0, 1, 0, 2, 0 against labels 0, 1, 2, 0, 0.
LOGITS = [
    [2.0, 1.0, 0.0],  # label 0 -> 0 right
    [0.0, 3.0, 1.0],  # label 1 -> 1 right
    [1.0, 0.0, 0.5],  # label 2 -> 0 wrong
    [0.0, 0.0, 5.0],  # label 0 -> 2 wrong
    [5.0, 0.0, 0.0],  # label 0 -> 0 right
]
LABELS = [0, 1, 2, 0, 0]


# --------------------------------------------------------------------------- classification_metrics


def test_hand_computed_metrics_and_confusion_matrix():
    result = classification_metrics(np.array(LOGITS), LABELS, class_names=["cat", "dog", "owl"])
    assert result["top1"] == pytest.approx(60.0)
    assert result["num_examples"] == 5
    assert result["confusion_matrix"] == [[2, 0, 1], [0, 1, 0], [1, 0, 0]]
    assert [row["support"] for row in result["per_class"]] == [3, 1, 1]
    assert [row["accuracy"] for row in result["per_class"]] == pytest.approx([200 / 3, 100.0, 0.0])
    assert result["per_class"][1] == {"class": "dog", "index": 1, "support": 1, "accuracy": 100.0}
    # the mean over classes (55.56) is not the overall accuracy (60): class 0 has 3 examples
    assert result["mean_per_class_accuracy"] == pytest.approx((200 / 3 + 100.0 + 0.0) / 3)
    # only 3 classes: "top5" is top-3, which every example passes
    assert result["top5"] == 100.0 and result["top5_k"] == 3


def test_torch_inputs_half_precision_and_default_names():
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16)
    result = classification_metrics(logits, torch.tensor(LABELS), num_classes=3)
    assert result["top1"] == pytest.approx(60.0)
    assert [row["class"] for row in result["per_class"]] == ["0", "1", "2"]
    json.dumps(result)  # plain Python types only: the report is JSON


def test_top5_counts_the_fifth_place_but_not_the_sixth():
    row = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # class i is ranked i-th (0-based)
    result = classification_metrics(np.array([row, row, row]), [4, 5, 0])
    assert result["top5_k"] == 5
    assert result["top1"] == pytest.approx(100 / 3)  # only the label-0 example
    assert result["top5"] == pytest.approx(200 / 3)  # label 4 is 5th (in), label 5 is 6th (out)


def test_ties_go_to_the_lowest_index():
    tied = [1.0, 1.0, 0.0]
    result = classification_metrics(np.array([tied, tied]), [0, 1])
    assert result["top1"] == 50.0  # both predicted as class 0
    assert result["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    # top-k uses the same rule: with all six logits equal, class 4 is 5th and class 5 is 6th
    flat = np.zeros((2, 6))
    result = classification_metrics(flat, [4, 5])
    assert result["top1"] == 0.0 and result["top5"] == 50.0


def test_class_without_examples_has_no_accuracy_and_is_left_out_of_the_mean():
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    result = classification_metrics(logits, [0, 1, 1])  # no class-2 examples
    per_class = result["per_class"]
    assert per_class[2] == {"class": "2", "index": 2, "support": 0, "accuracy": None}
    assert per_class[0]["accuracy"] == 100.0 and per_class[1]["accuracy"] == 50.0
    assert result["mean_per_class_accuracy"] == pytest.approx(75.0)
    assert result["confusion_matrix"][2] == [0, 0, 0]


@pytest.mark.parametrize(
    ("logits", "labels", "options", "message"),
    [
        (np.zeros(3), [0, 1, 2], {}, "2-D"),
        (np.zeros((3, 2)), [0, 1], {}, "2 labels but 3 rows"),
        (np.zeros((2, 3)), [0, 3], {}, r"outside \[0, 3\)"),
        (np.zeros((2, 3)), [-1, 0], {}, r"labels\[0\] = -1"),
        (np.zeros((2, 3)), [0, 1], {"num_classes": 4}, "num_classes=4"),
        (np.zeros((2, 3)), [0, 1], {"class_names": ["a", "b"]}, "2 class names"),
        (np.zeros((2, 3)), [0.5, 1], {}, "integer class indices"),
        (np.full((1, 2), np.nan), [0], {}, "NaN"),
        (np.zeros((0, 3)), [], {}, "no examples"),
        (np.zeros((2, 3)), [[0], [1]], {}, "1-D"),
    ],
)
def test_invalid_inputs_are_rejected_with_clear_errors(logits, labels, options, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(logits, labels, **options)


def test_integral_float_labels_are_accepted():
    assert classification_metrics(np.array(LOGITS), [float(x) for x in LABELS])["top1"] == pytest.approx(60.0)


# --------------------------------------------------------------------------- confusion-matrix plot


def test_confusion_png_is_written_atomically(tmp_path):
    target = tmp_path / "plots" / "confusion.png"
    path = vision_metrics.plot_confusion_matrix(
        [[2, 0, 1], [0, 1, 0], [1, 0, 0]], ["cat", "dog", "owl"], target, title="toy"
    )
    assert path == target and target.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in target.parent.iterdir()) == ["confusion.png"]  # no temporary left behind


def test_confusion_png_for_many_classes_and_raw_counts(tmp_path):
    size = 60  # no annotations, no tick labels
    matrix = np.eye(size, dtype=int) * 3
    matrix[0, 1] = 2
    matrix[5] = 0  # a class without examples: its normalised row stays zero, no division by zero
    for normalize in (True, False):
        path = vision_metrics.plot_confusion_matrix(
            matrix, [f"c{i}" for i in range(size)], tmp_path / f"cm_{normalize}.png", normalize=normalize
        )
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_confusion_plot_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="square"):
        vision_metrics.plot_confusion_matrix([[1, 2, 3]], ["a"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 class names"):
        vision_metrics.plot_confusion_matrix(np.eye(3), ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- VTAB


def group_scores(natural: float, specialized: float, structured: float) -> dict[str, float]:
    values = {"natural": natural, "specialized": specialized, "structured": structured}
    return {task: values[group] for group, tasks in vision_metrics.VTAB_GROUPS.items() for task in tasks}


def test_vtab_groups_table():
    groups = vision_metrics.VTAB_GROUPS
    assert list(groups) == ["natural", "specialized", "structured"]
    assert [len(tasks) for tasks in groups.values()] == [7, 4, 8]
    assert len(set(vision_metrics.VTAB_TASKS)) == 19


def test_vtab_groups_match_the_data_builders():
    """The metrics re-export the data code's table: one table, the same groups in the same order."""
    from datasets_builders.vision import VTAB_GROUPS

    assert list(VTAB_GROUPS) == list(vision_metrics.VTAB_GROUPS)
    assert {group: tuple(tasks) for group, tasks in VTAB_GROUPS.items()} == vision_metrics.VTAB_GROUPS


def test_vtab_aliases_match_the_data_builders():
    """A task name the data code reads must aggregate under the same task: both use the one resolver."""
    from datasets_builders.vision import VTAB_ALIASES, resolve_vtab_task

    assert vision_metrics.resolve_vtab_task is resolve_vtab_task
    assert evaluate_vision.resolve_vtab_task is resolve_vtab_task
    assert not hasattr(vision_metrics, "canonical_vtab_task")  # the second copy is gone
    for alias, task in VTAB_ALIASES.items():
        assert vtab_aggregate({alias: 50.0})["tasks"] == {task: 50.0}
        assert vision_metrics.vtab_group_of(alias) == vision_metrics.vtab_group_of(task)
    for name in ["CIFAR-100", "Oxford IIIT Pet", " dsprites-location ", *vision_metrics.VTAB_TASKS]:
        assert vtab_aggregate({name: 50.0})["tasks"] == {resolve_vtab_task(name): 50.0}


def test_vtab_task_names_in_result_files_use_the_data_resolver(tmp_path):
    """Every spelling the data readers accept is read from a result file; an unknown one lists the choices."""
    from datasets_builders.vision import VTAB_ALIASES, ImageDataError, resolve_vtab_task

    for number, name in enumerate(["Oxford-IIIT Pet", "SMALLNORB_AZIMUTH", *VTAB_ALIASES]):
        path = tmp_path / f"{number}.json"
        path.write_text(json.dumps({"task": name, "top1": 50.0}))
        assert evaluate_vision.load_vtab_results([path]) == {resolve_vtab_task(name): 50.0}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "imagenet", "top1": 50.0}))
    with pytest.raises(
        ImageDataError, match=r"unknown VTAB-1k task 'imagenet'; expected one of cifar.*spellings: .*pcam"
    ):
        evaluate_vision.load_vtab_results([bad])


def test_vtab_aggregate_distinguishes_the_two_means():
    result = vtab_aggregate(group_scores(90.0, 80.0, 50.0))
    assert result["group_means"] == pytest.approx({"natural": 90.0, "specialized": 80.0, "structured": 50.0})
    assert result["mean_of_group_means"] == pytest.approx(220 / 3)  # 73.33
    assert result["mean_of_19_tasks"] == pytest.approx((7 * 90 + 4 * 80 + 8 * 50) / 19)  # 71.05
    assert round(result["mean_of_group_means"], 2) == 73.33 and round(result["mean_of_19_tasks"], 2) == 71.05
    assert result["complete"] is True and result["missing"] == [] and result["num_tasks"] == 19
    assert "74.6" in result["labels"]["mean_of_19_tasks"] and "76.9" in result["labels"]["mean_of_group_means"]


def test_vtab_aliases_map_to_the_canonical_names():
    scores = group_scores(90.0, 80.0, 50.0)
    for alias, canonical in [("cifar100", "cifar"), ("pets", "oxford_iiit_pet"), ("flowers102", "oxford_flowers102")]:
        scores[alias] = scores.pop(canonical)
    result = vtab_aggregate(scores)
    assert result["complete"] is True
    assert {"cifar", "oxford_iiit_pet", "oxford_flowers102"} <= set(result["tasks"])
    assert vtab_aggregate({"cifar_100": 70.0})["tasks"] == {"cifar": 70.0}
    assert vtab_aggregate({"CIFAR-100": 70.0})["tasks"] == {"cifar": 70.0}


def test_vtab_partial_results():
    result = vtab_aggregate({"cifar": 60.0, "dtd": 70.0, "eurosat": 95.0})
    assert result["complete"] is False
    assert len(result["missing"]) == 16 and "caltech101" in result["missing"] and "cifar" not in result["missing"]
    assert result["group_means"] == {"natural": pytest.approx(65.0), "specialized": 95.0, "structured": None}
    assert result["mean_of_19_tasks"] == pytest.approx(75.0)  # over the 3 tasks present
    assert result["mean_of_group_means"] == pytest.approx(80.0)  # over the 2 groups present
    report = vision_metrics.format_vision_report(result)
    assert "partial" in report and "not comparable" in report


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ({"imagenet": 80.0}, "unknown VTAB-1k task 'imagenet'.*clevr_count"),
        ({"cifar": 70.0, "cifar100": 71.0}, "given twice"),
        ({"dtd": 170.0}, r"percentage in \[0, 100\]"),
        ({"dtd": float("nan")}, "percentage"),
        ({}, "no VTAB task results"),
    ],
)
def test_vtab_aggregate_rejects_bad_input(scores, message):
    with pytest.raises(ValueError, match=message):
        vtab_aggregate(scores)


def test_vtab_report_labels_both_means():
    report = vision_metrics.format_vision_report({"vtab": vtab_aggregate(group_scores(90.0, 80.0, 50.0))})
    assert "partial" not in report
    assert "| mean over the 19 tasks (e.g. SNELL's 74.6) | 71.05 |" in report
    assert "| mean of the 3 group means (e.g. SNELL's 76.9) | 73.33 |" in report
    for group in ("natural", "specialized", "structured"):
        assert f"### {group}" in report
    assert "| **structured mean** | **50.00** |" in report
    assert "| smallnorb_ele | 50.00 |" in report


# --------------------------------------------------------------------------- markdown report


def test_classification_report_tables():
    results = classification_metrics(np.array(LOGITS), LABELS, class_names=["cat", "dog", "o|wl"])
    report = vision_metrics.format_vision_report({"config": {"task": "toy", "split": "test"}, **results})
    assert "- task: `toy`" in report
    assert "| top-1 accuracy (%) | 60.00 |" in report
    assert "| top-3 accuracy (%) | 100.00 |" in report  # honest about k with 3 classes
    assert "| mean per-class accuracy (%) | 55.56 |" in report
    assert "| 2 | o\\|wl | 1 | 0.00 |" in report  # a pipe in a class name stays inside its cell
    assert "| cat | o\\|wl | 1 | 33.33 |" in report  # most frequent confusions
    assert "more classes" not in report


def test_per_class_table_is_capped_at_50_rows():
    size = 60
    logits = np.eye(size)
    results = classification_metrics(logits, list(range(size)))
    report = vision_metrics.format_vision_report(results)
    assert "| 49 | 49 | 1 | 100.00 |" in report and "| 50 | 50 |" not in report
    assert "... 10 more classes" in report
    assert "| top-5 accuracy (%) | 100.00 |" in report


def test_report_needs_something_to_show():
    with pytest.raises(ValueError, match="nothing to report"):
        vision_metrics.format_vision_report({"config": {}})


# --------------------------------------------------------------------------- evaluate_classifier


class PixelPicker(nn.Module):
    """Linear on the flattened 2x2 image: the logit of class c is pixel c (pixel 3 is ignored)."""

    def __init__(self, wrap_output: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.dropout = nn.Dropout(0.9)  # would randomise the logits if eval mode were not set
        self.wrap_output = wrap_output
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(3, 4))
            self.linear.bias.zero_()

    def forward(self, pixel_values: torch.Tensor):
        logits = self.linear(self.dropout(pixel_values.flatten(1)))
        return types.SimpleNamespace(logits=logits) if self.wrap_output else logits


def image(*pixels: float) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.float32).reshape(1, 2, 2)


# the brightest of the first three pixels is the prediction; same outcomes as LOGITS/LABELS
DATASET = [
    {"pixel_values": image(2.0, 1.0, 0.0, 9.0), "labels": 0},
    {"pixel_values": image(0.0, 3.0, 1.0, 9.0), "labels": 1},
    {"pixel_values": image(1.0, 0.0, 0.5, 9.0), "labels": 2},
    {"pixel_values": image(0.0, 0.0, 5.0, 9.0), "labels": 0},
    {"pixel_values": image(5.0, 0.0, 0.0, 9.0), "labels": 0},
]


@pytest.mark.parametrize("wrap_output", [False, True])
def test_evaluate_classifier_on_a_tiny_model(wrap_output):
    model = PixelPicker(wrap_output).train()
    loader = DataLoader(DATASET, batch_size=2)  # 3 batches, the last one short
    result = evaluate_vision.evaluate_classifier(model, loader, 3, ["cat", "dog", "owl"], "cpu")
    expected = classification_metrics(np.array(LOGITS), LABELS, class_names=["cat", "dog", "owl"])
    assert {key: result[key] for key in expected} == expected
    assert result["images_per_second"] > 0 and result["eval_seconds"] >= 0
    assert model.training  # the caller's mode is restored


def test_evaluate_classifier_collects_in_order_without_gradients():
    logits, labels = evaluate_vision.collect_logits(PixelPicker(), DataLoader(DATASET, batch_size=3))
    assert labels.tolist() == LABELS
    assert torch.equal(logits, torch.tensor(LOGITS))
    assert not logits.requires_grad


def test_evaluate_classifier_reorders_labels():
    # the dataset's classes are (owl, cat, dog) while the model's are (cat, dog, owl)
    relabelled = [{**row, "labels": [1, 2, 0][row["labels"]]} for row in DATASET]
    result = evaluate_vision.evaluate_classifier(
        PixelPicker(), DataLoader(relabelled, batch_size=4), 3, ["cat", "dog", "owl"], label_map=[2, 0, 1]
    )
    assert result["top1"] == pytest.approx(60.0)
    assert evaluate_vision.match_classes(["cat", "dog", "owl"], ["owl", "cat", "dog"]) == [2, 0, 1]
    assert evaluate_vision.match_classes(["cat", "dog"], ["cat", "dog"]) is None
    with pytest.raises(ValueError, match="2 classes but the split has 3"):
        evaluate_vision.match_classes(["cat", "dog"], ["cat", "dog", "owl"])


def test_evaluate_classifier_checks_the_logits_shape():
    class Flat(nn.Module):
        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return pixel_values.flatten()

    with pytest.raises(ValueError, match="expected \\(batch, num_classes\\)"):
        evaluate_vision.evaluate_classifier(Flat(), DataLoader(DATASET, batch_size=2), 3, None)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_vision.evaluate_classifier(PixelPicker(), DataLoader([], batch_size=2), 3, None)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def fake_vision_stack(monkeypatch):
    """Stand-ins for the trained-run loader, the split readers and the transforms, with the agreed interfaces."""
    import datasets_builders.image_classification as image_classification
    import hf_tuning.vision

    calls: dict[str, object] = {}

    def load_trained_classifier(model_dir):
        calls["model_dir"] = Path(model_dir)
        return types.SimpleNamespace(
            model=PixelPicker().eval(),
            data_config={"input_size": (1, 2, 2), "mean": (0.0,), "std": (1.0,)},
            class_names=["cat", "dog", "owl"],
        )

    def vtab_split(root, task, split):
        calls["split"] = (str(root), task, split)
        return types.SimpleNamespace(samples=DATASET, classes=["cat", "dog", "owl"], source=f"{root}/{task}")

    def image_folder_split(root, split, *, classes=None):
        calls["split"] = (str(root), split, classes)
        return types.SimpleNamespace(samples=DATASET, classes=list(classes), source=str(root))

    def build_image_transform(data_config, train=False):
        calls["train"] = train
        return lambda x: x

    def dataset(split, transform):
        return [{**row, "pixel_values": transform(row["pixel_values"])} for row in split.samples]

    monkeypatch.setattr(hf_tuning.vision, "load_trained_classifier", load_trained_classifier)
    # the split readers as read_split (shared with the recipe's data arguments) finds them
    monkeypatch.setattr(image_classification, "vtab_split", vtab_split)
    monkeypatch.setattr(image_classification, "image_folder_split", image_folder_split)
    monkeypatch.setattr(image_classification, "fgvc_split", None)
    monkeypatch.setattr(image_classification, "few_shot_split", None)
    monkeypatch.setattr(evaluate_vision, "build_image_transform", build_image_transform)
    monkeypatch.setattr(evaluate_vision, "ImageClassificationDataset", dataset)
    return calls


def test_cli_evaluates_a_run_and_feeds_the_vtab_aggregate(tmp_path, fake_vision_stack, capsys):
    run = tmp_path / "vit-dtd"
    run.mkdir()
    code = evaluate_vision.main(
        ["--model_dir", str(run), "--data_format", "vtab", "--data_dir", str(tmp_path), "--task", "dtd"]
    )
    assert code == 0
    assert fake_vision_stack["split"] == (str(tmp_path), "dtd", "test")  # default split for VTAB
    assert fake_vision_stack["train"] is False
    saved = json.loads((run / "eval_vision.json").read_text())
    assert saved["task"] == "dtd" and saved["vtab_group"] == "natural"
    assert saved["top1"] == pytest.approx(60.0)
    assert saved["config"]["split"] == "test" and saved["config"]["labels_reordered"] is False
    assert "| top-1 accuracy (%) | 60.00 |" in (run / "eval_vision.md").read_text()
    assert (run / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    assert "top-1 60.00%" in capsys.readouterr().out

    other = tmp_path / "eurosat.json"
    other.write_text(json.dumps({"task": "eurosat", "top1": 90.0}))
    report_dir = tmp_path / "vtab"
    assert (
        evaluate_vision.main(
            ["--vtab_results", str(run / "eval_vision.json"), str(other), "--output_dir", str(report_dir)]
        )
        == 0
    )
    aggregate = json.loads((report_dir / "eval_vtab.json").read_text())["vtab"]
    assert aggregate["tasks"] == {"dtd": pytest.approx(60.0), "eurosat": 90.0}
    assert aggregate["mean_of_19_tasks"] == pytest.approx(75.0) and aggregate["complete"] is False
    markdown = (report_dir / "eval_vtab.md").read_text()
    assert "partial" in markdown and "mean of the 3 group means" in markdown


def test_cli_image_folder_uses_the_model_classes(tmp_path, fake_vision_stack):
    run, out = tmp_path / "run", tmp_path / "out"
    assert evaluate_vision.main(["--model_dir", str(run), "--data_dir", str(tmp_path), "--output_dir", str(out)]) == 0
    assert fake_vision_stack["split"] == (str(tmp_path), "val", ["cat", "dog", "owl"])  # val by default
    saved = json.loads((out / "eval_vision.json").read_text())
    assert "task" not in saved and saved["config"]["data_format"] == "imagefolder"
    assert [row["class"] for row in saved["per_class"]] == ["cat", "dog", "owl"]


def test_cli_several_runs_go_to_subfolders(tmp_path, fake_vision_stack):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
    out = tmp_path / "out"
    args = ["--data_format", "vtab", "--data_dir", str(tmp_path), "--task", "dtd", "--output_dir", str(out)]
    assert evaluate_vision.main(["--model_dir", str(runs[0]), "--model_dir", str(runs[1]), *args]) == 0
    assert (out / "a" / "eval_vision.json").is_file() and (out / "b" / "eval_vision.json").is_file()
    assert not (runs[0] / "eval_vision.json").exists()


def test_vtab_results_rejects_duplicates_and_missing_fields(tmp_path):
    first, second, bad = tmp_path / "1.json", tmp_path / "2.json", tmp_path / "3.json"
    first.write_text(json.dumps({"task": "cifar", "top1": 70.0}))
    second.write_text(json.dumps({"config": {"task": "cifar100"}, "top1": 71.0}))
    bad.write_text(json.dumps({"top1": 71.0}))
    with pytest.raises(ValueError, match="'cifar' appears in both"):
        evaluate_vision.load_vtab_results([first, second])
    with pytest.raises(ValueError, match="needs 'task' and 'top1'"):
        evaluate_vision.load_vtab_results([bad])


@pytest.mark.parametrize(
    "argv",
    [
        ["--model_dir", "m", "--data_format", "vtab", "--data_dir", "d"],  # no --task
        ["--model_dir", "m", "--data_dir", "d", "--task", "dtd"],  # imagefolder has no tasks
        ["--model_dir", "m"],  # no --data_dir
        ["--vtab_results", "a.json"],  # no --output_dir
        ["--vtab_results", "a.json", "--model_dir", "m", "--output_dir", "o"],
        ["--model_dir", "x/m", "y/m", "--data_dir", "d", "--output_dir", "o"],  # same folder names
    ],
)
def test_cli_argument_errors(argv):
    with pytest.raises(SystemExit):
        evaluate_vision.parse_args(argv)


def test_cli_default_splits():
    assert evaluate_vision.parse_args(["--model_dir", "m", "--data_dir", "d"]).split == "val"
    args = evaluate_vision.parse_args(["--model_dir", "m", "--data_dir", "d", "--data_format", "fgvc", "--task", "cub"])
    assert args.split == "test" and args.model_dir == ["m"] and args.batch_size == 64 and args.num_workers == 0
    assert evaluate_vision.parse_args(["--model_dir", "a", "b", "--data_dir", "d"]).model_dir == ["a", "b"]


def test_evaluate_run_with_values_matches_the_cli(tmp_path, fake_vision_stack):
    """The CLI is a thin wrapper: settings built in code and evaluate_run give the CLI's report."""
    run = tmp_path / "vit-dtd"
    run.mkdir()
    argv = ["--data_format", "vtab", "--data_dir", str(tmp_path), "--task", "dtd", "--batch_size", "2"]
    assert evaluate_vision.main(["--model_dir", str(run), *argv, "--output_dir", str(tmp_path / "cli")]) == 0
    from_cli = json.loads((tmp_path / "cli" / "eval_vision.json").read_text())

    settings = evaluate_vision.VisionEvalSettings(
        model_dir=[str(run)], data_format="vtab", data_dir=str(tmp_path), task="dtd", batch_size=2
    )
    assert settings == evaluate_vision.parse_args(["--model_dir", str(run), *argv])
    results = evaluate_vision.evaluate_run(run, settings, tmp_path / "code")
    timing = ("eval_seconds", "images_per_second")
    assert {k: v for k, v in results.items() if k not in timing} == {
        k: v for k, v in from_cli.items() if k not in timing
    }
    assert json.loads((tmp_path / "code" / "eval_vision.json").read_text()) == results
    assert evaluate_vision.evaluate_runs(settings)[0]["top1"] == results["top1"]  # reports beside the model
    assert (run / "eval_vision.json").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model_dir": ["m"], "data_dir": "d", "data_format": "vtab"}, "--task is required"),
        ({"model_dir": ["m"], "data_dir": "d", "data_format": "coco"}, "not one of imagefolder"),
        ({"model_dir": ["m"], "data_dir": "d", "shots": 2}, "--shots and --seed are for"),
        ({"model_dir": ["m"], "data_dir": "d", "batch_size": 0}, "--batch_size must be at least 1"),
        ({"data_dir": "d"}, "--model_dir is required"),
        ({"vtab_results": ["a.json"]}, "--output_dir is required"),
    ],
)
def test_settings_validate_in_code_too(options, message):
    with pytest.raises(ValueError, match=message):
        evaluate_vision.VisionEvalSettings(**options)


@pytest.mark.parametrize("wrap", ["mapping", "tuple"])
def test_collect_logits_reads_outputs_as_the_trainer_does(wrap):
    """One ``logits_of`` (the library's) for training and evaluation: mappings and tuples work too."""

    class Wrapped(PixelPicker):
        def forward(self, pixel_values: torch.Tensor):
            logits = super().forward(pixel_values)
            return {"logits": logits} if wrap == "mapping" else (logits, pixel_values)

    logits, labels = evaluate_vision.collect_logits(Wrapped(), DataLoader(DATASET, batch_size=2))
    assert torch.equal(logits, torch.tensor(LOGITS)) and labels.tolist() == LABELS
