"""Split a model's trainable parameters into ordered subspaces (the paper's P0..P(N-1)).

Membership rules (``docs/dt_variants.md`` explains them, per architecture):

* ``adjacent``: N contiguous depth groups of near-equal size (one group per stage for
  hierarchical models). Input-side parameters (embeddings, stem) belong to the first group
  (ConvNeXt: to every stage); a downsampling layer belongs to the stage it follows.
* ``cross``: N interleaved groups by block index (index counted inside each stage for
  hierarchical models); N=2 gives even and odd blocks. Input-side parameters and stage-level
  parameters (downsampling) are trainable in every stage.
* ``regex``: user-given groups, one regex per group, matched against parameter names.

Output-side parameters (task head, final norm) and PEFT ``modules_to_save`` are trainable in
every stage. Only parameters that are trainable when partitioning starts are considered, so
on a PEFT model the subspaces hold adapter parameters only, grouped by the block they sit in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from hf_tuning.families import BlocksNotFoundError, BlockStack, embedding_modules, find_block_stack

__all__ = [
    "SubspaceGroup",
    "SubspacePartition",
    "partition_subspaces",
    "whole_model_partition",
    "PartitionError",
    "SCHEMES",
]

SCHEMES = ("adjacent", "cross", "regex")
DEFAULT_NUM_GROUPS = {"adjacent": 4, "cross": 2}
# PEFT parameters that PEFT itself always trains alongside the adapters.
_ALWAYS_PEFT_PATTERN = re.compile(r"\.modules_to_save\.|trainable_tokens_delta")


class PartitionError(ValueError):
    """The requested partition cannot be built for this model."""


@dataclass(frozen=True)
class SubspaceGroup:
    """One subspace: its display name, the blocks it spans and its parameter names."""

    name: str
    blocks: str
    params: tuple[str, ...]


@dataclass
class SubspacePartition:
    """Ordered subspaces of a model plus the parameters outside them.

    Attributes:
        scheme: ``adjacent``, ``cross`` or ``regex``.
        groups: the subspaces, in depth order (P0 is nearest the input).
        always_trainable: trainable in every stage (head, final norm, modules_to_save; under
            ``cross`` also embeddings and stage-level layers).
        frozen: trainable before partitioning but excluded from every stage (``frozen``
            patterns, or parameters no regex group matched).
        family: the block family used, ``None`` for regex groups.
        num_blocks: number of blocks found (0 for regex groups).
        param_numel: element count per candidate parameter, for reporting.
        runs_before_blocks: the candidates outside the blocks that run before them (embeddings, stem), where
            the blocks were found; backward must reach the input when one of them trains.
    """

    scheme: str
    groups: list[SubspaceGroup]
    always_trainable: tuple[str, ...]
    frozen: tuple[str, ...] = ()
    family: str | None = None
    num_blocks: int = 0
    param_numel: dict[str, int] = field(default_factory=dict)
    runs_before_blocks: tuple[str, ...] | None = None

    @property
    def trainable(self) -> tuple[str, ...]:
        """Every parameter some stage trains (groups plus always-trainable), in model order."""
        members = set(self.always_trainable).union(*(group.params for group in self.groups))
        return tuple(name for name in self.param_numel if name in members)

    def numel(self, names: Sequence[str]) -> int:
        return sum(self.param_numel[name] for name in names)


def _compile(patterns: Sequence[str] | None, what: str) -> list[re.Pattern[str]] | None:
    if patterns is None:
        return None
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise PartitionError(f"{what}: {pattern!r} is not a valid regex ({err})") from err
    return compiled


def _trainable(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    candidates = [(name, p) for name, p in named if p.requires_grad]
    if not candidates:
        raise PartitionError(
            f"{type(model).__name__} has no trainable parameters (every requires_grad is False); nothing to partition"
        )
    return candidates


def _numel(candidates: list[tuple[str, nn.Parameter]]) -> dict[str, int]:
    # ZeRO-3 partitioned parameters are empty placeholders; ds_numel is their real size
    return {name: int(getattr(p, "ds_numel", p.numel())) for name, p in candidates}


def whole_model_partition(
    model: nn.Module,
    always_trainable: Sequence[str] | None = None,
    frozen: Sequence[str] | None = None,
    groups: Sequence[str] | Mapping[str, str] | None = None,
) -> SubspacePartition:
    """The OST partition: one group with every trainable parameter (no block discovery needed).
    With ``groups`` it is the regex partition, so OST trains what the DT variants would."""
    if groups:
        return partition_subspaces(model, "regex", groups=groups, always_trainable=always_trainable, frozen=frozen)
    candidates = _trainable(model, list(model.named_parameters()))
    frozen_patterns = _compile(frozen, "frozen") or []
    matches = _pattern_matcher(model)
    kept, excluded = [], []
    for name, param in candidates:
        (excluded if matches(frozen_patterns, param) else kept).append(name)
    return SubspacePartition(
        scheme="none",
        groups=[SubspaceGroup(name="all", blocks="all", params=tuple(kept))],
        always_trainable=(),
        frozen=tuple(excluded),
        param_numel=_numel(candidates),
    )


Matcher = Callable[[Sequence[re.Pattern[str]], nn.Parameter], bool]


def _pattern_matcher(model: nn.Module) -> Matcher:
    """``matches(patterns, param)``: whether any pattern finds any name of ``param``. A parameter shared by
    several modules (a head tied to the input embeddings) answers to every name it has, so ``lm_head`` in
    ``dt_frozen`` or ``dt_always_trainable`` reaches a tied head listed as ``embed_tokens``."""
    aliases: dict[int, list[str]] = {}
    for alias, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(alias)

    def matches(patterns: Sequence[re.Pattern[str]], param: nn.Parameter) -> bool:
        return any(p.search(alias) for p in patterns for alias in aliases[id(param)])

    return matches


def _output_side_ids(model: nn.Module) -> set[int]:
    """ids of the output head's parameters (catches heads tied to the input embeddings)."""
    _, head = embedding_modules(model)
    return {id(p) for p in head.parameters()} if head is not None else set()


def _contiguous_split(count: int, parts: int) -> list[range]:
    """Split ``range(count)`` into ``parts`` contiguous ranges whose sizes differ by at most 1."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def _block_label(indices: Sequence[int]) -> str:
    if not indices:
        return "-"
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"blocks {indices[0]}-{indices[-1]}" if len(indices) > 1 else f"block {indices[0]}"
    return "blocks " + ",".join(str(i) for i in indices)


def partition_subspaces(
    model: nn.Module,
    scheme: str = "adjacent",
    num_groups: int | None = None,
    *,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    always_trainable: Sequence[str] | None = None,
    frozen: Sequence[str] | None = None,
) -> SubspacePartition:
    """Find the repeated blocks of ``model`` and return its ordered subspaces.

    Args:
        model: a ``PreTrainedModel``, a PEFT model or any ``nn.Module`` whose block family is
            registered. Only parameters with ``requires_grad=True`` are partitioned.
        scheme: ``adjacent``, ``cross`` or ``regex`` (implied by ``groups``).
        num_groups: number of subspaces (default 4 for ``adjacent``, 2 for ``cross``;
            hierarchical models use one ``adjacent`` group per stage).
        groups: regex per subspace, as a list or a ``{name: regex}`` mapping.
        always_trainable: regexes of parameters trained in every stage. ``None`` keeps the
            paper's rule (head and final norm); ``[]`` trains them in no stage. PEFT
            ``modules_to_save`` are always trainable.
        frozen: regexes of parameters never trained by any stage (e.g. ``embed_tokens|lm_head``
            to save optimizer memory in full fine-tuning of a large LLM).
    """
    if groups is not None:
        scheme = "regex"
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if scheme == "regex" and not groups:
        raise PartitionError("scheme 'regex' needs groups=[regex, ...] (one regex per subspace)")
    if num_groups is not None and num_groups < 1:
        raise PartitionError(f"num_groups must be >= 1, got {num_groups}")

    named = list(model.named_parameters())
    candidates = _trainable(model, named)
    numel = _numel(candidates)
    frozen_patterns = _compile(frozen, "frozen") or []
    always_patterns = _compile(always_trainable, "always_trainable")
    head_ids = _output_side_ids(model)

    matches = _pattern_matcher(model)
    is_frozen = {name: matches(frozen_patterns, param) for name, param in candidates}

    def is_always(name: str, param: nn.Parameter, output_side: bool) -> bool:
        if _ALWAYS_PEFT_PATTERN.search(name):
            return True
        if always_patterns is None:
            return output_side or id(param) in head_ids
        return matches(always_patterns, param)

    if scheme == "regex":
        try:
            stack: BlockStack | None = find_block_stack(model)
        except BlocksNotFoundError:
            stack = None
        return _partition_by_regex(named, candidates, numel, groups, is_frozen, is_always, stack)

    stack = find_block_stack(model)
    position = {name: i for i, (name, _) in enumerate(named)}
    block_positions = [position[n] for n, _ in named if any(n.startswith(b) for b, _, _ in stack.blocks)]
    first_block, last_block = min(block_positions), max(block_positions)
    late = _runs_after_but_registered_before(stack, named, position, first_block)

    def locate(name: str) -> tuple[int, int] | int | None:
        for prefix, stage, index in stack.blocks:
            if name.startswith(prefix):
                return (stage, index)
        for stage, prefix in enumerate(stack.stage_prefixes):
            if name.startswith(prefix):
                return stage
        return None

    # block (stage, index) -> group index
    n_groups, group_of, group_blocks = _assign_blocks(stack, scheme, num_groups)
    members: list[list[str]] = [[] for _ in range(n_groups)]
    always: list[str] = []
    excluded: list[str] = []
    runs_before: list[str] = []
    for name, param in candidates:
        where = locate(name)
        output_side = where is None and (position[name] > last_block or name in late)
        input_side = where is None and position[name] < first_block and name not in late
        if input_side:
            runs_before.append(name)
        if is_frozen[name]:
            excluded.append(name)
        elif is_always(name, param, output_side):
            always.append(name)
        elif isinstance(where, tuple):
            members[group_of[where]].append(name)
        elif input_side and scheme == "adjacent" and not stack.family.stem_in_every_stage:
            members[0].append(name)  # embeddings / stem: with the first group
        elif isinstance(where, int) and scheme == "adjacent":
            # stage-level layers (downsampling): with the stage they follow
            members[max(where - 1, 0) if stack.family.downsample_with_previous_stage else where].append(name)
        elif input_side or isinstance(where, int):
            always.append(name)  # under cross: in every stage
        else:
            excluded.append(name)  # output side but the user's always_trainable list left it out

    result_groups = []
    for index, names in enumerate(members):
        label = group_blocks[index]
        if not names:
            raise PartitionError(
                f"subspace {index} ({label}) of the {scheme} partition has no trainable parameters; "
                "a stage with nothing to train would be wasted. With PEFT, check that the adapter "
                "covers every block (layers_to_transform), or lower num_groups, or pass regex groups."
            )
        name = _group_name(scheme, index, n_groups)
        result_groups.append(SubspaceGroup(name=name, blocks=label, params=tuple(names)))
    return SubspacePartition(
        scheme=scheme,
        groups=result_groups,
        always_trainable=tuple(always),
        frozen=tuple(excluded),
        family=stack.family.name,
        num_blocks=len(stack.blocks),
        param_numel=numel,
        runs_before_blocks=tuple(runs_before),
    )


def _runs_after_but_registered_before(
    stack: BlockStack, named: list[tuple[str, nn.Parameter]], position: dict[str, int], first_block: int
) -> set[str]:
    """Parameters registered before the blocks whose modules the family declares to run after them (OPT's
    ``final_layer_norm`` and ``project_out``): they are output side, whatever the registration order says."""
    return {
        name for name, _ in named if position[name] < first_block and stack.family.runs_after(name.rpartition(".")[0])
    }


def _group_name(scheme: str, index: int, count: int) -> str:
    if scheme == "cross" and count == 2:
        return ("even", "odd")[index]
    return f"{'G' if scheme == 'adjacent' else 'C'}{index}"


def _assign_blocks(
    stack: BlockStack, scheme: str, num_groups: int | None
) -> tuple[int, dict[tuple[int, int], int], list[str]]:
    blocks = [(stage, index) for _, stage, index in stack.blocks]
    if scheme == "adjacent" and stack.hierarchical:
        stages = stack.num_stages
        if num_groups not in (None, stages):
            raise PartitionError(
                f"{stack.family.name} is hierarchical with {stages} stages; the adjacent partition "
                f"uses one group per stage, so num_groups must be {stages} (got {num_groups}). "
                "Pass regex groups for another split."
            )
        labels = [f"stage {s} ({_block_label([i for st, i in blocks if st == s])})" for s in range(stages)]
        return stages, {key: key[0] for key in blocks}, labels
    count = num_groups or DEFAULT_NUM_GROUPS[scheme]
    if scheme == "adjacent":
        if count > len(blocks):
            raise PartitionError(
                f"num_groups={count} is more than the {len(blocks)} blocks found at "
                f"{stack.path!r}; use at most {len(blocks)} groups"
            )
        group_of, labels = {}, []
        for group, span in enumerate(_contiguous_split(len(blocks), count)):
            for position in span:
                group_of[blocks[position]] = group
            labels.append(_block_label(list(span)))
        return count, group_of, labels
    longest = max(sum(1 for st, _ in blocks if st == s) for s in range(stack.num_stages))
    if count > longest:
        raise PartitionError(
            f"num_groups={count} is more than the {longest} blocks per stage found at "
            f"{stack.path!r}; the cross partition needs at least one block per group"
        )
    group_of = {key: key[1] % count for key in blocks}
    where = "within each stage " if stack.hierarchical else ""
    labels = [
        f"blocks with index % {count} == {g} {where}".strip()
        if count != 2
        else f"{('even', 'odd')[g]} blocks {where}".strip()
        for g in range(count)
    ]
    return count, group_of, labels


def _partition_by_regex(
    named: list[tuple[str, nn.Parameter]],
    candidates: list[tuple[str, nn.Parameter]],
    numel: dict[str, int],
    groups: Sequence[str] | Mapping[str, str],
    is_frozen: dict[str, bool],
    is_always: Callable[[str, nn.Parameter, bool], bool],
    stack: BlockStack | None,
) -> SubspacePartition:
    items = list(groups.items()) if isinstance(groups, Mapping) else [(f"R{i}", g) for i, g in enumerate(groups)]
    compiled = _compile([pattern for _, pattern in items], "groups")
    hits_of = {name: [i for i, pattern in enumerate(compiled) if pattern.search(name)] for name, _ in candidates}
    block_prefixes = tuple(prefix for prefix, _, _ in stack.blocks) if stack is not None else ()
    # output side: outside the blocks and after every parameter the groups matched (head, final norm), or
    # declared by the family to run after the blocks
    position = {name: i for i, (name, _) in enumerate(named)}
    last_grouped = max((position[n] for n, hits in hits_of.items() if hits), default=len(named))

    def output_side(name: str) -> bool:
        if name.startswith(block_prefixes):
            return False
        return position[name] > last_grouped or (stack is not None and stack.family.runs_after(name.rpartition(".")[0]))

    members: list[list[str]] = [[] for _ in items]
    always, excluded = [], []
    for name, param in candidates:
        hits = hits_of[name]
        if len(hits) > 1:
            raise PartitionError(
                f"parameter {name!r} matches several groups ({', '.join(items[i][0] for i in hits)}); "
                "each parameter may belong to one group only"
            )
        if is_frozen[name]:
            excluded.append(name)
        elif hits:
            members[hits[0]].append(name)
        elif is_always(name, param, output_side(name)):
            always.append(name)
        else:
            excluded.append(name)
    for (label, pattern), names in zip(items, members):
        if not names:
            raise PartitionError(f"group {label!r} ({pattern!r}) matches no trainable parameter")
    return SubspacePartition(
        scheme="regex",
        groups=[
            SubspaceGroup(name=label, blocks=f"/{pattern}/", params=tuple(names))
            for (label, pattern), names in zip(items, members)
        ],
        always_trainable=tuple(always),
        frozen=tuple(excluded),
        param_numel=numel,
    )
