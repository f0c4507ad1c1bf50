"""Image-classification data: folder/VTAB/FGVC/few-shot readers, decoding, transforms, collator, digits export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_builders.digits import DigitsExportError, export_digits, main
from datasets_builders.image_classification import DATA_FORMATS, DEFAULT_SPLITS, VisionDataArguments, read_split
from datasets_builders.vision import (
    VTAB_ALIASES,
    VTAB_GROUPS,
    VTAB_TASKS,
    AugmentationArguments,
    ImageClassificationCollator,
    ImageClassificationDataset,
    ImageDataError,
    ImageSplit,
    build_image_transform,
    few_shot_split,
    fgvc_split,
    image_folder_split,
    resolve_vtab_task,
    vtab_split,
)


def write_image(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# image_folder_split


def make_folder(root: Path) -> None:
    for split, names in {"train": ("b_cat", "a_dog"), "val": ("a_dog",)}.items():
        for name in names:
            write_image(root / split / name / "1.png")
            write_image(root / split / name / "2.JPG")
            (root / split / name / "notes.txt").write_text("not an image")


def test_image_folder_classes_and_labels(tmp_path: Path) -> None:
    make_folder(tmp_path)
    train = image_folder_split(tmp_path, "train")
    assert train.classes == ["a_dog", "b_cat"] and train.num_classes == 2
    assert len(train.samples) == 4  # .txt files are ignored, .JPG is accepted
    assert all(Path(path).is_absolute() for path, _ in train.samples)
    assert {(Path(path).parent.name, label) for path, label in train.samples} == {("a_dog", 0), ("b_cat", 1)}
    assert train.source == f"imagefolder {tmp_path / 'train'}"

    val = image_folder_split(tmp_path, "val", classes=train.classes)
    assert val.classes == train.classes and {label for _, label in val.samples} == {0}


def test_image_folder_errors(tmp_path: Path) -> None:
    make_folder(tmp_path)
    with pytest.raises(ImageDataError, match=r"'test' does not exist.*splits found .*: train, val"):
        image_folder_split(tmp_path, "test")
    (tmp_path / "train" / "c_empty").mkdir()
    with pytest.raises(ImageDataError, match=r"c_empty.*no image files"):
        image_folder_split(tmp_path, "train")
    with pytest.raises(ImageDataError, match=r"a_dog are not among the 1 given classes"):
        image_folder_split(tmp_path, "val", classes=["b_cat"])
    write_image(tmp_path / "flat" / "x.png")
    with pytest.raises(ImageDataError, match=r"no class folders \(1 image"):
        image_folder_split(tmp_path, "flat")
    with pytest.raises(ImageDataError, match="does not exist"):
        image_folder_split(tmp_path / "missing", "train")


# ---------------------------------------------------------------------------------------------------------------
# VTAB-1k


def make_vtab(root: Path, task: str = "cifar", lines: list[str] | None = None) -> Path:
    task_dir = root / task
    for i in range(3):
        write_image(task_dir / "images" / f"{i}.jpg")
    lines = lines if lines is not None else ["images/0.jpg 0", "images/1.jpg 99", "", "images/2.jpg 5"]
    for split in ("train800", "val200", "train800val200", "test"):
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return task_dir


def test_vtab_tables() -> None:
    assert len(VTAB_TASKS) == 19
    assert sorted(t for group in VTAB_GROUPS.values() for t in group) == sorted(VTAB_TASKS)
    assert [len(g) for g in VTAB_GROUPS.values()] == [7, 4, 8]
    assert resolve_vtab_task("CIFAR-100") == "cifar" and resolve_vtab_task("pets") == "oxford_iiit_pet"


def test_one_vtab_resolver_accepts_every_alias_and_spelling() -> None:
    """The data readers and the evaluation's aggregates share this resolver: every name either accepted is here."""
    for task in VTAB_TASKS:
        for spelling in (task, task.upper(), task.replace("_", "-"), task.replace("_", " ").title(), f"  {task} "):
            assert resolve_vtab_task(spelling) == task
    for alias, task in VTAB_ALIASES.items():
        assert task in VTAB_TASKS
        for spelling in (alias, alias.upper(), alias.replace("_", "-"), alias.replace("_", " ")):
            assert resolve_vtab_task(spelling) == task
    # the error names the tasks and the other accepted spellings; it is a ValueError for callers that expect one
    with pytest.raises(ImageDataError, match=r"unknown VTAB-1k task 'imagenet'; expected one of cifar.*pcam") as info:
        resolve_vtab_task("imagenet")
    assert isinstance(info.value, ValueError)


def test_vtab_parsing(tmp_path: Path) -> None:
    task_dir = make_vtab(tmp_path)
    split = vtab_split(tmp_path, "cifar100", "train800val200")
    assert split.num_classes == 100 and split.classes[:2] == ["0", "1"]
    assert split.samples == [
        (str(task_dir / "images" / "0.jpg"), 0),
        (str(task_dir / "images" / "1.jpg"), 99),
        (str(task_dir / "images" / "2.jpg"), 5),
    ]
    assert split.source == "vtab-1k cifar train800val200.txt"


def test_vtab_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageDataError, match=r"unknown VTAB-1k task 'imagenet'.*cifar, caltech101"):
        vtab_split(tmp_path, "imagenet", "test")
    task_dir = make_vtab(tmp_path, lines=["images/0.jpg 100"])
    with pytest.raises(ImageDataError) as info:
        vtab_split(tmp_path, "cifar", "test")
    assert f"{task_dir / 'test.txt'}:1: label 100 is out of range 0..99 for cifar" in str(info.value)

    make_vtab(tmp_path, lines=["images/0.jpg 1", "images/1.jpg", "images/nope.jpg 2"])
    with pytest.raises(ImageDataError) as info:
        vtab_split(tmp_path, "cifar", "val200")
    message = str(info.value)
    assert "2 problem(s)" in message
    assert f"{task_dir / 'val200.txt'}:2: expected '<path> <label>'" in message
    assert f"{task_dir / 'val200.txt'}:3: image {task_dir / 'images' / 'nope.jpg'} does not exist" in message

    (task_dir / "test.txt").unlink()
    with pytest.raises(ImageDataError, match=r"test\.txt: list file missing; expected train800\.txt, val200\.txt"):
        vtab_split(tmp_path, "cifar", "test")


# ---------------------------------------------------------------------------------------------------------------
# FGVC and few-shot


def test_fgvc_remaps_ids_and_rejects_unknown(tmp_path: Path) -> None:
    dataset = tmp_path / "nabirds"
    for name in ("a/1.jpg", "b/2.jpg", "c/3.jpg"):
        write_image(dataset / "images" / name)
    (dataset / "train.json").write_text(json.dumps({"a/1.jpg": 817, "b/2.jpg": 295, "c/3.jpg": 817}))
    (dataset / "val.json").write_text(json.dumps({"b/2.jpg": 295}))
    (dataset / "test.json").write_text(json.dumps({"a/1.jpg": 5}))
    train = fgvc_split(tmp_path, "nabirds", "train")
    assert train.classes == ["295", "817"]
    assert [label for _, label in train.samples] == [1, 0, 1]
    assert fgvc_split(tmp_path, "nabirds", "val").samples == [(str(dataset / "images" / "b/2.jpg"), 0)]
    with pytest.raises(ImageDataError, match=r"test\.json: 'a/1\.jpg': class id 5 does not occur in train\.json"):
        fgvc_split(tmp_path, "nabirds", "test")
    (dataset / "test.json").write_text("[1, 2]")
    with pytest.raises(ImageDataError, match=r"test\.json: top level is a JSON list; expected an object"):
        fgvc_split(tmp_path, "nabirds", "test")
    (dataset / "test.json").write_text(json.dumps({"z/9.jpg": 295}))
    with pytest.raises(ImageDataError, match=r"'z/9\.jpg': image .* does not exist"):
        fgvc_split(tmp_path, "nabirds", "test")
    (dataset / "val.json").unlink()
    with pytest.raises(ImageDataError, match=r"val\.json: annotation file missing"):
        fgvc_split(tmp_path, "nabirds", "val")


def test_few_shot_path_with_space(tmp_path: Path) -> None:
    annotations = tmp_path / "few-shot_split" / "oxford-pets" / "annotations"
    annotations.mkdir(parents=True)
    write_image(tmp_path / "oxford-pets" / "images" / "great pyrenees_1.jpg")
    write_image(tmp_path / "oxford-pets" / "images" / "abyssinian_1.jpg")
    (annotations / "train_meta.list.num_shot_1.seed_0").write_text(
        "images/great pyrenees_1.jpg 2\nimages/abyssinian_1.jpg 0\n"
    )
    split = few_shot_split(tmp_path, "oxford-pets", "train", shots=1, seed=0)
    assert split.samples[0] == (str(tmp_path / "oxford-pets" / "images" / "great pyrenees_1.jpg"), 2)
    assert split.num_classes == 3
    with pytest.raises(ImageDataError, match=r"num_shot_2\.seed_0: list file missing.*num_shot_1\.seed_0"):
        few_shot_split(tmp_path, "oxford-pets", "train", shots=2, seed=0)
    with pytest.raises(ImageDataError, match="needs shots and seed"):
        few_shot_split(tmp_path, "oxford-pets", "train")


def test_read_split_is_the_recipe_reader_for_every_format(tmp_path: Path) -> None:
    """One reader for training and evaluation: DATA_FORMATS and their default splits live beside it."""
    assert set(DEFAULT_SPLITS) == set(DATA_FORMATS)
    assert {fmt: splits[1] for fmt, splits in DEFAULT_SPLITS.items()} == {
        "imagefolder": "val",
        "vtab": "test",
        "fgvc": "test",
        "fewshot": "test",
    }
    make_folder(tmp_path / "folder")
    args = VisionDataArguments(data_dir=str(tmp_path / "folder"))
    assert (args.train_split, args.eval_split) == DEFAULT_SPLITS["imagefolder"]
    # the model's class list fixes the labels, as the recipe's training classes do
    val = read_split("imagefolder", tmp_path / "folder", None, "val", classes=["b_cat", "a_dog"])
    assert val.classes == ["b_cat", "a_dog"] and {label for _, label in val.samples} == {1}
    make_vtab(tmp_path / "vtab")
    assert read_split("vtab", tmp_path / "vtab", "CIFAR-100", "test").source == "vtab-1k cifar test.txt"
    # few-shot: the given classes set the class count, so labels beyond them are caught while reading
    annotations = tmp_path / "fs" / "few-shot_split" / "pets" / "annotations"
    annotations.mkdir(parents=True)
    write_image(tmp_path / "fs" / "pets" / "a.jpg")
    (annotations / "test_meta.list").write_text("a.jpg 1\n")
    assert read_split("fewshot", tmp_path / "fs", "pets", "test").num_classes == 2
    assert read_split("fewshot", tmp_path / "fs", "pets", "test", classes=list("abcd")).num_classes == 4
    with pytest.raises(ImageDataError, match="label 1 is out of range 0..0"):
        read_split("fewshot", tmp_path / "fs", "pets", "test", classes=["a"])
    with pytest.raises(ValueError, match="data_format='coco' is not one of imagefolder, vtab, fgvc, fewshot"):
        read_split("coco", tmp_path, None, "test")


# ---------------------------------------------------------------------------------------------------------------
# Dataset, transforms, collator


def test_dataset_decodes_and_names_corrupt_file(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.png", value=255)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x00garbage, not a png\xff" * 4)
    dataset = ImageClassificationDataset(
        ImageSplit([(str(good), 1), (str(bad), 0)], ["a", "b"], "test"), cache_images=True
    )
    item = dataset[0]
    assert item["labels"] == 1 and item["pixel_values"].shape == (3, 8, 8)
    assert item["pixel_values"].dtype == torch.float32 and torch.allclose(item["pixel_values"], torch.ones(3, 8, 8))
    assert dataset.load_image(0) is dataset.load_image(0)  # cached
    with pytest.raises(ImageDataError, match=rf"{bad}: cannot open image \(sample 1 of test\)"):
        dataset[1]


DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "interpolation": "bilinear",
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "crop_pct": 0.875,
}


def test_transforms_shape_and_normalisation() -> None:
    white = Image.new("RGB", (24, 20), (255, 255, 255))
    eval_out = build_image_transform(DATA_CONFIG, train=False)(white)
    assert eval_out.shape == (3, 16, 16) and torch.allclose(eval_out, torch.ones_like(eval_out))
    aug = AugmentationArguments(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, scale_min=0.5)
    train_out = build_image_transform(DATA_CONFIG, train=True, augmentation=aug)(white)
    assert train_out.shape == (3, 16, 16) and train_out.dtype == torch.float32
    plain = build_image_transform(DATA_CONFIG, train=True, augmentation=AugmentationArguments(train_crop=False))
    black = plain(Image.new("RGB", (5, 40), (0, 0, 0)))
    assert black.shape == (3, 16, 16) and torch.allclose(black, -torch.ones_like(black))
    with pytest.raises(ValueError, match="input_size"):
        build_image_transform({"mean": (0.5,) * 3, "std": (0.5,) * 3}, train=False)


def test_augmentation_arguments_validation() -> None:
    with pytest.raises(ValueError, match="hflip must be a probability"):
        AugmentationArguments(hflip=1.5)
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        AugmentationArguments(mixup_alpha=-1)
    with pytest.raises(ValueError, match="not a timm policy"):
        AugmentationArguments(auto_augment="bogus-policy")
    with pytest.raises(ValueError, match="train_crop=False"):
        AugmentationArguments(train_crop=False, random_erasing=0.25)


def batch_of(size: int, num_classes: int = 5) -> list[dict]:
    return [{"pixel_values": torch.full((3, 4, 4), float(i)), "labels": i % num_classes} for i in range(size)]


def test_collator_int_labels_without_mixup() -> None:
    out = ImageClassificationCollator(5)(batch_of(3))
    assert out["pixel_values"].shape == (3, 3, 4, 4)
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == [0, 1, 2]
    with pytest.raises(ImageDataError, match="out of range 0..4"):
        ImageClassificationCollator(5)([{"pixel_values": torch.zeros(3, 4, 4), "labels": 7}])


@pytest.mark.parametrize("size", [1, 4, 5])
def test_collator_soft_labels_with_mixup(size: int) -> None:
    np.random.seed(0)
    aug = AugmentationArguments(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    out = ImageClassificationCollator(5, aug)(batch_of(size))
    labels = out["labels"]
    assert labels.shape == (size, 5) and labels.dtype == torch.float32
    assert torch.allclose(labels.sum(dim=1), torch.ones(size))
    assert out["pixel_values"].shape == (size, 3, 4, 4)
    if size % 2:  # the odd one out keeps its image and a smoothed one-hot target
        last = (size - 1) % 5
        assert torch.equal(out["pixel_values"][-1], torch.full((3, 4, 4), float(size - 1)))
        assert labels[-1, last].item() == pytest.approx(0.9 + 0.1 / 5)


# ---------------------------------------------------------------------------------------------------------------
# Digits export


def png_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_export_digits_counts_and_stratification(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    sizes = export_digits(out, [9, 5, 6, 7, 8], seed=3)
    manifest = json.loads((out / "digits_export.json").read_text())
    assert manifest["digits"] == [5, 6, 7, 8, 9]
    total = sum(sizes.values())
    assert total == sum(1 for _ in out.rglob("*.png")) and 880 < total < 920  # ~180 images per digit
    assert abs(sizes["test"] - 0.25 * total) <= 5 and abs(sizes["val"] - 0.1 * total) <= 5
    for split in ("train", "val", "test"):
        folder = image_folder_split(out, split)
        assert folder.classes == [f"digit_{d}" for d in range(5, 10)]
        assert {label for _, label in folder.samples} == set(range(5))
        assert len(folder.samples) == sizes[split]
        assert manifest["counts"][split] == {
            f"digit_{d}": n for d, n in zip(range(5, 10), np.bincount([lbl for _, lbl in folder.samples]).tolist())
        }
    with Image.open(next((out / "train" / "digit_5").iterdir())) as image:
        assert image.mode == "L" and image.size == (8, 8)
        assert max(image.getdata()) == 255 and min(image.getdata()) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_export_digits_deterministic_idempotent_and_conflict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = export_digits(tmp_path / "a", [0, 1], seed=1, scale=2)
    second = export_digits(tmp_path / "b", [1, 0], seed=1, scale=2)
    assert first == second and png_bytes(tmp_path / "a") == png_bytes(tmp_path / "b")
    with Image.open(next((tmp_path / "a" / "test" / "digit_0").iterdir())) as image:
        assert image.size == (16, 16)
    export_digits(tmp_path / "c", [0, 1], seed=2, scale=2)
    assert png_bytes(tmp_path / "a") != png_bytes(tmp_path / "c")  # another seed, another split

    marker = tmp_path / "a" / "train" / "marker.txt"
    marker.write_text("kept")
    assert export_digits(tmp_path / "a", [0, 1], seed=1, scale=2) == first
    assert marker.exists()  # not rewritten
    with pytest.raises(DigitsExportError, match=r"seed: 1 there, 2 asked"):
        export_digits(tmp_path / "a", [0, 1], seed=2, scale=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(DigitsExportError, match="not a digits export"):
        export_digits(tmp_path / "other", [0, 1])

    assert main(["--output_dir", str(tmp_path / "cli"), "--digits", "3", "4", "--seed", "0"]) == 0
    assert "train=" in capsys.readouterr().out
    assert main(["--output_dir", str(tmp_path / "cli"), "--digits", "3", "4", "--seed", "1"]) == 2
    assert "other parameters" in capsys.readouterr().err
