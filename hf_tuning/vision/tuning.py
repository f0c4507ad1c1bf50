"""Tuning modes of a vision backbone: full fine-tuning, LoRA (through PEFT), the paper's adapter, or one of
our transfer methods (:mod:`hf_tuning.tuners`: DTL, DTL+, DyT, SNELL, SNELLA).

In every mode the classifier head is trainable, and the staged engine keeps it trainable in every
stage. Full, LoRA and adapter also train the final norm (under LoRA, a final norm whose name PEFT
cannot single out stays frozen); the methods keep it frozen, as they are defined. Outside full
fine-tuning the backbone is frozen, so only the added modules are split into subspaces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from hf_tuning.families import find_block_stack
from hf_tuning.vision.adapters import add_bottleneck_adapters

__all__ = [
    "TUNING_MODES",
    "VisionTuningArguments",
    "prepare_for_tuning",
    "output_side_modules",
    "block_linear_names",
]

logger = logging.getLogger(__name__)
TUNING_MODES = ("full", "lora", "adapter", "dtl", "dtl_plus", "dyt", "snell", "snella")
METHOD_MODES = (
    "dtl",
    "dtl_plus",
    "dyt",
    "snell",
    "snella",
)  # modes served by hf_tuning.tuners (saved as adapter folders)


@dataclass
class VisionTuningArguments:
    """What is trainable: the whole model, LoRA matrices, or bottleneck adapters."""

    tuning_mode: str = field(
        default="full",
        metadata={
            "help": "full (every weight), lora (PEFT LoRA), adapter (the paper's bottleneck), dtl or dtl_plus "
            "(a side network beside the frozen backbone), dyt (token routing around each MLP), snell or snella "
            "(sparse kernelized deltas on every linear layer; all four from hf_tuning.tuners).",
            "choices": list(TUNING_MODES),
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module name suffixes to adapt. Default: every nn.Linear inside the blocks "
            "(the attention and MLP projections)."
        },
    )
    adapter_reduction: int = field(default=4, metadata={"help": "Adapter bottleneck = dim / reduction."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout after the adapter."})
    dtl_rank: int = field(default=2, metadata={"help": "DTL: rank of each block's low-rank map (ViT-B 2, Swin-B 4)."})
    dtl_kernel_size: int = field(default=3, metadata={"help": "DTL+: size of the depthwise convolution (3, 4 or 5)."})
    dtl_map_blocks: str | None = field(
        default=None,
        metadata={
            "help": "DTL: blocks whose input feeds the side network, e.g. '0-11' (default: all; Swin: last two stages)."
        },
    )
    dtl_add_after_blocks: str | None = field(
        default=None,
        metadata={
            "help": "DTL: blocks after which the side output is added, e.g. '6-11' (default: second half of the mapped blocks)."
        },
    )
    dtl_no_grad_prefix: bool = field(
        default=True,
        metadata={"help": "DTL: run the blocks before the first add-back without autograd (exact, less memory)."},
    )
    dtl_cache_prefix_features: bool = field(
        default=False,
        metadata={
            "help": "DTL: compute the frozen prefix once per image and reuse it across epochs (needs no dropout, "
            "drop-path or random augmentation; refused otherwise)."
        },
    )

    dyt_bottleneck: int = field(default=16, metadata={"help": "DyT: adapter bottleneck width."})
    dyt_target_rate: float = field(default=0.5, metadata={"help": "DyT: fraction of patch tokens the MLPs process."})
    dyt_distillation: bool = field(
        default=False, metadata={"help": "DyT: also train the complete model and distil it into the gated one."}
    )
    dyt_num_experts: int = field(default=1, metadata={"help": "DyT: 1 = one adapter; more = the MoE adapter."})
    snell_rank: int = field(default=8, metadata={"help": "SNELL/SNELLA: factor rank (even; 8 or 32 in the method)."})
    snell_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "SNELL: fraction of each delta zeroed (default 0.9); SNELLA: every matrix's starting sparsity "
            "(default 0.01)."
        },
    )
    snella_target_sparsity: float = field(
        default=0.8, metadata={"help": "SNELLA: overall sparsity the allocator's budget shrinks towards."}
    )

    def __post_init__(self) -> None:
        if self.tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode={self.tuning_mode!r} is not one of {', '.join(TUNING_MODES)}")
        if self.lora_r < 1 or self.adapter_reduction < 1:
            raise ValueError("lora_r and adapter_reduction must be >= 1")
        if self.tuning_mode in METHOD_MODES:
            self.method_config()  # a bad DTL setting fails here, before any weights load

    def method_config(self, base_model_name_or_path: str | None = None):
        """The :mod:`hf_tuning.tuners` config of a method mode (``dtl``, ``dtl_plus``, ``dyt``, ``snell``, ``snella``)."""
        from hf_tuning.tuners import DTLConfig, DyTConfig, SNELLAConfig, SNELLConfig

        if self.tuning_mode not in METHOD_MODES:
            raise ValueError(f"tuning_mode={self.tuning_mode!r} is not a hf_tuning.tuners method")
        if self.tuning_mode in ("snell", "snella"):
            sparsity = {} if self.snell_sparsity is None else {"sparsity": self.snell_sparsity}
            if self.tuning_mode == "snella":
                return SNELLAConfig(
                    rank=self.snell_rank,
                    target_sparsity=self.snella_target_sparsity,
                    base_model_name_or_path=base_model_name_or_path,
                    **sparsity,
                )
            return SNELLConfig(rank=self.snell_rank, base_model_name_or_path=base_model_name_or_path, **sparsity)
        if self.tuning_mode == "dyt":
            return DyTConfig(
                bottleneck=self.dyt_bottleneck,
                target_rate=self.dyt_target_rate,
                distillation=self.dyt_distillation,
                num_experts=self.dyt_num_experts,
                base_model_name_or_path=base_model_name_or_path,
            )
        return DTLConfig(
            rank=self.dtl_rank,
            kernel_size=self.dtl_kernel_size if self.tuning_mode == "dtl_plus" else 0,
            map_blocks=self.dtl_map_blocks,
            add_after_blocks=self.dtl_add_after_blocks,
            no_grad_prefix=self.dtl_no_grad_prefix,
            cache_prefix_features=self.dtl_cache_prefix_features,
            base_model_name_or_path=base_model_name_or_path,
        )


def _is_projection(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True  # 1x1 convolutions are the MLP of conv-MLP ConvNeXts
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def block_linear_names(model: nn.Module) -> list[str]:
    """Full names of the projections inside the blocks: ``nn.Linear`` and 1x1 ``nn.Conv2d``
    (attention and MLP; downsampling layers sit outside the blocks and are not included)."""
    prefixes = tuple(prefix for prefix, _, _ in find_block_stack(model).blocks)
    return [name for name, m in model.named_modules() if _is_projection(m) and name.startswith(prefixes)]


def output_side_modules(model: nn.Module) -> list[str]:
    """The smallest modules holding the parameters registered after the last block (final norm, head)."""
    stack = find_block_stack(model)
    names = [name for name, _ in model.named_parameters()]
    block_prefixes = tuple(prefix for prefix, _, _ in stack.blocks)
    last = max(i for i, name in enumerate(names) if name.startswith(block_prefixes))
    tail = {name for name in names[last + 1 :] if not name.startswith(block_prefixes)}
    modules = []
    for module_name, module in model.named_modules():
        own = {f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)}
        if own and own <= tail:
            modules.append(module_name)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no parameters after its last block (no classifier head?)")
    return modules


def _freeze_all_but(model: nn.Module, keep_prefixes: list[str]) -> None:
    prefixes = tuple(f"{p}." for p in keep_prefixes)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))


def _unambiguous_for_peft(model: nn.Module, modules: list[str]) -> tuple[list[str], list[str]]:
    """Split ``modules`` into names PEFT can wrap as ``modules_to_save`` and names it cannot.

    PEFT finds ``modules_to_save`` by plain suffix match, when wrapping and again in
    ``PeftModel.from_pretrained``: timm Swin's final ``norm`` would also catch ``patch_embed.norm``
    and every ``downsample.norm``, and the saved adapter would then not reload.
    """
    # a clash with a module without parameters (timm ViT's Identity `fc_norm`) is harmless
    all_names = [name for name, module in model.named_modules() if any(True for _ in module.parameters())]
    usable, ambiguous = [], []
    for name in modules:
        clashes = [other for other in all_names if other != name and other.endswith(name)]
        (ambiguous if clashes else usable).append(name)
    return usable, ambiguous


def prepare_for_tuning(
    model: nn.Module, args: VisionTuningArguments, base_model_name_or_path: str | None = None
) -> nn.Module:
    """Return the model with exactly the mode's parameters trainable (a ``PeftModel`` for LoRA, a
    :class:`~hf_tuning.tuners.PetlModel` for the method modes)."""
    if args.tuning_mode in METHOD_MODES:
        from hf_tuning.tuners import get_petl_model

        return get_petl_model(model, args.method_config(base_model_name_or_path))
    head_modules = output_side_modules(model)
    if args.tuning_mode == "full":
        model.requires_grad_(True)
        return model
    if args.tuning_mode == "adapter":
        adapters = add_bottleneck_adapters(model, args.adapter_reduction, args.adapter_dropout)
        _freeze_all_but(model, adapters + head_modules)
        return model
    from peft import LoraConfig, get_peft_model

    to_save, ambiguous = _unambiguous_for_peft(model, head_modules)
    if ambiguous:
        logger.warning(
            "LoRA: %s stay frozen; PEFT matches modules_to_save by name suffix, so training them would make "
            "the adapter impossible to reload with PeftModel.from_pretrained",
            ", ".join(ambiguous),
        )
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or block_linear_names(model),
        modules_to_save=to_save,
    )
    return get_peft_model(model, config)
