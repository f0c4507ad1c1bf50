"""A small CNN trained on scikit-learn's 8x8 digits, whose hidden layer serves as an offline FID feature space.

No Inception weights are available offline, so the small end-to-end diffusion experiment scores its samples in
the features of this classifier instead. It trains in seconds on a CPU::

    python -m eval.digits_classifier --output_dir outputs/digits_fid_extractor

and writes ``feature_extractor.json`` + ``model.safetensors``, which ``eval.fid.load_feature_extractor`` reads.
The split matches ``datasets_builders.digits`` over all ten digits (test 0.2, val 0.1, seed 0), so an export of
all ten digits with those fractions keeps its test images unseen by the extractor. An export of a subset of
the digits is split differently, so its test images may have been training images here.

Training shows every image at export scales 1, 2 and 4, yet the features still depend on the scale (the 8x8
original is upsampled to 16 px, a 32 px export downsampled), so score real and generated images of the same
size: measured FID test-vs-train of digits 5-9 is 3-5 at one scale, ~49 across scales 1 and 4, ~580 against 0-4.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.fid import prepare_images
from hf_tuning.io import atomic_output, atomic_write_json, read_json

__all__ = [
    "CONFIG_NAME",
    "KIND",
    "WEIGHTS_NAME",
    "DigitsClassifier",
    "digits_split",
    "load_digits_classifier",
    "main",
    "prepare_digits",
    "save_digits_classifier",
    "train_digits_classifier",
]

KIND = "digits_cnn"
CONFIG_NAME = "feature_extractor.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
TRAIN_SCALES = (1, 2, 4)  # export scales seen in training, so features barely depend on the PNG size


def prepare_digits(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """The classifier's input: one grey channel in [0, 1] (intensity / 16) at ``image_size`` square.

    Integer tensors are read as 0..255, RGB(A) is averaged to grey, and other sizes are resized bilinearly
    (antialiased when shrinking, so a 4x nearest-upscaled PNG looks like the 8x8 original): the FID
    extractors' convention (:func:`eval.fid.prepare_images`), so both read an image file the same way.
    """
    return prepare_images(images, 1, image_size, name="digits classifier")


class DigitsClassifier(nn.Module):
    """Two conv blocks, a hidden layer (the features) and a 10-way head: enough for >95% on held-out digits."""

    def __init__(
        self, image_size: int = 16, hidden_dim: int = 128, widths: Sequence[int] = (16, 32), num_classes: int = 10
    ) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4 (two 2x poolings), got {image_size}")
        first, second = (int(w) for w in widths)
        self.image_size = int(image_size)
        self.hidden_dim = int(hidden_dim)
        self.widths = (first, second)
        self.num_classes = int(num_classes)
        # Batch norm steadies training: held-out accuracy varies ~1 point less between seeds than without it.
        self.conv = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.BatchNorm2d(first),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.BatchNorm2d(second),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Sequential(nn.Linear(second * (image_size // 4) ** 2, hidden_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(hidden_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden-layer activations (N, hidden_dim): the FID feature space."""
        return self.hidden(self.conv(prepare_digits(x, self.image_size)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split(
    test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """All 1797 digits as (images in [0, 1] quantised like the PNG export, labels, split indices).

    The split is ``datasets_builders.digits``'s own, over all ten digits, so the held-out images are the same.
    """
    from sklearn.datasets import load_digits

    from datasets_builders.digits import split_indices, to_png_array

    bunch = load_digits()
    labels = np.asarray(bunch.target)
    # The PNG export's own rounding (0..16 -> 0..255), so training sees exactly the pixels FID will read.
    images = to_png_array(np.asarray(bunch.images), scale=1) / 255.0
    splits = split_indices(labels, np.arange(len(labels)), test_fraction, val_fraction, seed)
    return images.astype(np.float32), labels, splits


def _inputs(images: np.ndarray, scale: int, image_size: int) -> torch.Tensor:
    """8x8 images as the exporter writes them at ``scale`` (nearest upscaling), prepared for the network."""
    x = torch.from_numpy(images)[:, None]
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return prepare_digits(x, image_size)


def _accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _fit(
    variants: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int,
    image_size: int,
    hidden_dim: int,
    batch_size: int,
    lr: float,
) -> DigitsClassifier:
    """AdamW on cross-entropy with cosine decay; each image is shown at a random export scale per epoch (``variants`` holds
    every scale, shape (scales, N, 1, H, W)), which costs no more steps than one scale. Initialisation,
    dropout, shuffling and scale choice draw from a forked, seeded RNG state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(image_size=image_size, hidden_dim=hidden_dim)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        total = epochs * -(-len(y) // batch_size)
        # Cosine decay to zero: ending at a small rate makes the result depend less on the last few batches.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total))
        )
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            scale = torch.randint(variants.shape[0], (len(y),), generator=generator)
            for batch in torch.randperm(len(y), generator=generator).split(batch_size):
                loss = F.cross_entropy(model(variants[scale[batch], batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model


def train_digits_classifier(
    seed: int = 0,
    epochs: int = 10,
    image_size: int = 16,
    *,
    hidden_dim: int = 128,
    batch_size: int = 64,
    lr: float = 5e-3,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train on the train part of the split (images at export scales 1, 2 and 4); report held-out accuracy.

    The global RNG state and thread count are left as they were, so a caller's run is not perturbed.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    start = time.perf_counter()
    images, labels, splits = digits_split(test_fraction, val_fraction, split_seed)

    def part(name: str, scales: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = splits[name]
        x = torch.cat([_inputs(images[idx], s, image_size) for s in scales])
        return x, torch.from_numpy(labels[idx]).long().repeat(len(scales))

    train_idx = splits["train"]
    variants = torch.stack([_inputs(images[train_idx], s, image_size) for s in TRAIN_SCALES])
    train_y = torch.from_numpy(labels[train_idx]).long()
    threads = torch.get_num_threads()
    # The kernels are tiny: extra threads only add synchronisation (7x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        model = _fit(variants, train_y, seed, epochs, image_size, hidden_dim, batch_size, lr)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    train_seconds = time.perf_counter() - start
    by_scale = {str(s): _accuracy(model, *part("test", (s,))) for s in TRAIN_SCALES}
    metrics = {
        "test_accuracy": by_scale["1"],
        "test_accuracy_by_scale": by_scale,
        "val_accuracy": _accuracy(model, *part("val", (1,))),
        "train_accuracy": _accuracy(model, *part("train", (1,))),
        "num_train": int(len(splits["train"])),
        "num_val": int(len(splits["val"])),
        "num_test": int(len(splits["test"])),
        "split": {
            "digits": list(range(10)),
            "test_fraction": test_fraction,
            "val_fraction": val_fraction,
            "seed": split_seed,
        },
        "seed": seed,
        "epochs": epochs,
        "train_scales": list(TRAIN_SCALES),
        "train_seconds": round(train_seconds, 3),
    }
    return model, metrics


def save_digits_classifier(model: DigitsClassifier, folder: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` then ``feature_extractor.json``, each atomically (the JSON last, so a
    folder with a config always has its weights)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_output(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"kind": KIND})
    config = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "image_size": model.image_size,
        "channels": 1,
        "feature_dim": model.hidden_dim,
        "widths": list(model.widths),
        "num_classes": model.num_classes,
        "input": "grey images in [0, 1] (intensity / 16), bilinearly resized to image_size; RGB averaged to grey",
        "metrics": metrics,
    }
    atomic_write_json(folder / CONFIG_NAME, config)
    return folder


def load_digits_classifier(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The classifier and its config from a folder written by :func:`save_digits_classifier`, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; a digits classifier folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    try:
        config = read_json(config_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path}: cannot read: {exc}") from None
    if not isinstance(config, dict) or config.get("kind") != KIND:
        kind = config.get("kind") if isinstance(config, dict) else None
        raise ValueError(f"{config_path}: kind is {kind!r}, expected {KIND!r}")
    try:
        model = DigitsClassifier(
            image_size=int(config["image_size"]),
            hidden_dim=int(config["feature_dim"]),
            widths=config.get("widths", (16, 32)),
            num_classes=int(config.get("num_classes", 10)),
        )
        model.load_state_dict(load_file(str(weights_path), device="cpu"))
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{folder}: the weights do not match {CONFIG_NAME}: {exc}") from None
    return model.eval().to(device), config


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: train, save, print the held-out accuracy."""
    parser = argparse.ArgumentParser(prog="python -m eval.digits_classifier", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Folder for feature_extractor.json + model.safetensors.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation and shuffling (not of the split).")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    model, metrics = train_digits_classifier(seed=args.seed, epochs=args.epochs)
    folder = save_digits_classifier(model, args.output_dir, metrics)
    by_scale = ", ".join(f"x{s}: {100 * a:.2f}%" for s, a in metrics["test_accuracy_by_scale"].items())
    print(
        f"held-out test accuracy {100 * metrics['test_accuracy']:.2f}% on {metrics['num_test']} images "
        f"({by_scale}); trained in {metrics['train_seconds']:.1f}s"
    )
    print(f"wrote {folder / CONFIG_NAME}\nwrote {folder / WEIGHTS_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
