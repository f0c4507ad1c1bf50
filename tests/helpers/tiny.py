"""Tiny models, tokenizers and datasets built offline for the tests (no Hub access)."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a tractor plough seed drill sprayer nozzle boom pressure litre hectare harvest combine header "
    "grain tank engine oil filter belt chain tyre wheel hitch pto shaft rpm speed field soil tillage "
    "depth row spacing calibrate check clean replace adjust before after during each every safety "
    "guard stop start is are to of and in on for with at by from"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(layers: int = 8, hidden: int = 32, vocab: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab or (len(WORDS) + 4),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lm_dataset(rows: int = 64, length: int = 16, seed: int = 0, vocab: int | None = None) -> Dataset:
    """Random-but-learnable sequences: each row repeats a short random motif."""
    generator = torch.Generator().manual_seed(seed)
    vocab = vocab or (len(WORDS) + 4)
    data = []
    for _ in range(rows):
        motif = torch.randint(4, vocab, (4,), generator=generator)
        ids = motif.repeat(length // 4 + 1)[:length].tolist()
        data.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * length})
    return Dataset.from_list(data)


def text_dataset(rows: int = 64, words: int = 12, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(rows):
        picks = torch.randint(0, len(WORDS), (4,), generator=generator).tolist()
        data.append({"text": " ".join(WORDS[i] for i in (picks * 4)[:words])})
    return Dataset.from_list(data)


def tiny_opt(project: bool = False) -> OPTForCausalLM:
    """OPT registers final_layer_norm (``project=False``) or project_in/project_out (``project=True``) before its
    layers; the head is untied, so only the embeddings run before the blocks."""
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16 if project else 32, do_layer_norm_before=not project,
        tie_word_embeddings=False,
    )  # fmt: skip
    return OPTForCausalLM(config)


def tokenizing_sft_trainer(tokenizer, train_dataset: Dataset, output_dir: str, max_length: int | None = 1024):
    """A :class:`~hf_tuning.StagedSFTTrainer` on a 2-layer LLaMA of the tokenizer's vocabulary, built to read what TRL
    made of the rows (``trainer.train_dataset``: input ids and assistant-only labels); it is never trained."""
    from hf_tuning import StagedSFTConfig, StagedSFTTrainer

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    args = StagedSFTConfig(
        output_dir=output_dir,
        assistant_only_loss=True,
        max_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dt_variant="ost",
        save_strategy="no",
        max_length=max_length,
    )
    return StagedSFTTrainer(
        model=LlamaForCausalLM(config), args=args, train_dataset=train_dataset, processing_class=tokenizer
    )
