"""A real Llama-3 tokenizer built offline from the BPE ranks shipped by ``quicktok-v1``.

The vocabulary is Meta's (Llama 3 license), so it is converted when a test or a benchmark asks for it, and
never committed.
Ids, merges, the pre-tokenizer regex and the special tokens match Llama 3's tokenizer.json.
"""

from __future__ import annotations

from functools import lru_cache

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

NUM_BPE_TOKENS = 128_000


class _RanksConverter(TikTokenConverter):
    """TikTokenConverter reading the ranks from memory instead of a ``.tiktoken`` file."""

    def __init__(self, ranks: dict[bytes, int], **kwargs):
        super().__init__(vocab_file="<memory>", **kwargs)
        self._ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:  # noqa: ARG002 - signature of the base
        return self._ranks


@lru_cache(maxsize=1)
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    import quicktok

    encoding = quicktok.get_encoding("llama3")
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(NUM_BPE_TOKENS)}
    specials = [encoding.decode_single_token_bytes(i).decode() for i in range(NUM_BPE_TOKENS, encoding.n_vocab)]
    core = _RanksConverter(ranks, extra_special_tokens=specials).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", clean_up_tokenization_spaces=False
    )
    tokenizer.name_or_path = "quicktok-llama3"
    return tokenizer
