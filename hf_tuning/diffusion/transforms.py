"""DiT's pixel pipeline: ADM's centre crop, a random horizontal flip, values in [-1, 1].

Target images and knowledge-bank images go through the same transform, so the retention and
reconsolidation terms see images prepared alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

__all__ = ["build_diffusion_transform", "center_crop_arr"]


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop: halve with a box filter while the image is at least twice too large, then
    resize bicubically so the short side is ``image_size`` and crop the centre square."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top : top + image_size, left : left + image_size])


def build_diffusion_transform(
    image_size: int, channels: int = 3, random_flip: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> tensor (channels, image_size, image_size) in [-1, 1]."""
    from torchvision.transforms import functional

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    mode = "L" if channels == 1 else "RGB"

    def transform(image: Image.Image) -> torch.Tensor:
        image = center_crop_arr(image.convert(mode), image_size)
        if random_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return functional.to_tensor(image) * 2.0 - 1.0

    return transform
