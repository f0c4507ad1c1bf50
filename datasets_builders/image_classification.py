"""One set of arguments for every image-classification layout the vision recipe reads.

``data_format`` picks the layout (ImageNet-style folders, VTAB-1k, FGVC JSON, few-shot lists);
:func:`load_image_splits` returns the training and evaluation :class:`ImageSplit` with one class
list, checked before any model is built. :data:`DATA_FORMATS`, :data:`DEFAULT_SPLITS` and
:func:`read_split` are shared with ``eval/evaluate_vision.py``, so training and evaluation read a
split the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets_builders.vision import (
    ImageDataError,
    ImageSplit,
    few_shot_split,
    fgvc_split,
    image_folder_split,
    vtab_split,
)

__all__ = ["DATA_FORMATS", "DEFAULT_SPLITS", "VisionDataArguments", "load_image_splits", "read_split"]

DATA_FORMATS = ("imagefolder", "vtab", "fgvc", "fewshot")
# data_format -> (training split, evaluation split): the splits the papers train and report on
DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    "imagefolder": ("train", "val"),
    "vtab": ("train800val200", "test"),
    "fgvc": ("train", "test"),
    "fewshot": ("train", "test"),
}


@dataclass
class VisionDataArguments:
    """Where the images are and which splits train and evaluate."""

    data_format: str = field(
        default="imagefolder",
        metadata={
            "help": "imagefolder (train/ val/ with a folder per class), vtab (VTAB-1k extracted layout), "
            "fgvc (VPT JSON layout) or fewshot (NOAH split lists).",
            "choices": list(DATA_FORMATS),
        },
    )
    data_dir: str = field(default="data", metadata={"help": "Root folder of the dataset."})
    task: str | None = field(
        default=None, metadata={"help": "VTAB task, FGVC dataset or few-shot dataset name (not for imagefolder)."}
    )
    train_split: str | None = field(
        default=None, metadata={"help": "Training split (default: train; train800val200 for VTAB, as in the papers)."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Evaluation split (default: val for imagefolder, test otherwise); 'none' to skip."},
    )
    shots: int | None = field(default=None, metadata={"help": "Few-shot: shots per class of the training list."})
    split_seed: int | None = field(default=None, metadata={"help": "Few-shot: seed of the training list."})
    cache_images: bool = field(default=False, metadata={"help": "Keep decoded images in memory (small datasets)."})

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format={self.data_format!r} is not one of {', '.join(DATA_FORMATS)}")
        if self.data_format != "imagefolder" and not self.task:
            raise ValueError(f"data_format={self.data_format!r} needs --task (the dataset name inside data_dir)")
        default_train, default_eval = DEFAULT_SPLITS[self.data_format]
        self.train_split = self.train_split or default_train
        self.eval_split = self.eval_split or default_eval


def read_split(
    data_format: str,
    data_dir: str | os.PathLike,
    task: str | None,
    split: str,
    *,
    classes: Sequence[str] | None = None,
    shots: int | None = None,
    seed: int | None = None,
) -> ImageSplit:
    """One split of any layout. ``classes`` (the training split's, or a trained model's) fixes the labels: an
    image folder takes its class order from them (so a class folder missing in this split shifts no label) and a
    few-shot list is checked against that many classes. ``shots`` and ``seed`` name a few-shot training list."""
    if data_format == "imagefolder":
        return image_folder_split(data_dir, split, classes=classes)
    if data_format == "vtab":
        return vtab_split(data_dir, task, split)
    if data_format == "fgvc":
        return fgvc_split(data_dir, task, split)
    if data_format == "fewshot":
        num_classes = len(classes) if classes is not None else None
        return few_shot_split(data_dir, task, split, shots=shots, seed=seed, num_classes=num_classes)
    raise ValueError(f"data_format={data_format!r} is not one of {', '.join(DATA_FORMATS)}")


def _split(args: VisionDataArguments, split: str, classes: list[str] | None = None) -> ImageSplit:
    """One split; ``classes`` (the training split's) fixes the class list of an evaluation split."""
    train = split == "train"
    return read_split(
        args.data_format,
        args.data_dir,
        args.task,
        split,
        classes=classes,
        shots=args.shots if train else None,
        seed=args.split_seed if train else None,
    )


def load_image_splits(args: VisionDataArguments) -> tuple[ImageSplit, ImageSplit | None]:
    """The training split and the evaluation split (``None`` when eval_split is 'none')."""
    train = _split(args, args.train_split)
    if not train.samples:
        raise ImageDataError(f"{train.source}: the training split has no images")
    if str(args.eval_split).lower() == "none":
        return train, None
    return train, _split(args, args.eval_split, classes=train.classes)
