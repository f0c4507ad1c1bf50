"""Tiny DiTs, VAEs and image folders for the diffusion tests (no weights, no Hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_dit(
    in_channels: int = 1,
    classes: int = 5,
    layers: int = 4,
    sample_size: int = 8,
    learn_sigma: bool = True,
    out_channels: int | None = None,
    head_dim: int = 8,
    seed: int = 0,
):
    """A DiT of a few thousand parameters; ``out_channels`` overrides the learned-sigma default."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or (2 * in_channels if learn_sigma else in_channels),
        num_layers=layers,
        num_attention_heads=2,
        attention_head_dim=head_dim,
        patch_size=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=classes,
    )


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def image_folder(
    root: Path, classes: int = 3, per_class: int = 6, size: int = 8, mode: str = "L", seed: int = 0
) -> Path:
    """``root/train/class_<k>/<i>.png`` of random images."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for k in range(classes):
        folder = root / "train" / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode).save(folder / f"{i}.png")
    return root


def bank_folder(root: Path, count: int = 10, size: int = 8, mode: str = "L", seed: int = 1) -> Path:
    """A plain folder of images used as a knowledge bank."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    channels = 1 if mode == "L" else 3
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode).save(root / f"{i:03d}.png")
    return root
