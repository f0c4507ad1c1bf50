"""``hf-tuning export-gguf``: the file transformers' own GGUF loader reads back is the model that was written.

Each round trip reads the GGUF from a folder holding nothing else, so config, weights and tokenizer all come from
the file's metadata and tensors (a folder with config.json beside it would let transformers read that instead).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_tuning.cli import main
from hf_tuning.llm.chat_templates import apply_training_chat_template
from hf_tuning.llm.gguf_export import (
    _LLAMA3_SPLIT,
    GgufExportError,
    export_gguf,
    llama3_rope_factors,
    rotary_rows_to_gguf,
)
from tests.helpers.tiny import WORDS, tiny_llama, tiny_tokenizer

pytest.importorskip("gguf")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [
    {"role": "system", "content": "You advise farmers."},
    {"role": "user", "content": "Check the tractor oil at 12345 hours?"},
    {"role": "assistant", "content": "Don't wait: replace the filter, then check   the tyre pressure!"},
]
# logits of the file read back against the model written, max |difference| (measured on the tiny model:
# F32 0.0, F16 1.8e-4, Q8_0 4.6e-3 with logits up to 0.45)
TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "Q8_0": 2e-2}


def llama3_style_tokenizer() -> PreTrainedTokenizerFast:
    """A small real byte-level BPE, trained here, split like Llama 3 (its regex, then the byte mapping), adding
    <|begin_of_text|> like Llama 3, with the llama3 training chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) + " 12 345 don't!\n" for i in range(len(WORDS))], trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    apply_training_chat_template(tokenizer, "llama3")  # also sets the pad token (<|eot_id|>)
    return tokenizer


def save_tiny_model(folder: Path, tokenizer: PreTrainedTokenizerFast | None = None, **config: object) -> Path:
    """A 2-layer LLaMA with grouped-query attention (4 heads, 2 kv heads) and the tokenizer, saved to ``folder``."""
    tokenizer = tokenizer or llama3_style_tokenizer()
    model = tiny_llama(layers=2, hidden=32, vocab=len(tokenizer))
    for holder in (model.config, model.generation_config):  # the ids of this tokenizer, not tiny_llama's defaults
        holder.bos_token_id, holder.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        holder.pad_token_id = tokenizer.pad_token_id
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gguf_alone(path: Path, folder: Path) -> Path:
    """Copy the file into an otherwise empty folder: a reader then has nothing but the file."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, folder / path.name))


def sample_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def assert_tokenizer_round_trips(original, gguf_path: Path) -> None:
    """Same ids for plain text, digits, odd spacing, non-ASCII and chat-rendered text with special tokens; same
    chat template and special tokens."""
    read = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    rendered = original.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)
    prompt = original.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    for text in ("the tractor is in the field", " 12345 don't  stop\n\nnow", "héllo wörld ✓", rendered, prompt):
        assert read(text)["input_ids"] == original(text)["input_ids"], text
    assert read.chat_template == original.chat_template
    assert (read.bos_token, read.eos_token, read.pad_token) == (
        original.bos_token,
        original.eos_token,
        original.pad_token,
    )


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """(metadata without the token arrays, {tensor name: GGML type name})."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template")
    meta = {key: field.contents() for key, field in reader.fields.items() if key not in skip}
    return meta, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("outtype", ["F32", "F16", "Q8_0"])
def test_tiny_llama_round_trips_through_transformers_gguf_loader(tiny_dir, tmp_path, outtype):
    written = export_gguf(tiny_dir, tmp_path / "out" / f"tiny.{outtype}.gguf", outtype)
    path = gguf_alone(written.path, tmp_path / "alone")
    meta, types = gguf_fields(path)
    assert (
        meta["general.architecture"] == "llama"
        and meta["general.file_type"] == {"F32": 0, "F16": 1, "Q8_0": 7}[outtype]
    )
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (2, 32, 64)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert (meta["llama.context_length"], meta["llama.rope.dimension_count"], meta["llama.vocab_size"]) == (128, 8, 420)
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0) and meta["tokenizer.ggml.pre"] == "llama-bpe"
    norms = {name for name in types if name.endswith("norm.weight")}
    assert norms and {types[n] for n in norms} == {"F32"}
    assert {t for n, t in types.items() if n not in norms} == {outtype}  # every 2-D weight, output.weight included
    assert "output.weight" in types and len(types) == 2 * 9 + 3
    assert written.tensor_types == {"F32": len(types)} if outtype == "F32" else written.tensor_types[outtype] == 16

    reference = AutoModelForCausalLM.from_pretrained(tiny_dir)
    read = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert (read.config.num_key_value_heads, read.config.tie_word_embeddings) == (2, False)
    ids = sample_ids(reference.config.vocab_size)
    expected = logits_of(reference, ids)
    difference = (logits_of(read, ids) - expected).abs().max().item()
    assert difference <= TOLERANCE[outtype], difference
    if outtype == "F32":
        assert difference == 0.0  # the same float32 weights, permuted and back
        assert_tokenizer_round_trips(AutoTokenizer.from_pretrained(tiny_dir), path)


def test_rotary_rows_follow_llama_cpp_pairs():
    """Per head, transformers' halves (x0 x1 | y0 y1) become llama.cpp's neighbouring pairs (x0 y0 x1 y1)."""
    rows = torch.arange(16.0).reshape(8, 2)  # 2 heads of dimension 4, 2 input columns
    permuted = rotary_rows_to_gguf(rows, num_heads=2)
    assert permuted[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 2, 2)
    assert torch.equal(torch.from_numpy(undone), rows)


def test_llama31_rope_scaling_is_written_as_frequency_factors(tmp_path):
    """llama.cpp divides each rotary frequency by rope_freqs.weight: base / factor must be transformers' llama3
    frequency. (transformers' GGUF loader ignores rope_freqs, so this part is checked on the tensor itself.)"""
    scaling = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }  # fmt: skip
    folder = save_tiny_model(tmp_path / "llama31", rope_parameters=scaling, max_position_embeddings=512)
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    path = export_gguf(folder, tmp_path / "llama31.gguf", "F32").path
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    factors = torch.from_numpy(tensor.data.copy())
    base = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float) / 8))
    torch.testing.assert_close(base / factors, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)  # high frequencies kept, low ones stretched 8x
    torch.testing.assert_close(factors, llama3_rope_factors(model.config.to_dict()))


def _qwen2(folder: Path) -> Path:
    save_tiny_model(folder)
    config = (folder / "config.json").read_text().replace('"LlamaForCausalLM"', '"Qwen2ForCausalLM"')
    (folder / "config.json").write_text(config.replace('"model_type": "llama"', '"model_type": "qwen2"'))
    return folder


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_qwen2, r"'Qwen2ForCausalLM'\] is not supported by export-gguf; expected one of LlamaForCausalLM"),
        (lambda f: save_tiny_model(f, tiny_tokenizer()), "the tokenizer is WordLevel, not byte-level BPE"),
        (
            lambda f: save_tiny_model(
                f,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 1e4,
                    "factor": 2.0,
                    "original_max_position_embeddings": 64,
                },
            ),
            "rotary scaling 'yarn' is not supported",
        ),
        (lambda f: save_tiny_model(f, attention_bias=True), "attention_bias=true is not supported"),
    ],
    ids=["qwen2", "wordlevel-tokenizer", "yarn-rope", "attention-bias"],
)
def test_unsupported_models_are_refused_before_writing(tmp_path, build, message):
    folder = build(tmp_path / "model")
    output = tmp_path / "out" / "model.gguf"
    with pytest.raises(GgufExportError, match=message):
        export_gguf(folder, output, "F16")
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_cli_writes_the_file_and_reports_errors_in_one_line(tiny_dir, tmp_path, capsys):
    output = tmp_path / "cli.gguf"
    assert main(["export-gguf", "--model", str(tiny_dir), "--output", str(output), "--outtype", "q8_0"]) == 0
    assert "Q8_0: 5 F32, 16 Q8_0; tokenizer gpt2/llama-bpe" in capsys.readouterr().out
    assert gguf_fields(output)[0]["general.file_type"] == 7
    assert main(["export-gguf", "--model", str(tmp_path / "missing"), "--output", str(output)]) == 2
    assert "has no config.json: pass a merged model folder" in capsys.readouterr().err


def test_our_loader_reads_a_gguf_file_beside_a_model_folder_from_the_file_itself(tiny_dir, tmp_path, monkeypatch):
    """``merge --gguf`` puts the file inside the merged folder. transformers would then read the folder's config.json
    and tokenizer files instead of the file's metadata; ``load_causal_lm`` reads the file alone."""
    from hf_tuning.llm.loading import load_causal_lm, load_tokenizer

    monkeypatch.setenv("HF_TUNING_CACHE", str(tmp_path / "cache"))
    folder = Path(shutil.copytree(tiny_dir, tmp_path / "merged"))
    written = export_gguf(folder, folder / "merged.F32.gguf", "F32").path
    decoy = json.loads((folder / "config.json").read_text()) | {"num_hidden_layers": 1}
    (folder / "config.json").write_text(json.dumps(decoy))  # a side file that disagrees with the GGUF metadata
    model = load_causal_lm(str(written), dtype="float32")
    assert model.config.num_hidden_layers == 2
    ids = sample_ids(model.config.vocab_size)
    assert torch.equal(logits_of(model, ids), logits_of(AutoModelForCausalLM.from_pretrained(tiny_dir), ids))
    assert load_tokenizer(str(written)).chat_template == AutoTokenizer.from_pretrained(tiny_dir).chat_template
