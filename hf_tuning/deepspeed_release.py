"""Tear a finished stage's DeepSpeed engine down completely before the next stage builds its own.

DeepSpeed allocates its fp32 master weights, gradient partitions and Adam moments when an engine is built.
Destroying an engine (``accelerator.free_memory`` does) removes its gradient hooks but leaves links that keep
it, and everything it holds, alive: the forward hooks it registered on the model (closures over the engine) and
attributes on every parameter: ZeRO-3's ``_z3_optimizer``, ZeRO-1/2's ``_zero_optimizer`` (with optimizer
offload), the bf16 optimizer's ``_hp_grad`` views into its flat fp32 gradients, and ``_hp_mapping`` (which
DeepSpeed clears itself for ZeRO-1/2, not for every optimizer). The model outlives the stage, so without
unlinking them each stage switch would hold two stages' optimizer state at once.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["unlink_engine"]

_ENGINE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook")
_PARAMETER_LINKS = ("_z3_optimizer", "_zero_optimizer", "_hp_grad", "_hp_mapping")


def unlink_engine(engine: Any, model: nn.Module) -> None:
    """Remove what ties ``model`` to a (destroyed) DeepSpeed ``engine`` and its optimizer."""
    for name in _ENGINE_HOOKS:
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    for param in model.parameters():
        for name in _PARAMETER_LINKS:
            if hasattr(param, name):
                delattr(param, name)
