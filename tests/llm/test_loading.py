"""Model sources (Hub id, folder, GGUF file, package://), GGUF caching, and precision chosen for the hardware."""

from __future__ import annotations

import pytest
import torch

from hf_tuning.llm.loading import (
    ModelNotFoundError,
    gguf_cache_dir,
    load_causal_lm,
    load_config,
    resolve_model_source,
)
from hf_tuning.llm.sft import StagedSFTConfig
from hf_tuning.precision import resolve_mixed_precision
from tests.helpers.real_models import SMOLLM2, requires_smollm2
from tests.helpers.tiny import tiny_llama


def test_sources(tmp_path):
    tiny_llama(layers=2).save_pretrained(tmp_path / "model")
    assert resolve_model_source(str(tmp_path / "model")).kind == "local"
    assert resolve_model_source("meta-llama/Llama-3.1-8B-Instruct").kind == "hub"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    gguf = resolve_model_source(str(tmp_path / "m.gguf"))
    assert (gguf.kind, gguf.path, gguf.gguf_file) == ("gguf", str(tmp_path), "m.gguf")
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="package 'no_such_package_xyz' is not installed"):
        resolve_model_source("package://no_such_package_xyz/model.gguf")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        (tmp_path / "weights.bin").write_bytes(b"x")
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_unknown_hub_model_is_a_clear_error(monkeypatch):
    with pytest.raises(ModelNotFoundError, match="model 'no-such-org/no-such-model' is not a local folder or file"):
        load_causal_lm("no-such-org/no-such-model")  # offline (tests/conftest.py): the cache is all there is
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set, so the Hub was not asked"):
        load_config("no-such-org/no-such-model")


@requires_smollm2
def test_gguf_is_converted_once_into_a_cache(tmp_path, monkeypatch):
    first = load_causal_lm(SMOLLM2, dtype="float32")
    cached = [p for p in gguf_cache_dir().iterdir() if p.name.startswith("SmolLM2-135M-Instruct")]
    assert cached and all((p / "model.safetensors").is_file() for p in cached)
    assert type(first).__name__ == "LlamaForCausalLM" and first.config.num_hidden_layers == 30
    assert not hasattr(first.config, "quantization_config")  # a plain model: it can be saved and trained
    first.save_pretrained(tmp_path / "saved")  # the GGUF-loaded original cannot be saved; the cached copy can


def test_precision_follows_the_hardware(monkeypatch):
    assert resolve_mixed_precision(use_cpu=True) == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision() == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision() == "fp16"
    assert resolve_mixed_precision(use_cpu=True) == "no"


def test_staged_sft_config_does_not_force_bf16_on_cpu(tmp_path):
    args = StagedSFTConfig(output_dir=str(tmp_path), report_to="none")
    assert (args.bf16, args.fp16) == (False, False)  # TRL's own default (bf16=True) fails on a CPU
    explicit = StagedSFTConfig(output_dir=str(tmp_path), report_to="none", bf16=True, use_cpu=True)
    assert explicit.bf16
