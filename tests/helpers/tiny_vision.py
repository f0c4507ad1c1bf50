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


class TinyImages(torch.utils.data.Dataset):
    """``n`` random 16x16 images with labels 0-4, as the image trainer's batches want them."""

    def __init__(self, n: int = 24) -> None:
        self.x, self.y = tiny_images("timm_vit", batch=n, seed=5), torch.arange(n) % 5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def train_dt_stages(model: nn.Module, output_dir, variant: str = "dt1", steps: int = 2):
    """Train ``model`` stage by stage on :class:`TinyImages`; returns the trainer and a snapshot per stage."""
    from hf_tuning import StagedTrainingArguments
    from hf_tuning.vision import StagedImageClassificationTrainer

    args = StagedTrainingArguments(
        output_dir=str(output_dir), dt_variant=variant, max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    snapshots = TrainEndSnapshots()
    trainer = StagedImageClassificationTrainer(model=model, args=args, train_dataset=TinyImages())
    trainer.add_callback(snapshots)
    trainer.train()
    return trainer, snapshots
