"""Make backward stop at the lowest active block, with or without gradient checkpointing.

When only upper blocks are trainable, nothing below them needs a gradient, so the backward pass
can stop early; that is where staged tuning saves time. Two things defeat it:

* the input-require-grads hook that PEFT/TRL install for gradient checkpointing: it makes the
  embedding output require grad, so autograd walks down through every frozen block;
* reentrant checkpointing: a checkpointed block whose inputs do not require grad gives its own
  parameters no gradient.

:class:`BackwardStopper` removes the hook for the stage and, under reentrant checkpointing, runs the
lowest active block (and the frozen ones below it) without checkpointing; blocks below carry no
autograd graph at all, so this costs one block's activations. :meth:`restore` undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["BackwardStopper", "lowest_active_block", "uses_reentrant_checkpointing"]


def lowest_active_block(block_prefixes: list[str], active: set[str], all_names: list[str]) -> int:
    """Index of the lowest block holding an active parameter; -1 when an active parameter sits
    before the first block (embeddings), ``len(block_prefixes)`` when no block is active."""
    first_block_position = min(
        (i for i, name in enumerate(all_names) if any(name.startswith(p) for p in block_prefixes)),
        default=len(all_names),
    )
    for position, name in enumerate(all_names):
        if position < first_block_position and name in active:
            return -1
    for index, prefix in enumerate(block_prefixes):
        if any(name.startswith(prefix) for name in active):
            return index
    return len(block_prefixes)


def uses_reentrant_checkpointing(block: nn.Module) -> bool:
    func = getattr(block, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return bool(keywords.get("use_reentrant", True))


def _input_grad_hook_owners(model: nn.Module) -> list[nn.Module]:
    return [
        module
        for module in model.modules()
        if getattr(module, "_require_grads_hooks", None) or getattr(module, "_require_grads_hook", None)
    ]


@dataclass
class BackwardStopper:
    """Per-stage backward configuration for one model."""

    model: nn.Module
    block_prefixes: list[str]
    _hook_owners: list[nn.Module] = field(default_factory=list)
    _checkpoint_flags: dict[int, bool] = field(default_factory=dict)

    def _blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(prefix.rstrip(".")) for prefix in self.block_prefixes]

    def apply(self, active: set[str]) -> int:
        """Configure the model for a stage training ``active``; returns the lowest active block."""
        self.restore()
        names = [name for name, _ in self.model.named_parameters()]
        lowest = lowest_active_block(self.block_prefixes, active, names)
        if lowest == -1:
            return lowest  # trainable embeddings: backward must reach the input anyway
        self._hook_owners = _input_grad_hook_owners(self.model)
        for owner in self._hook_owners:
            owner.disable_input_require_grads()
        for index, block in enumerate(self._blocks()):
            if not getattr(block, "gradient_checkpointing", False):
                continue
            below = index < lowest
            lowest_reentrant = index == lowest and uses_reentrant_checkpointing(block)
            if below or lowest_reentrant:
                self._checkpoint_flags[index] = True
                block.gradient_checkpointing = False
        return lowest

    def restore(self) -> None:
        blocks = self._blocks() if self._checkpoint_flags else []
        for index, flag in self._checkpoint_flags.items():
            blocks[index].gradient_checkpointing = flag
        self._checkpoint_flags = {}
        for owner in self._hook_owners:
            owner.enable_input_require_grads()
        self._hook_owners = []
