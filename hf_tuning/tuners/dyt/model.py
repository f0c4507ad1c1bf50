"""DyT on a frozen ViT: every block's MLP sees only the tokens its router lets through.

Per block: attention on all tokens; the router reads the post-attention stream of the patch tokens (the
class and register tokens always pass); the adapter runs on that stream for every token; the output is
``x + gate * MLP(x) + adapter(x)``. Training multiplies the full MLP output by the hard straight-through
gate (no compute is saved); evaluation gathers the kept tokens, runs the MLP on them only and scatters
the result back, which gives the same logits as the masked form and saves the skipped tokens' MLP FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_tuning.tuners.backbones import IsotropicForm, backbone_form
from hf_tuning.tuners.config import PetlConfigError
from hf_tuning.tuners.dyt.config import DyTConfig
from hf_tuning.tuners.dyt.layer import BottleneckAdapter, MoEAdapter, TokenRouter, token_gate
from hf_tuning.tuners.model import PetlModel

__all__ = ["DyTModel", "ROUTER_NAME", "ADAPTER_NAME"]

ROUTER_NAME, ADAPTER_NAME = "dyt_router", "dyt_adapter"  # registered inside each block, staged with it


class DyTModel(PetlModel):
    """A ViT with DyT's routers and adapters; ``forward(pixel_values)`` returns logits.

    After each forward, ``last_gates`` holds the gates of every block, ``(batch, patch tokens)`` each, and
    :meth:`keep_rate` their mean: the fraction of patch tokens the MLPs processed.
    """

    config_class = DyTConfig

    def __init__(self, base_model: nn.Module, config: DyTConfig) -> None:
        super().__init__(base_model, config)
        form = backbone_form(base_model, "DyT", supported=("timm_vit", "hf_vit"))
        assert isinstance(form, IsotropicForm)
        form.check_two_halves("DyT")
        width = form.width_of[0]
        if config.bottleneck > width:
            raise PetlConfigError(f"DyT bottleneck {config.bottleneck} is larger than the width {width}")
        head_names = config.modules_to_save or form.head_names()
        self._check_modules_to_save(head_names)
        reference = next(base_model.parameters())
        for index in range(form.depth):
            block = form.block(index)
            if hasattr(block, ROUTER_NAME):
                raise PetlConfigError(f"{form.block_names[index]} already carries a DyT router")
            if config.num_experts > 1:
                adapter = MoEAdapter(
                    width, config.bottleneck, config.num_experts, config.adapter_dropout, config.adapter_scale
                )
            else:
                adapter = BottleneckAdapter(width, config.bottleneck, config.adapter_dropout, config.adapter_scale)
            block.add_module(ROUTER_NAME, TokenRouter(width).to(reference.device, reference.dtype))
            block.add_module(ADAPTER_NAME, adapter.to(reference.device, reference.dtype))
        self._form = form
        self._freeze_all_but_adapters(head_names)
        self.last_gates: list[torch.Tensor] = []
        self.last_complete_logits: torch.Tensor | None = None

    def method_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for index in range(self._form.depth)
            for name in (ROUTER_NAME, ADAPTER_NAME)
            for p in getattr(self._form.block(index), name).parameters()
        ]

    # one block -------------------------------------------------------------------------------------
    def _block(self, index: int, x: torch.Tensor, mode: str) -> torch.Tensor:
        """``mode``: ``masked`` (gate times the full MLP output), ``gather`` (MLP on kept tokens only) or
        ``complete`` (every token through the MLP; the router is not run)."""
        form, block = self._form, self._form.block(index)
        x = form.attention_half(index, x)
        adapter = getattr(block, ADAPTER_NAME)(x)
        if mode == "complete":
            return x + form.mlp_branch(index, x) + adapter
        prefix = form.num_prefix_tokens
        logits = getattr(block, ROUTER_NAME)(x[:, prefix:])
        gates = token_gate(logits, self.petl_config.temperature, self.training)
        self.last_gates.append(gates)
        keep = torch.cat([gates.new_ones(gates.shape[0], prefix), gates], dim=1)
        if mode == "masked":
            return x + keep.unsqueeze(-1) * form.mlp_branch(index, x) + adapter
        flat = x.reshape(-1, x.shape[-1])
        rows = keep.reshape(-1).nonzero().squeeze(1)
        mlp = flat.new_zeros(flat.shape).index_copy(0, rows, form.mlp_branch(index, flat.index_select(0, rows)))
        return x + mlp.view_as(x) + adapter

    def _walk(self, pixel_values: torch.Tensor, mode: str) -> torch.Tensor:
        x = self._form.embed(pixel_values)
        for index in range(self._form.depth):
            x = self._block(index, x, mode)
        return self._form.logits(x, self.petl_config.pooling)

    def forward(self, pixel_values: torch.Tensor, dispatch: str | None = None) -> torch.Tensor:
        """Logits. ``dispatch`` overrides the path: ``masked``, ``gather`` (evaluation only) or ``complete``."""
        mode = dispatch or ("masked" if self.training or not self.petl_config.efficient_inference else "gather")
        if mode == "gather" and self.training:
            raise ValueError("the gather path is for inference: gates need the masked form's gradient in training")
        self.last_gates = []
        logits = self._walk(pixel_values, mode)
        self.last_complete_logits = None
        if self.training and self.petl_config.distillation and mode != "complete":
            self.last_complete_logits = self._walk(pixel_values, "complete")
        return logits

    # the loss the method adds --------------------------------------------------------------------
    def keep_rate(self) -> torch.Tensor:
        """Mean gate of the last forward over batch, blocks and patch tokens."""
        if not self.last_gates:
            raise RuntimeError("no gated forward has run yet")
        return torch.stack([g.mean() for g in self.last_gates]).mean()

    def extra_loss(self, logits: torch.Tensor, labels: torch.Tensor, criterion) -> torch.Tensor:
        """``weight * (keep rate - r)^2``; with distillation also ``criterion(complete)`` and
        ``KL(p_complete.detach() || p_gated)`` (batch mean)."""
        config = self.petl_config
        gates = torch.cat([g.reshape(-1) for g in self.last_gates])
        loss = config.rate_loss_weight * (gates.mean() - config.target_rate) ** 2
        if self.last_complete_logits is not None:
            complete = self.last_complete_logits
            loss = loss + criterion(complete, labels)
            loss = loss + F.kl_div(
                F.log_softmax(logits.float(), dim=-1),
                F.log_softmax(complete.detach().float(), dim=-1),
                log_target=True,
                reduction="batchmean",
            )
        return loss
