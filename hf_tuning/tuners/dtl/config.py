"""DTL / DTL+ settings: where the side network reads, where it writes back, its rank and the DTL+ convolution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_tuning.tuners.config import PetlConfig, PetlConfigError, parse_block_indices

__all__ = ["DTLConfig"]


@dataclass
class DTLConfig(PetlConfig):
    """Disentangled Transfer Learning: a compact side network beside a frozen backbone.

    Block ``i`` in ``map_blocks`` adds a bias-free rank-``rank`` map of its input to a running sum ``h``;
    after each block in ``add_after_blocks`` the stream gets ``fuse(swish_beta(h))`` added. ``kernel_size``
    > 0 makes it DTL+: ``fuse`` is a depthwise ``k x k`` convolution over the patch grid (one shared by all
    add points on a ViT, one per stage on Swin); 0 is plain DTL (``fuse`` is the identity).

    Defaults follow the method's ViT-B/16 setting and scale with the backbone: maps on every block (Swin:
    on the last two stages) and add-back from the middle of the mapped blocks on (ViT-B: maps 0-11, add
    after 6-11). Block indices count all blocks in depth order, across Swin's stages.

    Beyond the reference: ``no_grad_prefix`` runs the blocks up to the first add-back without an autograd
    graph (exact: nothing there needs a gradient); ``cache_prefix_features`` keeps what those blocks
    produce for each distinct training image across epochs (exact only without dropout, drop-path or
    random augmentation in front of the cache, which is checked; evaluation never uses the cache).
    """

    method: ClassVar[str] = "dtl"
    rank: int = 2
    map_blocks: str | list[int] | None = None
    add_after_blocks: str | list[int] | None = None
    beta: float = 100.0
    kernel_size: int = 0
    pooling: str = "patch_mean"
    no_grad_prefix: bool = True
    cache_prefix_features: bool = False
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise PetlConfigError(f"DTL rank must be a positive integer, got {self.rank!r}")
        if self.kernel_size < 0:
            raise PetlConfigError(f"DTL kernel_size must be 0 (plain DTL) or positive (DTL+), got {self.kernel_size}")
        if self.beta <= 0:
            raise PetlConfigError(f"DTL beta must be positive, got {self.beta}")
        if self.pooling not in ("patch_mean", "class_token"):
            raise PetlConfigError(f"DTL pooling must be patch_mean or class_token, got {self.pooling!r}")
        maps = parse_block_indices(self.map_blocks, "map_blocks")
        adds = parse_block_indices(self.add_after_blocks, "add_after_blocks")
        if maps is not None and adds is not None and min(adds) < min(maps):
            raise PetlConfigError(
                f"add_after_blocks starts at block {min(adds)}, before the first map (block {min(maps)}): "
                "the side network would add nothing there"
            )
        # canonical, JSON-friendly lists
        self.map_blocks = list(maps) if maps is not None else None
        self.add_after_blocks = list(adds) if adds is not None else None

    @property
    def plus(self) -> bool:
        """DTL+ (a depthwise convolution fuses the side output) rather than plain DTL."""
        return self.kernel_size > 0
