"""File input and output shared by every layer: atomic writes (a reader never sees a half-written file
or folder), JSON, and image files (which files count as images, reading one with a clear error)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataError",
    "atomic_directory",
    "atomic_output",
    "atomic_write_json",
    "atomic_write_text",
    "is_image_file",
    "list_image_files",
    "read_image",
    "read_json",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageDataError(ValueError):
    """Image data that cannot be used as given; the message names the file (and line) and what is expected."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; it becomes ``path`` only if the block succeeds, so a
    reader sees the old folder or the complete new one, never a partial one.

    ``overwrite=False`` keeps a non-empty folder that appeared at ``path`` meanwhile (another process
    finished the same work first) and raises :class:`FileExistsError` instead of replacing it; an empty
    folder is replaced either way.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    retired = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        yield staging
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{path} was written by someone else meanwhile; it was left as it is")
            os.replace(path, retired)
        os.replace(staging, path)  # onto an empty folder, or onto nothing
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_image_file(name: str) -> bool:
    """An image by its extension (case-insensitive); hidden files never are."""
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Image files anywhere below ``folder`` (as torchvision's ImageFolder finds them, hidden folders
    skipped), as absolute paths in a stable sorted order."""
    found: list[str] = []
    for current, dirs, files in os.walk(os.path.abspath(folder), followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(current, name) for name in sorted(files) if is_image_file(name))
    return found


def read_image(path: str | os.PathLike, mode: str = "RGB", *, context: str = "") -> Image.Image:
    """Decode ``path`` into a PIL image of ``mode``; a file PIL cannot read raises :class:`ImageDataError`
    naming it (``context`` says where it came from, e.g. which sample of which split)."""
    from PIL import Image

    try:
        with Image.open(path) as handle:
            return handle.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        where = f" ({context})" if context else ""
        raise ImageDataError(f"{path}: cannot open image{where}: {exc}; expected a readable image file") from exc
