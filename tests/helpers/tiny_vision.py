"""Tiny vision backbones of every supported family, built from configs (no weights, no Hub)."""

from __future__ import annotations

import torch
from torch import nn

from hf_tuning.vision import VisionModelArguments, load_vision_model

TIMM_KWARGS = {
    "timm_vit": (
        "vit_tiny_patch16_224",
        {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 8, "num_heads": 2},
    ),
    "timm_swin": (
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 16,
            "patch_size": 2,
            "window_size": 4,
            "embed_dim": 16,
            "depths": [2, 2, 2, 2],
            "num_heads": [2, 2, 2, 2],
        },
    ),
    "timm_convnext": ("convnext_atto", {"depths": [2, 2, 2, 2], "dims": [8, 16, 16, 16]}),
}
INPUT_SIZE = {"timm_convnext": 32, "hf_convnext": 32}


def tiny_hf(family: str, num_classes: int = 5) -> nn.Module:
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        SwinConfig,
        SwinForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    if family == "hf_vit":
        config = ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=8,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=num_classes,
        )
        return ViTForImageClassification(config)
    if family == "hf_swin":
        config = SwinConfig(
            image_size=16,
            patch_size=2,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 2],
            window_size=4,
            num_labels=num_classes,
        )
        return SwinForImageClassification(config)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 2], num_labels=num_classes)
    return ConvNextForImageClassification(config)


def tiny_vision_model(family: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family.startswith("hf_"):
        return tiny_hf(family, num_classes)
    name, kwargs = TIMM_KWARGS[family]
    return load_vision_model(VisionModelArguments(model_name_or_path=name, model_kwargs=dict(kwargs)), num_classes)


def tiny_images(family: str, batch: int = 4, seed: int = 0) -> torch.Tensor:
    size = INPUT_SIZE.get(family, 16)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


FAMILIES = ("timm_vit", "timm_swin", "timm_convnext", "hf_vit", "hf_swin", "hf_convnext")


class TrainEndSnapshots:
    """Trainer callback: a copy of every parameter at the end of each ``train()`` call, i.e. of each DT stage."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
