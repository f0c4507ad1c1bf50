"""``hf-tuning merge``: the merged folder is a stock transformers model whose logits are the adapter's.

Every logits check compares against the adapter attached *unmerged* to its base (PeftModel / PetlModel), in fp32.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hf_tuning.cli import main
from hf_tuning.io import read_json
from hf_tuning.llm.chat_templates import apply_training_chat_template
from hf_tuning.llm.merge import AdapterMismatchError, merge_adapter
from tests.helpers.fake_hub import FAKE_TOKEN
from tests.helpers.real_models import SMOLLM2, requires_smollm2, smollm2_tokenizer
from tests.helpers.tiny import tiny_llama, tiny_opt
from tests.llm.test_gguf_export import (
    assert_tokenizer_round_trips,
    gguf_alone,
    llama3_style_tokenizer,
    logits_of,
    sample_ids,
    save_tiny_model,
)

MERGE_TOLERANCE = 1e-5


def make_lora_adapter(base: torch.nn.Module, folder: Path, tokenizer=None, *, base_id: str | None = None, **lora):
    """A LoRA adapter with non-zero B (a trained one's output differs from the base's), saved like the recipe saves
    it; returns the PeftModel (unmerged) it was saved from."""
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **lora})
    tuned = get_peft_model(base, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    if base_id is not None:
        tuned.peft_config["default"].base_model_name_or_path = base_id
    tuned.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return tuned.eval()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """(adapter folder, sample ids, the unmerged PeftModel's logits on them)."""
    folder = tmp_path_factory.mktemp("tiny-adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tuned = make_lora_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), folder, tokenizer)
    ids = sample_ids(len(tokenizer))
    return folder, ids, logits_of(tuned, ids)


def test_lora_merge_is_a_stock_model_with_the_adapter_logits(tiny_base, tiny_adapter, tmp_path):
    adapter, ids, expected = tiny_adapter
    assert read_json(adapter / "adapter_config.json")["base_model_name_or_path"] == str(tiny_base)
    result = merge_adapter(adapter, tmp_path / "merged", dtype="float32")  # no --base: the recorded one
    out = result.output_dir
    assert (result.base, result.method, result.tokenizer_source, result.dequantized) == (
        str(tiny_base),
        "lora",
        "adapter",
        False,
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged) is LlamaForCausalLM and not any("lora" in n for n, _ in merged.named_parameters())
    assert set(load_file(out / "model.safetensors")) == set(load_file(tiny_base / "model.safetensors"))
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_base), ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changes the output
    assert (logits_of(merged, ids) - expected).abs().max().item() <= MERGE_TOLERANCE
    # the training template and its stop token travel with the model
    assert (out / "chat_template.jinja").read_text() == (adapter / "chat_template.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = read_json(out / "generation_config.json")
    assert generation["eos_token_id"] == sorted(
        {tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|end_of_text|>")}
    )
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and f"Base model: `{tiny_base}`" in card
    assert "merged into the base weights in float32" in card and "{% generation %}" in card
    assert "base_model:" not in card  # a local path is not a Hub id


def test_snell_adapter_merges_and_leaves_plain_linear_layers(tiny_base, tmp_path, capsys):
    from hf_tuning.tuners import SNELLConfig, get_petl_model

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    petl = get_petl_model(base, SNELLConfig(rank=4, base_model_name_or_path=str(tiny_base)))
    torch.manual_seed(5)
    with torch.no_grad():
        for param in petl.method_parameters():
            param.normal_(0, 0.1)
    petl.eval()
    ids = sample_ids(base.config.vocab_size)
    expected = logits_of(petl, ids)
    adapter = tmp_path / "snell"
    petl.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(adapter)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output_dir", str(out), "--dtype", "float32"]) == 0
    assert f"merged snell adapter into {tiny_base}" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {type(m).__name__ for m in merged.modules()} <= {
        "LlamaForCausalLM", "LlamaModel", "Embedding", "ModuleList", "LlamaDecoderLayer", "LlamaAttention",
        "Linear", "LlamaMLP", "SiLUActivation", "LlamaRMSNorm", "LlamaRotaryEmbedding",
    }  # fmt: skip
    assert set(load_file(out / "model.safetensors")) == set(load_file(tiny_base / "model.safetensors"))
    assert (logits_of(base.__class__.from_pretrained(tiny_base), ids) - expected).abs().max() > 1e-3
    assert (logits_of(merged, ids) - expected).abs().max().item() <= MERGE_TOLERANCE


def test_adapter_for_another_base_is_refused_clearly(tiny_adapter, tmp_path):
    adapter, _, _ = tiny_adapter
    wider = tmp_path / "wider"
    tiny_llama(layers=2, hidden=64, vocab=420).save_pretrained(wider)
    with pytest.raises(
        AdapterMismatchError,
        match=r"mlp.down_proj has input size 64 in the adapter but 128 in .*wider'.*adapter records",
    ):
        merge_adapter(adapter, tmp_path / "out", base=str(wider))
    opt = tmp_path / "opt"
    tiny_opt().save_pretrained(opt)
    with pytest.raises(
        AdapterMismatchError, match=r"weights for 'model.layers.0.mlp.down_proj', which .* \(OPTForCausalLM\) does not"
    ):
        merge_adapter(adapter, tmp_path / "out", base=str(opt))
    assert not (tmp_path / "out").exists()


def test_missing_base_and_missing_tokenizer(tiny_base, tmp_path, caplog):
    adapter = tmp_path / "adapter"
    make_lora_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), adapter)  # no tokenizer saved
    config = read_json(adapter / "adapter_config.json")
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="records no base model .*: pass --base"):
        merge_adapter(adapter, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="hf_tuning.llm.merge"):
        result = merge_adapter(adapter, tmp_path / "out", base=str(tiny_base))
    assert result.tokenizer_source == "base" and "has no tokenizer" in caplog.text
    assert "the base model's tokenizer and chat template were saved" in (result.output_dir / "README.md").read_text()
    assert (
        AutoTokenizer.from_pretrained(result.output_dir).chat_template
        == AutoTokenizer.from_pretrained(tiny_base).chat_template
    )


def test_quantized_base_is_refused_without_dequantize(tiny_adapter, tiny_base, tmp_path):
    adapter, _, _ = tiny_adapter
    with pytest.raises(ValueError, match="is quantized .*Pass --dequantize"):
        merge_adapter(adapter, tmp_path / "out", load_in_4bit=True)
    prequantized = tmp_path / "bnb-4bit"
    prequantized.mkdir()
    config = read_json(tiny_base / "config.json")
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (prequantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bnb-4bit' is quantized"):
        merge_adapter(adapter, tmp_path / "out", base=str(prequantized))
    assert not (tmp_path / "out").exists()


def test_qlora_adapter_merges_into_the_dequantized_4bit_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base_dir = tmp_path / "base64"
    tiny_llama(layers=2, hidden=64, vocab=420).save_pretrained(base_dir)  # bitsandbytes' CPU blocks are 64 wide
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    four_bit = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map={"": "cpu"})
    adapter = tmp_path / "qlora"
    tuned = make_lora_adapter(four_bit, adapter, llama3_style_tokenizer())
    ids = sample_ids(420)
    expected = logits_of(tuned, ids)
    result = merge_adapter(adapter, tmp_path / "merged", load_in_4bit=True, dequantize=True, dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert result.dequantized and "quantization_config" not in read_json(result.output_dir / "config.json")
    difference = (logits_of(merged, ids) - expected).abs().max().item()
    # measured 2.4e-3 (logits up to ~0.6): bitsandbytes' CPU 4-bit matmul rounds activations to bfloat16, the
    # merged model computes in float32 on the same dequantized weights
    assert difference <= 1e-2, difference
    # merging into the full-precision base instead would be off by the quantization error, ~30x more
    full_precision = AutoModelForCausalLM.from_pretrained(base_dir)
    assert (logits_of(full_precision, ids) - logits_of(four_bit, ids)).abs().max() > 10 * difference
    assert "merged into the **dequantized** 4-bit weights" in (result.output_dir / "README.md").read_text()


def test_merge_pushes_the_folder_without_the_token(tiny_adapter, tmp_path, fake_hub, caplog):
    adapter, _, _ = tiny_adapter
    out = tmp_path / "merged"
    with caplog.at_level(logging.DEBUG):
        code = main(
            ["merge", "--adapter", str(adapter), "--output_dir", str(out), "--push_to_hub", "--hub_model_id",
             "user/merged-tiny", "--hub_private_repo", "--hub_token", FAKE_TOKEN]
        )  # fmt: skip
    assert code == 0
    repo = fake_hub.repo("user/merged-tiny")
    assert repo.private
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "generation_config.json"} <= set(
        repo.files()
    )
    assert FAKE_TOKEN not in caplog.text
    assert not any(FAKE_TOKEN.encode() in path.read_bytes() for path in out.rglob("*") if path.is_file())
    assert main(["merge", "--adapter", str(adapter), "--output_dir", str(out), "--push_to_hub"]) == 2


@pytest.fixture(scope="module")
def smollm2_base():
    from hf_tuning.llm.loading import load_causal_lm

    return load_causal_lm(SMOLLM2, dtype=torch.float32)


@requires_smollm2
def test_smollm2_lora_merge_and_gguf_round_trip(smollm2_base, tmp_path):
    """The real SmolLM2-135M-Instruct (tied embeddings, GQA 9/3 heads, 49k byte-level BPE) with a LoRA on q/v:
    merged logits equal the PeftModel's to 1e-5 of the logit scale; the F16 GGUF read back by transformers matches
    within 0.15 (measured 0.05-0.06 on logits up to ~22-34; the F32 file reads back exactly), with the same
    tokenizer ids and chat template.
    """
    tokenizer = smollm2_tokenizer()
    apply_training_chat_template(tokenizer, "chatml")
    adapter = tmp_path / "adapter"
    tuned = make_lora_adapter(smollm2_base, adapter, tokenizer, base_id=SMOLLM2, target_modules=["q_proj", "v_proj"])
    ids = sample_ids(49152)
    expected = logits_of(tuned, ids)
    result = merge_adapter(adapter, tmp_path / "merged", dtype="float32", gguf="F16")
    tuned.unload()  # gives the module-scoped base back without the LoRA layers
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir)
    merged_logits = logits_of(merged, ids)
    # float32 rounding through 30 layers: measured 1.2e-4 on logits up to ~22 (in float64 the two agree exactly),
    # so the bound is 1e-5 of the logit scale
    scale = expected.abs().max().item()
    assert (merged_logits - expected).abs().max().item() <= MERGE_TOLERANCE * scale
    assert read_json(result.output_dir / "generation_config.json")["eos_token_id"] == [2]  # <|im_end|>

    path = gguf_alone(result.gguf_file, tmp_path / "gguf")
    read = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert read.config.tie_word_embeddings and (read.config.num_attention_heads, read.config.num_key_value_heads) == (
        9,
        3,
    )
    difference = (logits_of(read, ids) - merged_logits).abs().max().item()
    assert difference <= 0.15, difference
    assert_tokenizer_round_trips(AutoTokenizer.from_pretrained(result.output_dir), path)
