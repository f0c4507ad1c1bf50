"""Weighted mixtures of instruction datasets: several sources built one by one, held-out rows of every source
kept out of training, and each source's training rows sampled by a ``weight`` or a ``count``.

Each source is built with :func:`~datasets_builders.instruction_formats.build_instruction_dataset` (its own
format, Hub config/split and system prompt; the shared bad-row policy and validation split). Then:

1. every source's ``test`` and ``validation`` rows go to the mixture's ``test``/``validation``, tagged with
   their source; a training row whose conversation (its turns without the system message) equals a held-out or
   validation row of *any* source is removed and counted as leakage;
2. each source's remaining training rows are taken ``weight`` times (``0.25``: a quarter of them, sampled
   without replacement; ``2.5``: all twice plus half again) or ``count`` times in total (whole passes, then a
   sample for the rest). A source's sample comes from a random generator seeded by the mixture seed and the
   source's *label*, so adding, removing or reordering other sources never changes which rows it contributes;
3. the taken rows are shuffled together with the same seed, and the columns of all sources are aligned (a
   column one source lacks is filled with None).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets

from datasets_builders.instruction_formats import (
    FORMAT_CHOICES,
    LOCAL_SUFFIXES,
    BadRowsError,
    BuildReport,
    DataSourceNotFoundError,
    EmptyDatasetError,
    build_instruction_dataset,
    looks_like_hub_id,
)

__all__ = [
    "MIXTURE_KEYS",
    "SOURCE_COLUMN",
    "MixtureSource",
    "SourceReport",
    "MixtureReport",
    "parse_mixture",
    "build_mixture",
    "conversation_key",
    "concatenate_aligned",
]

logger = logging.getLogger(__name__)

SOURCE_COLUMN = "source"
EVALUATION_SPLITS = ("test", "validation")  # test first: a row in both stays in test
MIXTURE_EXAMPLE = '[{"path": "agrimachine_sample", "weight": 1}, {"path": "extra.json", "count": 200}]'


@dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture, as given under ``dataset_mixture``; exactly one of ``weight``/``count`` is set.

    ``system_prompt`` None means "the data arguments' system prompt"; an empty string means none.
    ``label`` names the source in the ``source`` column and the report, and seeds its sample; without one it is
    the path as written (plus ``/config`` and ``:split`` when given).
    """

    path: str
    weight: float | None = None
    count: int | None = None
    format: str = "auto"
    config: str | None = None
    split: str = "train"
    system_prompt: str | None = None
    label: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The keys that are set, in a form :func:`parse_mixture` reads back."""
        return {name: value for name, value in asdict(self).items() if value is not None}


MIXTURE_KEYS = tuple(item.name for item in fields(MixtureSource))


def _default_label(path: str, config: str | None, split: str) -> str:
    """The path as written, plus the Hub config and a non-default split, so that two configs or splits of one
    Hub dataset get different labels without the user naming them."""
    label = path if config is None else f"{path}/{config}"
    return label if split == "train" else f"{label}:{split}"


def parse_mixture(value: str | Sequence[Mapping[str, Any] | MixtureSource]) -> tuple[MixtureSource, ...]:
    """Check a mixture given as a JSON string (command line) or a list of mappings (YAML); every problem names
    the source's index and key."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"dataset_mixture is not valid JSON ({exc.msg} at column {exc.colno}); expected a list of "
                f"sources, e.g. '{MIXTURE_EXAMPLE}'"
            ) from None
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"dataset_mixture must be a non-empty list of sources (mappings with a path and a weight or a count), "
            f"got {type(value).__name__} {value!r:.80}; e.g. {MIXTURE_EXAMPLE}"
        )
    sources = tuple(_parse_source(index, item) for index, item in enumerate(value))
    labels = Counter(source.label for source in sources)
    repeated = [label for label, times in labels.items() if times > 1]
    if repeated:
        raise ValueError(
            f"dataset_mixture: the label {repeated[0]!r} is used by {labels[repeated[0]]} sources; give each of them "
            "a distinct 'label' (the label names the source in the data and seeds its sample)"
        )
    return sources


def _parse_source(index: int, item: Any) -> MixtureSource:
    where = f"dataset_mixture[{index}]"
    if isinstance(item, MixtureSource):
        item = item.to_dict()
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(MIXTURE_KEYS)}, got {item!r:.80}")
    for key in item:
        if key not in MIXTURE_KEYS:
            close = difflib.get_close_matches(str(key), MIXTURE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; expected: {', '.join(MIXTURE_KEYS)}")
    given = {key: value for key, value in item.items() if value is not None}
    path = _text(given, "path", where, required=True)
    split = _text(given, "split", where) or "train"
    config = _text(given, "config", where)
    fmt = given.get("format", "auto")
    if fmt not in FORMAT_CHOICES:
        raise ValueError(f"{where}: format must be one of {', '.join(FORMAT_CHOICES)}, got {fmt!r}")
    system_prompt = given.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"{where}: system_prompt must be a string, got {system_prompt!r}")
    weight, count = _amount(given, where)
    label = _text(given, "label", where) or _default_label(path, config, split)
    return MixtureSource(path, weight, count, fmt, config, split, system_prompt, label)


def _text(given: Mapping[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = given.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        expected = "a file path, a Hub dataset id or a bundled sample name" if key == "path" else "a non-empty string"
        got = "nothing" if value is None else repr(value)
        raise ValueError(f"{where}: {key} must be {expected}, got {got}")
    return value


def _amount(given: Mapping[str, Any], where: str) -> tuple[float | None, int | None]:
    """Exactly one of a positive finite ``weight`` and a positive whole ``count``."""
    weight, count = given.get("weight"), given.get("count")
    if (weight is None) == (count is None):
        both = "both" if weight is not None else "neither"
        raise ValueError(
            f"{where}: give exactly one of weight (a multiple of the source's training rows, e.g. 0.5 or 2) or "
            f"count (a number of training rows), got {both}"
        )
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
        return float(weight), None
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"{where}: count must be a positive whole number of rows, got {count!r}")
    return None, count


# -------------------------------------------------------------------------------------------------- report


@dataclass
class SourceReport:
    """What the mixture did with one source; ``build`` is the source's own build report.

    ``rows_read = rows_skipped + duplicates_removed + heldout_overlap_removed`` (of ``build``) ``+ test +
    validation + heldout_duplicates + leakage_removed + available``.
    """

    label: str
    weight: float | None
    count: int | None
    build: BuildReport
    test: int = 0
    validation: int = 0
    heldout_duplicates: int = 0  # test/validation rows already in test/validation from an earlier source
    leakage_removed: int = 0  # training rows equal to a held-out or validation row of any source
    available: int = 0  # training rows left to sample from
    taken: int = 0  # rows this source put in the mixed train split (repeats included)
    repeats: int = 0  # how many of the taken rows are second or later copies
    in_train: int = 0  # taken rows left after max_train_samples

    @property
    def amount(self) -> str:
        return f"count {self.count}" if self.count is not None else f"weight {self.weight:g}"

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["build"] = self.build.to_dict()
        return record


@dataclass
class MixtureReport:
    """Per-source counts, split sizes and the realised share of each source in ``train``."""

    sources: list[SourceReport]
    mixture_seed: int
    split_sizes: dict[str, int] = field(default_factory=dict)
    proportions: dict[str, float] = field(default_factory=dict)
    trimmed: int = 0  # mixed training rows dropped by max_train_samples

    @property
    def leakage_removed(self) -> int:
        return sum(source.leakage_removed for source in self.sources)

    def summary(self) -> str:
        """A few lines: the split sizes, then one table row per source."""
        splits = ", ".join(f"{name}={size}" for name, size in self.split_sizes.items())
        trimmed = f" (max_train_samples dropped {self.trimmed} mixed rows)" if self.trimmed else ""
        width = max(len("source"), *(len(source.label) for source in self.sources))
        header = (
            f"  {'source':<{width}}  {'amount':<13} {'read':>6} {'bad':>5} {'dup':>5} {'test':>5} {'valid':>5} "
            f"{'leak':>5} {'avail':>6} {'taken':>6} {'repeat':>6} {'share':>6}"
        )
        lines = [
            f"mixture of {len(self.sources)} sources (mixture_seed={self.mixture_seed}): {splits}{trimmed}",
            header,
        ]
        for source in self.sources:
            build = source.build
            duplicates = build.duplicates_removed + source.heldout_duplicates
            leaked = source.leakage_removed + build.heldout_overlap_removed
            share = self.proportions.get(source.label, 0.0)
            lines.append(
                f"  {source.label:<{width}}  {source.amount:<13} {build.rows_read:>6} {build.rows_skipped:>5} "
                f"{duplicates:>5} {source.test:>5} {source.validation:>5} {leaked:>5} "
                f"{source.available:>6} {source.taken:>6} {source.repeats:>6} {share:>6.1%}"
            )
        lines.extend(
            f"  {source.label}: {detail}" for source in self.sources for detail in _build_details(source.build)
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mixture_seed": self.mixture_seed,
            "split_sizes": dict(self.split_sizes),
            "proportions": dict(self.proportions),
            "trimmed": self.trimmed,
            "leakage_removed": self.leakage_removed,
            "sources": [source.to_dict() for source in self.sources],
        }


def _build_details(build: BuildReport) -> list[str]:
    details = []
    if build.skip_reasons:
        details.append("bad rows skipped: " + ", ".join(f"{kind}: {n}" for kind, n in build.skip_reasons.items()))
    if build.dropped_columns:
        details.append("unused columns dropped: " + ", ".join(build.dropped_columns))
    return details


# ------------------------------------------------------------------------------------------------ building


def conversation_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """The conversation without its system messages: two sources with different system prompts still
    count the same question and answer as the same row."""
    turns = [
        {key: value for key, value in message.items() if value is not None}  # an absent tool_calls is None
        for message in messages
        if message.get("role") != "system"
    ]
    return json.dumps(turns, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def source_rng(seed: int, label: str) -> random.Random:
    """A generator that depends only on the seed and the label (sha256: stable across runs and Pythons)."""
    digest = hashlib.sha256(f"{seed}\x00{label}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_indices(available: int, target: int, rng: random.Random) -> list[int]:
    """``target // available`` whole passes, then ``target % available`` distinct rows drawn at random."""
    passes, rest = divmod(target, available)
    return [index for _ in range(passes) for index in range(available)] + rng.sample(range(available), rest)


def _target(source: MixtureSource, available: int, where: str) -> int:
    if source.count is not None:
        return source.count
    target = math.floor(source.weight * available + 0.5)  # nearest whole row, halves up
    if target == 0:
        raise ValueError(
            f"{where}: weight {source.weight:g} of {available} training rows rounds to 0 rows; raise the weight "
            "or give a count"
        )
    return target


def _check_paths_exist(sources: Sequence[MixtureSource], resolve: Callable[[str], str]) -> None:
    """A missing local file fails before any source is read (a Hub id is only checked when it is loaded)."""
    for index, source in enumerate(sources):
        path = Path(resolve(source.path)).expanduser()
        looks_local = path.suffix.lower() in LOCAL_SUFFIXES or not looks_like_hub_id(str(path))
        if looks_local and not path.exists():
            raise DataSourceNotFoundError(
                f"dataset_mixture[{index}] ({source.label}): {path}: no such file; expected a local "
                f"{', '.join(LOCAL_SUFFIXES)} file, a Hub dataset id or a bundled sample name"
            )


def _build_source(
    index: int, source: MixtureSource, resolve: Callable[[str], str], default_system_prompt: str, **options: Any
) -> tuple[DatasetDict, BuildReport]:
    """Build one source; an error names the source's index and label as well as the row."""
    where = f"dataset_mixture[{index}] ({source.label})"
    system_prompt = default_system_prompt if source.system_prompt is None else source.system_prompt
    try:
        return build_instruction_dataset(
            resolve(source.path),
            format=source.format,
            config=source.config,
            split=source.split,
            system_prompt=system_prompt or None,
            **options,
        )
    except BadRowsError as exc:
        raise BadRowsError(f"{where} {exc.source}", exc.problems) from exc
    except (ValueError, FileNotFoundError) as exc:  # format, empty data, missing source: same type, more context
        raise type(exc)(f"{where}: {exc}") from exc


def _tagged(dataset: Dataset, label: str) -> Dataset:
    return dataset.add_column(SOURCE_COLUMN, [label] * len(dataset))


def _merge_feature(first: Any, second: Any, where: str) -> Any:
    """One feature that holds the values of both: a struct gets the union of the fields (messages with
    ``tool_calls`` beside messages without), a null column takes the other type."""
    if first == second:
        return first
    if first == Value("null"):
        return second
    if second == Value("null"):
        return first
    if isinstance(first, dict) and isinstance(second, dict):
        return {
            key: _merge_feature(first[key], second[key], f"{where}.{key}")
            if key in first and key in second
            else first.get(key, second.get(key))
            for key in {**first, **second}
        }
    if isinstance(first, List) and isinstance(second, List) and first.length == second.length:
        return List(_merge_feature(first.feature, second.feature, f"{where}[]"), length=first.length)
    raise ValueError(f"the sources' {where} columns cannot be combined: {first} in one, {second} in another")


def concatenate_aligned(parts: list[Dataset]) -> Dataset:
    """Rows of every part; a column some parts lack is None in their rows, and struct columns (``messages``)
    get the union of the parts' fields, missing ones None."""
    if len(parts) == 1:
        return parts[0]
    merged: dict[str, Any] = {}
    for part in parts:
        for name, feature in part.features.items():
            merged[name] = _merge_feature(merged[name], feature, name) if name in merged else feature
    aligned = [
        part
        if all(part.features[name] == merged[name] for name in part.column_names)
        else part.cast(Features({name: merged[name] for name in part.column_names}))
        for part in parts
    ]
    return concatenate_datasets(aligned)


def _evaluation_splits(
    sources: Sequence[MixtureSource], datasets: Sequence[DatasetDict], reports: Sequence[SourceReport]
) -> dict[str, Dataset]:
    """Each source's ``test`` and ``validation`` rows, tagged; a conversation already in ``test`` (or
    earlier in the same split) is left out, so no row is evaluated twice or in both splits."""
    seen: set[str] = set()
    splits: dict[str, Dataset] = {}
    for name in EVALUATION_SPLITS:
        parts = []
        for source, dataset, record in zip(sources, datasets, reports):
            if name not in dataset:
                continue
            keep = []
            for index, messages in enumerate(dataset[name]["messages"]):
                key = conversation_key(messages)
                if key not in seen:
                    seen.add(key)
                    keep.append(index)
            record.heldout_duplicates += len(dataset[name]) - len(keep)
            setattr(record, name, len(keep))
            parts.append(_tagged(dataset[name], source.label).select(keep))
        if parts:
            splits[name] = concatenate_aligned(parts)
    return {name: splits[name] for name in ("validation", "test") if name in splits}


def build_mixture(
    sources: Sequence[MixtureSource],
    *,
    mixture_seed: int = 42,
    default_system_prompt: str = "",
    on_bad_rows: str = "error",
    validation_size: float | int = 0.05,
    split_seed: int = 42,
    max_train_samples: int | None = None,
    resolve: Callable[[str], str] = str,
) -> tuple[DatasetDict, MixtureReport]:
    """Build every source, keep held-out rows of all of them out of training, sample and shuffle the training
    rows. ``validation_size`` applies to each source; ``resolve`` maps a path as written to what is read."""
    sources = parse_mixture(list(sources))
    _check_paths_exist(sources, resolve)
    options = {"on_bad_rows": on_bad_rows, "validation_size": validation_size, "split_seed": split_seed}
    built = [_build_source(i, source, resolve, default_system_prompt, **options) for i, source in enumerate(sources)]
    reports = [
        SourceReport(source.label, source.weight, source.count, report) for source, (_, report) in zip(sources, built)
    ]
    heldout_keys = {
        conversation_key(messages)
        for dataset, _ in built
        for name in EVALUATION_SPLITS
        if name in dataset
        for messages in dataset[name]["messages"]
    }
    train_parts: list[Dataset] = []
    for index, (source, (dataset, _), record) in enumerate(zip(sources, built, reports)):
        train = dataset["train"]
        clean = [i for i, messages in enumerate(train["messages"]) if conversation_key(messages) not in heldout_keys]
        record.leakage_removed = len(train) - len(clean)
        record.available = len(clean)
        where = f"dataset_mixture[{index}] ({source.label})"
        if not clean:
            raise EmptyDatasetError(
                f"{where}: no training rows left: all {len(train)} equal a held-out or validation row of a source"
            )
        if record.leakage_removed:
            logger.warning(
                "%s: removed %d training row(s) equal to a held-out or validation row",
                where,
                record.leakage_removed,
            )
        picks = sample_indices(len(clean), _target(source, len(clean), where), source_rng(mixture_seed, source.label))
        record.taken, record.repeats = len(picks), len(picks) - len(set(picks))
        train_parts.append(_tagged(train, source.label).select([clean[i] for i in picks]))
    mixed = concatenate_aligned(train_parts)
    order = list(range(len(mixed)))
    source_rng(mixture_seed, "\x00mixture order").shuffle(order)
    trimmed = 0
    if max_train_samples is not None and len(order) > max_train_samples:
        trimmed, order = len(order) - max_train_samples, order[:max_train_samples]
    splits = {"train": mixed.select(order)}
    splits.update(_evaluation_splits(sources, [dataset for dataset, _ in built], reports))
    result = DatasetDict(splits)
    shares = Counter(result["train"][SOURCE_COLUMN])
    for record in reports:
        record.in_train = shares.get(record.label, 0)
    report = MixtureReport(
        reports,
        mixture_seed,
        split_sizes={name: len(part) for name, part in result.items()},
        proportions={record.label: record.in_train / len(result["train"]) for record in reports},
        trimmed=trimmed,
    )
    logger.info("%s", report.summary())
    return result, report
