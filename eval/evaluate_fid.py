"""FID (and optionally k-NN precision/recall) between a folder of real and a folder of generated images.

    python eval/evaluate_fid.py --feature_extractor outputs/digits_fid_extractor \\
        --real data/digits/test --fake outputs/dit-digits/samples --precision_recall --output fid.json

``--feature_extractor`` is anything ``eval.fid.load_feature_extractor`` accepts: a digits classifier folder,
a torchvision Inception-v3 state dict, or a TorchScript file (``--kind`` overrides the detected kind).
Images (every extension of ``hf_tuning.io.IMAGE_EXTENSIONS``, recursively) are read in batches, so large
folders stay out of memory. The result is printed as JSON and, with ``--output``, written atomically.

The CLI is a thin wrapper: :class:`FidEvalSettings` holds its options, :func:`evaluate_fid` takes them and
returns the result, and :func:`score_folders` scores two folders with an extractor already loaded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from eval.common import parse_settings, pick_device
from eval.fid import KINDS, FeatureExtractor, compute_fid, iter_image_folder, load_feature_extractor
from hf_tuning.io import atomic_write_json

__all__ = ["FidEvalSettings", "evaluate_fid", "main", "parse_args", "score_folders"]


@dataclass
class FidEvalSettings:
    """Which extractor scores which two folders, and how."""

    feature_extractor: str = field(metadata={"help": "extractor folder or file (see eval/fid.py)"})
    real: str = field(metadata={"help": "folder of reference images (searched recursively)"})
    fake: str = field(metadata={"help": "folder of generated images (searched recursively)"})
    kind: str | None = field(
        default=None, metadata={"help": "extractor kind; default: detected from the path", "choices": KINDS}
    )
    precision_recall: bool = field(default=False, metadata={"help": "also report k-NN precision and recall"})
    k: int = field(default=3, metadata={"help": "neighbourhood size for precision/recall"})
    batch_size: int = field(default=256, metadata={"help": "images per feature-extraction batch"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, ..."})
    output: str | None = field(default=None, metadata={"help": "JSON file to write the result to"})

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"--kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be at least 1")
        if self.k < 1:
            raise ValueError("--k must be at least 1")


def parse_args(argv: Sequence[str] | None = None) -> FidEvalSettings:
    """The command line as :class:`FidEvalSettings`; a bad value exits with a usage error."""
    (settings,) = parse_settings(FidEvalSettings, argv, description=__doc__.split("\n\n")[0])
    return settings


def score_folders(
    extractor: FeatureExtractor,
    real: str | os.PathLike,
    fake: str | os.PathLike,
    *,
    batch_size: int = 256,
    with_precision_recall: bool = False,
    k: int = 3,
) -> dict[str, Any]:
    """FID (and precision/recall) of two image folders streamed through ``extractor`` in batches.

    Both folders are listed before any feature is computed, so a missing or empty one fails at once.
    """
    real_batches = iter_image_folder(real, extractor.channels, batch_size)
    fake_batches = iter_image_folder(fake, extractor.channels, batch_size)
    return compute_fid(
        extractor, real_batches, fake_batches, batch_size=batch_size, with_precision_recall=with_precision_recall, k=k
    )


def evaluate_fid(settings: FidEvalSettings) -> dict[str, Any]:
    """Load the extractor, stream both folders through it and return the result with its inputs recorded."""
    device = pick_device(settings.device)
    start = time.perf_counter()
    extractor = load_feature_extractor(settings.feature_extractor, device=device, kind=settings.kind)
    result = score_folders(
        extractor,
        settings.real,
        settings.fake,
        batch_size=settings.batch_size,
        with_precision_recall=settings.precision_recall,
        k=settings.k,
    )
    return {
        **result,
        "real": str(settings.real),
        "fake": str(settings.fake),
        "feature_extractor": str(settings.feature_extractor),
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        result = evaluate_fid(settings)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if settings.output is not None:
        atomic_write_json(settings.output, result)
        print(f"wrote {settings.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
