"""Stage plans: which parameters each training stage optimises, from a variant and a partition."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from hf_tuning.partition import PartitionError, SubspacePartition, partition_subspaces, whole_model_partition
from hf_tuning.variants import get_variant

__all__ = ["Stage", "StagePlan", "build_stage_plan", "ORDERS"]

ORDERS = ("forward", "reverse", "random")


@dataclass(frozen=True)
class Stage:
    """One stage: its position, a readable name, the groups it trains and every parameter
    name trainable during it (groups plus the always-trainable set)."""

    index: int
    name: str
    groups: tuple[str, ...]
    params: tuple[str, ...]
    num_params: int


@dataclass(frozen=True)
class StagePlan:
    """An ordered list of stages for one variant."""

    variant: str
    order: str
    stages: tuple[Stage, ...]
    partition: SubspacePartition | None
    seed: int = 0

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def fingerprint(self) -> str:
        """Stable hash of the stages' parameter sets; a resumed run must have the same one."""
        payload = json.dumps([[s.name, list(s.params)] for s in self.stages]).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_dict(self) -> dict:
        partition = self.partition
        return {
            "variant": self.variant,
            "order": self.order,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "partition": None
            if partition is None
            else {
                "scheme": partition.scheme,
                "family": partition.family,
                "num_blocks": partition.num_blocks,
                "groups": [
                    {"name": g.name, "blocks": g.blocks, "num_params": partition.numel(g.params)}
                    for g in partition.groups
                ],
                "always_trainable_params": partition.numel(partition.always_trainable),
                "frozen_params": partition.numel(partition.frozen),
            },
            "stages": [
                {"index": s.index, "name": s.name, "groups": list(s.groups), "num_params": s.num_params}
                for s in self.stages
            ],
        }


def _ordered(groups: list, order: str, seed: int) -> list:
    if order == "forward":
        return list(groups)
    if order == "reverse":
        return list(reversed(groups))
    shuffled = list(groups)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def build_stage_plan(
    model_or_partition: nn.Module | SubspacePartition,
    variant: str = "dt3",
    *,
    order: str = "forward",
    seed: int = 0,
    num_groups: int | None = None,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    always_trainable: Sequence[str] | None = None,
    frozen: Sequence[str] | None = None,
) -> StagePlan:
    """Build the stage plan of ``variant`` (``ost``, ``dt1``..``dt4``).

    ``dt1`` = [G0],[G1],[G2],[G3]; ``dt2`` = [G0],[G0,G1],[G0..G2],[all];
    ``dt3`` = [even],[odd]; ``dt4`` = [even],[all]; ``ost`` = [all].

    Args:
        model_or_partition: a model (partitioned here with the variant's scheme) or a
            :class:`SubspacePartition` built by :func:`partition_subspaces`.
        variant: the tuning variant.
        order: ``forward`` (input side first, as in the paper), ``reverse`` or ``random``
            (a permutation of the groups drawn with ``seed``).
        num_groups, groups, always_trainable, frozen: passed to :func:`partition_subspaces`
            when a model is given.
    """
    spec = get_variant(variant)
    if order not in ORDERS:
        raise ValueError(f"unknown dt_order {order!r}; expected one of {', '.join(ORDERS)}")

    if isinstance(model_or_partition, SubspacePartition):
        partition = model_or_partition
        if spec.partition and partition.scheme not in (spec.partition, "regex"):
            raise PartitionError(
                f"{spec.name} uses the {spec.partition} partition but a {partition.scheme} partition was given"
            )
    elif spec.partition is None:
        partition = whole_model_partition(model_or_partition, always_trainable, frozen, groups)
    else:
        partition = partition_subspaces(
            model_or_partition,
            spec.partition,
            num_groups,
            groups=groups,
            always_trainable=always_trainable,
            frozen=frozen,
        )

    everything = partition.trainable
    always = set(partition.always_trainable)

    def make(index: int, name: str, chosen: list) -> Stage:
        members = always.union(*(g.params for g in chosen))
        params = tuple(n for n in everything if n in members)
        return Stage(index, name, tuple(g.name for g in chosen), params, partition.numel(params))

    if spec.schedule == "single":
        stages = [make(0, "all", list(partition.groups))]
    else:
        ordered = _ordered(partition.groups, order, seed)
        if len(ordered) < 2:
            raise PartitionError(f"{spec.name} needs at least 2 subspaces, got {len(ordered)}")
        if spec.schedule == "exclusive":
            stages = [make(i, g.name, [g]) for i, g in enumerate(ordered)]
        else:
            stages = [
                make(i, "+".join(g.name for g in ordered[: i + 1]), ordered[: i + 1]) for i in range(len(ordered) - 1)
            ]
            stages.append(make(len(ordered) - 1, "all", ordered))
    for stage in stages:
        if not stage.params:
            raise PartitionError(f"stage {stage.index} ({stage.name}) of {spec.name} has nothing to train")
    return StagePlan(variant=spec.name, order=order, stages=tuple(stages), partition=partition, seed=seed)
