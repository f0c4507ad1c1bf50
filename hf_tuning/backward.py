"""Make backward stop at the lowest active block, with or without gradient checkpointing.

When only upper blocks are trainable, nothing below them needs a gradient, so the backward pass
can stop early; that is where staged tuning saves time. Two things defeat it:

* the input-require-grads hooks that PEFT/TRL/transformers install for gradient checkpointing:
  they make the embedding output require grad, so autograd walks down through every frozen block;
* reentrant checkpointing: a checkpointed block whose inputs do not require grad gives its own
  parameters no gradient.

:class:`BackwardStopper` detaches the embedding output for the stage (when the embeddings are not
trained) and, under reentrant checkpointing, runs the
lowest active block (and the frozen ones below it) without checkpointing; blocks below carry no
autograd graph at all, so this costs one block's activations. :meth:`restore` undoes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from hf_tuning.families import embedding_modules

__all__ = ["BackwardStopper", "lowest_active_block", "uses_reentrant_checkpointing"]


def lowest_active_block(
    block_prefixes: list[str], active: set[str], all_names: list[str], before_blocks: Sequence[str] | None = None
) -> int:
    """Index of the lowest block holding an active parameter; -1 when an active parameter runs before the
    first block (embeddings), ``len(block_prefixes)`` when no block is active. ``before_blocks`` names the
    parameters that run before the blocks (the partition knows them); without it, those registered before."""
    if before_blocks is None:
        first_block_position = min(
            (i for i, name in enumerate(all_names) if any(name.startswith(p) for p in block_prefixes)),
            default=len(all_names),
        )
        before_blocks = all_names[:first_block_position]
    if active.intersection(before_blocks):
        return -1
    for index, prefix in enumerate(block_prefixes):
        if any(name.startswith(prefix) for name in active):
            return index
    return len(block_prefixes)


def uses_reentrant_checkpointing(block: nn.Module) -> bool:
    func = getattr(block, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return bool(keywords.get("use_reentrant", True))


def _detach_output(module: nn.Module, inputs: object, output: object) -> object:
    return output.detach() if getattr(output, "requires_grad", False) else output


@dataclass
class BackwardStopper:
    """Per-stage backward configuration for one model."""

    model: nn.Module
    block_prefixes: list[str]
    before_blocks: Sequence[str] | None = None  # the parameters that run before the blocks (None: registered before)
    _handles: list = field(default_factory=list)
    _checkpoint_flags: dict[int, bool] = field(default_factory=dict)

    def _blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(prefix.rstrip(".")) for prefix in self.block_prefixes]

    def apply(self, active: set[str]) -> int:
        """Configure the model for a stage training ``active``; returns the lowest active block.

        Call it after gradient checkpointing was enabled (the Trainer does that inside
        ``train()``), since enabling it re-installs input-require-grads hooks.
        """
        self.restore()
        if not self.block_prefixes:
            return 0
        names = [name for name, _ in self.model.named_parameters()]
        lowest = lowest_active_block(self.block_prefixes, active, names, self.before_blocks)
        if lowest == -1:
            return lowest  # trainable embeddings: backward must reach the input anyway
        embeddings, _ = embedding_modules(self.model)
        if embeddings is not None:
            # Runs after every other forward hook on the embeddings (PEFT/TRL/transformers may
            # have installed several that set requires_grad on the output), and cuts the graph.
            self._handles.append(embeddings.register_forward_hook(_detach_output))
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
        for handle in self._handles:
            handle.remove()
        self._handles = []
