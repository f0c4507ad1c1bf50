"""``hf-tuning merge``: fold a finished adapter into its base model and save a plain transformers model.

    hf-tuning merge --adapter outputs/agrimatech-smollm2-dt3 --output_dir merged --dtype float32 --gguf Q8_0

A recipe run leaves an adapter folder (PEFT LoRA, or SNELL / SNELLA from :mod:`hf_tuning.tuners`) with the
tokenizer that carries the training chat template. :func:`merge_adapter` loads the base, attaches the adapter,
merges it into the weights and writes one folder atomically: ``model.safetensors`` (+ ``config.json``), the
adapter's tokenizer, ``generation_config.json`` stopping on the template's end-of-turn token, and a short
``README.md``; optionally a GGUF file beside them (:mod:`hf_tuning.llm.gguf_export`) and a push to the Hub.

QLoRA adapters were trained against 4-bit weights. Merging into the full-precision base would change what the
adapter was trained on, and merging into 4-bit weights would round the update away, so a quantized base is
refused unless ``--dequantize`` asks to merge into the dequantized 4-bit weights (the card says so).
"""

from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_tuning.io import atomic_directory, read_json
from hf_tuning.llm.adapters import (
    ADAPTER_CONFIG,
    adapter_base_model,
    adapter_method,
    adapter_tokenizer,
    attach_adapter,
    check_adapter_dir,
    plain_layers_back,
)
from hf_tuning.llm.gguf_export import OUTTYPES, add_outtype_argument

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DTYPES", "AdapterMismatchError", "MergeResult", "merge_adapter", "register"]

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
BNB_QUANT_TYPES = ("nf4", "fp4")


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base: its layers are missing from, or shaped unlike, the given base."""


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_adapter` wrote and from what."""

    output_dir: Path
    base: str
    method: str  # "lora" (or the PEFT type), "snell", "snella"
    tokenizer_source: str  # "adapter" or "base"
    dequantized: bool
    gguf_file: Path | None = None
    pushed: Any = None  # the Hub commit, when pushed


# ----------------------------------------------------------------------------------------------- checks


def _base_config(base: str, trust_remote_code: bool) -> dict[str, Any]:
    """The base's config.json as a dict (cheap: no weights), after resolving the source."""
    from hf_tuning.llm.loading import load_config

    return load_config(base, trust_remote_code=trust_remote_code).to_dict()


def _is_bnb_quantized(config: dict[str, Any]) -> bool:
    quantization = config.get("quantization_config") or {}
    return quantization.get("quant_method") == "bitsandbytes" or bool(
        quantization.get("load_in_4bit") or quantization.get("load_in_8bit")
    )


def check_adapter_fits(adapter_dir: Path, base_config: dict[str, Any], base: str, trust_remote_code: bool) -> None:
    """Every layer a PEFT adapter holds weights for exists in the base with the same shape; checked on a weightless
    (meta) copy of the base, so a wrong ``--base`` fails before anything loads."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = adapter_dir / "adapter_model.safetensors"
    if adapter_method(adapter_dir) is not None or not weights.is_file():
        return  # hf_tuning.tuners checks its own names and shapes on load (PetlConfigError)
    config = AutoConfig.for_model(**{k: v for k, v in base_config.items() if k != "quantization_config"})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = dict(skeleton.named_modules())
    recorded = adapter_base_model(adapter_dir)
    hint = f" (the adapter records {recorded!r})" if recorded and recorded != base else ""
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            for part, axis in (("lora_A", 1), ("lora_B", 0)):
                marker = f".{part}."
                if marker not in key:
                    continue
                path = key.split(marker)[0].removeprefix("base_model.model.")
                layer = modules.get(path)
                if layer is None:
                    raise AdapterMismatchError(
                        f"{adapter_dir}: the adapter has weights for {path!r}, which {base!r} "
                        f"({type(skeleton).__name__}) does not have: pass the base it was trained on{hint}"
                    )
                expected = getattr(layer, "in_features" if axis == 1 else "out_features", None)
                size = handle.get_slice(key).get_shape()[axis]
                if expected is not None and size != expected:
                    side = "input" if axis == 1 else "output"
                    raise AdapterMismatchError(
                        f"{adapter_dir}: {path} has {side} size {size} in the adapter but {expected} in {base!r}: "
                        f"pass the base it was trained on{hint}"
                    )


# ----------------------------------------------------------------------------------------------- loading


def _load_base(
    base: str, dtype: str, *, quantized: bool, quant_type: str, nested_quant: bool, trust_remote_code: bool
) -> tuple[nn.Module, nn.Module | None]:
    """The floating-point base to merge into, and (for a quantized base) the 4-bit model the adapter was trained on.

    For a quantized base the 4-bit weights are dequantized into a plain model of ``dtype``: the merge then adds the
    adapter to exactly the weights it learned against (up to the dequantization's rounding).
    """
    import torch

    from hf_tuning.llm.loading import load_causal_lm

    if not quantized:
        return load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code), None
    from transformers import BitsAndBytesConfig

    compute = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested_quant,
        bnb_4bit_compute_dtype=compute,
    )
    four_bit = load_causal_lm(
        base,
        dtype=compute,
        quantization_config=quantization,
        device_map={"": "cpu"},
        trust_remote_code=trust_remote_code,
    )
    return _dequantized_copy(four_bit, compute), four_bit


def _dequantized_copy(four_bit: nn.Module, dtype: Any) -> nn.Module:
    """A plain model of ``dtype`` with the 4-bit model's weights: each 4-bit linear weight dequantized, every other
    parameter copied."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(four_bit.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    targets = dict(plain.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, module in four_bit.named_modules():
            prefix = f"{name}." if name else ""
            if type(module).__name__ == "Linear4bit":
                weight = module.weight
                dense = dequantize_4bit(weight.data, weight.quant_state)
                targets[f"{prefix}weight"].copy_(dense.reshape(targets[f"{prefix}weight"].shape).to(dtype))
                if module.bias is not None:
                    targets[f"{prefix}bias"].copy_(module.bias.to(dtype))
                continue
            for param_name, param in module.named_parameters(recurse=False):
                targets[f"{prefix}{param_name}"].copy_(param.to(dtype))
    return plain.eval()


def _merge_in_place(tuned: Any, method: str | None) -> nn.Module:
    """Fold the adapter into the base's weights and give back a stock transformers model with plain layers."""
    if method is None:
        return tuned.merge_and_unload()
    tuned.merge()
    return plain_layers_back(tuned)


def _stop_tokens(tokenizer: Any, generation_config: Any) -> list[int]:
    """The ids generation stops on: the training template's end-of-turn token and every EOS the base names (as
    the recipe sets them before training; PEFT does not save the generation config with the adapter)."""
    from hf_tuning.llm.chat_templates import known_template_name, stop_token_ids

    return stop_token_ids(tokenizer, known_template_name(tokenizer), generation_config=generation_config)


# ----------------------------------------------------------------------------------------------- card


def render_merge_card(
    *, base: str, adapter: str, method: str, dtype: str, dequantized: bool, tokenizer_source: str, template: Any,
    gguf_file: str | None,
) -> str:  # fmt: skip
    """A short README.md for the merged folder: where it came from, how it was merged, the chat template."""
    from hf_tuning.model_card import HF_TUNING_LINK, hub_repo_id

    repo = hub_repo_id(base)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    front += [f"base_model: {repo}", "base_model_relation: merge"] if repo else []
    front += ["tags:", "- hf-tuning", "- merged", f"- {method}", *(["- gguf"] if gguf_file else []), "---", ""]
    how = f"The {method} adapter was merged into the base weights in {dtype}"
    if dequantized:
        how += (
            ". The base was quantized (QLoRA, bitsandbytes 4-bit): the adapter was merged into the **dequantized** "
            "4-bit weights, so this model differs from the 4-bit base + adapter by the dequantization's rounding "
            "and from the original full-precision base by the quantization error"
        )
    lines = [
        *front,
        "# Merged model",
        "",
        f"Base model: `{base}`. Adapter: `{adapter}`. Merged with [hf_tuning]({HF_TUNING_LINK}) "
        "(`hf-tuning merge`); this is a plain transformers model, no PEFT needed.",
        "",
        how + ".",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
        "```",
        "",
    ]
    if gguf_file:
        lines += [f"`{gguf_file}` holds the same model as GGUF for llama.cpp and Ollama (`docs/deployment.md`).", ""]
    lines += ["## Chat template", ""]
    if tokenizer_source == "base":
        lines += ["The adapter folder had no tokenizer: the base model's tokenizer and chat template were saved.", ""]
    if isinstance(template, str):
        lines += [
            "The tokenizer carries the template the model was trained with (its `{% generation %}` markers only "
            "matter for training):",
            "",
            "```jinja",
            template,
            "```",
            "",
        ]
    else:
        lines += ["The tokenizer has no chat template.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- merge


def merge_adapter(
    adapter: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    dequantize: bool = False,
    load_in_4bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    use_bnb_nested_quant: bool = False,
    gguf: str | None = None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private_repo: bool = False,
    hub_token: str | None = None,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge ``adapter`` into its base and write ``output_dir`` (see the module docstring).

    ``base`` defaults to the base the adapter records. A base that is quantized (its config.json has a
    bitsandbytes ``quantization_config``, or ``load_in_4bit``) is refused unless ``dequantize``. ``gguf``
    (``F16``, ``F32``, ``Q8_0``) also writes ``output_dir/<name>.gguf``.
    """
    import torch

    adapter_dir = check_adapter_dir(adapter)
    method = adapter_method(adapter_dir)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if gguf is not None and gguf.upper() not in OUTTYPES:
        raise ValueError(f"--gguf {gguf!r} is not one of {', '.join(OUTTYPES)}")
    if bnb_4bit_quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"--bnb_4bit_quant_type {bnb_4bit_quant_type!r} is not one of {', '.join(BNB_QUANT_TYPES)}")
    if push_to_hub and not hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (owner/name)")
    base = base or adapter_base_model(adapter_dir)
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} records no base model (base_model_name_or_path): pass --base")
    base_config = _base_config(base, trust_remote_code)
    quantized = load_in_4bit or _is_bnb_quantized(base_config)
    if quantized and method is not None:
        raise ValueError(f"a {method} adapter merges into a floating-point base only; {base!r} is quantized")
    if quantized and not dequantize:
        raise ValueError(
            f"the base {base!r} is quantized (bitsandbytes 4-bit/8-bit, a QLoRA run): merging into its "
            "full-precision weights would not be the model the adapter was trained with. Pass --dequantize to "
            "merge into the dequantized 4-bit weights (the card records it), or pass the full-precision base "
            "without --load_in_4bit if the adapter was trained on that"
        )
    check_adapter_fits(adapter_dir, base_config, base, trust_remote_code)

    tokenizer = adapter_tokenizer(adapter_dir, trust_remote_code=trust_remote_code)
    tokenizer_source = "adapter"
    if tokenizer is None:
        from hf_tuning.llm.loading import load_tokenizer

        logger.warning("%s has no tokenizer: saving the base model's tokenizer and chat template", adapter_dir)
        try:
            tokenizer, tokenizer_source = load_tokenizer(base, trust_remote_code=trust_remote_code), "base"
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{adapter_dir} has no tokenizer (tokenizer.json / tokenizer_config.json) and the base {base!r} "
                f"has none that loads either ({error}); save the training tokenizer into the adapter folder"
            ) from error

    model, _ = _load_base(
        base,
        dtype,
        quantized=quantized,
        quant_type=bnb_4bit_quant_type,
        nested_quant=use_bnb_nested_quant,
        trust_remote_code=trust_remote_code,
    )
    try:
        tuned = attach_adapter(model, adapter_dir)
    except (RuntimeError, KeyError) as error:  # PEFT's size-mismatch and missing-key errors
        raise AdapterMismatchError(f"{adapter_dir} does not fit the base {base!r}: {error}") from error
    with torch.no_grad():
        merged = _merge_in_place(tuned, method)
    merged.config._name_or_path = base
    if quantized and hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.generation_config.eos_token_id = _stop_tokens(tokenizer, merged.generation_config)
    if tokenizer.pad_token_id is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id

    output = Path(output_dir).expanduser()
    gguf_name = f"{output.name}.{gguf.upper()}.gguf" if gguf else None
    written_dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    card = render_merge_card(
        base=base,
        adapter=str(adapter),
        method=method or read_json(adapter_dir / ADAPTER_CONFIG).get("peft_type", "lora").lower(),
        dtype=written_dtype,
        dequantized=quantized,
        tokenizer_source=tokenizer_source,
        template=tokenizer.chat_template,
        gguf_file=gguf_name,
    )
    with atomic_directory(output) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(card, encoding="utf-8")
        if gguf_name:
            from hf_tuning.llm.gguf_export import export_gguf

            export_gguf(staging, staging / gguf_name, gguf, trust_remote_code=trust_remote_code)
    logger.info("merged %s into %s: %s", adapter_dir, base, output)

    pushed = None
    if push_to_hub:
        from hf_tuning.hub import push_output_dir

        pushed = push_output_dir(output, hub_model_id, private=hub_private_repo, token=hub_token)
        logger.info("pushed %s to %s", output, hub_model_id)
    return MergeResult(
        output_dir=output,
        base=base,
        method=method or "lora",
        tokenizer_source=tokenizer_source,
        dequantized=quantized,
        gguf_file=output / gguf_name if gguf_name else None,
        pushed=pushed,
    )


# ----------------------------------------------------------------------------------------------- CLI


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge a LoRA / SNELL adapter into its base and save a plain transformers model (optionally GGUF)",
        description="Merge a finished adapter folder into its base model and write a stock transformers model "
        "(safetensors) with the adapter's tokenizer and training chat template.",
    )
    parser.add_argument("--adapter", required=True, help="adapter folder a recipe run saved")
    parser.add_argument(
        "--base", default=None, help="base model (Hub id, folder, .gguf); default: the one the adapter records"
    )
    parser.add_argument("--output_dir", required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype to merge in and save (auto: the base's)")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="for a quantized (QLoRA) base: merge into its dequantized 4-bit weights instead of refusing",
    )
    parser.add_argument("--load_in_4bit", action="store_true", help="the adapter was trained on the base in 4-bit")
    parser.add_argument("--bnb_4bit_quant_type", default="nf4", choices=BNB_QUANT_TYPES, help="as in training")
    parser.add_argument("--use_bnb_nested_quant", action="store_true", help="as in training")
    add_outtype_argument(parser, "--gguf", None)
    parser.add_argument("--push_to_hub", action="store_true", help="push the merged folder to the Hub")
    parser.add_argument("--hub_model_id", default=None, help="repo to push to (owner/name)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo private")
    parser.add_argument("--hub_token", default=None, help="token to push with (default: the logged-in one)")
    parser.add_argument("--trust_remote_code", action="store_true", help="run the model repository's own code")
    parser.set_defaults(handler=_merge_command)


def _merge_command(args: argparse.Namespace) -> int:
    result = merge_adapter(
        args.adapter,
        args.output_dir,
        base=args.base,
        dtype=args.dtype,
        dequantize=args.dequantize,
        load_in_4bit=args.load_in_4bit,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        use_bnb_nested_quant=args.use_bnb_nested_quant,
        gguf=args.gguf,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        hub_private_repo=args.hub_private_repo,
        hub_token=args.hub_token,
        trust_remote_code=args.trust_remote_code,
    )
    note = " into the dequantized 4-bit weights" if result.dequantized else ""
    print(f"merged {result.method} adapter{note} into {result.base}: {result.output_dir}")
    if result.tokenizer_source == "base":
        print("note: the adapter folder had no tokenizer; the base model's tokenizer was saved")
    if result.gguf_file:
        print(f"GGUF: {result.gguf_file}")
    if result.pushed is not None:
        print(f"pushed to {args.hub_model_id}")
    return 0
