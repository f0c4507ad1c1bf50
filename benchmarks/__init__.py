"""Benchmarks and experiments: run from the repository root as modules, e.g. ``python -m benchmarks.bench_engine``.

Everything here runs offline: the defaults are set when the package is imported, before any module of it
imports ``huggingface_hub`` (which reads ``HF_HUB_OFFLINE`` once, at import).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
