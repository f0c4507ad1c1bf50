"""Reading the chain-of-forgetting knowledge bank and drawing its share of every batch.

A knowledge bank is a folder of samples of the pretrained model: one written by
``python -m datasets_builders.knowledge_bank`` (``metadata.jsonl`` in the ``imagefolder`` layout,
``bank_config.json``, optionally ``latents.safetensors``) or any folder of images, like the reference
code's ``pretrained_images/``. Bank draws are addressed by position in an endless seeded stream, so a
resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from hf_tuning.diffusion.transforms import build_diffusion_transform
from hf_tuning.io import IMAGE_EXTENSIONS, ImageDataError, list_image_files, read_image

__all__ = [
    "BANK_CONFIG",
    "BANK_LATENTS",
    "BANK_METADATA",
    "KnowledgeBank",
    "bank_batch_size",
    "bank_indices",
    "read_bank_metadata",
]

BANK_CONFIG = "bank_config.json"
BANK_METADATA = "metadata.jsonl"
BANK_LATENTS = "latents.safetensors"


def read_bank_metadata(bank_dir: Path) -> list[dict[str, Any]]:
    """The complete rows of ``metadata.jsonl``; a torn last line (an interrupted build) is dropped."""
    path = bank_dir / BANK_METADATA
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the build stopped while writing this line
            raise ImageDataError(f"{path}:{number}: not a JSON object; expected one bank image per line") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise ImageDataError(f"{path}:{number}: expected an object with a file_name, got {line[:80]!r}")
        rows.append(row)
    return rows


class KnowledgeBank(torch.utils.data.Dataset):
    """Samples of the pretrained model that the retention term replays, always with the null label.

    Items are ``{"pixel_values": tensor}`` or, with cached latents, ``{"latent_moments": tensor}``
    (the VAE's mean and log-variance, of the image or of its mirror image, so a fresh latent is
    still sampled every time, as when encoding on the fly).
    """

    def __init__(
        self,
        bank_dir: str | os.PathLike,
        *,
        image_size: int,
        channels: int = 3,
        random_flip: bool = True,
        use_cached_latents: bool = True,
    ) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(bank_dir))))
        if not self.root.is_dir():
            raise ImageDataError(f"{self.root}: knowledge bank folder does not exist")
        rows = read_bank_metadata(self.root)
        if (self.root / BANK_METADATA).is_file() or (self.root / BANK_CONFIG).is_file():
            # a bank built here: only listed images count (a build writes PNGs before their lines)
            if not rows:
                raise ImageDataError(
                    f"{self.root}: a knowledge bank with no complete image in {BANK_METADATA} (an interrupted "
                    "build?); resume it with `python -m datasets_builders.knowledge_bank` and the same settings"
                )
            paths = [str(self.root / row["file_name"]) for row in rows]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise ImageDataError(
                    f"{self.root / BANK_METADATA}: {len(missing)} listed image(s) are missing, e.g. {missing[0]}"
                )
        else:
            paths = list_image_files(self.root)
        if not paths:
            raise ImageDataError(
                f"{self.root}: the knowledge bank has no images ({' '.join(IMAGE_EXTENSIONS)}); build one with "
                "`python -m datasets_builders.knowledge_bank` or point bank_dir at a folder of samples"
            )
        self.rows = rows
        self.paths = paths
        self.random_flip = random_flip
        self.latents: dict[str, torch.Tensor] | None = None
        latents_path = self.root / BANK_LATENTS
        if use_cached_latents and latents_path.is_file():
            from safetensors.torch import load_file

            latents = load_file(str(latents_path))
            if "moments" not in latents:
                raise ImageDataError(
                    f"{latents_path}: no 'moments' tensor (found {', '.join(sorted(latents)) or 'none'}); expected "
                    "the file cache_bank_latents writes"
                )
            for key in ("moments", "moments_flipped"):
                if key in latents and latents[key].shape[0] != len(paths):
                    raise ImageDataError(
                        f"{latents_path}: {key!r} holds latents of {latents[key].shape[0]} images but the bank "
                        f"lists {len(paths)}; rebuild it (python -m datasets_builders.knowledge_bank --cache_latents "
                        "...)"
                    )
            self.latents = latents
        self.transform = build_diffusion_transform(image_size, channels, random_flip)

    @property
    def has_latents(self) -> bool:
        return self.latents is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.latents is not None:
            flipped = self.random_flip and "moments_flipped" in self.latents and bool(torch.rand(()) < 0.5)
            return {"latent_moments": self.latents["moments_flipped" if flipped else "moments"][index]}
        image = read_image(self.paths[index], context=f"sample {index} of the knowledge bank {self.root}")
        return {"pixel_values": self.transform(image)}

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        items = [self[i] for i in indices]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def bank_indices(position: int, count: int, size: int, seed: int) -> list[int]:
    """``count`` bank indices starting at draw ``position`` of an endless shuffled stream.

    The stream is a fresh seeded permutation per pass over the bank (a drop-last shuffled loader
    restarted when exhausted, as in the reference), addressed by position, so a resumed run draws
    exactly what the uninterrupted run would have, with no iterator state to save.
    """
    if size < 1:
        raise ValueError(f"cannot draw from an empty bank (size={size})")
    if position < 0 or count < 0:
        raise ValueError(f"position and count must be >= 0, got {position} and {count}")
    indices: list[int] = []
    cursor = position
    while len(indices) < count:
        epoch, offset = divmod(cursor, size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(size, generator=generator)
        take = min(count - len(indices), size - offset)
        indices.extend(order[offset : offset + take].tolist())
        cursor += take
    return indices


def bank_batch_size(total: int, fraction: float) -> int:
    """Bank samples in a batch of ``total``: ``int(total * fraction)``, as the reference (6 of 32)."""
    return int(math.floor(total * fraction + 1e-9))
