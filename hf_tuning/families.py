"""Registry of model families whose repeated blocks the subspace partitioner can find.

A family says where a model keeps its stack of blocks (a ``ModuleList``/``Sequential`` whose
path ends with ``container``) and which class names its blocks have. Hierarchical models
(Swin, ConvNeXt) keep a stack of *stages*, each holding its own block stack under
``stage_blocks``. The vision and DiT work registers their families with
:func:`register_block_family` without touching the partitioner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "BlockFamily",
    "BlockStack",
    "BlocksNotFoundError",
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
        description: models known to use this layout.
    """

    name: str
    container: str
    block_class: str = ".*"
    stage_blocks: str | None = None
    downsample_with_previous_stage: bool = False
    stem_in_every_stage: bool = False
    description: str = ""

    def matches_path(self, path: str) -> bool:
        return re.search(rf"(?:^|\.){self.container}$", path) is not None

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


register_block_family(
    BlockFamily(
        name="decoder_layers",
        container="layers",
        block_class=r"DecoderLayer$",
        description="LLaMA, Mistral, Qwen2/3, Gemma, Phi-3 and other `model.layers.N` decoders",
    )
)
register_block_family(
    BlockFamily(
        name="bert_encoder",
        container=r"encoder\.layer",
        block_class=r"Layer$",
        description="BERT, RoBERTa, XLM-R, ELECTRA and other `encoder.layer.N` encoders",
    )
)
register_block_family(
    BlockFamily(
        name="gpt2_blocks",
        container=r"h",
        block_class=r"Block$",
        description="GPT-2, GPT-J, GPT-Neo and other `transformer.h.N` decoders",
    )
)


# Vision families. The hierarchical ones come before ``timm_vit``: a Swin stage also holds a
# ``blocks`` stack, and the first family that matches wins.
register_block_family(
    BlockFamily(
        name="timm_swin",
        container="layers",
        block_class=r"SwinTransformer(V2)?Stage$",
        stage_blocks="blocks",
        downsample_with_previous_stage=True,
        description="timm Swin / SwinV2: `layers.S.blocks.B`; `layers.S.downsample` opens stage S",
    )
)
register_block_family(
    BlockFamily(
        name="timm_convnext",
        container="stages",
        block_class=r"ConvNeXtStage$",
        stage_blocks="blocks",
        downsample_with_previous_stage=True,
        stem_in_every_stage=True,
        description="timm ConvNeXt: `stages.S.blocks.B`; the stem is trained in every stage (the paper)",
    )
)
register_block_family(
    BlockFamily(
        name="hf_swin",
        container=r"encoder\.layers",
        block_class=r"Swin(v2)?Stage$",
        stage_blocks="blocks",
        description="transformers Swin / Swinv2: `encoder.layers.S.blocks.B`; the downsample closes stage S",
    )
)
register_block_family(
    BlockFamily(
        name="hf_convnext",
        container=r"encoder\.stages",
        block_class=r"ConvNext(V2)?Stage$",
        stage_blocks="layers",
        downsample_with_previous_stage=True,
        stem_in_every_stage=True,
        description="transformers ConvNeXt / ConvNeXtV2: `encoder.stages.S.layers.B`",
    )
)
register_block_family(
    BlockFamily(
        name="hf_vit",
        container="layers",
        block_class=r"(?<!Decoder)Layer$",
        description="transformers ViT, DeiT, DINOv2 and other `vit.layers.N` encoders",
    )
)
register_block_family(
    BlockFamily(
        name="timm_vit",
        container="blocks",
        block_class=r"Block$",
        description="timm ViT, DeiT, EVA and other isotropic `blocks.N` models",
    )
)

# Diffusion transformers. diffusers' DiT keeps a copy of the timestep/label embedder inside every
# block (``transformer_blocks.N.norm1.emb``), so each copy is staged with its block.
register_block_family(
    BlockFamily(
        name="diffusers_dit",
        container="transformer_blocks",
        block_class=r"BasicTransformerBlock$",
        description="diffusers DiTTransformer2DModel / PixArt: `transformer_blocks.N`",
    )
)


def _strip_prefix(path: str) -> str:
    return f"{path}." if path else ""


def _candidate_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
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
