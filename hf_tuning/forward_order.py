"""Where a module runs relative to the block stack: before it (input side), after it (output side).

Registration order usually says it, but not always: OPT registers ``final_layer_norm`` and ``project_out``
before ``layers``, though both run after them. When the order of registration is ambiguous (a module
outside the blocks registered before them that is not the input embeddings), one forward pass over the
model's own dummy inputs (``PreTrainedModel.dummy_inputs``) shows where each module really runs. Models
without dummy inputs, or whose pass fails, keep the registration order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["runs_after_blocks"]

logger = logging.getLogger(__name__)


def runs_after_blocks(model: nn.Module, block_prefixes: Sequence[str], modules: Sequence[str]) -> dict[str, bool] | None:
    """For each module name in ``modules``: whether its first call comes after the last block finished, in
    one forward pass on the model's dummy inputs. None when that pass cannot run (no dummy inputs, meta or
    partitioned weights, a failing forward)."""
    inputs = _dummy_inputs(model)
    if inputs is None:
        return None
    blocks = {prefix.rstrip(".") for prefix in block_prefixes}
    clock = {"tick": 0, "blocks_done": 0}
    first_call: dict[str, int] = {}
    last_block_end = {"tick": -1}

    def before(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            clock["tick"] += 1
            first_call.setdefault(name, clock["tick"])

        return hook

    def after_block(module: nn.Module, args: Any, output: Any) -> None:
        clock["tick"] += 1
        last_block_end["tick"] = clock["tick"]

    named = dict(model.named_modules())
    try:
        with _hooks(named, modules, blocks, before, after_block), _evaluating(model), torch.no_grad():
            model(**inputs)
    except Exception as err:  # any model may reject its own dummy inputs; then registration order decides
        logger.debug("forward pass on dummy inputs failed (%s); using registration order", err)
        return None
    if last_block_end["tick"] < 0:
        return None
    return {name: first_call.get(name, -1) > last_block_end["tick"] for name in modules}


def _dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = getattr(base, "dummy_inputs", None)
    parameter = next(model.parameters(), None)
    if not isinstance(inputs, dict) or parameter is None or parameter.device.type == "meta":
        return None
    if hasattr(parameter, "ds_id"):  # ZeRO-3 placeholders: no forward outside the DeepSpeed engine
        return None
    return {key: value.to(parameter.device) for key, value in inputs.items() if isinstance(value, torch.Tensor)}


@contextlib.contextmanager
def _hooks(named: dict[str, nn.Module], modules: Sequence[str], blocks: set[str], before, after_block) -> Iterator:
    handles = [named[name].register_forward_pre_hook(before(name)) for name in modules if name in named]
    handles += [named[name].register_forward_hook(after_block) for name in blocks if name in named]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator:
    """Eval mode for the pass (no dropout, no batch-norm statistics updated), then each module's own mode back."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
