"""Resume under DeepSpeed: bring back the weights the DeepSpeed checkpoint does not hold.

A ZeRO-3 checkpoint keeps parameters only inside the optimizer's fp32 partitions, and with PEFT
the Trainer saves DeepSpeed module states without frozen parameters: either way only what the
current stage trains is there. Parameters trained by earlier stages and frozen now would come
back at their initial values. They are restored from the (gathered) weights the Trainer saves
beside the DeepSpeed state (ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save: true``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

__all__ = ["restore_frozen_weights"]

_ADAPTER_FILE = "adapter_model.safetensors"


def _saved_tensors(checkpoint: Path, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read the tensors named by ``wanted`` (file key -> parameter name) from the checkpoint."""
    index = checkpoint / "model.safetensors.index.json"
    if (checkpoint / _ADAPTER_FILE).is_file():
        files = [checkpoint / _ADAPTER_FILE]
    elif index.is_file():
        files = sorted({checkpoint / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [checkpoint / "model.safetensors"]
    found: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted:
                    found[wanted[key]] = handle.get_tensor(key)
    return found


def _file_key(name: str, adapter_names: list[str]) -> str:
    """Parameter name -> key in the saved file (PEFT drops the adapter name)."""
    for adapter in adapter_names:
        name = name.replace(f".{adapter}.", ".")
    return name


def restore_frozen_weights(model: nn.Module, checkpoint: str | Path, names: set[str]) -> int:
    """Load ``names`` from ``checkpoint``'s saved weights into a (possibly partitioned) model.

    Runs on every rank. Returns how many parameters were restored; raises if some are missing.
    """
    if not names:
        return 0
    checkpoint = Path(checkpoint)
    adapters = list(getattr(model, "peft_config", {}) or {})
    is_adapter = (checkpoint / _ADAPTER_FILE).is_file()
    wanted = {_file_key(n, adapters) if is_adapter else n: n for n in names}
    tensors = _saved_tensors(checkpoint, wanted)
    missing = sorted(names - tensors.keys())
    if missing:
        raise ValueError(
            f"cannot resume the staged DeepSpeed run from {checkpoint}: the weights of {len(missing)} parameters "
            f"trained by earlier stages are not saved there (e.g. {missing[:3]}). The DeepSpeed config needs "
            '"stage3_gather_16bit_weights_on_model_save": true (as in deepspeed_configs/zero3.json)'
        )
    params = {n: p for n, p in model.named_parameters() if n in names}
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
    with gathered, torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(dtype=param.dtype, device=param.device))
    return len(params)
