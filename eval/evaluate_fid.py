"""FID (and optionally k-NN precision/recall) between a folder of real and a folder of generated images.

    python eval/evaluate_fid.py --feature_extractor outputs/digits_fid_extractor \\
        --real data/digits/test --fake outputs/dit-digits/samples --precision_recall --output fid.json

``--feature_extractor`` is anything ``eval.fid.load_feature_extractor`` accepts: a digits classifier folder,
a torchvision Inception-v3 state dict, or a TorchScript file (``--kind`` overrides the detected kind).
Images (png/jpg, recursively) are read in batches, so large folders stay out of memory. The result is
printed as JSON and, with ``--output``, written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from eval.fid import KINDS, compute_fid, iter_image_folder, load_feature_extractor
from hf_tuning.io import atomic_write_json

__all__ = ["evaluate_fid", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feature_extractor", required=True, help="extractor folder or file (see eval/fid.py)")
    parser.add_argument("--kind", choices=KINDS, default=None, help="extractor kind; default: detected from the path")
    parser.add_argument("--real", required=True, help="folder of reference images (searched recursively)")
    parser.add_argument("--fake", required=True, help="folder of generated images (searched recursively)")
    parser.add_argument("--precision_recall", action="store_true", help="also report k-NN precision and recall")
    parser.add_argument("--k", type=int, default=3, help="neighbourhood size for precision/recall")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--output", default=None, help="JSON file to write the result to")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.k < 1:
        parser.error("--k must be at least 1")
    return args


def evaluate_fid(args: argparse.Namespace) -> dict[str, Any]:
    """Load the extractor, stream both folders through it and return the result with its inputs recorded."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    start = time.perf_counter()
    extractor = load_feature_extractor(args.feature_extractor, device=device, kind=args.kind)
    real = iter_image_folder(args.real, extractor.channels, args.batch_size)
    fake = iter_image_folder(args.fake, extractor.channels, args.batch_size)
    result = compute_fid(
        extractor, real, fake, batch_size=args.batch_size, with_precision_recall=args.precision_recall, k=args.k
    )
    return {
        **result,
        "real": str(args.real),
        "fake": str(args.fake),
        "feature_extractor": str(args.feature_extractor),
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate_fid(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.output is not None:
        atomic_write_json(args.output, result)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
