"""Registry of model families whose repeated blocks the subspace partitioner can find.

A family says where a model keeps its stack of blocks (a ``ModuleList``/``Sequential`` whose
path ends with ``container``) and which class names its blocks have. Hierarchical models
(Swin, ConvNeXt) keep a stack of *stages*, each holding its own block stack under
``stage_blocks``.

This module holds the registry and the search only. The families themselves are declared by the
domain packages (:mod:`hf_tuning.llm.families`, :mod:`hf_tuning.vision.families`,
:mod:`hf_tuning.diffusion.families`) with :func:`register_block_family`, and users add their own
the same way; the partitioner never changes for a new architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is searched, so registering a family stays cheap
    from torch import nn

__all__ = [
    "BlockFamily",
    "BlockStack",
    "BlocksNotFoundError",
    "embedding_modules",
    "find_block_stack",
    "register_block_family",
    "registered_block_families",
]


class BlocksNotFoundError(ValueError):
    """The model's repeated blocks could not be located."""


@dataclass(frozen=True)
class BlockFamily:
    """Where one family of architectures keeps its repeated blocks.

    Attributes:
        name: short identifier shown by ``hf-tuning plan``.
        container: regex that the end of the stack's module path must match
            (``layers`` matches ``model.layers`` and ``base_model.model.model.layers``).
        block_class: regex searched in the class name of each element of the stack.
        stage_blocks: for hierarchical models, the attribute path of the block stack inside each
            stage (``blocks``); ``None`` for isotropic models.
        downsample_with_previous_stage: hierarchical models whose stage-level layers (patch
            merging, downsampling) sit at the *start* of the next stage (timm Swin and ConvNeXt,
            transformers ConvNeXt). The paper groups such a layer with the stage it follows, so
            under ``adjacent`` it joins the previous stage's group.
        stem_in_every_stage: the input-side parameters (stem) are trained in every stage, as the
            paper does for ConvNeXt; otherwise they belong to the first ``adjacent`` group.
        runs_after_blocks: regex of the module paths outside the blocks that run after them although
            the model registers them before (OPT's ``final_layer_norm`` and ``project_out``). Which side
            of the blocks a module runs on decides its membership; registration order is only the
            default, and declaring the exceptions keeps the plan the same wherever it is computed
            (on the meta device, under ZeRO-3), so its fingerprint is too.
        description: models known to use this layout.
    """

    name: str
    container: str
    block_class: str = ".*"
    stage_blocks: str | None = None
    downsample_with_previous_stage: bool = False
    stem_in_every_stage: bool = False
    runs_after_blocks: str | None = None
    description: str = ""

    def matches_path(self, path: str) -> bool:
        return re.search(rf"(?:^|\.){self.container}$", path) is not None

    def runs_after(self, module_path: str) -> bool:
        """Whether the module at ``module_path`` (outside the blocks) runs after them whatever its registration."""
        return self.runs_after_blocks is not None and re.search(self.runs_after_blocks, module_path) is not None

    def matches_elements(self, stack: nn.Module) -> bool:
        children = list(stack.children())
        return bool(children) and all(re.search(self.block_class, type(child).__name__) for child in children)


@dataclass
class BlockStack:
    """The located blocks of one model, in forward order.

    ``blocks`` holds, per block, its parameter-name prefix (ending with ``.``), its stage and its
    index inside that stage. ``stage_prefixes`` is non-empty only for hierarchical models.
    """

    family: BlockFamily
    path: str
    blocks: list[tuple[str, int, int]] = field(default_factory=list)
    stage_prefixes: list[str] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return max(stage for _, stage, _ in self.blocks) + 1 if self.blocks else 0

    @property
    def hierarchical(self) -> bool:
        return self.family.stage_blocks is not None


_REGISTRY: list[BlockFamily] = []


def register_block_family(family: BlockFamily, *, first: bool = False) -> BlockFamily:
    """Add a family to the registry (``first=True`` gives it priority over the built-ins)."""
    if any(existing.name == family.name for existing in _REGISTRY):
        raise ValueError(f"a block family named {family.name!r} is already registered")
    if first:
        _REGISTRY.insert(0, family)
    else:
        _REGISTRY.append(family)
    return family


def registered_block_families() -> list[BlockFamily]:
    return list(_REGISTRY)


def embedding_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's input embeddings and output head (``get_input_embeddings`` / ``get_output_embeddings``), or
    None where it has none or does not say."""

    def get(getter_name: str) -> nn.Module | None:
        from torch import nn

        getter = getattr(model, getter_name, None)
        try:
            module = getter() if callable(getter) else None
        except (AttributeError, NotImplementedError):
            return None
        return module if isinstance(module, nn.Module) else None

    return get("get_input_embeddings"), get("get_output_embeddings")


def _strip_prefix(path: str) -> str:
    return f"{path}." if path else ""


def _candidate_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch import nn

    return [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0
    ]


def _describe_stacks(model: nn.Module) -> str:
    lines = []
    for path, module in _candidate_stacks(model):
        classes = sorted({type(child).__name__ for child in module.children()})
        lines.append(f"  {path or '<root>'}: {len(module)} x {'/'.join(classes)}")
    return "\n".join(lines[:12]) or "  (no ModuleList or Sequential at all)"


def find_block_stack(model: nn.Module, families: list[BlockFamily] | None = None) -> BlockStack:
    """Locate the repeated blocks of ``model`` using the first registered family that matches.

    Raises:
        BlocksNotFoundError: no family matches, or one family matches several stacks.
    """
    ambiguous: BlocksNotFoundError | None = None
    for family in families if families is not None else _REGISTRY:
        hits = [
            (path, module)
            for path, module in _candidate_stacks(model)
            if family.matches_path(path) and family.matches_elements(module)
        ]
        if not hits:
            continue
        if len(hits) > 1:
            # e.g. an isotropic `blocks` family inside each stage of a hierarchical model: a later
            # family may match the model as a whole
            paths = ", ".join(path for path, _ in hits)
            ambiguous = ambiguous or BlocksNotFoundError(
                f"family {family.name!r} matches several block stacks in "
                f"{type(model).__name__}: {paths}. Pass explicit regex groups "
                "(dt_groups / groups=...) to say which parameters form each subspace."
            )
            continue
        path, stack_module = hits[0]
        stack = BlockStack(family=family, path=path)
        prefix = _strip_prefix(path)
        if family.stage_blocks is None:
            for index, _ in enumerate(stack_module.children()):
                stack.blocks.append((f"{prefix}{index}.", 0, index))
        else:
            for stage, stage_module in enumerate(stack_module.children()):
                stage_prefix = f"{prefix}{stage}."
                stack.stage_prefixes.append(stage_prefix)
                inner = stage_module.get_submodule(family.stage_blocks)
                for index, _ in enumerate(inner.children()):
                    stack.blocks.append((f"{stage_prefix}{family.stage_blocks}.{index}.", stage, index))
        return stack
    if ambiguous is not None:
        raise ambiguous
    raise BlocksNotFoundError(
        f"could not find the repeated blocks of {type(model).__name__}: no registered family "
        f"({', '.join(f.name for f in (families or _REGISTRY))}) matches. Stacks found:\n"
        f"{_describe_stacks(model)}\n"
        "Pass explicit regex groups (dt_groups=['layers\\.[0-3]\\.', ...] or "
        "partition_subspaces(..., groups=[...])), or register the family with "
        "hf_tuning.register_block_family(BlockFamily(name=..., container=..., block_class=...))."
    )
