"""scikit-learn's bundled digits written out as a real ImageNet-style image folder.

The 1797 8x8 digits ship with scikit-learn, so a vision recipe can be exercised end to end (folder reading,
PIL decoding, timm transforms) offline and in seconds::

    python -m datasets_builders.digits --output_dir data/digits --digits 0 1 2 3 4

The result is ``output_dir/{train,val,test}/digit_<d>/<index>.png`` (``index`` = position in
``load_digits()``) plus ``digits_export.json``. The split is stratified and fixed by the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hf_tuning.io import atomic_directory, atomic_write_json

__all__ = ["MANIFEST_NAME", "SPLITS", "DigitsExportError", "export_digits", "main", "split_indices", "to_png_array"]

MANIFEST_NAME = "digits_export.json"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
_PARAMETERS = ("format_version", "digits", "test_fraction", "val_fraction", "seed", "scale")


class DigitsExportError(ValueError):
    """The output folder holds something other than this exact export; overwriting it would lose data."""


def _check_arguments(
    digits: Sequence[int], test_fraction: float, val_fraction: float, seed: int, scale: int
) -> list[int]:
    values = list(digits)
    if not values:
        raise ValueError("digits is empty; expected one or more digits in 0..9")
    if any(isinstance(d, bool) or not isinstance(d, int | np.integer) or not 0 <= d <= 9 for d in values):
        raise ValueError(f"digits must be integers in 0..9, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"digits contain duplicates: {values}")
    if len(values) < 2:
        raise ValueError(f"a classification dataset needs at least two digits, got {values}")
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    if test_fraction + val_fraction >= 1:
        raise ValueError(
            f"test_fraction + val_fraction must be < 1 to leave training images, got {test_fraction + val_fraction}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return sorted(int(d) for d in values)


def split_indices(
    labels: np.ndarray, indices: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Stratified train/val/test; both fractions are of the whole selection."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=labels)
    rest_labels = labels[np.searchsorted(indices, rest)]
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=rest_labels
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def to_png_array(image: np.ndarray, scale: int) -> np.ndarray:
    """0..16 intensities to 0..255, upscaled by pixel repetition (nearest neighbour)."""
    pixels = np.clip(np.rint(image.astype(np.float64) * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else pixels


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _existing_counts(output_dir: Path, parameters: dict[str, Any]) -> dict[str, int] | None:
    """The recorded sizes when ``output_dir`` already holds this export, None when it does not exist."""
    if not output_dir.exists():
        return None
    if not output_dir.is_dir():
        raise DigitsExportError(f"{output_dir}: exists and is not a folder; expected a digits export folder")
    manifest_path = output_dir / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    if manifest is None:
        if not any(output_dir.iterdir()):
            return None
        raise DigitsExportError(
            f"{output_dir}: exists without a readable {MANIFEST_NAME}, so it is not a digits export; "
            "choose another --output_dir or remove the folder"
        )
    recorded = {key: manifest.get(key) for key in _PARAMETERS}
    if recorded != parameters:
        differences = ", ".join(
            f"{key}: {recorded[key]!r} there, {parameters[key]!r} asked"
            for key in _PARAMETERS
            if recorded[key] != parameters[key]
        )
        raise DigitsExportError(
            f"{manifest_path}: an export with other parameters is already there ({differences}); "
            "choose another --output_dir or remove the folder to re-export"
        )
    return {split: int(manifest["sizes"][split]) for split in SPLITS}


def export_digits(
    output_dir: str | os.PathLike,
    digits: Sequence[int],
    *,
    test_fraction: float = 0.25,
    val_fraction: float = 0.1,
    seed: int = 0,
    scale: int = 1,
) -> dict[str, int]:
    """Write the chosen digits as ``output_dir/{train,val,test}/digit_<d>/<index>.png``; return the split sizes.

    The folder is built beside ``output_dir`` and renamed into place, so a reader never sees half an export.
    Re-running with the same parameters returns the recorded sizes without rewriting; other parameters raise
    :class:`DigitsExportError` rather than mix two exports.
    """
    import sklearn
    from sklearn.datasets import load_digits

    chosen = _check_arguments(digits, test_fraction, val_fraction, seed, scale)
    parameters = {
        "format_version": FORMAT_VERSION,
        "digits": chosen,
        "test_fraction": float(test_fraction),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "scale": int(scale),
    }
    target = Path(os.path.abspath(os.fspath(output_dir)))
    existing = _existing_counts(target, parameters)
    if existing is not None:
        return existing

    bunch = load_digits()
    images, targets = np.asarray(bunch.images), np.asarray(bunch.target)
    indices = np.flatnonzero(np.isin(targets, chosen))
    labels = targets[indices]
    try:
        splits = split_indices(labels, indices, test_fraction, val_fraction, int(seed))
    except ValueError as exc:  # too few images of a digit for the requested fractions
        raise ValueError(
            f"cannot split digits {chosen} with test_fraction={test_fraction}, val_fraction={val_fraction}: {exc}"
        ) from None
    counts = {split: {f"digit_{d}": int(np.sum(targets[idx] == d)) for d in chosen} for split, idx in splits.items()}
    empty = [f"{split}/{name}" for split, per_class in counts.items() for name, n in per_class.items() if n == 0]
    if empty:
        raise ValueError(f"the split leaves no images in {', '.join(empty)}; use larger test_fraction/val_fraction")

    try:
        with atomic_directory(target, overwrite=False) as staging:
            for split, idx in splits.items():
                for d in chosen:
                    (staging / split / f"digit_{d}").mkdir(parents=True)
                for i in idx:
                    path = staging / split / f"digit_{int(targets[i])}" / f"{int(i)}.png"
                    Image.fromarray(to_png_array(images[i], int(scale))).save(path, format="PNG")
            sizes = {split: int(len(idx)) for split, idx in splits.items()}
            atomic_write_json(
                staging / MANIFEST_NAME,
                {**parameters, "sizes": sizes, "counts": counts, "sklearn_version": sklearn.__version__},
            )
    except FileExistsError:
        # Another process finished the same export first: accept it if it matches, else report it.
        recorded = _existing_counts(target, parameters)
        if recorded is None:
            raise
        return recorded
    return sizes


def main(argv: list[str] | None = None) -> int:
    """CLI: export, then print the split sizes."""
    parser = argparse.ArgumentParser(prog="python -m datasets_builders.digits", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Folder to create (train/val/test/digit_<d>/*.png).")
    parser.add_argument("--digits", type=int, nargs="+", required=True, help="Digits to keep, e.g. 0 1 2 3 4.")
    parser.add_argument("--test_fraction", type=float, default=0.25, help="Fraction of the images for test.")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="Fraction of the images for val.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the stratified split.")
    parser.add_argument("--scale", type=int, default=1, help="Integer nearest-neighbour upscaling of the 8x8 images.")
    args = parser.parse_args(argv)
    try:
        sizes = export_digits(
            args.output_dir,
            args.digits,
            test_fraction=args.test_fraction,
            val_fraction=args.val_fraction,
            seed=args.seed,
            scale=args.scale,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output_dir}: " + ", ".join(f"{split}={n}" for split, n in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
