"""``hf-tuning export-gguf``: write a merged LLaMA-family model folder as one GGUF file for llama.cpp and Ollama.

    hf-tuning export-gguf --model merged/ --output merged/agri.gguf --outtype Q8_0

The file is written with the ``gguf`` package's :class:`~gguf.GGUFWriter` from the folder's ``config.json``,
safetensors weights and tokenizer; nothing from llama.cpp's own converter is used. What is covered (and refused
with a message before anything is written):

* models: ``LlamaForCausalLM`` (Llama 2/3/3.1/3.2, SmolLM2) with SiLU MLPs and no projection biases. Rotary
  scaling ``default`` or ``llama3`` (written as llama.cpp's ``rope_freqs`` factors, see :func:`llama3_rope_factors`).
* tokenizers: byte-level BPE (``tokenizer.ggml.model = gpt2``) whose pre-tokenizer is one llama.cpp knows by name
  (:data:`PRE_TOKENIZERS`). SentencePiece vocabularies are refused.
* types: ``F32`` (everything), ``F16`` (2-D weights in F16, norms in F32) and ``Q8_0`` (2-D weights whose rows
  split into 32-value blocks in Q8_0, any other 2-D weight in F16, norms in F32).

q and k projections are stored with their rows reordered (:func:`rotary_rows_to_gguf`): transformers rotates the
two halves of each head, llama.cpp rotates neighbouring pairs. ``docs/deployment.md`` lists the tolerances
measured when transformers' own GGUF loader reads the file back.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_tuning.io import atomic_output, read_json

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "OUTTYPES",
    "PRE_TOKENIZERS",
    "GgufExport",
    "GgufExportError",
    "export_gguf",
    "llama3_rope_factors",
    "register",
    "rotary_rows_to_gguf",
]

logger = logging.getLogger(__name__)

OUTTYPES = ("F16", "F32", "Q8_0")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# llama.cpp's general.file_type values (its LlamaFileType enum) for the three output types
_FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7}
# The pre-tokenizer name llama.cpp selects its text-splitting rule by. A byte-level tokenizer is matched by the
# rule its tokenizer.json applies before the byte mapping: the Llama 3 regex, the GPT-2 regex (ByteLevel with
# use_regex), or single digits then the GPT-2 regex (SmolLM2's original tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "llama-bpe": "Split(Llama 3 regex) + ByteLevel(use_regex=False): Llama 3, 3.1, 3.2",
    "gpt-2": "ByteLevel(use_regex=True): GPT-2 style, SmolLM2 as transformers reads it from GGUF",
    "smollm": "Digits(individual_digits=True) + ByteLevel(use_regex=True): SmolLM2's tokenizer.json",
}


class GgufExportError(ValueError):
    """The model folder cannot be written as GGUF; the message names what is unsupported and what is expected."""


@dataclass(frozen=True)
class GgufExport:
    """What was written: the file, its type and how many tensors went in each GGML type."""

    path: Path
    outtype: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    pre_tokenizer: str = ""
    vocab_size: int = 0


# ----------------------------------------------------------------------------------------------- checks


def check_llama_config(config: dict[str, Any], source: str) -> None:
    """Refuse a config the writer would get wrong, naming the field and what is supported."""
    architectures = config.get("architectures") or []
    if architectures[:1] != ["LlamaForCausalLM"] or config.get("model_type") != "llama":
        raise GgufExportError(
            f"{source}: architecture {architectures or config.get('model_type')!r} is not supported by export-gguf; "
            f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3/3.1/3.2, SmolLM2). Mistral and Qwen2 "
            "are not covered: convert them with llama.cpp's convert_hf_to_gguf.py"
        )
    if config.get("quantization_config"):
        raise GgufExportError(
            f"{source}: the weights are quantized ({config['quantization_config'].get('quant_method', '?')}); "
            "export a floating-point folder (hf-tuning merge --dequantize writes one)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise GgufExportError(f"{source}: {flag}=true is not supported (LLaMA has no projection biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise GgufExportError(f"{source}: hidden_act={config['hidden_act']!r}; llama.cpp's LLaMA graph uses silu")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise GgufExportError(
            f"{source}: rotary scaling {rope_type!r} is not supported; expected one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings under either spelling transformers has used (``rope_parameters`` / ``rope_scaling``)."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def pre_tokenizer_name(tokenizer_json: dict[str, Any], source: str) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level BPE ``tokenizer.json``, or a clear refusal."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        kind = model.get("type") or "unknown"
        raise GgufExportError(
            f"{source}: the tokenizer is {kind}, not byte-level BPE; export-gguf writes byte-level BPE (gpt2-style) "
            "vocabularies only (SentencePiece vocabularies such as Llama 2's are not covered)"
        )
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if steps and kinds[-1] == "ByteLevel" else None
    if byte_level is None or tokenizer_json.get("normalizer"):
        raise GgufExportError(
            f"{source}: the tokenizer is not byte-level BPE (pre-tokenizer {kinds}, normalizer "
            f"{(tokenizer_json.get('normalizer') or {}).get('type')}); export-gguf writes gpt2-style vocabularies only"
        )
    uses_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and uses_regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not uses_regex:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT and steps[0].get("behavior") == "Isolated":
            return "llama-bpe"
    raise GgufExportError(
        f"{source}: the pre-tokenizer {kinds} is not one llama.cpp knows by name here; supported: "
        + "; ".join(f"{name} ({what})" for name, what in PRE_TOKENIZERS.items())
    )


def _pre_tokenizer_steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


# ----------------------------------------------------------------------------------------------- tensors


def rotary_rows_to_gguf(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from transformers' rotary layout to llama.cpp's.

    transformers rotates the first half of each head's dimensions against the second half; llama.cpp rotates
    dimension 2i against 2i+1. Row ``h*d + j`` (first half) therefore moves to ``h*d + 2j`` and row
    ``h*d + d/2 + j`` to ``h*d + 2j + 1``.
    """
    rows, columns = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def llama3_rope_factors(config: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's rotary scaling as the per-frequency divisors llama.cpp reads from ``rope_freqs.weight``.

    llama.cpp divides each base rotary frequency by its factor, so the factor is the base frequency over the
    scaled one; both come from transformers' own rotary code, so the file rotates exactly as transformers does.
    """
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama = LlamaConfig.from_dict(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](llama, torch.device("cpu"))
    base, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(llama)
    return (base / scaled).to(torch.float32)


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _gguf_tensor_name(name: str, name_map: Any) -> str:
    stem, _, suffix = name.rpartition(".")
    mapped = name_map.get_name(stem)
    if mapped is None:
        raise GgufExportError(f"tensor {name!r} has no GGUF name for the llama architecture")
    return f"{mapped}.{suffix}"


def _read_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the folder's safetensors files (one or sharded), one at a time, as float32."""
    import torch
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir} has no model.safetensors (or index): save the model with safetensors")
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name).to(torch.float32)


def _encode(array: np.ndarray, name: str, outtype: str) -> tuple[np.ndarray, Any]:
    """The stored form of one tensor and its GGML type: norms stay F32, 2-D weights follow ``outtype``."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if outtype == "F32" or array.ndim == 1:
        return array.astype(np.float32), GGMLQuantizationType.F32
    if outtype == "Q8_0" and array.shape[-1] % quants.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), GGMLQuantizationType.F16


# ----------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def _vocabulary(tokenizer: Any, vocab_size: int, source: str) -> _Vocabulary:
    """Tokens in id order with llama.cpp's token types, merges as ``"a b"`` strings, and the pre-tokenizer name."""
    from gguf import TokenType

    if not getattr(tokenizer, "is_fast", False):
        raise GgufExportError(f"{source}: export-gguf needs a fast tokenizer (tokenizer.json)")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer_name(data, source)
    by_id = {index: token for token, index in data["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    if max(by_id) >= vocab_size:
        raise GgufExportError(
            f"{source}: the tokenizer has ids up to {max(by_id)} but the model's embedding has {vocab_size} rows"
        )
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # rows the embedding has and the tokenizer never produces
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(TokenType.CONTROL if added[index].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return _Vocabulary(tokens, [int(t) for t in types], merges, pre)


def _adds_token(tokenizer: Any, token_id: int | None, *, first: bool) -> bool:
    """Whether encoding plain text adds ``token_id`` at the start (``first``) or the end."""
    if token_id is None:
        return False
    ids = tokenizer("hello")["input_ids"]
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    return len(ids) > len(plain) and (ids[0] if first else ids[-1]) == token_id


# ----------------------------------------------------------------------------------------------- writer


def export_gguf(
    model_dir: str | Path, output: str | Path, outtype: str = "F16", *, trust_remote_code: bool = False
) -> GgufExport:
    """Write the LLaMA-family model in ``model_dir`` (config.json, safetensors, tokenizer) to ``output`` atomically.

    Everything that can be refused (architecture, rotary scaling, quantized weights, tokenizer kind and
    pre-tokenizer, ``outtype``) is checked before any tensor is read; the file appears only when complete.
    """
    import gguf
    from transformers import AutoTokenizer

    outtype = outtype.upper()
    if outtype not in OUTTYPES:
        raise GgufExportError(f"--outtype {outtype!r} is not supported; expected one of {', '.join(OUTTYPES)}")
    model_dir, output = Path(model_dir).expanduser(), Path(output).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a merged model folder (hf-tuning merge)")
    if output.suffix != ".gguf":
        raise GgufExportError(f"--output {str(output)!r} must end in .gguf")
    config = read_json(model_dir / "config.json")
    check_llama_config(config, str(model_dir / "config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    vocabulary = _vocabulary(tokenizer, int(config["vocab_size"]), f"{model_dir} tokenizer")
    template = tokenizer.chat_template
    if template is not None and not isinstance(template, str):
        raise GgufExportError(f"{model_dir}: the tokenizer has several named chat templates; keep one")
    rope = rope_parameters(config)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or 0)
    kv_heads = kv_heads or heads
    tied = bool(config.get("tie_word_embeddings", False))
    counts: dict[str, int] = {}
    with atomic_output(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(config.get("_name_or_path") or model_dir.name)
        writer.add_file_type(_FILE_TYPES[outtype])
        if outtype == "Q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        head_dim = _head_dim(config)
        if head_dim != int(config["hidden_size"]) // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(int(config["vocab_size"]))
        _add_tokenizer(writer, tokenizer, vocabulary, template)
        if rope.get("rope_type") == "llama3":
            writer.add_tensor(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config).numpy()
            )
            counts["F32"] = counts.get("F32", 0) + 1
        for name, tensor in _read_weights(model_dir):
            if name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd.weight when output.weight is absent
            if name.endswith("self_attn.q_proj.weight"):
                tensor = rotary_rows_to_gguf(tensor, heads)
            elif name.endswith("self_attn.k_proj.weight"):
                tensor = rotary_rows_to_gguf(tensor, kv_heads)
            data, kind = _encode(tensor.numpy(), name, outtype)
            writer.add_tensor(_gguf_tensor_name(name, name_map), data, raw_dtype=kind)
            counts[kind.name] = counts.get(kind.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    logger.info("wrote %s (%s): %s", output, outtype, counts)
    return GgufExport(output, outtype, counts, vocabulary.pre, len(vocabulary.tokens))


def _add_tokenizer(writer: Any, tokenizer: Any, vocabulary: _Vocabulary, template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    writer.add_token_merges(vocabulary.merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(_adds_token(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds_token(tokenizer, tokenizer.eos_token_id, first=False))
    if template:
        writer.add_chat_template(template)


# ----------------------------------------------------------------------------------------------- CLI


def add_outtype_argument(parser: argparse.ArgumentParser, flag: str, default: str | None) -> None:
    parser.add_argument(
        flag,
        default=default,
        type=str.upper,
        choices=OUTTYPES,
        help="F32: every tensor in float32; F16: 2-D weights in float16, norms in float32; Q8_0: 2-D weights in "
        "8-bit blocks of 32 (F16 where a row does not split into blocks), norms in float32",
    )


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export-gguf",
        help="write a merged LLaMA-family model folder as a GGUF file for llama.cpp / Ollama",
        description="Write a merged model folder (hf-tuning merge) as one GGUF file: LlamaForCausalLM with a "
        "byte-level BPE tokenizer; the tokenizer's chat template goes in as tokenizer.chat_template.",
    )
    parser.add_argument("--model", required=True, help="merged model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--output", required=True, help="the .gguf file to write")
    add_outtype_argument(parser, "--outtype", "F16")
    parser.add_argument("--trust_remote_code", action="store_true", help="run the tokenizer repository's own code")
    parser.set_defaults(handler=_export_command)


def _export_command(args: argparse.Namespace) -> int:
    result = export_gguf(args.model, args.output, args.outtype, trust_remote_code=args.trust_remote_code)
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(result.tensor_types.items()))
    print(f"wrote {result.path} ({result.outtype}: {types}; tokenizer gpt2/{result.pre_tokenizer})")
    return 0
