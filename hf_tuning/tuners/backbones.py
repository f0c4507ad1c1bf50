"""The backbone forms the methods attach to: how to embed, run one block at a time, and classify.

A method such as DTL does not call the backbone's own forward: it walks the blocks itself (to read
each block's input and add its side output after some of them). A *form* gives it that walk for one
library's architecture without copying the architecture: the modules stay the backbone's own, so its
pretrained weights load as usual.

* :class:`IsotropicForm`: timm ``VisionTransformer`` and transformers ``ViT*ForImageClassification``
  (tokens ``(B, N, C)``, class/register tokens first, one stage).
* :class:`SwinForm`: timm ``SwinTransformer`` (tokens ``(B, H, W, C)``, a downsampling step opens every
  stage after the first).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from hf_tuning.families import BlocksNotFoundError, find_block_stack

__all__ = ["PetlBackboneError", "BackboneForm", "IsotropicForm", "SwinForm", "backbone_form", "random_modules"]


class PetlBackboneError(ValueError):
    """A backbone a method cannot be attached to (no form for its family, or an unsupported setting)."""


def random_modules(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the modules of ``module`` that draw random numbers in training (dropout or drop-path above 0)."""
    found = []
    for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        probability = getattr(sub, "p", None) if isinstance(sub, nn.modules.dropout._DropoutNd) else None
        if probability is None and type(sub).__name__ in ("DropPath", "PatchDropout", "PatchDropoutWithIndices"):
            probability = getattr(sub, "drop_prob", getattr(sub, "prob", 0.0))
        if probability:
            found.append(f"{name} (p={probability})")
    return found


class BackboneForm:
    """One backbone seen as: embed -> (enter stage, blocks)* -> logits. Indices are global block indices.

    Attributes:
        block_names: module path of every block, in depth order.
        stage_of: stage of every block (0 throughout for an isotropic ViT).
        width_of: token width at every block.
        num_prefix_tokens: class and register tokens ahead of the patch tokens.
    """

    def __init__(
        self,
        family: str,
        model: nn.Module,
        block_names: list[str],
        stage_of: list[int],
        width_of: list[int],
        num_prefix_tokens: int = 0,
    ) -> None:
        self.family = family
        self.model = model
        self.block_names = block_names
        self.stage_of = stage_of
        self.width_of = width_of
        self.num_prefix_tokens = num_prefix_tokens

    @property
    def depth(self) -> int:
        return len(self.block_names)

    def block(self, index: int) -> nn.Module:
        return self.model.get_submodule(self.block_names[index])

    def stage_starts(self, index: int) -> bool:
        return index == 0 or self.stage_of[index] != self.stage_of[index - 1]

    def blocks_of_stage(self, stage: int) -> list[int]:
        return [i for i, s in enumerate(self.stage_of) if s == stage]

    # The walk, overridden per architecture.
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def enter_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.block(index)(x)

    def logits(self, x: torch.Tensor, pooling: str) -> torch.Tensor:
        raise NotImplementedError

    def head_names(self) -> list[str]:
        """The classifier head's module paths (trainable under every method)."""
        raise NotImplementedError

    def modules_before(self, index: int) -> Iterator[tuple[str, nn.Module]]:
        """The modules that run up to and including block ``index`` (embedding, downsampling, blocks)."""
        raise NotImplementedError

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        raise NotImplementedError


class IsotropicForm(BackboneForm):
    """timm ``VisionTransformer`` or a transformers ViT classifier: ``(B, N, C)`` tokens, prefix tokens first."""

    def __init__(self, family: str, model: nn.Module, block_path: str) -> None:
        blocks = model.get_submodule(block_path)
        names = [f"{block_path}.{i}" for i in range(len(blocks))]
        if family == "timm_vit":
            if getattr(model, "dynamic_img_size", False):
                raise PetlBackboneError("timm ViTs built with dynamic_img_size=True are not supported")
            if getattr(model, "global_pool", "token") == "map":
                raise PetlBackboneError("timm ViTs with attention pooling (global_pool='map') are not supported")
            width, prefix_tokens = model.embed_dim, model.num_prefix_tokens
        else:
            encoder = getattr(model, model.base_model_prefix)
            for attr in ("embeddings", "layernorm"):
                if not hasattr(encoder, attr):
                    raise PetlBackboneError(f"{type(encoder).__name__} has no `{attr}`: not a transformers ViT encoder")
            if not isinstance(getattr(model, "classifier", None), nn.Module):
                raise PetlBackboneError(f"{type(model).__name__} has no `classifier`: not an image classifier")
            width, prefix_tokens = model.config.hidden_size, 1
            self._encoder = encoder
        super().__init__(family, model, names, [0] * len(names), [width] * len(names), prefix_tokens)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.family == "timm_vit":
            x = m.patch_embed(pixel_values)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)
        weight_dtype = self._encoder.embeddings.patch_embeddings.projection.weight.dtype
        return self._encoder.embeddings(pixel_values.to(weight_dtype))

    # A block in two halves, for methods that act between them (DyT gates the MLP half per token).
    def attention_half(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The block's input plus its attention branch: the residual stream the MLP half reads."""
        block = self.block(index)
        if self.family == "timm_vit":
            return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        return x + block.dropout(block.attention(block.layernorm_before(x), None)[0])

    def mlp_branch(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch alone (norm, MLP, layer scale, drop-path), on tokens of any leading shape."""
        block = self.block(index)
        if self.family == "timm_vit":
            return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return block.dropout(block.mlp(block.layernorm_after(x)))

    def check_two_halves(self, method: str) -> None:
        """Refuse blocks that are not the plain pre-norm attention-then-MLP layout the halves assume."""
        wanted = (
            ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
            if self.family == "timm_vit"
            else ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
        )
        for index in range(self.depth):
            block = self.block(index)
            missing = [name for name in wanted if not hasattr(block, name)]
            if missing or type(block).__name__ not in ("Block", "ViTLayer"):
                raise PetlBackboneError(
                    f"{method} needs plain attention-then-MLP blocks; {self.block_names[index]} is a "
                    f"{type(block).__name__}{' without ' + ', '.join(missing) if missing else ''}"
                )

    def logits(self, x: torch.Tensor, pooling: str) -> torch.Tensor:
        m = self.model
        if pooling == "patch_mean":
            pooled = x[:, self.num_prefix_tokens :].mean(dim=1)
            if self.family == "timm_vit":
                return m.head(m.head_drop(m.fc_norm(m.norm(pooled))))
            return m.classifier(self._encoder.layernorm(pooled))
        if pooling == "class_token":
            if self.family == "timm_vit":
                return m.forward_head(m.norm(x))
            return m.classifier(self._encoder.layernorm(x)[:, 0])
        raise PetlBackboneError(f"unknown pooling {pooling!r}: expected patch_mean or class_token")

    def head_names(self) -> list[str]:
        if self.family == "timm_vit":
            return ["head"]
        return ["classifier"]

    def modules_before(self, index: int) -> Iterator[tuple[str, nn.Module]]:
        if self.family == "timm_vit":
            for name in ("patch_embed", "pos_drop", "patch_drop", "norm_pre"):
                yield name, self.model.get_submodule(name)
        else:
            yield f"{self.model.base_model_prefix}.embeddings", self._encoder.embeddings
        for i in range(index + 1):
            yield self.block_names[i], self.block(i)

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        if self.family == "timm_vit":
            return tuple(self.model.patch_embed.grid_size)
        config = self.model.config
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        return size // patch, size // patch


class SwinForm(BackboneForm):
    """timm ``SwinTransformer``: ``(B, H, W, C)`` tokens; ``layers.S.downsample`` opens stage S."""

    def __init__(self, model: nn.Module) -> None:
        names, stages, widths = [], [], []
        for s, stage in enumerate(model.layers):
            for b in range(len(stage.blocks)):
                names.append(f"layers.{s}.blocks.{b}")
                stages.append(s)
                widths.append(stage.blocks[b].norm1.normalized_shape[0])
        super().__init__("timm_swin", model, names, stages, widths)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(pixel_values)

    def enter_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return self.model.layers[stage].downsample(x)

    def logits(self, x: torch.Tensor, pooling: str) -> torch.Tensor:
        if pooling != "patch_mean":
            raise PetlBackboneError("Swin has no class token: its only pooling is patch_mean")
        return self.model.forward_head(self.model.norm(x))

    def head_names(self) -> list[str]:
        return ["head"]

    def modules_before(self, index: int) -> Iterator[tuple[str, nn.Module]]:
        yield "patch_embed", self.model.patch_embed
        for i in range(index + 1):
            if self.stage_starts(i):
                yield f"layers.{self.stage_of[i]}.downsample", self.model.layers[self.stage_of[i]].downsample
            yield self.block_names[i], self.block(i)

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[1], x.shape[2]


SUPPORTED = {
    "timm_vit": "timm VisionTransformer",
    "hf_vit": "transformers ViT*ForImageClassification",
    "timm_swin": "timm SwinTransformer",
}


def backbone_form(model: nn.Module, method: str, supported: tuple[str, ...] = tuple(SUPPORTED)) -> BackboneForm:
    """The form of ``model`` for ``method``; a clear error for a family the method has no form for."""
    try:
        stack = find_block_stack(model)
    except BlocksNotFoundError as err:
        raise PetlBackboneError(f"{method}: cannot find the blocks of {type(model).__name__}: {err}") from err
    family = stack.family.name
    if family not in supported:
        forms = "; ".join(SUPPORTED[name] for name in supported)
        raise PetlBackboneError(
            f"{method} has no form for {type(model).__name__} (block family {family!r}); it supports: {forms}"
        )
    if family == "timm_swin":
        if not hasattr(model, "forward_head") or not hasattr(model, "patch_embed"):
            raise PetlBackboneError(f"{type(model).__name__} is not a timm SwinTransformer classifier")
        return SwinForm(model)
    if family == "timm_vit" and not hasattr(model, "_pos_embed"):
        raise PetlBackboneError(
            f"{type(model).__name__} matches timm's `blocks.N` layout but is not a VisionTransformer"
        )
    return IsotropicForm(family, model, stack.path)
