"""The modules DyT adds to a block: the token router, its gate, the bottleneck adapter and the MoE adapter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenRouter", "token_gate", "BottleneckAdapter", "MoEAdapter"]


class TokenRouter(nn.Module):
    """One logit per token (``Linear(dim, 1)``): positive means "through the MLP". Weights start small
    (truncated normal, std 0.02) and the bias at zero, so about half the tokens pass at first."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens).squeeze(-1)


def token_gate(logits: torch.Tensor, temperature: float, training: bool) -> torch.Tensor:
    """Hard 0/1 gates. Training: Gumbel-sigmoid ``sigmoid((l + g1 - g2) / t)`` thresholded at 0.5, with the
    soft value's gradient (straight-through). Evaluation: ``l > 0``, no noise."""
    if not training:
        return (logits > 0).to(logits.dtype)
    uniform = torch.rand((2, *logits.shape), device=logits.device, dtype=logits.dtype).clamp_(1e-10, 1 - 1e-10)
    gumbel = -torch.log(-torch.log(uniform))
    soft = torch.sigmoid((logits + gumbel[0] - gumbel[1]) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class BottleneckAdapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))`` on every token; ``up`` starts at zero, so the block starts as it was."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.1, scale: float = 1.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(F.relu(self.down(x))))


class MoEAdapter(nn.Module):
    """The paper's mixture-of-experts adapter: ``num_experts`` bottleneck adapters, mixed per image.

    Choices (the reference code has none): a router ``Linear(dim, experts)`` reads the mean of the image's
    tokens and its softmax gives each expert a weight; the experts' weights (down, up and biases) are mixed
    with those weights into one adapter per image, which then runs on every token. So the cost per token is
    one adapter's, whatever the number of experts, and an expert's gradient is its routing weight times the
    mixed adapter's, which differs from image to image.
    """

    def __init__(self, dim: int, bottleneck: int, num_experts: int, dropout: float = 0.1, scale: float = 1.0) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts)
        self.down_weight = nn.Parameter(torch.empty(num_experts, bottleneck, dim))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(num_experts, dim, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        for expert in self.down_weight:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        nn.init.trunc_normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, experts) mixing weights from each image's mean token."""
        return torch.softmax(self.router(x.mean(dim=1)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.routing(x)
        down = torch.einsum("be,ekd->bkd", mix, self.down_weight)
        up = torch.einsum("be,edk->bdk", mix, self.up_weight)
        hidden = F.relu(torch.einsum("bnd,bkd->bnk", x, down) + (mix @ self.down_bias)[:, None])
        return self.scale * (torch.einsum("bnk,bdk->bnd", self.dropout(hidden), up) + (mix @ self.up_bias)[:, None])
