"""Build a chain-of-forgetting knowledge bank: images sampled from the pretrained DiT.

The reference code trains on a folder of such samples but ships no script that makes it (and does
not say how it was made), so every choice is a recorded setting here::

    python -m datasets_builders.knowledge_bank --model_name_or_path facebook/DiT-XL-2-256 \\
        --output_dir data/bank --num_images 10000 --guidance_scale 1.5 --num_inference_steps 250 \\
        --cache_latents

Layout (the ``imagefolder`` layout of datasets, so ``load_dataset("imagefolder", data_dir=...)``
reads it): ``images/000000.png``, ``metadata.jsonl`` (file_name, label, index), ``bank_config.json``
(the settings) and, with ``--cache_latents``, ``latents.safetensors`` (VAE mean and log-variance of
each image and of its mirror image).

Resumable: image ``i`` depends only on the settings and its batch (always sampled whole, so
``num_images`` does not change it), every PNG is written atomically before its metadata line, and a
restart continues from the first image without one; an interrupted or extended build therefore
ends with exactly the images of an uninterrupted one. The settings are locked once the first image
is listed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_tuning.diffusion.knowledge_bank import BANK_CONFIG, BANK_LATENTS, BANK_METADATA, read_bank_metadata
from hf_tuning.diffusion.sampling import SAMPLERS
from hf_tuning.io import atomic_output, atomic_write_json, read_json

__all__ = ["KnowledgeBankArguments", "KnowledgeBankError", "bank_labels", "build_knowledge_bank", "cache_bank_latents"]

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
# settings that decide what image i is; a resumed build must use the same ones
_IDENTITY = (
    "format_version",
    "source_classes",
    "guidance_scale",
    "cfg_channels",
    "num_inference_steps",
    "sampler",
    "seed",
    "batch_size",
    "model",
    "vae",
)


class KnowledgeBankError(ValueError):
    """A bank folder that cannot be built into or read as asked."""


@dataclass
class KnowledgeBankArguments:
    """How many samples, of which classes, made how."""

    output_dir: str = field(default="", metadata={"help": "Bank folder (created; an interrupted build resumes)."})
    num_images: int = field(default=10000, metadata={"help": "Images in the bank (a larger number extends it)."})
    source_classes: int | None = field(
        default=None,
        metadata={"help": "Labels are spread evenly over classes 0..N-1 (default: every class of the label table)."},
    )
    guidance_scale: float = field(default=1.5, metadata={"help": "Classifier-free guidance (DiT's FID setting 1.5)."})
    cfg_channels: int = field(default=3, metadata={"help": "Latent channels guided (DiT: the first 3)."})
    num_inference_steps: int = field(default=250, metadata={"help": "Sampling steps (DiT: 250 DDPM)."})
    sampler: str = field(default="ddpm", metadata={"help": "ddpm (learned variance) or ddim.", "choices": SAMPLERS})
    seed: int = field(default=0, metadata={"help": "Seed of the labels and of every batch's noise."})
    batch_size: int = field(default=32, metadata={"help": "Images sampled at once (part of the seed scheme)."})
    cache_latents: bool = field(
        default=False, metadata={"help": "Also store the VAE moments of every image (latents.safetensors)."}
    )

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise KnowledgeBankError("output_dir is required")
        if self.num_images < 1 or self.batch_size < 1 or self.num_inference_steps < 1:
            raise KnowledgeBankError("num_images, batch_size and num_inference_steps must be positive")
        if self.cfg_channels < 1:
            raise KnowledgeBankError(f"cfg_channels must be >= 1, got {self.cfg_channels}")
        if self.sampler not in SAMPLERS:
            raise KnowledgeBankError(f"sampler={self.sampler!r} is not one of {', '.join(SAMPLERS)}")


def bank_labels(start: int, stop: int, num_classes: int, seed: int) -> list[int]:
    """Labels of images ``start..stop-1``: each run of ``num_classes`` images covers every class once,
    in a seeded order, so any prefix of the bank is as balanced as it can be."""
    labels = []
    for index in range(start, stop):
        round_, position = divmod(index, num_classes)
        order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed * 7919 + round_))
        labels.append(int(order[position]))
    return labels


def _check_existing(root: Path, settings: dict[str, Any]) -> int:
    """Images already built (0 for a new bank); other settings in a bank with images are an error.

    A bank with no listed image yet (a first attempt that failed before finishing a batch) takes the
    new settings: its unlisted PNGs are overwritten."""
    config_path = root / BANK_CONFIG
    if not config_path.is_file():
        if root.is_dir() and any(root.iterdir()):
            raise KnowledgeBankError(
                f"{root}: exists without {BANK_CONFIG}, so it is not a knowledge bank built here; choose another "
                "output_dir or remove the folder"
            )
        return 0
    recorded = read_json(config_path)
    rows = read_bank_metadata(root)
    if not rows:
        return 0
    differences = [
        f"{key}: {recorded.get(key)!r} there, {settings[key]!r} asked"
        for key in _IDENTITY
        if recorded.get(key) != settings[key]
    ]
    if differences:
        raise KnowledgeBankError(
            f"{config_path}: a bank made with other settings is there ({'; '.join(differences)}); resume with the "
            "same settings, or choose another output_dir"
        )
    for expected, row in enumerate(rows):
        if row.get("index") != expected:
            raise KnowledgeBankError(
                f"{root / BANK_METADATA}: line {expected + 1} is image {row.get('index')}, "
                f"expected {expected}; the file was edited"
            )
    return len(rows)


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _drop_torn_line(path: Path, complete: int) -> None:
    """Rewrite metadata.jsonl with its complete lines when the last one was cut off mid-write."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip()][:complete]
    if len(kept) != len(lines) or (lines and not lines[-1].endswith("\n")):
        with atomic_output(path) as tmp:
            tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept), encoding="utf-8")


def _vae_identity(vae: torch.nn.Module | None) -> str | None:
    """What the bank records of the VAE: None (pixel space), else where it came from (or its class)."""
    if vae is None:
        return None
    config = getattr(vae, "config", None)
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if not name:
        return type(vae).__name__
    name = str(name)
    return os.path.abspath(os.path.expanduser(name)) if os.path.isdir(os.path.expanduser(name)) else name


def build_knowledge_bank(
    transformer: torch.nn.Module,
    args: KnowledgeBankArguments,
    *,
    vae: torch.nn.Module | None = None,
    model_name: str = "",
    device: str | torch.device = "cpu",
    stop_after: int | None = None,
) -> Path:
    """Sample the bank into ``args.output_dir``; returns the folder. ``stop_after`` ends the build
    after that many new images (to test resumption)."""
    from hf_tuning.diffusion.loading import null_class_of, vae_downscale
    from hf_tuning.diffusion.sampling import sample_dit, to_pil_image

    root = Path(os.path.abspath(os.path.expanduser(args.output_dir)))
    null_class = null_class_of(transformer)
    source_classes = null_class if args.source_classes is None else args.source_classes
    if not 1 <= source_classes <= null_class:
        raise KnowledgeBankError(
            f"source_classes={source_classes} does not fit the label table (classes 0..{null_class - 1}, null "
            f"{null_class})"
        )
    if args.cache_latents and vae is None:
        raise KnowledgeBankError("cache_latents needs a VAE; a pixel-space DiT trains on the images themselves")
    settings = {key: value for key, value in asdict(args).items() if key not in ("output_dir", "num_images")}
    settings.update(
        format_version=FORMAT_VERSION, source_classes=source_classes, model=model_name, vae=_vae_identity(vae)
    )
    done = _check_existing(root, settings)
    # the settings first: a folder holding anything else is not taken for a bank on the next run
    atomic_write_json(
        root / BANK_CONFIG, {**settings, "num_images": max(args.num_images, done), "null_class": null_class}
    )
    (root / "images").mkdir(parents=True, exist_ok=True)
    _drop_torn_line(root / BANK_METADATA, done)
    transformer = transformer.to(device)
    if vae is not None:
        vae = vae.to(device)
    written = 0
    first_batch = done // args.batch_size
    for batch in range(first_batch, -(-args.num_images // args.batch_size)):
        start, stop = batch * args.batch_size, min((batch + 1) * args.batch_size, args.num_images)
        if stop <= done:
            continue
        # the whole batch is sampled even past num_images, so its noise (and so every image) does not
        # depend on num_images: extending the bank later gives the images a larger build would have
        labels = bank_labels(start, start + args.batch_size, source_classes, args.seed)
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + batch)
        images = sample_dit(
            transformer,
            torch.tensor(labels, device=device),
            null_class=null_class,
            guidance_scale=args.guidance_scale,
            cfg_channels=args.cfg_channels,
            num_inference_steps=args.num_inference_steps,
            sampler=args.sampler,
            generator=generator,
            vae=vae,
            batch_size=args.batch_size,
        )
        rows = []
        for offset, (image, label) in enumerate(zip(images, labels, strict=True)):
            index = start + offset
            if index < done or index >= stop:
                continue
            name = f"images/{index:06d}.png"
            with atomic_output(root / name) as tmp:
                to_pil_image(image).save(tmp, format="PNG")
            rows.append({"file_name": name, "label": label, "index": index})
        _append_rows(root / BANK_METADATA, rows)
        done += len(rows)
        written += len(rows)
        logger.info("knowledge bank: %d/%d images", done, args.num_images)
        if stop_after is not None and written >= stop_after:
            return root
    if args.cache_latents:
        side = transformer.config.sample_size * vae_downscale(vae)  # the size the VAE decoded to
        cache_bank_latents(root, vae, image_size=side, channels=3, device=device)
    return root


@torch.no_grad()
def cache_bank_latents(
    bank_dir: str | os.PathLike,
    vae: torch.nn.Module,
    *,
    image_size: int,
    channels: int = 3,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> Path:
    """Write ``latents.safetensors``: the VAE moments (mean, log-variance) of every bank image and of
    its mirror image, in metadata order. Training samples a fresh latent from them each time."""
    from safetensors.torch import save_file

    from hf_tuning.diffusion.knowledge_bank import KnowledgeBank

    root = Path(bank_dir)
    bank = KnowledgeBank(root, image_size=image_size, channels=channels, random_flip=False, use_cached_latents=False)
    vae = vae.to(device).eval()
    moments, flipped = [], []
    for start in range(0, len(bank), batch_size):
        pixels = torch.stack([bank[i]["pixel_values"] for i in range(start, min(start + batch_size, len(bank)))])
        pixels = pixels.to(device, dtype=vae.dtype)
        moments.append(vae.encode(pixels).latent_dist.parameters.float().cpu())
        flipped.append(vae.encode(torch.flip(pixels, dims=[-1])).latent_dist.parameters.float().cpu())
    tensors = {"moments": torch.cat(moments).contiguous(), "moments_flipped": torch.cat(flipped).contiguous()}
    path = root / BANK_LATENTS
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"count": str(len(bank)), "image_size": str(image_size)})
    return path


def _model_name(model_args: Any) -> str:
    """The recorded model: a local folder as an absolute path (so a resume from elsewhere matches) plus
    the subfolder (transformer and transformer_ema are different models)."""
    source = model_args.model_name_or_path
    if os.path.isdir(os.path.expanduser(source)):
        source = os.path.abspath(os.path.expanduser(source))
    return f"{source}:{model_args.subfolder}" if model_args.subfolder else source


def main(argv: list[str] | None = None) -> Path:
    from transformers import HfArgumentParser

    from hf_tuning.diffusion.loading import DiTModelArguments, load_dit, load_vae

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser((DiTModelArguments, KnowledgeBankArguments))
    model_args, bank_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.model_name_or_path is None:
        raise KnowledgeBankError("model_name_or_path is required: the bank samples the pretrained model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = load_dit(model_args)
    vae = load_vae(model_args)
    root = build_knowledge_bank(transformer, bank_args, vae=vae, model_name=_model_name(model_args), device=device)
    print(f"knowledge bank: {root} ({len(read_bank_metadata(root))} images)")
    return root


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
