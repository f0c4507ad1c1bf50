"""Every test runs offline; the ``fake_hub`` fixture points the Hugging Face clients at a loopback Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers.fake_hub import fake_hub  # noqa: E402, F401
