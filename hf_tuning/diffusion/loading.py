"""Class-conditional DiT and its VAE on diffusers, loaded and checked for transfer.

Three things diffusers leaves to the user and DiT transfer depends on:

* the label table: ``num_embeds_ada_norm`` classes plus a null row at index ``num_embeds_ada_norm``.
  Target classes reuse rows ``0..C-1`` and the null class keeps its index (the reference code), so
  a target with more classes than the table has rows is an error, not a silent resize;
* label dropout: diffusers draws a separate 10% drop mask in every block's embedder (28 per step
  for DiT-XL). DiT drops once per sample, so :func:`disable_per_block_label_dropout` turns the
  per-block draws off and the trainer drops the labels itself;
* the VAE must produce latents of the shape the transformer was built for.

``vae_name_or_path: none`` trains a pixel-space DiT (the image *is* the latent), which is what the
small CPU recipe uses.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

__all__ = [
    "DiffusionSetupError",
    "DiTModelArguments",
    "load_dit",
    "load_vae",
    "null_class_of",
    "label_table_size",
    "learns_sigma",
    "check_label_table",
    "check_vae_matches",
    "disable_per_block_label_dropout",
    "vae_downscale",
]

logger = logging.getLogger(__name__)
NO_VAE = ("", "none", "pixel")


class DiffusionSetupError(ValueError):
    """A transformer, VAE or label space that cannot be combined as asked; the message says what fits."""


@dataclass
class DiTModelArguments:
    """Which DiT (and VAE) to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder of a diffusers DiT (e.g. facebook/DiT-XL-2-256), or of a run of this "
            "recipe. Unset: a freshly initialised DiT built from model_config (pretraining)."
        },
    )
    subfolder: str | None = field(
        default="transformer",
        metadata={
            "help": "Subfolder holding the transformer (transformer for the DiT pipelines, transformer_ema "
            "for runs of this recipe)."
        },
    )
    model_config: dict | str | None = field(  # str: a JSON object given on the command line
        default=None,
        metadata={"help": "DiTTransformer2DModel config (JSON object) for a freshly initialised model."},
    )
    vae_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder of an AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema). Unset: the "
            "model's own repository, subfolder vae. 'none': a pixel-space DiT, no VAE."
        },
    )
    vae_subfolder: str | None = field(default=None, metadata={"help": "Subfolder of the VAE, if any."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model and VAE."})

    def __post_init__(self) -> None:
        if isinstance(self.model_config, str):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as exc:
                raise DiffusionSetupError(
                    f"model_config is not a JSON object ({exc}); expected e.g. "
                    '\'{"num_layers": 4, "sample_size": 8, ...}\''
                ) from None
        if self.model_name_or_path is None and not self.model_config:
            raise DiffusionSetupError(
                "give model_name_or_path (a pretrained DiT) or model_config (a DiTTransformer2DModel config for a "
                "freshly initialised one)"
            )
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise DiffusionSetupError(f"model_config must be a JSON object, got {type(self.model_config).__name__}")

    @property
    def pixel_space(self) -> bool:
        if self.vae_name_or_path is not None:
            return self.vae_name_or_path.strip().lower() in NO_VAE
        return self.model_name_or_path is None  # a fresh model has no repository to take a VAE from


def _is_local(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path))


def load_dit(args: DiTModelArguments) -> nn.Module:
    """The transformer, pretrained or freshly initialised (seeded by the caller)."""
    from diffusers import DiTTransformer2DModel

    if args.model_name_or_path is None:
        try:
            return DiTTransformer2DModel(**args.model_config)
        except TypeError as exc:
            raise DiffusionSetupError(f"model_config does not fit DiTTransformer2DModel: {exc}") from None
    source = args.model_name_or_path
    subfolder = args.subfolder or None
    if _is_local(source):
        folder = Path(os.path.expanduser(source)) / (subfolder or "")
        if not (folder / "config.json").is_file():
            raise DiffusionSetupError(
                f"{folder}: no config.json; expected a diffusers DiTTransformer2DModel folder (check subfolder="
                f"{subfolder!r}; runs of this recipe keep the sampling weights in transformer_ema)"
            )
    try:
        return DiTTransformer2DModel.from_pretrained(
            source, subfolder=subfolder, revision=args.revision, use_safetensors=None
        )
    except OSError as exc:
        raise DiffusionSetupError(f"cannot load a DiT from {source!r} (subfolder {subfolder!r}): {exc}") from exc


def load_vae(args: DiTModelArguments) -> nn.Module | None:
    """The frozen AutoencoderKL, or None for a pixel-space DiT."""
    if args.pixel_space:
        return None
    from diffusers import AutoencoderKL

    source = args.vae_name_or_path or args.model_name_or_path
    subfolder = args.vae_subfolder if args.vae_name_or_path else (args.vae_subfolder or "vae")
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, revision=args.revision)
    except OSError as exc:
        raise DiffusionSetupError(
            f"cannot load an AutoencoderKL from {source!r} (subfolder {subfolder!r}): {exc}. Pass vae_name_or_path "
            "(e.g. stabilityai/sd-vae-ft-ema), or 'none' for a pixel-space DiT"
        ) from exc
    vae.requires_grad_(False)
    return vae.eval()


def label_table_size(transformer: nn.Module) -> int:
    """Rows of the class-label table (classes + the null row)."""
    classes = transformer.config.num_embeds_ada_norm
    if classes is None:
        raise DiffusionSetupError(
            f"{type(transformer).__name__} has no class-label table (num_embeds_ada_norm is None); chain of "
            "forgetting needs a class-conditional DiT"
        )
    return int(classes) + 1


def null_class_of(transformer: nn.Module) -> int:
    """The index of the null (unconditional) label: the last row, 1000 for ImageNet DiTs."""
    return label_table_size(transformer) - 1


def learns_sigma(transformer: nn.Module) -> bool:
    """DiT's learned variance: the model outputs epsilon and a variance interpolation."""
    config = transformer.config
    out = config.out_channels if config.out_channels is not None else config.in_channels
    if out == 2 * config.in_channels:
        return True
    if out == config.in_channels:
        return False
    raise DiffusionSetupError(
        f"the transformer outputs {out} channels for {config.in_channels} input channels; expected "
        f"{config.in_channels} (epsilon) or {2 * config.in_channels} (epsilon and learned variance)"
    )


def check_label_table(transformer: nn.Module, num_classes: int, *, what: str = "the target data") -> None:
    """Target labels reuse rows ``0..num_classes-1``; the null row must stay out of reach."""
    available = null_class_of(transformer)
    if num_classes < 1:
        raise DiffusionSetupError(f"{what} has no classes")
    if num_classes > available:
        raise DiffusionSetupError(
            f"{what} has {num_classes} classes but the transformer's label table has {available} class rows "
            f"(+ the null row {available}); target classes reuse the first rows, so at most {available} fit. Use a "
            "DiT built with num_embeds_ada_norm >= the class count"
        )


def vae_downscale(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_vae_matches(vae: nn.Module | None, transformer: nn.Module, image_size: int, image_channels: int) -> None:
    """The latents the VAE (or the pixels, without one) produce must be what the transformer takes."""
    config = transformer.config
    expected = (config.in_channels, config.sample_size, config.sample_size)
    if vae is None:
        produced = (image_channels, image_size, image_size)
        source = f"pixel-space images ({image_channels} channel(s), {image_size} px)"
    else:
        scale = vae_downscale(vae)
        side = image_size // scale
        produced = (vae.config.latent_channels, side, side)
        source = f"the VAE ({vae.config.latent_channels} latent channels, /{scale}) on {image_size} px images"
        if image_size % scale:
            raise DiffusionSetupError(f"image_size {image_size} is not a multiple of the VAE's downscale {scale}")
    if produced != expected:
        raise DiffusionSetupError(
            f"{source} give latents of shape {produced}, but the transformer takes {expected} (in_channels, "
            f"sample_size, sample_size); pick image_size = sample_size x the VAE downscale, or a matching model"
        )


def disable_per_block_label_dropout(transformer: nn.Module) -> float:
    """Turn off the per-block label dropout of diffusers' embedders; returns the probability it had.

    The caller applies that probability once per sample (:class:`ChainOfForgettingTrainer` does).
    """
    probabilities = set()
    for module in transformer.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            probabilities.add(float(module.dropout_prob))
            module.dropout_prob = 0.0
    if not probabilities:
        raise DiffusionSetupError(f"{type(transformer).__name__} has no label embedders (LabelEmbedding)")
    return max(probabilities)
