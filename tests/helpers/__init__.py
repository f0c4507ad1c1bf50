"""Helpers shared by the tests: tiny models and tokenizers built from configs, the loopback Hub, real
pretrained artefacts available offline, parameter snapshots of staged runs, and script loaders."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "tests" / "data"


def script_env(**extra: str) -> dict[str, str]:
    """Environment for a test's subprocess: offline, and the repository importable (``tests.helpers``
    included) without the script editing ``sys.path``."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}
