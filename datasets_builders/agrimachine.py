"""AgriMachine28K-style instruction data for the AgriMaTech recipe.

Builds ``train``/``validation``/``test`` chat data from the bundled sample, a local file or a Hub dataset
with :func:`datasets_builders.instruction_formats.build_instruction_dataset`, or from a weighted mixture of
several of them (``dataset_mixture``, :mod:`datasets_builders.mixture`), saves it atomically and can push it
to the Hub::

    python -m datasets_builders.agrimachine --dataset_name_or_path agrimachine_sample --output_dir data/agri
    python -m datasets_builders.agrimachine --output_dir data/mix --dataset_mixture \
        '[{"path": "agrimachine_sample", "weight": 1}, {"path": "agrimachine_extra_sample", "weight": 2}]'
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from datasets_builders.instruction_formats import (
    BAD_ROW_POLICIES,
    FORMAT_CHOICES,
    BuildReport,
    build_instruction_dataset,
    looks_like_hub_id,
)
from datasets_builders.mixture import MixtureReport, MixtureSource, build_mixture, parse_mixture
from hf_tuning.io import atomic_directory, atomic_write_json

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "SAMPLE_NAME",
    "SAMPLE_PATH",
    "BUNDLED_SAMPLES",
    "resolve_bundled",
    "AgriMachineDataArguments",
    "build_agrimachine_dataset",
    "save_dataset",
    "push_dataset",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are an agricultural mechanization assistant. Give accurate, practical answers about choosing, "
    "operating, maintaining and repairing farm machinery, and point out safety precautions where they matter."
)
SAMPLE_NAME = "agrimachine_sample"
SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "agrimachine_sample.jsonl"
# Names that stand for the data files shipped with the package (alpaca rows, and ShareGPT conversations).
BUNDLED_SAMPLES = {
    SAMPLE_NAME: SAMPLE_PATH,
    "agrimachine_extra_sample": SAMPLE_PATH.with_name("agrimachine_extra_sample.jsonl"),
}
# Single-source options a mixture replaces, with their defaults: setting one beside a mixture is refused.
_SINGLE_SOURCE_DEFAULTS = {
    "dataset_name_or_path": SAMPLE_NAME,
    "dataset_config": None,
    "dataset_split": "train",
    "dataset_format": "auto",
}


def resolve_bundled(name_or_path: str | os.PathLike) -> str:
    """The shipped file for a bundled sample name, otherwise the value as given."""
    name = os.fspath(name_or_path)
    return str(BUNDLED_SAMPLES[name]) if name in BUNDLED_SAMPLES else name


@dataclass
class AgriMachineDataArguments:
    """Where the instruction data comes from and how it is cleaned and split (HfArgumentParser fields)."""

    dataset_name_or_path: str = field(
        default=SAMPLE_NAME,
        metadata={
            "help": f"A local .json/.jsonl/.csv/.parquet file, a Hub dataset id, or a bundled sample "
            f"({', '.join(BUNDLED_SAMPLES)})."
        },
    )
    # YAML (TrlParser) gives a list of mappings; the command line gives JSON text, which is all that
    # HfArgumentParser can type (it reads this annotation as ``str``). __post_init__ stores the checked list.
    dataset_mixture: list[dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Several sources instead of dataset_name_or_path: a list (YAML) or JSON list (command line) of "
            "{path, weight | count, format, config, split, system_prompt, label}; see docs/data.md."
        },
    )
    mixture_seed: int = field(
        default=42, metadata={"help": "Seed of the mixture's sampling and shuffling (not of the validation hash)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from a Hub dataset."})
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Row format: alpaca, sharegpt or messages; auto detects it from the first row's columns.",
            "choices": list(FORMAT_CHOICES),
        },
    )
    on_bad_rows: str = field(
        default="error",
        metadata={
            "help": "error: stop and list the bad rows (file:line: field: problem); skip: drop and report them.",
            "choices": list(BAD_ROW_POLICIES),
        },
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "System message for rows without one of their own; an empty string adds none."},
    )
    validation_size: float = field(
        default=0.05,
        metadata={
            "help": "Validation split: a fraction in [0, 1) of the non-test rows, or a whole number >= 1 of "
            "rows; chosen by a stable hash of each conversation. 0 for no validation split."
        },
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the validation hash."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows (quick runs and debugging)."}
    )
    push_dataset_to_hub: str | None = field(
        default=None, metadata={"help": "Hub repo id (owner/name) to push the built DatasetDict to."}
    )

    def __post_init__(self) -> None:
        self.system_prompt = self.system_prompt or ""
        self._check_source()
        self._check_choices()
        self._check_numbers()
        self._check_mixture()
        if self.push_dataset_to_hub is not None and not looks_like_hub_id(self.push_dataset_to_hub):
            raise ValueError(
                f"push_dataset_to_hub must be a Hub repo id like 'owner/name', got {self.push_dataset_to_hub!r}"
            )

    def _check_source(self) -> None:
        if not isinstance(self.dataset_name_or_path, str | os.PathLike) or not str(self.dataset_name_or_path).strip():
            raise ValueError("dataset_name_or_path must be a file path, a Hub dataset id or 'agrimachine_sample'")
        if not isinstance(self.dataset_split, str) or not self.dataset_split.strip():
            raise ValueError(f"dataset_split must be a non-empty split name, got {self.dataset_split!r}")

    def _check_choices(self) -> None:
        if self.dataset_format not in FORMAT_CHOICES:
            raise ValueError(f"dataset_format must be one of {', '.join(FORMAT_CHOICES)}, got {self.dataset_format!r}")
        if self.on_bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_rows must be one of {', '.join(BAD_ROW_POLICIES)}, got {self.on_bad_rows!r}")

    def _check_numbers(self) -> None:
        self.validation_split_size()  # raises on a bad value
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"split_seed must be an integer, got {self.split_seed!r}")
        if self.max_train_samples is not None and (
            isinstance(self.max_train_samples, bool)
            or not isinstance(self.max_train_samples, int)
            or self.max_train_samples < 1
        ):
            raise ValueError(f"max_train_samples must be a positive integer or None, got {self.max_train_samples!r}")

    def _check_mixture(self) -> None:
        if isinstance(self.mixture_seed, bool) or not isinstance(self.mixture_seed, int):
            raise ValueError(f"mixture_seed must be an integer, got {self.mixture_seed!r}")
        if self.dataset_mixture is None:
            return
        conflicts = [
            f"{name}={getattr(self, name)!r}"
            for name, default in _SINGLE_SOURCE_DEFAULTS.items()
            if getattr(self, name) != default
        ]
        if conflicts:
            raise ValueError(
                f"dataset_mixture replaces the single-source option(s) {', '.join(conflicts)}: remove them, or "
                "give each source its own path/config/split/format inside dataset_mixture"
            )
        self.dataset_mixture = [source.to_dict() for source in parse_mixture(self.dataset_mixture)]

    def mixture_sources(self) -> tuple[MixtureSource, ...]:
        """The checked mixture sources; empty for a single source."""
        return parse_mixture(self.dataset_mixture) if self.dataset_mixture is not None else ()

    def hub_dataset_ids(self) -> list[str]:
        """The Hub dataset ids read (for a model card's ``datasets``): sources that are not local paths."""
        paths = [source.path for source in self.mixture_sources()] or [os.fspath(self.dataset_name_or_path)]
        resolved = [resolve_bundled(path) for path in paths]
        return list(dict.fromkeys(path for path in resolved if looks_like_hub_id(path) and not Path(path).exists()))

    def validation_split_size(self) -> float | int:
        """The fraction, or the row count when the value is a whole number >= 1 (the CLI parses floats)."""
        value = self.validation_size
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"validation_size must be a fraction in [0, 1) or a whole number of rows, got {value!r}")
        if value < 1:
            return float(value)
        if value != int(value):
            raise ValueError(f"validation_size >= 1 is a row count and must be a whole number, got {value}")
        return int(value)

    def resolved_source(self) -> str:
        """The shipped file for a bundled sample name, otherwise the value as given (single source)."""
        return resolve_bundled(self.dataset_name_or_path)


def build_agrimachine_dataset(args: AgriMachineDataArguments) -> tuple[DatasetDict, BuildReport | MixtureReport]:
    """Build the chat dataset the arguments describe; ``max_train_samples`` trims ``train`` last."""
    if args.dataset_mixture is not None:
        return build_mixture(
            args.mixture_sources(),
            mixture_seed=args.mixture_seed,
            default_system_prompt=args.system_prompt,
            on_bad_rows=args.on_bad_rows,
            validation_size=args.validation_split_size(),
            split_seed=args.split_seed,
            max_train_samples=args.max_train_samples,
            resolve=resolve_bundled,
        )
    dataset, report = build_instruction_dataset(
        args.resolved_source(),
        format=args.dataset_format,
        config=args.dataset_config,
        split=args.dataset_split,
        system_prompt=args.system_prompt or None,
        on_bad_rows=args.on_bad_rows,
        validation_size=args.validation_split_size(),
        split_seed=args.split_seed,
    )
    if args.max_train_samples is not None and len(dataset["train"]) > args.max_train_samples:
        dataset["train"] = dataset["train"].select(range(args.max_train_samples))
        report.split_sizes["train"] = args.max_train_samples
        logger.info("Kept the first %d training rows (max_train_samples)", args.max_train_samples)
    return dataset, report


def save_dataset(
    dataset: DatasetDict, output_dir: str | os.PathLike, report: BuildReport | MixtureReport | None = None
) -> Path:
    """``save_to_disk`` into a hidden sibling folder, then rename it into place: a reader never sees a
    partial folder, and a failed save leaves the previous one untouched. The report goes in as
    ``build_report.json``."""
    target = Path(output_dir)
    with atomic_directory(target) as staging:
        dataset.save_to_disk(str(staging))
        if report is not None:
            atomic_write_json(staging / "build_report.json", report.to_dict())
    return target


def push_dataset(dataset: DatasetDict, repo_id: str, private: bool = False, token: str | None = None) -> Any:
    """Push every split to ``repo_id``; the token is passed through and never logged."""
    if not looks_like_hub_id(repo_id):
        raise ValueError(f"not a Hub repo id: {repo_id!r}")
    visibility = "private" if private else "public"
    logger.info("Pushing splits %s to the Hub as %s (%s)", ", ".join(dataset), repo_id, visibility)
    return dataset.push_to_hub(repo_id, private=private, token=token)


@dataclass
class AgriMachineOutputArguments:
    """Where the CLI writes the built dataset."""

    output_dir: str = field(metadata={"help": "Folder for DatasetDict.save_to_disk (replaced atomically)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the pushed dataset repo as private."})


def main(argv: list[str] | None = None) -> int:
    """Build, print the report summary, save, and push when ``--push_dataset_to_hub`` is given."""
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser((AgriMachineDataArguments, AgriMachineOutputArguments))
    try:
        data_args, output_args = parser.parse_args_into_dataclasses(args=argv)
        dataset, report = build_agrimachine_dataset(data_args)
    except (ValueError, FileNotFoundError) as exc:  # bad rows, empty data, format, arguments, missing file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    path = save_dataset(dataset, output_args.output_dir, report)
    print(f"saved to {path}")
    if data_args.push_dataset_to_hub:
        push_dataset(dataset, data_args.push_dataset_to_hub, private=output_args.hub_private)
        print(f"pushed to {data_args.push_dataset_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
