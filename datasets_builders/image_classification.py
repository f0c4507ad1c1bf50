"""One set of arguments for every image-classification layout the vision recipe reads.

``data_format`` picks the layout (ImageNet-style folders, VTAB-1k, FGVC JSON, few-shot lists);
:func:`load_image_splits` returns the training and evaluation :class:`ImageSplit` with one class
list, checked before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets_builders.vision import (
    ImageDataError,
    ImageSplit,
    few_shot_split,
    fgvc_split,
    image_folder_split,
    vtab_split,
)

__all__ = ["DATA_FORMATS", "VisionDataArguments", "load_image_splits"]

DATA_FORMATS = ("imagefolder", "vtab", "fgvc", "fewshot")
_DEFAULT_SPLITS = {
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
        default_train, default_eval = _DEFAULT_SPLITS[self.data_format]
        self.train_split = self.train_split or default_train
        self.eval_split = self.eval_split or default_eval


def _split(args: VisionDataArguments, split: str, classes: list[str] | None = None) -> ImageSplit:
    """One split; ``classes`` (the training split's) fixes the class list of an evaluation split."""
    if args.data_format == "imagefolder":
        return image_folder_split(args.data_dir, split, classes=classes)
    if args.data_format == "vtab":
        return vtab_split(args.data_dir, args.task, split)
    if args.data_format == "fgvc":
        return fgvc_split(args.data_dir, args.task, split)
    train = split == "train"
    return few_shot_split(
        args.data_dir,
        args.task,
        split,
        shots=args.shots if train else None,
        seed=args.split_seed if train else None,
        num_classes=len(classes) if classes is not None else None,
    )


def load_image_splits(args: VisionDataArguments) -> tuple[ImageSplit, ImageSplit | None]:
    """The training split and the evaluation split (``None`` when eval_split is 'none')."""
    train = _split(args, args.train_split)
    if not train.samples:
        raise ImageDataError(f"{train.source}: the training split has no images")
    if str(args.eval_split).lower() == "none":
        return train, None
    return train, _split(args, args.eval_split, classes=train.classes)
