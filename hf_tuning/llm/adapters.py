"""Finished adapters of a causal LM: recognise the folder, attach it to a base model, take it off again.

A recipe run leaves a PEFT folder (LoRA) or a :mod:`hf_tuning.tuners` folder (SNELL, SNELLA: its
``adapter_config.json`` names a ``method``). Evaluation, merging and chatting all start from such a folder,
so the rules for reading one live here once: :func:`check_adapter_dir` fails before any weights load,
:func:`attach_adapter` loads it onto a base model, :func:`tuned_model` attaches it for the length of a
``with`` block, and :func:`adapter_tokenizer` returns the tokenizer saved next to it, which carries the
training chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_tuning.io import read_json
from hf_tuning.llm.tuning import METHOD_MODES

__all__ = [
    "ADAPTER_CONFIG",
    "adapter_base_model",
    "adapter_method",
    "adapter_tokenizer",
    "attach_adapter",
    "check_adapter_dir",
    "detach_adapter",
    "plain_layers_back",
    "tuned_model",
]

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """An adapter is a local folder with adapter_config.json for a causal LM; say so before any model work."""
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {str(path)!r} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no adapter_config.json: pass the folder a PEFT or hf_tuning.tuners adapter was "
            "saved to (trainer.save_model() / model.save_pretrained())"
        )
    method = adapter_method(path)
    if method is not None and method not in METHOD_MODES:
        raise ValueError(
            f"{str(path)!r} holds a {method!r} adapter (hf_tuning.tuners), which does not attach to a causal LM; "
            f"expected a PEFT adapter or one of {', '.join(METHOD_MODES)}"
        )
    return path


def adapter_method(adapter_dir: str | Path) -> str | None:
    """The :mod:`hf_tuning.tuners` method of an adapter folder (``method`` in adapter_config.json); ``None`` for
    a PEFT adapter."""
    method = read_json(Path(adapter_dir) / ADAPTER_CONFIG).get("method")
    return str(method) if method else None


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """The base model the adapter records (``base_model_name_or_path``), if any."""
    base = read_json(Path(adapter_dir) / ADAPTER_CONFIG).get("base_model_name_or_path")
    return str(base) if base else None


def attach_adapter(base_model: Any, adapter_dir: str | Path) -> Any:
    """``base_model`` with the adapter loaded on it (a ``PeftModel`` or a :class:`hf_tuning.tuners.PetlModel`)."""
    adapter = check_adapter_dir(adapter_dir)
    if adapter_method(adapter) is None:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(adapter))
    from hf_tuning.tuners import load_petl_model

    return load_petl_model(base_model, adapter)


def detach_adapter(tuned: Any) -> Any:
    """Undo :func:`attach_adapter` on an unmerged model; returns the plain base model with its own layers."""
    if hasattr(tuned, "unload") and not hasattr(tuned, "snell_layers"):
        return tuned.unload()  # PEFT: removes the LoRA layers and gives back the base
    tuned.unmerge()
    return plain_layers_back(tuned)


def plain_layers_back(tuned: Any) -> Any:
    """The base model of a :mod:`hf_tuning.tuners` SNELL model with every adapted layer's own ``nn.Linear`` put
    back: after ``unmerge()`` the original model, after ``merge()`` a stock model that holds the merged weights."""
    base = tuned.get_base_model()
    for name, layer in tuned.snell_layers().items():
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, layer.base_layer)
    return base


@contextlib.contextmanager
def tuned_model(base_model: Any, adapter_dir: str | Path, *, merge: bool = False) -> Iterator[Any]:
    """``base_model`` with the adapter attached while the block runs; afterwards the caller has its plain base back.

    With ``merge`` the adapter is folded into the weights first (generation then costs what the base costs) and
    taken out again at the end: the base weights come back up to float rounding (unmerged, they are untouched).
    """
    tuned = attach_adapter(base_model, adapter_dir)
    is_peft = adapter_method(adapter_dir) is None
    try:
        if merge:
            tuned.merge_adapter() if is_peft else tuned.merge()
        yield tuned
    finally:
        if merge:
            tuned.unmerge_adapter() if is_peft else tuned.unmerge()
        detach_adapter(tuned)


def adapter_tokenizer(adapter_dir: str | Path, *, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer saved next to the adapter (it carries the training chat template), or ``None`` if the folder
    has none."""
    path = Path(adapter_dir)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
