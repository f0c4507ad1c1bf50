"""The paper's parallel bottleneck adapter, attached to any supported vision backbone.

Diffusion Tuning's adapter models add, in every block, a bottleneck ``dim -> dim/4 -> GELU -> dim``
(then dropout) in parallel with the attention output: the block computes
``x + drop_path(attn(x) + adapter(attn(x)))``. Both linears start from a truncated normal
(std 0.02), not zero, as in the reference. Blocks without attention (ConvNeXt) get the adapter in
parallel with their MLP instead.

The adapter is registered as a child of the module it follows (``blocks.3.attn.adapter``), so its
parameters sit inside the block and the partitioner stages them with that block; a forward hook
adds its output. The wrapped module's own forward is untouched, so pretrained weights load as
before and no architecture file is copied per method.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_tuning.families import find_block_stack

__all__ = ["BottleneckAdapter", "add_bottleneck_adapters", "adapter_host", "ADAPTER_HOSTS"]

# Where in a block the adapter goes, first match wins: timm attention, transformers attention,
# timm ConvNeXt MLP, transformers ConvNeXt pointwise projection.
ADAPTER_HOSTS = ("attn", "attention", "mlp", "pwconv2")


class BottleneckAdapter(nn.Module):
    """``dropout(up(gelu(down(x))))`` over the last dimension, added to its host's output."""

    def __init__(
        self, dim: int, reduction: int = 4, dropout: float = 0.0, init_std: float = 0.02, channels_first: bool = False
    ) -> None:
        super().__init__()
        self.channels_first = channels_first  # (B, C, H, W) outputs of 1x1-conv MLPs
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return self.dropout(self.up(self.act(self.down(x.movedim(1, -1))))).movedim(-1, 1)
        return self.dropout(self.up(self.act(self.down(x))))

    def add_to_output(self, module: nn.Module, inputs: object, output: object) -> object:
        """Forward hook of the host: ``output + adapter(output)`` (the first element of a tuple)."""
        if isinstance(output, tuple):
            return (output[0] + self(output[0]), *output[1:])
        return output + self(output)


def adapter_host(block: nn.Module) -> tuple[str, nn.Module]:
    for name in ADAPTER_HOSTS:
        host = getattr(block, name, None)
        if isinstance(host, nn.Module):
            return name, host
    children = ", ".join(name for name, _ in block.named_children())
    raise ValueError(
        f"{type(block).__name__} has none of the adapter hosts {ADAPTER_HOSTS}; its children are: {children}"
    )


def _output_layout(host: nn.Module) -> tuple[int, bool]:
    """Width of the host's output and whether channels come first (a 1x1-conv MLP)."""
    projections = [m for m in host.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not projections:
        raise ValueError(f"cannot infer the adapter width: {type(host).__name__} has no nn.Linear or nn.Conv2d")
    last = projections[-1]
    if isinstance(last, nn.Conv2d):
        return last.out_channels, True
    return last.out_features, False


def add_bottleneck_adapters(
    model: nn.Module, reduction: int = 4, dropout: float = 0.0, init_std: float = 0.02
) -> list[str]:
    """Attach one adapter per block of ``model`` (in place); returns the adapters' module names."""
    if reduction < 1:
        raise ValueError(f"adapter reduction must be >= 1, got {reduction}")
    stack = find_block_stack(model)
    names = []
    for prefix, _, _ in stack.blocks:
        block = model.get_submodule(prefix.rstrip("."))
        host_name, host = adapter_host(block)
        if hasattr(host, "adapter"):
            raise ValueError(f"{prefix}{host_name} already has an adapter")
        reference = next(host.parameters())
        dim, channels_first = _output_layout(host)
        adapter = BottleneckAdapter(dim, reduction, dropout, init_std, channels_first).to(
            device=reference.device, dtype=reference.dtype
        )
        host.add_module("adapter", adapter)
        host.register_forward_hook(adapter.add_to_output)
        names.append(f"{prefix}{host_name}.adapter")
    return names
