"""Import the repository's scripts in tests: recipes by path (a folder of scripts, not a package), benchmark
scripts as modules of the ``benchmarks`` package (the repository root is on ``sys.path`` under pytest)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.helpers import REPO_ROOT

RECIPES = REPO_ROOT / "recipes"


@functools.cache
def load_recipe(filename: str) -> ModuleType:
    """``recipes/<filename>`` as a module, executed once per test session."""
    spec = importlib.util.spec_from_file_location(f"recipe_{Path(filename).stem}", RECIPES / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``benchmarks.<name>``."""
    return importlib.import_module(f"benchmarks.{name}")
