"""Block families of transformers text models: decoder LLMs, BERT-style encoders, GPT-2-style decoders.

Registered when ``hf_tuning`` is imported (see :mod:`hf_tuning.families` for what a family says).
"""

from __future__ import annotations

from hf_tuning.families import BlockFamily, register_block_family

DECODER_LAYERS = register_block_family(
    BlockFamily(
        name="decoder_layers",
        container="layers",
        block_class=r"DecoderLayer$",
        # OPT registers these two before its layers, though they run after them
        runs_after_blocks=r"(?:^|\.)(?:final_layer_norm|project_out)$",
        description="LLaMA, Mistral, Qwen2/3, Gemma, Phi-3, OPT and other `model.layers.N` decoders",
    )
)
BERT_ENCODER = register_block_family(
    BlockFamily(
        name="bert_encoder",
        container=r"encoder\.layer",
        block_class=r"Layer$",
        description="BERT, RoBERTa, XLM-R, ELECTRA and other `encoder.layer.N` encoders",
    )
)
GPT2_BLOCKS = register_block_family(
    BlockFamily(
        name="gpt2_blocks",
        container=r"h",
        block_class=r"Block$",
        description="GPT-2, GPT-J, GPT-Neo and other `transformer.h.N` decoders",
    )
)
