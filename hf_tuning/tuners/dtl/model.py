"""DTL / DTL+ on a frozen ViT or Swin: the side network's walk over the blocks.

The frozen backbone runs block by block (the backbone's own modules, through its form). Before each
mapped block, the block's input goes through that block's low-rank map into the running sum ``h``
(reset at every stage on Swin); after each add-back block, ``fuse(swish(h))`` joins the stream. The
blocks up to the first add-back see no trainable input, so they run without an autograd graph, and
their results can be cached per image across epochs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from hf_tuning.tuners.backbones import BackboneForm, backbone_form, random_modules
from hf_tuning.tuners.config import PetlConfigError
from hf_tuning.tuners.dtl.config import DTLConfig
from hf_tuning.tuners.dtl.layer import LowRankMap, PatchGridConv, swish
from hf_tuning.tuners.model import PetlModel

__all__ = ["DTLModel", "MAP_NAME"]

MAP_NAME = "dtl_map"  # the map of block i is `<block i>.dtl_map`, so the engine stages it with its block


@dataclass(frozen=True)
class _Prefix:
    """What the frozen prefix hands on: the inputs of its mapped blocks and the stream after its last block."""

    map_inputs: dict[int, torch.Tensor]
    stream: torch.Tensor


def _default_maps(form: BackboneForm) -> list[int]:
    """Every block; on a hierarchical backbone the blocks of the last two stages."""
    stages = sorted(set(form.stage_of))
    mapped_stages = stages[-2:] if len(stages) > 1 else stages
    return [i for i, s in enumerate(form.stage_of) if s in mapped_stages]


def _default_adds(form: BackboneForm, maps: tuple[int, ...]) -> list[int]:
    """After the second half of the mapped blocks, and after the last block of any mapped stage that would
    otherwise add nothing back (the sum restarts at every stage)."""
    adds = set(maps[len(maps) // 2 :])
    for stage in sorted({form.stage_of[i] for i in maps}):
        last = form.blocks_of_stage(stage)[-1]
        if not any(form.stage_of[a] == stage for a in adds):
            adds.add(last)
    return sorted(adds)


class DTLModel(PetlModel):
    """A backbone with DTL's side network; ``forward(pixel_values)`` returns logits."""

    config_class = DTLConfig

    def __init__(self, base_model: nn.Module, config: DTLConfig) -> None:
        super().__init__(base_model, config)
        form = backbone_form(base_model, "DTL")
        self.map_blocks = tuple(config.map_blocks if config.map_blocks is not None else _default_maps(form))
        if config.add_after_blocks is not None:
            self.add_after_blocks = tuple(config.add_after_blocks)
        else:
            self.add_after_blocks = (
                tuple(_default_adds(form, self.map_blocks)) if max(self.map_blocks) < form.depth else ()
            )
        head_names = config.modules_to_save or form.head_names()
        self._check_modules_to_save(head_names)
        self._check_blocks(form, config)
        self._check_prefix(form, config, head_names)  # every check before the backbone is touched
        self._form = form
        self._reset_per_stage = len(set(form.stage_of)) > 1

        reference = next(base_model.parameters())
        for index in self.map_blocks:
            block = form.block(index)
            if hasattr(block, MAP_NAME):
                raise PetlConfigError(f"{form.block_names[index]} already carries a DTL map")
            block.add_module(
                MAP_NAME, LowRankMap(form.width_of[index], config.rank).to(reference.device, reference.dtype)
            )
        self.dtl_fuse = nn.ModuleDict()
        if config.plus:  # one convolution per stage with add points: a single shared one on a ViT
            for stage in sorted({form.stage_of[i] for i in self.add_after_blocks}):
                width = form.width_of[form.blocks_of_stage(stage)[0]]
                self.dtl_fuse[str(stage)] = PatchGridConv(width, config.kernel_size).to(
                    reference.device, reference.dtype
                )
        self._freeze_all_but_adapters(head_names)
        self._cache: dict[bytes, tuple[torch.Tensor, ...]] = {}

    # construction checks ------------------------------------------------------------------------
    def _check_blocks(self, form: BackboneForm, config: DTLConfig) -> None:
        depth = form.depth
        for what, indices in (("map_blocks", self.map_blocks), ("add_after_blocks", self.add_after_blocks)):
            if not indices:
                raise PetlConfigError(f"DTL {what} is empty")
            if max(indices) >= depth:
                raise PetlConfigError(
                    f"DTL {what} names block {max(indices)}, beyond the depth of {type(form.model).__name__} "
                    f"({depth} blocks: 0-{depth - 1})"
                )
        for index in self.map_blocks:
            if config.rank > form.width_of[index]:
                raise PetlConfigError(
                    f"DTL rank {config.rank} is larger than the width {form.width_of[index]} of block {index}"
                )
        hierarchical = len(set(form.stage_of)) > 1
        for index in self.add_after_blocks:
            stage = form.stage_of[index]
            if not any(m <= index and form.stage_of[m] == stage for m in self.map_blocks):
                where = f" in stage {stage} (the sum restarts at every stage)" if hierarchical else ""
                raise PetlConfigError(
                    f"DTL add_after_blocks has block {index}, but no mapped block comes at or before it{where}"
                )
        for index in self.map_blocks:  # a map whose sum is never added back would train nothing
            stage = form.stage_of[index]
            if not any(a >= index and (form.stage_of[a] == stage or not hierarchical) for a in self.add_after_blocks):
                where = f" in stage {stage} (the sum restarts at every stage)" if hierarchical else ""
                raise PetlConfigError(
                    f"DTL map_blocks has block {index}, but no add-back block comes at or after it{where}: "
                    "its map would never reach the output"
                )

    def _check_prefix(self, form: BackboneForm, config: DTLConfig, head_names: list[str]) -> None:
        """The no-grad prefix and the cache are exact only if nothing trainable (and, for the cache, nothing
        random) runs in front of the first add-back."""
        first_add = self.add_after_blocks[0]
        prefix_modules = list(form.modules_before(first_add))
        trained = {id(p) for name in head_names for p in form.model.get_submodule(name).parameters()}
        trainable = [
            f"{name}.{pname}"
            for name, module in prefix_modules
            for pname, p in module.named_parameters()
            if id(p) in trained
        ]
        if trainable and (config.no_grad_prefix or config.cache_prefix_features):
            raise PetlConfigError(
                f"DTL: {', '.join(trainable[:4])} train in front of the first add-back (block {first_add}); "
                "set no_grad_prefix=False and cache_prefix_features=False"
            )
        if config.cache_prefix_features:
            noisy = [found for name, module in prefix_modules for found in random_modules(module, name)]
            if noisy:
                raise PetlConfigError(
                    "DTL cache_prefix_features would replay one random draw forever: "
                    f"{', '.join(noisy[:4])} run in front of the first add-back (block {first_add}). "
                    "Set drop_path_rate and dropout to 0, or turn the cache off"
                )

    def method_parameters(self) -> list[nn.Parameter]:
        params = [p for i in self.map_blocks for p in getattr(self._form.block(i), MAP_NAME).parameters()]
        return params + list(self.dtl_fuse.parameters())

    # the walk ------------------------------------------------------------------------------------
    def _map(self, index: int) -> LowRankMap:
        return getattr(self._form.block(index), MAP_NAME)

    def _run_prefix(self, pixel_values: torch.Tensor) -> _Prefix:
        form, last = self._form, self.add_after_blocks[0]
        x = form.embed(pixel_values)
        inputs = {}
        for index in range(last + 1):
            if form.stage_starts(index):
                x = form.enter_stage(form.stage_of[index], x)
            if index in self.map_blocks:
                inputs[index] = x
            x = form.run_block(index, x)
        return _Prefix(inputs, x)

    def _cached_prefix(self, pixel_values: torch.Tensor) -> _Prefix:
        """The prefix of every image, computed once per distinct image (keyed by its pixels) and kept on CPU."""
        keys = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in pixel_values.cpu()]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            with torch.no_grad():
                fresh = self._run_prefix(pixel_values[missing])
            order = sorted(fresh.map_inputs)
            for row, i in enumerate(missing):
                self._cache[keys[i]] = tuple(fresh.map_inputs[m][row].cpu() for m in order) + (fresh.stream[row].cpu(),)
        rows = [self._cache[key] for key in keys]
        columns = [torch.stack(column).to(pixel_values.device) for column in zip(*rows)]
        mapped = [m for m in self.map_blocks if m <= self.add_after_blocks[0]]
        return _Prefix(dict(zip(mapped, columns[:-1])), columns[-1])

    def clear_feature_cache(self) -> None:
        self._cache.clear()

    def _add_back(self, index: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        side = swish(h, self.petl_config.beta)
        if self.petl_config.plus:
            conv = self.dtl_fuse[str(self._form.stage_of[index])]
            side = conv(side, self._form.num_prefix_tokens, self._form.grid_size(x))
        return x + side

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        form, config = self._form, self.petl_config
        first_add = self.add_after_blocks[0]
        if config.cache_prefix_features and self.training:  # evaluation sets are seen once: not worth the memory
            prefix = self._cached_prefix(pixel_values)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not config.no_grad_prefix):
                prefix = self._run_prefix(pixel_values)
        h: torch.Tensor | None = None
        x = prefix.stream
        for index in range(form.depth):
            if form.stage_starts(index) and self._reset_per_stage:
                h = None
            if index <= first_add:  # the prefix already ran this block
                block_input = prefix.map_inputs.get(index)
            else:
                if form.stage_starts(index):
                    x = form.enter_stage(form.stage_of[index], x)
                block_input = x
            if index in self.map_blocks:
                update = self._map(index)(block_input)
                h = update if h is None else h + update
            if index > first_add:
                x = form.run_block(index, x)
            if index in self.add_after_blocks:
                x = self._add_back(index, x, h)
        return form.logits(x, config.pooling)
