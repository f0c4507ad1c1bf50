"""Resume under DeepSpeed: bring back the weights the DeepSpeed checkpoint does not hold.

A ZeRO-3 checkpoint keeps parameters only inside the optimizer's fp32 partitions, and with PEFT
the Trainer saves DeepSpeed module states without frozen parameters: either way only what the
current stage trains is there. Parameters trained by earlier stages and frozen now would come
back at their initial values. They are restored from the (gathered) weights the Trainer saves
beside the DeepSpeed state (ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save: true``).

Late in a run that is most of the model (a late dt1 stage of an 8B full fine-tune: about 12 GB), so
the weights are restored in chunks of bounded size, and under ZeRO-3 only rank 0 reads the file: the
gathered parameters are broadcast from it when each chunk is released.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

__all__ = ["CHUNK_BYTES", "chunked", "restore_frozen_weights", "saved_key"]

_ADAPTER_FILE = "adapter_model.safetensors"
CHUNK_BYTES = 1 << 30  # parameters gathered (and tensors read) at once: 1 GiB


def saved_key(name: str, adapter_names: Sequence[str]) -> str:
    """Parameter name -> key in a saved PEFT adapter, which drops the adapter name wherever it stands
    (``...lora_A.default.weight`` -> ``...lora_A.weight``, ``...lora_embedding_A.default`` -> ``...lora_embedding_A``)
    and saves a ``modules_to_save`` copy under its module's own name (``score.modules_to_save.default.weight`` ->
    ``score.weight``)."""
    for adapter in adapter_names:
        name = re.sub(rf"\.modules_to_save\.{re.escape(adapter)}(?=\.|$)", "", name)
        name = re.sub(rf"\.{re.escape(adapter)}(?=\.|$)", "", name)
    return name


def chunked(params: Sequence[tuple[str, nn.Parameter]], max_bytes: int) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Consecutive groups of parameters whose full size (``ds_numel`` for ZeRO-3 placeholders) stays within
    ``max_bytes``; a parameter larger than that forms a group of its own."""
    group: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, param in params:
        nbytes = int(getattr(param, "ds_numel", param.numel())) * param.element_size()
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append((name, param))
        size += nbytes
    if group:
        yield group


def _weight_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if (checkpoint / _ADAPTER_FILE).is_file():
        return [checkpoint / _ADAPTER_FILE]
    if index.is_file():
        return sorted({checkpoint / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [checkpoint / "model.safetensors"]


def _saved_locations(checkpoint: Path, keys: dict[str, str]) -> dict[str, tuple[Path, str]]:
    """Parameter name -> (file, key) for each of ``keys`` (parameter name -> file key) the checkpoint holds."""
    wanted = {key: name for name, key in keys.items()}
    found: dict[str, tuple[Path, str]] = {}
    for file in _weight_files(checkpoint):
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted:
                    found[wanted[key]] = (file, key)
    return found


def restore_frozen_weights(
    model: nn.Module, checkpoint: str | Path, names: set[str], *, max_bytes: int | None = None
) -> int:
    """Load ``names`` from ``checkpoint``'s saved weights into a (possibly ZeRO-3 partitioned) model.

    Runs on every rank. ``max_bytes`` bounds what is gathered and read at once (default :data:`CHUNK_BYTES`).
    Returns how many parameters were restored; raises, before changing anything, if some are missing.
    """
    if not names:
        return 0
    checkpoint = Path(checkpoint)
    adapters = list(getattr(model, "peft_config", {}) or {})
    is_adapter = (checkpoint / _ADAPTER_FILE).is_file()
    keys = {name: saved_key(name, adapters) if is_adapter else name for name in names}
    locations = _saved_locations(checkpoint, keys)
    missing = sorted(names - locations.keys())
    if missing:
        searched = ", ".join(f.name for f in _weight_files(checkpoint) if f.is_file()) or "no safetensors file"
        raise ValueError(
            f"cannot resume the staged DeepSpeed run from {checkpoint}: the weights of {len(missing)} parameters "
            f"trained by earlier stages are not saved there (searched {searched}; e.g. {missing[:3]} as "
            f"{[keys[name] for name in missing[:3]]}). Under ZeRO-3 the DeepSpeed config needs "
            '"stage3_gather_16bit_weights_on_model_save": true (as in deepspeed_configs/zero3.json)'
        )
    params = [(n, p) for n, p in model.named_parameters() if n in names]
    partitioned = any(hasattr(p, "ds_id") for _, p in params)
    reads = not partitioned or torch.distributed.get_rank() == 0  # ZeRO-3 broadcasts rank 0's values
    with contextlib.ExitStack() as files:
        handles = {
            file: files.enter_context(safe_open(str(file), framework="pt"))
            for file in {file for file, _ in locations.values()}
        }
        for group in chunked(params, CHUNK_BYTES if max_bytes is None else max_bytes):
            gathered = contextlib.nullcontext()
            if partitioned:
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=0)
            with gathered, torch.no_grad():
                if reads:
                    for name, param in group:
                        file, key = locations[name]
                        param.copy_(handles[file].get_tensor(key).to(dtype=param.dtype, device=param.device))
    return len(params)
