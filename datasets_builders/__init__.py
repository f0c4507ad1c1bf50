"""Dataset builders (instruction data, image folders, VTAB/FGVC); see the README of each issue.

Names are exported lazily, so ``import datasets_builders`` stays light (no ``datasets``, no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "instruction_formats": (
        "BadRowsError",
        "BuildReport",
        "DataSourceNotFoundError",
        "EmptyDatasetError",
        "FormatError",
        "build_instruction_dataset",
        "detect_format",
        "read_source",
    ),
    "agrimachine": (
        "DEFAULT_SYSTEM_PROMPT",
        "SAMPLE_PATH",
        "AgriMachineDataArguments",
        "build_agrimachine_dataset",
        "push_dataset",
        "save_dataset",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the defining submodule on first use of one of its names."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
