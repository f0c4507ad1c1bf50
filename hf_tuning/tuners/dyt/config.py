"""DyT settings: the adapter, the token router's target rate and temperature, distillation and the MoE adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hf_tuning.tuners.config import PetlConfig, PetlConfigError

__all__ = ["DyTConfig"]


@dataclass
class DyTConfig(PetlConfig):
    """Dynamic Tuning: per block, a learned router sends only some patch tokens through the frozen MLP,
    and a bottleneck adapter runs beside it on every token.

    Attributes:
        bottleneck: adapter width (``dim -> bottleneck -> dim``, ReLU, up-projection starting at zero).
        target_rate: the fraction of patch tokens the MLPs should process, ``r`` in ``(mean gate - r)^2``.
        rate_loss_weight: weight of that loss (2.0 in the method).
        temperature: the Gumbel-sigmoid temperature in training (fixed at 5 in the method).
        adapter_dropout: dropout on the adapter's bottleneck; adapter_scale multiplies its output.
        distillation: also run the complete model (every token through every MLP) in training and add its
            cross-entropy and the KL divergence from its predictions to the gated ones.
        num_experts: 1 = the single adapter of the reference code; above 1 = the paper's MoE adapter
            (``docs/petl.md`` says how its experts are routed and combined).
        efficient_inference: in evaluation, run each MLP on the kept tokens only (gather, MLP, scatter);
            False multiplies the full MLP output by the gate, as in training.
        pooling: ``class_token`` (the method's readout) or ``patch_mean``.
        modules_to_save: trained beside the method's modules; default the classifier head.
    """

    method: ClassVar[str] = "dyt"
    bottleneck: int = 16
    target_rate: float = 0.5
    rate_loss_weight: float = 2.0
    temperature: float = 5.0
    adapter_dropout: float = 0.1
    adapter_scale: float = 1.0
    distillation: bool = False
    num_experts: int = 1
    efficient_inference: bool = True
    pooling: str = "class_token"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.target_rate <= 1.0:
            raise PetlConfigError(f"DyT target_rate must be in (0, 1], got {self.target_rate}")
        for name in ("bottleneck", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PetlConfigError(f"DyT {name} must be a positive integer, got {value!r}")
        if self.temperature <= 0:
            raise PetlConfigError(f"DyT temperature must be positive, got {self.temperature}")
        if self.rate_loss_weight < 0:
            raise PetlConfigError(f"DyT rate_loss_weight must be >= 0, got {self.rate_loss_weight}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise PetlConfigError(f"DyT adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.pooling not in ("class_token", "patch_mean"):
            raise PetlConfigError(f"DyT pooling must be class_token or patch_mean, got {self.pooling!r}")
