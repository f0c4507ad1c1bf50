"""An exponential moving average of the weights with a *constant* decay, as DiT trains it.

``diffusers.training_utils.EMAModel(decay=0.9999)`` warms its decay up as ``(1+s)/(10+s)``, which
after 24K steps is about 0.99963: a memory several times shorter than DiT's. Transfer depends on
it (after 24K steps at 0.9999 about 9% of the pretrained weights are still in the average), so this
one keeps the decay fixed from the first step, starting from the weights it is built from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """Shadow copies of every parameter of ``model`` (fp32), updated after each optimizer step.

    Every parameter is averaged, trainable or not, so a stage of staged tuning that freezes a
    block leaves that block's average converging to its (fixed) weights, as DiT's loop would.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: param.detach().to(torch.float32).clone() for name, param in model.named_parameters()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        names = []
        shadows = []
        values = []
        for name, param in model.named_parameters():
            shadow = self.shadow.get(name)
            if shadow is None:
                raise KeyError(f"parameter {name!r} is not tracked by the EMA (built from another model?)")
            if shadow.device != param.device:
                self.shadow[name] = shadow = shadow.to(param.device)
            names.append(name)
            shadows.append(shadow)
            values.append(param.detach().to(torch.float32))
        torch._foreach_lerp_(shadows, values, 1.0 - self.decay)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, tensor in state.items():
            target = self.shadow[name]
            if tensor.shape != target.shape:
                raise ValueError(
                    f"EMA tensor {name!r} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}"
                )
            target.copy_(tensor.to(target.device, torch.float32))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to each parameter's dtype)."""
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name].to(param.device, param.dtype))

    @contextlib.contextmanager
    def averaged_weights(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the averaged weights into ``model`` (for sampling during training)."""
        backup = {name: param.detach().clone() for name, param in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(backup[name])
