"""SNELL and SNELLA settings: kernel rank, sparsity, which linear layers get a delta, and SNELLA's allocator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hf_tuning.tuners.config import PetlConfig, PetlConfigError

__all__ = ["SNELLConfig", "SNELLAConfig"]


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise PetlConfigError(f"{name} must be in [0, 1), got {value!r}")


@dataclass
class SNELLConfig(PetlConfig):
    """SNELL: a sparse, high-rank update of every targeted linear layer, built from low-rank factors.

    Each targeted matrix ``W`` (``out x in``) gets ``W + dW_s``: two factor matrices (``in x rank`` and
    ``out x rank``) are merged into a dense ``dW`` through a distance kernel, and only the largest
    ``1 - sparsity`` of its entries survive (chosen afresh every step, no stored mask).

    Attributes:
        rank: width of each factor row (even: the kernel splits it into two halves). Costs
            ``(in + out) * rank`` parameters per matrix, the same as LoRA of that rank.
        sparsity: fraction of each matrix's delta entries set to zero (0 = the dense kernel delta).
        target_modules: ``nn.Linear`` names or name suffixes to adapt; default every ``nn.Linear`` inside the
            blocks (a ViT's q, k, v, proj, fc1, fc2; a LLaMA's seven projections).
        split_fused_qkv: give a fused ``qkv`` projection (timm) three separate deltas, one per q, k and v, so
            each competes on its own.
        dropout: dropout on the input of each delta; dropout_exclude: name suffixes that get none (default
            the attention output projections, as in the method).
        drop_path: per-sample drop of each delta's output in training.
        checkpoint_delta: rebuild the dense delta in backward instead of storing it (exact; saves memory).
        train_class_token: also train the backbone's class token, where it has one (the method does).
        modules_to_save: trained beside the deltas; default the classifier head of a vision backbone and
            nothing for a causal language model.
    """

    method: ClassVar[str] = "snell"
    rank: int = 8
    sparsity: float = 0.9
    target_modules: list[str] | None = None
    split_fused_qkv: bool = True
    dropout: float = 0.1
    dropout_exclude: list[str] | None = None
    drop_path: float = 0.1
    checkpoint_delta: bool = True
    train_class_token: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 2 or self.rank % 2:
            raise PetlConfigError(f"{name} rank must be an even integer >= 2 (the kernel halves it), got {self.rank!r}")
        _check_fraction(f"{name} sparsity", self.sparsity)
        _check_fraction(f"{name} dropout", self.dropout)
        _check_fraction(f"{name} drop_path", self.drop_path)
        if self.target_modules is not None and (isinstance(self.target_modules, str) or not self.target_modules):
            raise PetlConfigError(
                f"{name} target_modules must be a non-empty list of names, got {self.target_modules!r}"
            )


@dataclass
class SNELLAConfig(SNELLConfig):
    """SNELLA: SNELL with a mixing kernel and a bi-level allocator of the nonzero budget.

    The kernel adds learnable terms to SNELL's (``K + a * softmax(K / g) + b``, one ``a, g, b`` per
    matrix). The allocator starts every matrix at ``sparsity`` and, at the start of each epoch after the
    first, shares a global budget of nonzeros that shrinks cubically towards ``target_sparsity`` among
    the matrices in proportion to their importance (an EMA of ``|factor * grad|`` times its uncertainty).

    Attributes:
        sparsity: every matrix's starting sparsity (it also sets the starting budget).
        target_sparsity: the overall sparsity the budget shrinks towards over the run.
        allocate: move the budget between matrices; False keeps every matrix at ``sparsity`` (the kernel alone).
        importance_beta1 / importance_beta2: EMA factors of the importance and of its uncertainty.
    """

    method: ClassVar[str] = "snella"
    sparsity: float = 0.01
    target_sparsity: float = 0.8
    allocate: bool = True
    importance_beta1: float = 0.85
    importance_beta2: float = 0.85

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("SNELLAConfig target_sparsity", self.target_sparsity)
        if self.target_sparsity < self.sparsity:
            raise PetlConfigError(
                f"SNELLAConfig target_sparsity ({self.target_sparsity}) is below the starting sparsity "
                f"({self.sparsity}): the budget only shrinks"
            )
        for name in ("importance_beta1", "importance_beta2"):
            _check_fraction(f"SNELLAConfig {name}", getattr(self, name))
