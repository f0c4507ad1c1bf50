"""Fréchet distance (FID) and k-NN precision/recall between two image sets, with pluggable feature extractors.

FID compares Gaussians fitted to feature vectors of real and generated images. The number is only comparable
between runs that use the same extractor, the same preprocessing and similar sample counts, so every result
names its extractor and counts. Three kinds of extractor load from disk (see :func:`load_feature_extractor`):

* ``torchscript`` / ``inception_torchscript``: a TorchScript file, e.g. the Inception-2015-12-05 network used by
  StyleGAN and clean-fid (uint8-range 299x299 input, ``return_features=True``). Its preprocessing comes from the
  kind, or from a sidecar JSON ``<file>.json`` (keys in :data:`SIDECAR_KEYS`).
* ``inception_v3``: a torchvision Inception-v3 state dict (``.pth``/``.pt`` read with ``weights_only=True``, or
  ``.safetensors``); the 2048-d pool features at 299 px with ImageNet normalisation.
* ``digits_cnn``: a folder written by :mod:`eval.digits_classifier` (``feature_extractor.json`` +
  ``model.safetensors``), for offline experiments on scikit-learn's 8x8 digits.

Nothing is ever unpickled: state dicts load with safetensors or ``torch.load(..., weights_only=True)``.
Images are resized here with torch's bilinear filter (antialiased when shrinking), not with the PIL bicubic
resize of clean-fid, so Inception numbers are comparable between runs of this module, not to published FIDs.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hf_tuning.io import IMAGE_EXTENSIONS, read_image
from hf_tuning.io import list_image_files as _image_files_below

__all__ = [
    "ACCEPTED_KINDS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "SIDECAR_KEYS",
    "FeatureExtractor",
    "compute_fid",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "iter_image_folder",
    "list_image_files",
    "load_feature_extractor",
    "load_image_folder",
    "precision_recall",
    "prepare_images",
]

KINDS = ("digits_cnn", "inception_v3", "inception_torchscript", "torchscript")
ACCEPTED_KINDS = (
    "accepted: a TorchScript file (kind 'torchscript', or 'inception_torchscript' for the StyleGAN/clean-fid "
    "Inception), a torchvision Inception-v3 state dict .pth/.pt/.safetensors (kind 'inception_v3'), or a "
    "digits classifier folder with feature_extractor.json + model.safetensors (kind 'digits_cnn')"
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIDECAR_KEYS = ("name", "input_size", "input_range", "channels", "mean", "std", "feature_dim")
DIGITS_CONFIG = "feature_extractor.json"
DIGITS_WEIGHTS = "model.safetensors"
INCEPTION_SIZE = 299
# Keys that only a torchvision Inception-v3 has; the classifier head (fc.*) is optional and dropped.
_INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight")


# --------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N-1) covariance in float64, since FID subtracts large, nearly equal traces."""
    array = np.asarray(features)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"features must be a 2-D array (samples, dim) with at least 2 rows, got shape {array.shape}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"features of shape {array.shape} contain NaN or infinite values")
    mu = array.mean(axis=0)
    centred = array - mu
    sigma = centred.T @ centred / (array.shape[0] - 1)
    return mu, sigma


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; eigenvalues below zero are rounding noise and are clipped."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), squared Fréchet distance of two Gaussians.

    tr((S1 S2)^1/2) equals tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is symmetric PSD, so two ``eigh`` calls
    give it exactly in float64; the general ``sqrtm`` of the non-symmetric S1 S2 can return complex noise.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be 1-D of the same length, got shapes {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must have shape {(dim, dim)} to match the means, got {sigma.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or infinite values")
    root1 = _symmetric_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)
    return max(value, 0.0)  # a tiny negative is rounding; the distance of PSD covariances is >= 0


def _squared_distances(a: np.ndarray, b: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
    a_norms = np.einsum("ij,ij->i", a, a)
    return np.clip(a_norms[:, None] + b_norms[None, :] - 2.0 * (a @ b.T), 0.0, None)


def _chunk_rows(other_rows: int, max_elements: int) -> int:
    return max(1, max_elements // max(other_rows, 1))


def _kth_neighbour_radii(points: np.ndarray, k: int, max_elements: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point (index 0 after sorting is itself)."""
    norms = np.einsum("ij,ij->i", points, points)
    radii = np.empty(points.shape[0])
    step = _chunk_rows(points.shape[0], max_elements)
    for start in range(0, points.shape[0], step):
        block = _squared_distances(points[start : start + step], points, norms)
        radii[start : start + step] = np.partition(block, k, axis=1)[:, k]
    return radii


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, max_elements: int) -> float:
    """Fraction of queries inside at least one support point's k-NN ball."""
    norms = np.einsum("ij,ij->i", support, support)
    inside = 0
    step = _chunk_rows(support.shape[0], max_elements)
    for start in range(0, queries.shape[0], step):
        block = _squared_distances(queries[start : start + step], support, norms)
        inside += int(np.count_nonzero(np.any(block <= radii[None, :], axis=1)))
    return inside / queries.shape[0]


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, *, max_elements: int = 1 << 24
) -> dict[str, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): each set's manifold is the union of k-NN balls.

    Precision is the share of fake samples inside the real manifold (fidelity), recall the share of real
    samples inside the fake one (coverage). Distances are computed in row blocks of at most ``max_elements``
    entries (128 MiB in float64 by default), so memory stays bounded for 50k samples.
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be 2-D with the same feature dim, got {real.shape} and {fake.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    smallest = min(real.shape[0], fake.shape[0])
    if smallest <= k:
        raise ValueError(f"k={k} needs more than k samples in each set, got {real.shape[0]} real, {fake.shape[0]} fake")
    real_radii = _kth_neighbour_radii(real, k, max_elements)
    fake_radii = _kth_neighbour_radii(fake, k, max_elements)
    return {
        "precision": _coverage(fake, real, real_radii, max_elements),
        "recall": _coverage(real, fake, fake_radii, max_elements),
    }


# --------------------------------------------------------------------------- feature extractors


def prepare_images(images: torch.Tensor, channels: int, size: int | None, *, name: str = "images") -> torch.Tensor:
    """Float images in [0, 1] with ``channels`` (1 or 3) channels at ``size`` x ``size`` (None: their own size).

    Integer tensors are read as 0..255, RGBA loses its alpha (no content for these networks), grey is repeated
    to RGB and RGB averaged to grey, and other sizes are resized bilinearly, antialiased when shrinking (so a
    nearest-upscaled export looks like its original): the one input convention of the feature networks here,
    the digits classifier's included. ``name`` prefixes the errors.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{name}: expected images of shape (N, C, H, W), got {shape}")
    x = images.float() / 255.0 if not images.is_floating_point() else images.float()
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name}: images must have 1, 3 or 4 channels, got shape {tuple(images.shape)}")
    if x.shape[1] != channels:
        x = x.expand(-1, 3, -1, -1) if channels == 3 else x.mean(dim=1, keepdim=True)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        shrink = min(x.shape[-2:]) > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


class FeatureExtractor:
    """A feature network plus the preprocessing it was trained with, so callers only pass [0, 1] images.

    ``__call__`` takes float images (N, C, H, W) in [0, 1] (integer tensors are read as 0..255), converts the
    channels (grey is repeated to RGB, RGB averaged to grey), resizes bilinearly to ``input_size`` (with
    antialiasing when shrinking; ``None`` keeps the size), scales to ``input_range``, normalises with
    ``mean``/``std`` when given, and returns float32 features (N, dim) on the CPU.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        name: str,
        dim: int | None,
        input_size: int | None,
        channels: int,
        input_range: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        call_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"{name}: channels must be 1 or 3, got {channels!r}")
        if input_size is not None and (
            isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1
        ):
            raise ValueError(f"{name}: input_size must be a positive integer or None, got {input_size!r}")
        if (mean is None) != (std is None) or (mean is not None and not len(mean) == len(std) == channels):
            raise ValueError(f"{name}: mean and std must both be given with {channels} values each, or neither")
        self.model = model
        self.name = name
        self.input_size = input_size
        self.channels = channels
        self.input_range = float(input_range)
        self.device = torch.device(device)
        self.call_kwargs = dict(call_kwargs or {})
        shape = (1, channels, 1, 1)
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).reshape(shape)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).reshape(shape)
        self.dim = int(dim) if dim is not None else self._probe_dim()

    def _probe_dim(self) -> int:
        """The output width from one pass on blank images, for networks that do not declare it."""
        size = self.input_size or 32
        try:
            return int(self(torch.zeros(2, self.channels, size, size)).shape[1])
        except Exception as exc:  # the network's own error types; the message says what to declare instead
            raise ValueError(
                f"{self.name}: a probe pass on {size}x{size} images failed ({type(exc).__name__}: {exc}); "
                "declare input_size (and feature_dim) in the sidecar JSON"
            ) from None

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(name={self.name!r}, dim={self.dim}, input_size={self.input_size}, "
            f"channels={self.channels}, input_range={self.input_range:g})"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The network's input for [0, 1] images: channels, size, range and normalisation as documented."""
        x = prepare_images(images, self.channels, self.input_size, name=self.name)
        x = x * self.input_range
        if self._mean is not None and self._std is not None:
            x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # To the device first: resizing a batch to 299 px is a large share of the work.
        x = self.preprocess(images.to(self.device))
        with torch.inference_mode():
            output = self.model(x, **self.call_kwargs)
        if isinstance(output, tuple | list):  # some scripted networks return (features, logits)
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.ndim < 1 or output.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: the network returned {type(output).__name__}, not a (N, ...) tensor")
        return output.reshape(output.shape[0], -1).float().cpu()


def _read_sidecar(path: Path) -> dict[str, Any]:
    """Preprocessing overrides from ``<file>.json`` beside a TorchScript file (empty when there is none)."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return {}
    try:
        config = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{sidecar}: cannot read the extractor sidecar: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{sidecar}: expected a JSON object with keys among {list(SIDECAR_KEYS)}")
    unknown = sorted(set(config) - set(SIDECAR_KEYS))
    if unknown:
        raise ValueError(f"{sidecar}: unknown keys {unknown}; accepted keys are {list(SIDECAR_KEYS)}")
    return config


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with ``code/`` and ``constants.pkl``; torch.save zips have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def _load_torchscript(path: Path, kind: str | None, device: torch.device) -> FeatureExtractor:
    with warnings.catch_warnings():  # torch.jit is deprecated for new code, but these files only exist as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # torch raises assorted errors for a bad archive
            raise ValueError(f"{path}: cannot load as TorchScript: {exc}; {ACCEPTED_KINDS}") from None
    module.eval()
    try:
        arguments = [argument.name for argument in module.forward.schema.arguments]
    except (AttributeError, RuntimeError):
        arguments = []
    takes_return_features = "return_features" in arguments
    if kind is None:
        # The StyleGAN/clean-fid Inception is the TorchScript feature network that asks for return_features.
        kind = "inception_torchscript" if takes_return_features else "torchscript"
    if kind == "inception_torchscript":
        defaults: dict[str, Any] = {
            "name": "inception_torchscript",
            "input_size": INCEPTION_SIZE,
            "input_range": 255.0,
            "channels": 3,
        }
    else:
        defaults = {"name": "torchscript", "input_size": None, "input_range": 1.0, "channels": 3}
    config = {**defaults, **_read_sidecar(path)}
    return FeatureExtractor(
        module,
        name=f"{config['name']}:{path.name}",
        dim=config.get("feature_dim"),
        input_size=config["input_size"],
        channels=int(config["channels"]),
        input_range=float(config["input_range"]),
        mean=config.get("mean"),
        std=config.get("std"),
        call_kwargs={"return_features": True} if takes_return_features else None,
        device=device,
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load with weights_only=True (no arbitrary unpickling)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: cannot read as safetensors: {exc}; {ACCEPTED_KINDS}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, corrupt archives, non-torch files
        # torch's own message suggests weights_only=False, which would run arbitrary pickled code: not offered.
        raise ValueError(
            f"{path}: not a TorchScript file or a tensors-only state dict (torch.load with weights_only=True "
            f"failed: {type(exc).__name__}); {ACCEPTED_KINDS}"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds {type(state).__name__}, not a state dict of tensors; {ACCEPTED_KINDS}")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _looks_like_inception(state: Mapping[str, torch.Tensor]) -> bool:
    return all(key in state for key in _INCEPTION_KEYS)


def _load_inception_v3(path: Path, state: dict[str, torch.Tensor], device: torch.device) -> FeatureExtractor:
    """torchvision Inception-v3 with the head removed: 2048-d average-pool features.

    ``transform_input=True`` as torchvision sets for its ImageNet weights (ported from TensorFlow): it maps
    the ImageNet-normalised input back to the [-1, 1] scaling those weights were trained on.
    """
    from torchvision.models import inception_v3

    if not _looks_like_inception(state):
        raise ValueError(
            f"{path}: the state dict lacks Inception-v3 keys such as {_INCEPTION_KEYS[1]!r}; {ACCEPTED_KINDS}"
        )
    has_aux = any(key.startswith("AuxLogits.") for key in state)
    model = inception_v3(weights=None, aux_logits=has_aux, init_weights=False, transform_input=True)
    model.fc = torch.nn.Identity()
    weights = {key: value for key, value in state.items() if not key.startswith("fc.")}
    result = model.load_state_dict(weights, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: does not match torchvision's Inception-v3 (missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]})"
        )
    model.eval().to(device)
    return FeatureExtractor(
        model,
        name=f"inception_v3:{path.name}",
        dim=2048,
        input_size=INCEPTION_SIZE,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device=device,
    )


def _load_digits_folder(path: Path, device: torch.device) -> FeatureExtractor:
    from eval.digits_classifier import load_digits_classifier

    model, config = load_digits_classifier(path, device=device)
    return FeatureExtractor(
        model.features,
        name=f"digits_cnn:{path.name}",
        dim=int(config["feature_dim"]),
        input_size=int(config["image_size"]),
        channels=1,
        device=device,
    )


def load_feature_extractor(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, kind: str | None = None
) -> FeatureExtractor:
    """Load the extractor at ``path``, choosing its kind from ``kind`` or from the file itself.

    A folder is a digits classifier; a ``.safetensors`` file or a weights-only torch file is a torchvision
    Inception-v3 state dict; a TorchScript archive is ``inception_torchscript`` when its forward takes
    ``return_features`` (the StyleGAN/clean-fid network: 299 px, 0..255 input), otherwise ``torchscript``
    ([0, 1] input at the image's own size). A sidecar ``<file>.json`` overrides the TorchScript preprocessing.
    """
    path = Path(os.fspath(path))
    device = torch.device(device)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown feature extractor kind {kind!r}; expected one of {list(KINDS)}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature extractor; {ACCEPTED_KINDS}")
    if path.is_dir():
        if kind not in (None, "digits_cnn") or not (path / DIGITS_CONFIG).is_file():
            raise ValueError(f"{path}: a folder must hold {DIGITS_CONFIG} and {DIGITS_WEIGHTS}; {ACCEPTED_KINDS}")
        return _load_digits_folder(path, device)
    if kind == "digits_cnn":
        raise ValueError(f"{path}: kind 'digits_cnn' is a folder with {DIGITS_CONFIG}, not a file")
    if kind in ("torchscript", "inception_torchscript") or (kind is None and _is_torchscript(path)):
        return _load_torchscript(path, kind, device)
    state = _read_state_dict(path)
    if kind == "inception_v3" or _looks_like_inception(state):
        return _load_inception_v3(path, state, device)
    raise ValueError(f"{path}: unrecognised state dict (keys such as {list(state)[:3]}); {ACCEPTED_KINDS}")


# --------------------------------------------------------------------------- images and features


def list_image_files(path: str | os.PathLike) -> list[Path]:
    """Every image under ``path`` (recursively; the extensions of ``hf_tuning.io.IMAGE_EXTENSIONS``, any case,
    hidden files and folders skipped), in a stable sorted order: the files the data readers would find.

    A missing folder raises ``FileNotFoundError`` and one without images ``ValueError``, both naming it, since an
    empty folder would otherwise surface as an unhelpful statistics error.
    """
    root = Path(os.fspath(path))
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of images")
    files = [Path(file) for file in _image_files_below(root)]
    if not files:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files recursively)")
    return files


def _read_image(path: Path, channels: int) -> np.ndarray:
    """(H, W, C) uint8 pixels; an unreadable file raises ``hf_tuning.io.ImageDataError`` (a ValueError) naming it."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    array = np.asarray(read_image(path, "L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _stack(files: Sequence[Path], channels: int, size: list[tuple[int, int]]) -> torch.Tensor:
    """Images as a float (N, C, H, W) batch in [0, 1]; ``size`` holds the folder's first size for checking."""
    arrays = []
    for file in files:
        array = _read_image(file, channels)
        if not size:
            size.append(array.shape[:2])
        elif array.shape[:2] != size[0]:
            raise ValueError(
                f"{file}: size {array.shape[1]}x{array.shape[0]} differs from the folder's {size[0][1]}x{size[0][0]}"
            )
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def load_image_folder(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """All images under ``path`` as one float tensor (N, C, H, W) in [0, 1]; they must share one size."""
    return _stack(list_image_files(path), channels, [])


def iter_image_folder(path: str | os.PathLike, channels: int, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The folder's images in batches, so a 50k-image folder never sits in memory at once.

    The folder is listed (and an empty one reported) when called, not at the first batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    files = list_image_files(path)
    size: list[tuple[int, int]] = []
    return (_stack(files[start : start + batch_size], channels, size) for start in range(0, len(files), batch_size))


def _batches(images: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        return images.split(batch_size)
    return images


def extract_features(extractor: Any, images_or_loader: Any, batch_size: int = 256) -> np.ndarray:
    """Features (N, dim) as float32 for a tensor/array of images or an iterable of batches.

    A batch may be a tensor or a ``(images, labels)`` pair / ``{"pixel_values": ...}`` dict from a DataLoader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    parts: list[np.ndarray] = []
    for batch in _batches(images_or_loader, batch_size):
        if isinstance(batch, Mapping):
            batch = batch["pixel_values"]
        elif isinstance(batch, tuple | list):
            batch = batch[0]
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        parts.append(extractor(batch).numpy().astype(np.float32, copy=False))
    if not parts:
        raise ValueError("no images to extract features from: the input is empty")
    return np.concatenate(parts)


def compute_fid(
    extractor: Any,
    real_images: Any,
    fake_images: Any,
    *,
    batch_size: int = 256,
    with_precision_recall: bool = False,
    k: int = 3,
) -> dict[str, Any]:
    """FID between two image sets (tensors, arrays or iterables of batches), with counts and extractor name.

    FID is biased upwards for small samples and needs N > dim for a full-rank covariance, so compare numbers
    only at equal sample counts; ``with_precision_recall`` adds the k-NN precision and recall.
    """
    real = extract_features(extractor, real_images, batch_size)
    fake = extract_features(extractor, fake_images, batch_size)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape}, fake {fake.shape}")
    fid = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    result: dict[str, Any] = {
        "fid": fid,
        "num_real": int(real.shape[0]),
        "num_fake": int(fake.shape[0]),
        "feature_dim": int(real.shape[1]),
        "extractor": getattr(extractor, "name", type(extractor).__name__),
    }
    if with_precision_recall:
        result.update(precision_recall(real, fake, k=k))
        result["k"] = k
    return result
