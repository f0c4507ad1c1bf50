"""SNELL's modules: one matrix's kernelized sparse delta, and the linear layer that carries it.

The delta of a ``out x in`` matrix is built from two factor matrices, ``in x rank`` and ``out x rank``,
each split into two halves of ``rank / 2`` columns. Entry ``(o, i)`` is a signed sum of the Euclidean
distances between row ``i`` of the input factors and row ``o`` of the output factors, one distance per
half, weighted ``+c`` and ``-c``: a high-rank matrix from LoRA's parameter count, able to take either sign.
SNELLA adds ``a * softmax(K / g, over outputs) + b`` with learnable ``a, g, b``.

Sparsification is a competition: the entries whose magnitude is below the matrix's ``sparsity``
quantile are zeroed and the survivors become ``dW * |dW|`` (the magnitude factor detached), so large
entries grow fastest and the surviving set changes from step to step. There is no stored mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["KERNEL_WEIGHT", "KernelDelta", "SnellLinear", "sparsify"]

KERNEL_WEIGHT = 0.1  # the fixed weights of the two distance terms are +KERNEL_WEIGHT and -KERNEL_WEIGHT


def sparsify(delta: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest ``1 - sparsity`` of ``delta``'s entries by magnitude, as ``delta * |delta|``.

    ``sparsity == 0`` returns ``delta`` unchanged (the dense kernel form). The threshold is the
    ``round(sparsity * numel)``-th smallest magnitude (``kthvalue``: ``torch.quantile`` refuses tensors
    above 16M entries); entries equal to it are dropped too. Rounding (not flooring) makes a sparsity of
    ``1 - v / numel``, stored in float32, keep exactly ``v`` entries.
    """
    if sparsity == 0.0:
        return delta
    magnitude = delta.detach().abs()
    zeroed = round(sparsity * magnitude.numel())
    if zeroed == 0:
        return delta * magnitude
    threshold = magnitude.flatten().kthvalue(zeroed).values
    return delta * (magnitude * (magnitude > threshold))


class KernelDelta(nn.Module):
    """One matrix's delta: ``(in + out) * rank`` trainable numbers, ``out x in`` entries.

    Attributes:
        in_factors / out_factors: ``(2, in, rank/2)`` and ``(2, out, rank/2)``, one slice per kernel half.
        mixing: SNELLA's learnable ``scale``, ``temperature`` and ``offset`` (absent for SNELL).
        sparsity: this matrix's sparsity, a saved buffer (SNELLA's allocator changes it).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, sparsity: float, mixing: bool) -> None:
        super().__init__()
        half = rank // 2
        self.in_factors = nn.Parameter(torch.empty(2, in_features, half))
        self.out_factors = nn.Parameter(torch.empty(2, out_features, half))
        # uniform in +-1/sqrt(n * rank/2): distances then differ by about 5e-3, so the first deltas are small
        for factors in (self.in_factors, self.out_factors):
            bound = 1.0 / math.sqrt(factors.shape[1] * half)
            nn.init.uniform_(factors, -bound, bound)
        self.mixing = mixing
        if mixing:
            self.mix_scale = nn.Parameter(torch.tensor(1.0))
            self.mix_temperature = nn.Parameter(torch.tensor(1.0))
            self.mix_offset = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("sparsity", torch.tensor(float(sparsity)))
        self._sparsity = float(sparsity)  # host copy: reading the buffer every forward would sync a GPU

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_factors.shape[1], self.in_factors.shape[1]

    def set_sparsity(self, value: float) -> None:
        """Set this matrix's sparsity (1 zeroes it entirely; an allocator may give a matrix nothing)."""
        self.sparsity.fill_(min(max(float(value), 0.0), 1.0))
        self._sparsity = float(self.sparsity)  # the saved float32 value, so a reloaded model sparsifies the same

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sparsity = float(self.sparsity)

    def kernel(self) -> torch.Tensor:
        """The dense ``out x in`` delta before sparsification."""
        distances = torch.cdist(self.out_factors, self.in_factors)  # (2, out, in)
        dense = KERNEL_WEIGHT * (distances[0] - distances[1])
        if self.mixing:
            dense = dense + self.mix_scale * torch.softmax(dense / self.mix_temperature, dim=0) + self.mix_offset
        return dense

    def forward(self) -> torch.Tensor:
        """The sparse delta ``dW_s`` (``out x in``)."""
        return sparsify(self.kernel(), self._sparsity)


class SnellLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one :class:`KernelDelta` per output part (``q, k, v`` of a fused qkv).

    ``forward(x) = base_layer(x) + drop_path(dropout(x) @ dW_s.T)``. With ``checkpoint_delta`` the dense
    delta and the dropout are rebuilt in backward (non-reentrant checkpointing, the same dropout mask):
    only the factors and the input the base layer keeps anyway are stored. :meth:`merge` folds ``dW_s``
    into the weight for inference; :meth:`unmerge` takes it out again.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        parts: tuple[str, ...],
        rank: int,
        sparsity: float,
        mixing: bool,
        dropout: float,
        drop_path: float,
        checkpoint_delta: bool,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        out_each = base_layer.out_features // len(parts)
        weight = base_layer.weight
        self.snell = nn.ModuleDict(
            {
                part: KernelDelta(base_layer.in_features, out_each, rank, sparsity, mixing).to(weight.device)
                for part in parts
            }
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = drop_path
        self.checkpoint_delta = checkpoint_delta
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """``dW_s`` of the whole layer (``out x in``; the parts stacked in output order)."""
        deltas = [delta() for delta in self.snell.values()]
        return deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=0)

    def _delta_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(x), self.delta_weight().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("this SNELL layer is merged into its weight: call unmerge() before training")
            return out
        if self.checkpoint_delta and torch.is_grad_enabled():
            delta = checkpoint(self._delta_output, x, use_reentrant=False)
        else:
            delta = self._delta_output(x)
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            shape = (delta.shape[0],) + (1,) * (delta.dim() - 1)
            delta = delta * (delta.new_empty(shape).bernoulli_(keep) / keep)
        return out + delta.to(out.dtype)

    def _check_mergeable(self) -> None:
        weight = self.base_layer.weight
        if not isinstance(self.base_layer, nn.Linear) or not weight.dtype.is_floating_point:
            raise TypeError(
                f"cannot merge a SNELL delta into a {type(self.base_layer).__name__} with {weight.dtype} weights "
                "(a quantized layer): run it unmerged, or load the base in a floating dtype to merge"
            )

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W + dW_s``: the layer then costs what the plain layer costs."""
        if self.merged:
            return
        self._check_mergeable()
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W <- W - dW_s`` (the same delta, recomputed from the unchanged factors)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False
