"""Import a recipe script (``recipes/*.py``) as a module, once per test session."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@functools.cache
def load_recipe(filename: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"recipe_{Path(filename).stem}", RECIPES / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
