"""SNELLA's inter-matrix competition: a shrinking global budget of nonzeros, shared by importance.

After every optimizer step the allocator takes ``|factor * grad|`` of each matrix's factors and keeps
two EMAs per entry: the importance and its uncertainty (how far the current importance strays from
its average). A matrix scores ``mean(importance * uncertainty)`` over its input factors plus the same
over its output factors; scores are normalised to sum to one.

At the start of every epoch after the first, the budget (a count of nonzero delta entries) is
``V(e) = V_T + (V_0 - V_T) * (1 - e / E)^3`` for epoch ``e`` of ``E``, where ``V_0`` keeps
``1 - sparsity`` of every matrix and ``V_T`` keeps ``1 - target_sparsity``. Each matrix gets
``floor(V * score)`` entries, at most its size; what saturated matrices cannot take is shared again
among the others by score. Its sparsity becomes ``1 - entries / size``.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from hf_tuning.tuners.snell.layer import KernelDelta

__all__ = ["SparsityAllocator", "SparsityAllocationCallback", "share_budget"]


def share_budget(budget: float, scores: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """Split ``budget`` entries by ``scores`` with each share capped at its size (leftovers go round again)."""
    given = dict.fromkeys(sizes, 0)
    remaining = int(budget)
    open_names = [name for name in sizes if sizes[name] > 0]
    while remaining > 0 and open_names:
        weights = {name: max(scores.get(name, 0.0), 0.0) for name in open_names}
        total = sum(weights.values())
        if total <= 0:  # no importance seen yet: share by size
            weights, total = {name: float(sizes[name]) for name in open_names}, float(sum(sizes[n] for n in open_names))
        handed_out = 0
        for name in open_names:
            share = min(math.floor(remaining * weights[name] / total), sizes[name] - given[name])
            given[name] += share
            handed_out += share
        remaining -= handed_out
        open_names = [name for name in open_names if given[name] < sizes[name]]
        if handed_out == 0:
            break  # what is left is smaller than any share
    return given


class SparsityAllocator:
    """Owns SNELLA's importance statistics and sets every matrix's sparsity from them.

    Attributes:
        deltas: the matrices it allocates among, by name.
        allocated_epoch: the last epoch whose allocation has been made (0: the starting sparsities).
    """

    def __init__(
        self,
        deltas: dict[str, KernelDelta],
        initial_sparsity: float,
        target_sparsity: float,
        beta1: float,
        beta2: float,
    ) -> None:
        self.deltas = deltas
        self.beta1, self.beta2 = beta1, beta2
        self.sizes = {name: math.prod(delta.shape) for name, delta in deltas.items()}
        total = sum(self.sizes.values())
        self.initial_budget = (1.0 - initial_sparsity) * total
        self.final_budget = (1.0 - target_sparsity) * total
        self.importance: dict[str, list[torch.Tensor]] = {}
        self.uncertainty: dict[str, list[torch.Tensor]] = {}
        for name, delta in deltas.items():
            self.importance[name] = [torch.zeros_like(p) for p in (delta.in_factors, delta.out_factors)]
            self.uncertainty[name] = [torch.zeros_like(p) for p in (delta.in_factors, delta.out_factors)]
        self.allocated_epoch = 0

    def budget(self, epoch: float, num_epochs: float) -> float:
        """Nonzero entries allowed at the start of ``epoch`` (cubic decay from the starting budget)."""
        progress = min(max(epoch / num_epochs, 0.0), 1.0) if num_epochs > 0 else 1.0
        return self.final_budget + (self.initial_budget - self.final_budget) * (1.0 - progress) ** 3

    @torch.no_grad()
    def update_importance(self) -> int:
        """Fold the current gradients into the EMAs; returns how many factor tensors had a gradient."""
        seen = 0
        for name, delta in self.deltas.items():
            for i, factors in enumerate((delta.in_factors, delta.out_factors)):
                if factors.grad is None:
                    continue  # a frozen stage, or the factors did not take part
                seen += 1
                current = (factors * factors.grad).abs().nan_to_num(0.0)
                average = self.importance[name][i]
                average.mul_(self.beta1).add_(current, alpha=1.0 - self.beta1)
                self.uncertainty[name][i].mul_(self.beta2).add_((current - average).abs(), alpha=1.0 - self.beta2)
        return seen

    def scores(self) -> dict[str, float]:
        """Each matrix's share of the importance (sums to 1; all zero before any step)."""
        raw = {
            name: sum(float((imp * unc).mean()) for imp, unc in zip(self.importance[name], self.uncertainty[name]))
            for name in self.deltas
        }
        total = sum(raw.values())
        return {name: value / total if total > 0 else 0.0 for name, value in raw.items()}

    def reallocate(self, epoch: int, num_epochs: float) -> dict[str, float]:
        """Set every matrix's sparsity for ``epoch``; returns them by name."""
        entries = share_budget(self.budget(epoch, num_epochs), self.scores(), self.sizes)
        sparsities = {}
        for name, delta in self.deltas.items():
            delta.set_sparsity(1.0 - entries[name] / self.sizes[name])
            sparsities[name] = delta._sparsity
        self.allocated_epoch = epoch
        return sparsities

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"allocated_epoch": torch.tensor(self.allocated_epoch)}
        for name in self.deltas:
            for i, side in enumerate(("in", "out")):
                state[f"{name}.importance_{side}"] = self.importance[name][i].detach().cpu()
                state[f"{name}.uncertainty_{side}"] = self.uncertainty[name][i].detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"SNELLA allocator state does not match: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        self.allocated_epoch = int(state["allocated_epoch"])
        for name in self.deltas:
            for i, side in enumerate(("in", "out")):
                self.importance[name][i].copy_(state[f"{name}.importance_{side}"])
                self.uncertainty[name][i].copy_(state[f"{name}.uncertainty_{side}"])


class SparsityAllocationCallback(TrainerCallback):
    """Runs a :class:`SparsityAllocator` inside ``transformers.Trainer``: statistics after every optimizer
    step, a new allocation at the start of every epoch after the first (once per epoch, also on resume)."""

    def __init__(self, allocator: SparsityAllocator) -> None:
        self.allocator = allocator

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.allocator.update_importance() == 0:
            raise RuntimeError(
                "SNELLA's allocator found no gradient on any delta factor after the optimizer step (DeepSpeed ZeRO "
                "keeps gradients partitioned): train with DDP or a single device, or set allocate=False"
            )

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        if epoch > self.allocator.allocated_epoch:
            self.allocator.reallocate(epoch, state.num_train_epochs)
