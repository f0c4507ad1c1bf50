"""Mixed precision chosen for the hardware: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""

from __future__ import annotations

import torch

__all__ = ["resolve_mixed_precision", "torch_dtype_for"]


def resolve_mixed_precision(*, use_cpu: bool = False) -> str:
    """``bf16`` on GPUs with bf16 support, ``fp16`` on other GPUs, ``no`` on CPU."""
    if use_cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype_for(bf16: bool, fp16: bool) -> torch.dtype:
    """The dtype to load base weights in for a run's mixed-precision setting."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
