"""Data for DiT transfer: where the target images and the knowledge bank are, and the target dataset.

The images go through DiT's pixel pipeline (:mod:`hf_tuning.diffusion.transforms`); the knowledge bank
is read by :class:`hf_tuning.diffusion.KnowledgeBank` and built by :mod:`datasets_builders.knowledge_bank`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets_builders.vision import ImageClassificationDataset, ImageDataError, image_folder_split
from hf_tuning.diffusion.transforms import build_diffusion_transform

__all__ = ["DiffusionDataArguments", "load_target_dataset"]


@dataclass
class DiffusionDataArguments:
    """Target images, the knowledge bank, and how images become model inputs."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Target image folder: data_dir/<train_split>/<class>/<images> (class = sorted folder name)."},
    )
    train_split: str = field(default="train", metadata={"help": "Subfolder of data_dir to train on."})
    image_size: int = field(default=256, metadata={"help": "Side of the square images (DiT-XL/2-256: 256)."})
    image_channels: int = field(default=3, metadata={"help": "3 (RGB, with a VAE) or 1 (grey, pixel-space DiT)."})
    random_flip: bool = field(default=True, metadata={"help": "Random horizontal flip (DiT's only augmentation)."})
    bank_dir: str | None = field(
        default=None,
        metadata={"help": "Knowledge bank folder (samples of the pretrained model). Unset: no retention term."},
    )
    use_cached_latents: bool = field(
        default=True,
        metadata={"help": "Read the bank's latents.safetensors when it has one, instead of encoding its images."},
    )
    cache_images: bool = field(default=False, metadata={"help": "Keep decoded target images in memory (tiny sets)."})

    def __post_init__(self) -> None:
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {self.image_channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")


def load_target_dataset(args: DiffusionDataArguments) -> ImageClassificationDataset:
    """The target images; labels are the sorted class-folder indices (they reuse the first label rows)."""
    if args.data_dir is None:
        raise ImageDataError("data_dir is not set; expected a folder data_dir/<train_split>/<class>/<images>")
    split = image_folder_split(args.data_dir, args.train_split)
    transform = build_diffusion_transform(args.image_size, args.image_channels, args.random_flip)
    return ImageClassificationDataset(split, transform=transform, cache_images=args.cache_images)
