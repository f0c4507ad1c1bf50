"""Restoring, on resume, the weights a DeepSpeed checkpoint does not hold: every PEFT parameter name, in chunks."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_tuning.deepspeed_resume import chunked, restore_frozen_weights, saved_key
from tests.helpers.tiny import tiny_llama


def test_saved_keys_drop_the_adapter_name_wherever_it_stands():
    assert saved_key("m.q_proj.lora_A.default.weight", ["default"]) == "m.q_proj.lora_A.weight"
    assert saved_key("m.embed_tokens.lora_embedding_A.default", ["default"]) == "m.embed_tokens.lora_embedding_A"
    assert saved_key("m.default_head.weight", ["default"]) == "m.default_head.weight"  # only whole path parts
    assert saved_key("m.score.modules_to_save.default.weight", ["default"]) == "m.score.weight"


def test_chunks_stay_within_the_byte_limit():
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate([10, 10, 30, 5, 5])]
    groups = [[name for name, _ in group] for group in chunked(params, max_bytes=20 * 4)]
    assert groups == [["p0", "p1"], ["p2"], ["p3", "p4"]]  # p2 alone exceeds the limit: a group of its own


def lora_with_embeddings():
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["norm"]
    )
    return get_peft_model(tiny_llama(layers=2), config)


@pytest.mark.parametrize("max_bytes", [1 << 30, 64], ids=["one-chunk", "many-chunks"])
def test_restore_brings_back_every_adapter_parameter(tmp_path, max_bytes):
    model = lora_with_embeddings()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    model.save_pretrained(tmp_path)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(name.endswith("lora_embedding_A.default") for name in saved)  # a name that is not `...default.x`
    assert any(".modules_to_save.default." in name for name in saved)  # saved under the module's own name
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.zero_()
    assert restore_frozen_weights(model, tmp_path, set(saved), max_bytes=max_bytes) == len(saved)
    for name, param in model.named_parameters():
        if name in saved:
            assert torch.equal(param, saved[name]), name


def test_missing_weights_are_reported_before_anything_changes(tmp_path):
    model = lora_with_embeddings()
    model.save_pretrained(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {n for n in before if "lora_" in n} | {"base_model.model.model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="not saved there.*stage3_gather_16bit_weights_on_model_save"):
        restore_frozen_weights(model, tmp_path, names)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
