"""The modules DTL adds: a bias-free low-rank map per block and DTL+'s depthwise convolution on the patch grid."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LowRankMap", "PatchGridConv", "swish"]


def swish(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``x * sigmoid(beta * x)``: with beta 100 a smooth ReLU, so only positive side outputs reach the stream."""
    return x * torch.sigmoid(beta * x)


class LowRankMap(nn.Module):
    """``x -> up(down(x))`` with ``down: dim -> rank`` (Kaiming uniform) and ``up: rank -> dim`` (zeros), no bias.

    ``up`` starts at zero, so an untrained side network adds nothing and the backbone's outputs are unchanged.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, dim))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down.t()) @ self.up.t()


class PatchGridConv(nn.Module):
    """Depthwise ``k x k`` convolution (no bias, 'same' padding) over the patch tokens laid out on their grid.

    Prefix tokens (class, register) pass through unchanged. Takes ``(B, N, C)`` tokens with ``num_prefix``
    leading prefix tokens and an ``H x W`` patch grid, or ``(B, H, W, C)`` tokens (Swin).
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim, bias=False)

    def forward(self, x: torch.Tensor, num_prefix: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if x.dim() == 4:  # (B, H, W, C)
            return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
        batch, count, dim = patches.shape
        height, width = grid if grid is not None else (math.isqrt(count), math.isqrt(count))
        if height * width != count:
            raise ValueError(f"{count} patch tokens do not fill a {height}x{width} grid")
        image = patches.transpose(1, 2).reshape(batch, dim, height, width)
        out = self.conv(image).reshape(batch, dim, count).transpose(1, 2)
        return torch.cat([prefix, out], dim=1)
