"""SNELL / SNELLA on any model with ``nn.Linear`` layers: a timm or transformers ViT, a timm Swin, a LLaMA.

Each targeted linear layer is replaced by a :class:`~hf_tuning.tuners.snell.layer.SnellLinear` in
place (so its deltas sit inside the block that owns it and the staged engine partitions them by
block); the model's own forward runs unchanged. Attributes the wrapper lacks (``config``,
``generate``, ``gradient_checkpointing_enable``...) are the base model's, as with PEFT's ``PeftModel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_tuning.families import BlocksNotFoundError, find_block_stack
from hf_tuning.tuners.backbones import PetlBackboneError, backbone_form
from hf_tuning.tuners.config import PetlConfigError
from hf_tuning.tuners.model import PetlModel
from hf_tuning.tuners.snell.allocator import SparsityAllocationCallback, SparsityAllocator
from hf_tuning.tuners.snell.config import SNELLAConfig, SNELLConfig
from hf_tuning.tuners.snell.layer import KernelDelta, SnellLinear

__all__ = ["SNELLModel", "SnellTarget", "find_targets", "DEFAULT_DROPOUT_EXCLUDE"]

# attention output projections of timm, transformers ViT and LLaMA-style models: no input dropout there
DEFAULT_DROPOUT_EXCLUDE = ("attn.proj", "attention.output.dense", "self_attn.o_proj")
FUSED_QKV_PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class SnellTarget:
    """One linear layer that gets deltas: its module path and its output parts (``q, k, v`` or one)."""

    name: str
    parts: tuple[str, ...]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def find_targets(model: nn.Module, config: SNELLConfig) -> list[SnellTarget]:
    """The layers ``config`` adapts in ``model``, checked (rank against width) before anything changes."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if config.target_modules is None:
        try:
            blocks = tuple(prefix for prefix, _, _ in find_block_stack(model).blocks)  # each ends with "."
        except BlocksNotFoundError as err:
            raise PetlBackboneError(
                f"SNELL cannot find the blocks of {type(model).__name__} to target their linear layers; name "
                f"them with target_modules ({err})"
            ) from err
        names = [name for name in linears if name.startswith(blocks)]
        wanted = "every nn.Linear inside the blocks"
    else:
        names = [name for name in linears if _matches(name, config.target_modules)]
        wanted = f"target_modules {config.target_modules}"
    if not names:
        examples = ", ".join(list(linears)[:6]) or "none"
        raise PetlConfigError(
            f"{config.method}: no nn.Linear of {type(model).__name__} matches {wanted}; its linear layers include: "
            f"{examples}"
        )
    targets = []
    for name in names:
        layer = linears[name]
        fused = config.split_fused_qkv and name.endswith("qkv") and layer.out_features == 3 * layer.in_features
        parts = FUSED_QKV_PARTS if fused else ("delta",)
        width = min(layer.in_features, layer.out_features // len(parts))
        if config.rank > width:
            raise PetlConfigError(f"{config.method} rank {config.rank} is larger than the width {width} of {name}")
        targets.append(SnellTarget(name, parts))
    return targets


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def _default_head_names(model: nn.Module) -> list[str]:
    """A vision backbone's classifier head; nothing for a causal language model."""
    try:
        return backbone_form(model, "SNELL").head_names()
    except PetlBackboneError:
        pass
    if _is_causal_lm(model):
        return []
    raise PetlConfigError(
        f"SNELL does not know which modules of {type(model).__name__} form its head: pass modules_to_save "
        "(an empty list trains the deltas alone)"
    )


class SNELLModel(PetlModel):
    """A model whose targeted linear layers carry SNELL (or SNELLA) deltas; ``forward`` is the model's own.

    Attributes:
        allocator: SNELLA's budget allocator (``None`` for SNELL, or SNELLA with ``allocate=False``).
    """

    config_class = SNELLConfig

    def __init__(self, base_model: nn.Module, config: SNELLConfig) -> None:
        super().__init__(base_model, config)
        targets = find_targets(base_model, config)
        head_names = _default_head_names(base_model) if config.modules_to_save is None else config.modules_to_save
        self._check_modules_to_save(head_names)
        class_tokens = [
            name for name, _ in base_model.named_parameters() if config.train_class_token and name.endswith("cls_token")
        ]
        mixing = isinstance(config, SNELLAConfig)
        exclude = DEFAULT_DROPOUT_EXCLUDE if config.dropout_exclude is None else tuple(config.dropout_exclude)
        for target in targets:
            parent_name, _, child = target.name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            layer = SnellLinear(
                getattr(parent, child),
                target.parts,
                rank=config.rank,
                sparsity=config.sparsity,
                mixing=mixing,
                dropout=0.0 if _matches(target.name, list(exclude)) else config.dropout,
                drop_path=config.drop_path,
                checkpoint_delta=config.checkpoint_delta,
            )
            setattr(parent, child, layer)
        self.targets = tuple(targets)
        self._freeze_all_but_adapters(head_names, extra_parameters=class_tokens)
        self.adapter_buffer_names = tuple(f"{name}.sparsity" for name in self.deltas(prefix="base_model"))
        self.allocator: SparsityAllocator | None = None
        if mixing and config.allocate:
            self.allocator = SparsityAllocator(
                self.deltas(),
                config.sparsity,
                config.target_sparsity,
                config.importance_beta1,
                config.importance_beta2,
            )

    @property
    def pipeline_tag(self) -> str:  # type: ignore[override]
        return "text-generation" if _is_causal_lm(self.base_model) else "image-classification"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def snell_layers(self) -> dict[str, SnellLinear]:
        """Every adapted layer by its path in the base model."""
        return {target.name: self.base_model.get_submodule(target.name) for target in self.targets}

    def deltas(self, prefix: str = "") -> dict[str, KernelDelta]:
        """Every matrix's delta by module path (``blocks.0.attn.qkv.snell.q``...)."""
        lead = f"{prefix}." if prefix else ""
        return {
            f"{lead}{name}.snell.{part}": delta
            for name, layer in self.snell_layers().items()
            for part, delta in layer.snell.items()
        }

    def method_parameters(self) -> list[nn.Parameter]:
        return [p for delta in self.deltas().values() for p in delta.parameters()]

    def merge(self) -> None:
        """Fold every delta into its weight: inference then runs at the plain model's cost."""
        for layer in self.snell_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        """Take the deltas out of the weights again (before training on)."""
        for layer in self.snell_layers().values():
            layer.unmerge()

    @property
    def merged(self) -> bool:
        return all(layer.merged for layer in self.snell_layers().values())

    def trainer_callbacks(self) -> list[Any]:
        return [SparsityAllocationCallback(self.allocator)] if self.allocator is not None else []

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        return self.allocator.state_dict() if self.allocator is not None else {}

    def load_training_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.allocator is not None:
            self.allocator.load_state_dict(state)
