"""Import the repository's scripts in tests, as modules of the ``recipes`` and ``benchmarks`` packages (the
repository root is on ``sys.path`` under pytest)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType


def load_recipe(filename: str) -> ModuleType:
    """``recipes/<filename>`` as the module ``recipes.<name>``."""
    return importlib.import_module(f"recipes.{Path(filename).stem}")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``benchmarks.<name>``."""
    return importlib.import_module(f"benchmarks.{name}")
