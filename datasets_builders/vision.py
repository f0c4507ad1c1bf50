"""Image-classification data for the vision recipes: ImageNet-style folders, VTAB-1k, FGVC and few-shot lists.

Each reader returns an :class:`ImageSplit` (absolute image paths, 0-based labels, class names) after checking
everything that can be checked without decoding an image: list-file syntax, label ranges and that every listed
image exists. Problems are reported as ``<file>:<line>: <problem>`` so they can be fixed in an editor, all at
once rather than one per run. :class:`ImageClassificationDataset` decodes lazily (a corrupt file names its path),
:func:`build_image_transform` wraps timm's transforms, and :class:`ImageClassificationCollator` adds
mixup/cutmix soft labels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hf_tuning.io import IMAGE_EXTENSIONS, ImageDataError, is_image_file, list_image_files, read_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "VTAB_TASKS",
    "VTAB_GROUPS",
    "VTAB_ALIASES",
    "VTAB_SPLITS",
    "FGVC_DATASETS",
    "FGVC_SPLITS",
    "FEW_SHOT_SPLITS",
    "ImageDataError",
    "ImageSplit",
    "image_folder_split",
    "resolve_vtab_task",
    "vtab_split",
    "fgvc_split",
    "few_shot_split",
    "ImageClassificationDataset",
    "AugmentationArguments",
    "build_image_transform",
    "ImageClassificationCollator",
]

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20

VTAB_TASKS: dict[str, int] = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
# Other spellings seen in papers, TFDS and repositories; keys are lower case with '_' for '-' and ' '.
VTAB_ALIASES: dict[str, str] = {
    "cifar_100": "cifar",
    "cifar100": "cifar",
    "caltech": "caltech101",
    "caltech_101": "caltech101",
    "flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "oxford_flowers": "oxford_flowers102",
    "pets": "oxford_iiit_pet",
    "pet": "oxford_iiit_pet",
    "oxford_pet": "oxford_iiit_pet",
    "oxford_pets": "oxford_iiit_pet",
    "sun": "sun397",
    "camelyon": "patch_camelyon",
    "pcam": "patch_camelyon",
    "resisc": "resisc45",
    "retinopathy": "diabetic_retinopathy",
    "clevr_count_all": "clevr_count",
    "clevr_closest_object_distance": "clevr_dist",
    "clevr_distance": "clevr_dist",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
    "kitti_distance": "kitti",
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")

FGVC_DATASETS: dict[str, tuple[str, int]] = {
    "cub": ("images", 200),
    "nabirds": ("images", 555),
    "stanforddog": ("Images", 120),
    "stanfordcar": ("", 196),
    "oxfordflower": ("", 102),
}
FGVC_SPLITS = ("train", "val", "test")
FEW_SHOT_SPLITS = ("train", "val", "test")


@dataclass
class ImageSplit:
    """One split: ``(absolute image path, 0-based label)`` pairs and the class names, index = label."""

    samples: list[tuple[str, int]]
    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------------------------------------------------
# Shared helpers


def _raise_problems(source: str, problems: list[str]) -> None:
    """Report every problem at once, so a broken list file is fixed in one pass instead of one run per line."""
    if not problems:
        return
    if len(problems) == 1:
        raise ImageDataError(problems[0])
    listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise ImageDataError(f"{len(problems)} problem(s) in {source}:\n  {listed}{tail}")


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _require_dir(path: Path, what: str) -> None:
    """Fail with the folder's siblings listed, since a misspelt name is the usual cause."""
    if not path.exists():
        parent = path.parent
        siblings = _subfolders(parent) if parent.is_dir() else []
        found = f" (folders in {parent}: {', '.join(siblings) or 'none'})" if parent.is_dir() else ""
        raise ImageDataError(f"{path}: {what} does not exist{found}")
    if not path.is_dir():
        raise ImageDataError(f"{path}: {what} is not a folder")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ImageDataError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a list file"
        ) from None


def _parse_label(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------
# ImageNet-style folders


def _subfolders(path: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def image_folder_split(root: str | os.PathLike, split: str, *, classes: Sequence[str] | None = None) -> ImageSplit:
    """Read ``root/<split>/<class_name>/<images>``; labels follow the sorted class folder names.

    Pass the train split's ``classes`` when reading val/test, so labels agree even when a class folder is
    missing there; a class folder absent from ``classes`` is an error rather than a silently shifted label.
    """
    base = _absolute(root)
    _require_dir(base, "image folder root")
    split_dir = base / split
    if not split_dir.is_dir():
        existing = _subfolders(base)
        listed = ", ".join(existing) if existing else "none"
        raise ImageDataError(
            f"{split_dir}: split folder {split!r} does not exist; expected root/<split>/<class>/<images>, "
            f"splits found in {base}: {listed}"
        )
    folders = _subfolders(split_dir)
    if not folders:
        loose = [name for name in os.listdir(split_dir) if is_image_file(name)]
        hint = f" ({len(loose)} image(s) lie directly in it; move them into class folders)" if loose else ""
        raise ImageDataError(f"{split_dir}: no class folders{hint}; expected {split_dir}/<class_name>/<images>")
    if classes is None:
        class_list = folders
    else:
        class_list = list(classes)
        if len(set(class_list)) != len(class_list):
            raise ImageDataError(f"classes for {split_dir} contain duplicates; expected unique class names")
        unknown = [name for name in folders if name not in set(class_list)]
        if unknown:
            raise ImageDataError(
                f"{split_dir}: class folder(s) {', '.join(unknown)} are not among the {len(class_list)} given classes "
                "(those of the train split); expected the same class folder names as in train"
            )
    index = {name: label for label, name in enumerate(class_list)}
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for name in folders:
        images = list_image_files(split_dir / name)
        if not images:
            empty.append(f"{split_dir / name}: class folder {name!r} has no image files ({' '.join(IMAGE_EXTENSIONS)})")
        samples.extend((path, index[name]) for path in images)
    _raise_problems(str(split_dir), empty)
    return ImageSplit(samples=samples, classes=class_list, source=f"imagefolder {split_dir}")


# --------------------------------------------------------------------------------------------------------------
# List files (VTAB-1k, few-shot)


def _read_list(
    list_file: Path,
    image_root: Path,
    *,
    last_space: bool,
    num_classes: int | None,
    owner: str,
) -> list[tuple[str, int]]:
    """Parse ``<path> <label>`` lines, checking syntax, label range and that each image exists."""
    samples: list[tuple[str, int]] = []
    problems: list[str] = []
    for number, raw in enumerate(_read_lines(list_file), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{list_file}:{number}"
        parts = line.rsplit(" ", 1) if last_space else line.split()
        label = _parse_label(parts[1]) if len(parts) == 2 and parts[0].strip() else None
        if label is None:
            expected = "'<path> <label>' (the label after the last space)" if last_space else "'<path> <label>'"
            problems.append(f"{where}: expected {expected} with an integer label, got {line!r}")
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else "0.."
            problems.append(f"{where}: label {label} is out of range {bound} for {owner}")
            continue
        path = image_root / parts[0].strip()
        if not path.is_file():
            problems.append(f"{where}: image {path} does not exist")
            continue
        samples.append((str(path), label))
    _raise_problems(str(list_file), problems)
    if not samples:
        raise ImageDataError(f"{list_file}: no samples; expected one '<path> <label>' line per image")
    return samples


def resolve_vtab_task(task: str) -> str:
    """The canonical VTAB-1k name (the task's folder, its row in :data:`VTAB_GROUPS`) for ``task`` or one of its
    :data:`VTAB_ALIASES`, forgiving case, dashes and spaces: the one resolver of the data readers and of the
    evaluation's aggregates, so a name that reads a task also scores under it."""
    key = str(task).strip().lower().replace("-", "_").replace(" ", "_")
    name = VTAB_ALIASES.get(key, key)
    if name not in VTAB_TASKS:
        raise ImageDataError(
            f"unknown VTAB-1k task {task!r}; expected one of {', '.join(VTAB_TASKS)} "
            f"(other accepted spellings: {', '.join(VTAB_ALIASES)})"
        )
    return name


def vtab_split(root: str | os.PathLike, task: str, split: str) -> ImageSplit:
    """Read an extracted VTAB-1k task: ``root/<task>/<split>.txt`` lines ``<relative path> <label>``."""
    name = resolve_vtab_task(task)
    if split not in VTAB_SPLITS:
        raise ImageDataError(f"unknown VTAB-1k split {split!r} for {name}; expected one of {', '.join(VTAB_SPLITS)}")
    task_dir = _absolute(root) / name
    _require_dir(task_dir, f"VTAB-1k task folder for {name!r}")
    list_file = task_dir / f"{split}.txt"
    if not list_file.is_file():
        present = [f"{s}.txt" for s in VTAB_SPLITS if (task_dir / f"{s}.txt").is_file()]
        raise ImageDataError(
            f"{list_file}: list file missing; expected {', '.join(f'{s}.txt' for s in VTAB_SPLITS)} in {task_dir} "
            f"(found: {', '.join(present) or 'none'})"
        )
    count = VTAB_TASKS[name]
    samples = _read_list(list_file, task_dir, last_space=False, num_classes=count, owner=name)
    return ImageSplit(samples=samples, classes=[str(i) for i in range(count)], source=f"vtab-1k {name} {split}.txt")


def few_shot_split(
    root: str | os.PathLike,
    dataset: str,
    split: str,
    shots: int | None = None,
    seed: int | None = None,
    *,
    num_classes: int | None = None,
) -> ImageSplit:
    """Read the NOAH/DTL few-shot lists: ``root/few-shot_split/<dataset>/annotations/`` with images in
    ``root/<dataset>/``. ``train`` needs ``shots`` and ``seed``. Without ``num_classes`` the class count is
    the largest label + 1 (the few-shot splits cover every class)."""
    if split not in FEW_SHOT_SPLITS:
        raise ImageDataError(f"unknown few-shot split {split!r}; expected one of {', '.join(FEW_SHOT_SPLITS)}")
    base = _absolute(root)
    annotations = base / "few-shot_split" / dataset / "annotations"
    _require_dir(annotations.parent, f"few-shot split folder for {dataset!r}")
    _require_dir(annotations, f"few-shot annotation folder for {dataset!r}")
    if split == "train":
        if shots is None or seed is None:
            raise ImageDataError(f"few-shot split 'train' of {dataset!r} needs shots and seed (num_shot_<K>.seed_<S>)")
        list_name = f"train_meta.list.num_shot_{shots}.seed_{seed}"
    else:
        list_name = f"{split}_meta.list"
    list_file = annotations / list_name
    if not list_file.is_file():
        available = sorted(p.name for p in annotations.glob("train_meta.list.num_shot_*"))
        raise ImageDataError(
            f"{list_file}: list file missing; expected {list_name} in {annotations}; train lists present: "
            f"{', '.join(available) or 'none'}; val_meta.list {'present' if (annotations / 'val_meta.list').is_file() else 'missing'}, "
            f"test_meta.list {'present' if (annotations / 'test_meta.list').is_file() else 'missing'}"
        )
    image_root = base / dataset
    _require_dir(image_root, f"image folder for few-shot dataset {dataset!r}")
    samples = _read_list(list_file, image_root, last_space=True, num_classes=num_classes, owner=dataset)
    count = num_classes if num_classes is not None else max(label for _, label in samples) + 1
    return ImageSplit(samples=samples, classes=[str(i) for i in range(count)], source=f"few-shot {dataset} {list_name}")


# --------------------------------------------------------------------------------------------------------------
# FGVC (VPT JSON layout)


def _read_fgvc_json(path: Path) -> dict[str, int]:
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise ImageDataError(
            f"{path}: annotation file missing; expected {', '.join(f'{s}.json' for s in FGVC_SPLITS)} in {path.parent} "
            f"(found: {', '.join(siblings) or 'none'})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ImageDataError(f"{path}:{exc.lineno}: unparseable JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ImageDataError(
            f"{path}: top level is a JSON {type(data).__name__}; expected an object {{relative_image_path: class_id}}"
        )
    problems = [
        f"{path}: {key!r}: class id {value!r} is not an integer; expected {{relative_image_path: class_id}}"
        for key, value in data.items()
        if isinstance(value, bool) or not isinstance(value, int)
    ]
    _raise_problems(str(path), problems)
    return data


def fgvc_split(root: str | os.PathLike, name: str, split: str) -> ImageSplit:
    """Read a VPT FGVC dataset: ``root/<name>/<split>.json`` maps image paths to class ids.

    The ids (sparse for NABirds) are remapped to ``0..C-1`` by sorting those in ``train.json``, so every split
    uses the train mapping; class names are the original ids.
    """
    key = name.strip().lower()
    if key not in FGVC_DATASETS:
        raise ImageDataError(f"unknown FGVC dataset {name!r}; expected one of {', '.join(FGVC_DATASETS)}")
    if split not in FGVC_SPLITS:
        raise ImageDataError(f"unknown FGVC split {split!r}; expected one of {', '.join(FGVC_SPLITS)}")
    dataset_dir = _absolute(root) / key
    _require_dir(dataset_dir, f"FGVC dataset folder for {key!r}")
    subfolder, expected_count = FGVC_DATASETS[key]
    train_ids = sorted(set(_read_fgvc_json(dataset_dir / "train.json").values()))
    if len(train_ids) != expected_count:
        logger.warning(
            "%s: %d class ids in train.json, %s has %d classes; using the %d found",
            dataset_dir / "train.json",
            len(train_ids),
            key,
            expected_count,
            len(train_ids),
        )
    mapping = {class_id: label for label, class_id in enumerate(train_ids)}
    split_file = dataset_dir / f"{split}.json"
    entries = _read_fgvc_json(split_file)
    image_root = dataset_dir / subfolder if subfolder else dataset_dir
    samples: list[tuple[str, int]] = []
    problems: list[str] = []
    for relative, class_id in entries.items():
        if class_id not in mapping:
            problems.append(f"{split_file}: {relative!r}: class id {class_id} does not occur in train.json")
            continue
        path = image_root / relative
        if not path.is_file():
            problems.append(f"{split_file}: {relative!r}: image {path} does not exist")
            continue
        samples.append((str(path), mapping[class_id]))
    _raise_problems(str(split_file), problems)
    if not samples:
        raise ImageDataError(f"{split_file}: no samples; expected {{relative_image_path: class_id}} entries")
    return ImageSplit(samples=samples, classes=[str(i) for i in train_ids], source=f"fgvc {key} {split}.json")


# --------------------------------------------------------------------------------------------------------------
# Dataset


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Decodes images on access, so a split of any size costs only its path list until it is read.

    ``cache_images`` keeps the decoded RGB images (for tiny datasets such as digits); with DataLoader
    workers each worker holds its own cache.
    """

    def __init__(
        self, split: ImageSplit, transform: Callable[[Image.Image], Any] | None = None, cache_images: bool = False
    ) -> None:
        self.split = split
        self.transform = transform
        self.cache_images = cache_images
        self._cache: dict[int, Image.Image] = {}

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    def __len__(self) -> int:
        return len(self.split.samples)

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``; a file PIL cannot decode raises :class:`ImageDataError`."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        path, _ = self.split.samples[index]
        image = read_image(path, context=f"sample {index} of {self.split.source}")
        if self.cache_images:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.load_image(index)
        if self.transform is not None:
            pixels = self.transform(image)
        else:
            from torchvision.transforms.functional import to_tensor

            pixels = to_tensor(image)
        return {"pixel_values": pixels, "labels": self.split.samples[index][1]}


# --------------------------------------------------------------------------------------------------------------
# Augmentation and transforms


def _check_probability(name: str, value: float, *, below_one: bool = False) -> None:
    interval = "[0, 1)" if below_one else "[0, 1]"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a probability in {interval}, got {value!r}")
    if not (0 <= value < 1 if below_one else 0 <= value <= 1):
        raise ValueError(f"{name} must be a probability in {interval}, got {value!r}")


def _check_auto_augment(policy: str) -> None:
    """Build the policy once so a typo fails when arguments are parsed, not in the first training step."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if policy.startswith("rand"):
            rand_augment_transform(policy, dict(hparams))
        elif policy.startswith("augmix"):
            augment_and_mix_transform(policy, dict(hparams, translate_pct=0.3))
        else:
            auto_augment_transform(policy, dict(hparams))
    except Exception as exc:  # timm signals bad policies with asserts, KeyErrors and ValueErrors alike
        raise ValueError(
            f"auto_augment {policy!r} is not a timm policy ({type(exc).__name__}: {exc}); expected e.g. "
            "'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original' or 'v0'"
        ) from None


@dataclass
class AugmentationArguments:
    """Training-time augmentation, with the names timm's training script uses (HfArgumentParser fields)."""

    auto_augment: str | None = field(
        default=None,
        metadata={"help": "timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment as in Swin/ConvNeXt)."},
    )
    random_erasing: float = field(
        default=0.0, metadata={"help": "Random erasing probability (timm re_prob; per-pixel noise, one region)."}
    )
    color_jitter: float | None = field(
        default=None, metadata={"help": "Colour jitter strength; timm ignores it when auto_augment is set."}
    )
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    scale_min: float = field(default=0.08, metadata={"help": "Lower bound of RandomResizedCrop's area scale."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup beta-distribution alpha; 0 disables mixup."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix beta-distribution alpha; 0 disables cutmix."})
    mixup_prob: float = field(
        default=1.0, metadata={"help": "Probability of applying mixup or cutmix to a batch (when enabled)."}
    )
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of cutmix instead of mixup when both are enabled."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Label smoothing inside mixup/cutmix soft targets; without mixup the loss must apply it."},
    )
    train_crop: bool = field(
        default=True,
        metadata={
            "help": "True: random resized crop + flip + the augmentations above. False: plain resize to the input "
            "size and normalise (VTAB/DTL-style 'no augmentation'); mixup/cutmix still apply."
        },
    )

    def random_transforms(self) -> list[str]:
        """The augmentations that change an image from one epoch to the next (none: every epoch sees the
        same pixels, so features of a frozen prefix can be cached)."""
        found = []
        if self.train_crop:
            found.append("train_crop (random resized crop, flip, auto_augment, colour jitter, random erasing)")
        found += [
            f"{name}={getattr(self, name)}" for name in ("mixup_alpha", "cutmix_alpha") if getattr(self, name) > 0
        ]
        return found

    def __post_init__(self) -> None:
        for name in ("random_erasing", "hflip", "mixup_prob", "mixup_switch_prob"):
            _check_probability(name, getattr(self, name))
        _check_probability("label_smoothing", self.label_smoothing, below_one=True)
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be >= 0 (0 disables it), got {value!r}")
        if (
            isinstance(self.scale_min, bool)
            or not isinstance(self.scale_min, int | float)
            or not 0 < self.scale_min <= 1
        ):
            raise ValueError(f"scale_min must be in (0, 1], got {self.scale_min!r}")
        if self.color_jitter is not None and (
            isinstance(self.color_jitter, bool)
            or not isinstance(self.color_jitter, int | float)
            or not self.color_jitter >= 0
        ):
            raise ValueError(f"color_jitter must be >= 0 or None, got {self.color_jitter!r}")
        if self.auto_augment is not None and not str(self.auto_augment).strip():
            self.auto_augment = None
        if not self.train_crop:
            conflicting = [
                name
                for name, value in (
                    ("auto_augment", self.auto_augment),
                    ("random_erasing", self.random_erasing or None),
                    ("color_jitter", self.color_jitter),
                )
                if value is not None
            ]
            if conflicting:
                raise ValueError(
                    f"train_crop=False means plain resize without per-image augmentation, but {', '.join(conflicting)} "
                    "is set; unset it or use train_crop=True"
                )
        if self.auto_augment is not None:
            _check_auto_augment(self.auto_augment)

    @property
    def mixup_enabled(self) -> bool:
        """Whether batches get mixup/cutmix soft labels instead of integer labels."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _data_config_fields(data_config: dict[str, Any]) -> tuple[tuple[int, int, int], str, tuple, tuple]:
    missing = [key for key in ("input_size", "mean", "std") if key not in data_config]
    if missing:
        raise ValueError(
            f"data_config lacks {', '.join(missing)}; expected timm's keys input_size (C, H, W), interpolation, "
            "mean, std, crop_pct (see timm.data.resolve_data_config)"
        )
    input_size = tuple(data_config["input_size"])
    if len(input_size) != 3 or input_size[0] != 3 or any(int(v) != v or v < 1 for v in input_size):
        raise ValueError(f"data_config input_size must be (3, H, W) (images are loaded as RGB), got {input_size}")
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"data_config mean and std must have 3 entries (std > 0), got mean={mean} std={std}")
    return input_size, str(data_config.get("interpolation") or "bicubic"), mean, std  # type: ignore[return-value]


def build_image_transform(
    data_config: dict[str, Any], *, train: bool, augmentation: AugmentationArguments | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's train or eval transform for a model's ``data_config`` (``timm.data.resolve_data_config``).

    ``train``: random resized crop with scale ``(scale_min, 1)``, flip, auto-augment, colour jitter and random
    erasing; with ``train_crop=False`` a plain resize to the input size and normalisation. Eval: resize by
    ``crop_pct``, centre crop, normalise.
    """
    from timm.data import create_transform

    input_size, interpolation, mean, std = _data_config_fields(data_config)
    if not train:
        return create_transform(
            input_size,
            is_training=False,
            interpolation=interpolation,
            mean=mean,
            std=std,
            crop_pct=data_config.get("crop_pct"),
            crop_mode=data_config.get("crop_mode"),
        )
    aug = augmentation if augmentation is not None else AugmentationArguments()
    if not aug.train_crop:
        # timm's no-aug train transform: Resize((H, W)) then a no-op CenterCrop((H, W)), i.e. a plain resize.
        return create_transform(
            input_size, is_training=True, no_aug=True, interpolation=interpolation, mean=mean, std=std
        )
    if aug.auto_augment and aug.color_jitter is not None and "3a" not in aug.auto_augment:
        logger.warning("color_jitter=%s is ignored by timm because auto_augment is set", aug.color_jitter)
    return create_transform(
        input_size,
        is_training=True,
        scale=(aug.scale_min, 1.0),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        interpolation=interpolation,
        mean=mean,
        std=std,
        re_prob=aug.random_erasing,
        re_mode="pixel",
        re_count=1,
    )


# --------------------------------------------------------------------------------------------------------------
# Collator


class ImageClassificationCollator:
    """Stacks samples into ``pixel_values``/``labels``; with mixup or cutmix on, labels become soft targets.

    timm's ``Mixup`` pairs each sample with its mirror in the batch and so needs an even batch. For an odd
    batch the first ``B - 1`` samples are mixed and the last one keeps its image with a (smoothed) one-hot
    target, so the soft labels still have shape ``(B, num_classes)``. Randomness comes from numpy's global
    RNG (timm's choice), which ``transformers.set_seed`` seeds.
    """

    def __init__(self, num_classes: int, augmentation: AugmentationArguments | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.augmentation = augmentation
        self.mixup = None
        if augmentation is not None and augmentation.mixup_enabled:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=augmentation.mixup_alpha,
                cutmix_alpha=augmentation.cutmix_alpha,
                prob=augmentation.mixup_prob,
                switch_prob=augmentation.mixup_switch_prob,
                mode="batch",
                label_smoothing=augmentation.label_smoothing,
                num_classes=num_classes,
            )

    def _labels(self, batch: Iterable[dict[str, Any]]) -> torch.Tensor:
        labels = torch.tensor([int(item["labels"]) for item in batch], dtype=torch.int64)
        bad = [int(v) for v in labels if not 0 <= v < self.num_classes]
        if bad:
            raise ImageDataError(f"labels {sorted(set(bad))} are out of range 0..{self.num_classes - 1} for this batch")
        return labels

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        pixel_values = torch.stack([torch.as_tensor(item["pixel_values"]) for item in batch])
        labels = self._labels(batch)
        if self.mixup is None:
            return {"pixel_values": pixel_values, "labels": labels}
        from timm.data.mixup import mixup_target

        even = len(batch) - len(batch) % 2
        soft_parts: list[torch.Tensor] = []
        if even:
            mixed, soft = self.mixup(pixel_values[:even].clone(), labels[:even])
            pixel_values = torch.cat([mixed, pixel_values[even:]])
            soft_parts.append(soft)
        if even < len(batch):
            soft_parts.append(
                mixup_target(labels[even:], self.num_classes, lam=1.0, smoothing=self.mixup.label_smoothing)
            )
        return {"pixel_values": pixel_values, "labels": torch.cat(soft_parts).float()}
