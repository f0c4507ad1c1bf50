"""Training chat templates: the loss mask token by token, and prompts that tokenize the same at inference."""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from benchmarks.llama3_tokenizer import llama3_tokenizer
from hf_tuning.llm.chat_templates import (
    ChatTemplateError,
    apply_training_chat_template,
    compare_with_stock,
    detect_template_name,
    end_of_turn_token,
    stock_default_system_message,
)
from tests.helpers.real_models import requires_smollm2, smollm2_tokenizer
from tests.helpers.tiny import tiny_tokenizer, tokenizing_sft_trainer

CONVERSATION = [
    {"role": "system", "content": "You advise farmers on machinery."},
    {"role": "user", "content": "How often should I grease the PTO shaft?"},
    {"role": "assistant", "content": "Every 8 to 10 hours of use, or as the operator's manual says."},
    {"role": "user", "content": "And the cross journals?"},
    {"role": "assistant", "content": "Grease them at the same interval until clean grease shows at the seals."},
]


def llama3():
    return copy.deepcopy(llama3_tokenizer())


def _expected_mask(tokenizer, messages: list[dict], eot: str) -> tuple[list[int], list[int]]:
    """The mask built independently: every assistant reply plus its end-of-turn token, nothing else.

    For each assistant turn, the prompt rendered for inference (``add_generation_prompt``) must
    tokenize to exactly the tokens that precede the reply in the training sequence.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    mask = [0] * len(full_ids)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids, "generation prompt tokenizes differently in training"
        reply_ids = tokenizer(message["content"].strip(), add_special_tokens=False)["input_ids"] + [eot_id]
        start, end = len(prompt_ids), len(prompt_ids) + len(reply_ids)
        assert full_ids[start:end] == reply_ids
        mask[start:end] = [1] * len(reply_ids)
    return full_ids, mask


def _check_mask(tokenizer, name: str, messages: list[dict]) -> None:
    assert apply_training_chat_template(tokenizer, name) == name
    eot = end_of_turn_token(tokenizer, name)
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    expected_ids, expected_mask = _expected_mask(tokenizer, messages, eot)
    assert encoded["input_ids"] == expected_ids
    assert encoded["assistant_masks"] == expected_mask
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(masked) == "".join(reply + eot for reply in replies)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    eot_positions = [i for i, t in enumerate(encoded["input_ids"]) if t == eot_id]
    # Every assistant turn's end token is learned; user/system turns' end tokens are not.
    roles = [m["role"] for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False).removeprefix("<|begin_of_text|>")
    if roles[0] != "system" and text.startswith(("<|start_header_id|>system", "<|im_start|>system")):
        roles.insert(0, "system")  # Llama 3.1 always opens with a system turn; SmolLM2 adds a default one
    assert [encoded["assistant_masks"][i] for i in eot_positions] == [int(role == "assistant") for role in roles]


@requires_smollm2
def test_chatml_mask_with_smollm2_tokenizer():
    _check_mask(smollm2_tokenizer(), "chatml", CONVERSATION)


@pytest.mark.parametrize("name", ["llama3", "llama3.1"])
def test_llama3_mask_with_real_llama3_vocabulary(name):
    _check_mask(llama3(), name, CONVERSATION)
    _check_mask(llama3(), name, CONVERSATION[1:3])  # no system prompt


@requires_smollm2
def test_chatml_training_template_renders_like_the_stock_smollm2_template():
    stock = smollm2_tokenizer()
    trained = smollm2_tokenizer()
    apply_training_chat_template(trained, "chatml")
    for messages in (CONVERSATION, CONVERSATION[:3], CONVERSATION[:2]):
        for prompt in (False, True):
            if prompt and messages[-1]["role"] == "assistant":
                continue
            expected = stock.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert trained.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == expected


def test_llama31_system_turn_and_prompt():
    tokenizer = llama3()
    apply_training_chat_template(tokenizer, "llama3.1")
    text = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You advise farmers on machinery.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow often should I grease the PTO shaft?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    dated = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, date_string="1 Jan 2026")
    assert "Today Date: 1 Jan 2026\n\n<|eot_id|>" in dated


def test_template_detection():
    tokenizer = llama3()
    assert detect_template_name(tokenizer) == "llama3"
    tokenizer.chat_template = "{{ 'Cutting Knowledge Date: December 2023' }}"
    assert detect_template_name(tokenizer) == "llama3.1"
    with pytest.raises(ChatTemplateError, match="neither the Llama-3 header tokens nor the ChatML"):
        detect_template_name(tiny_tokenizer())


def test_auto_and_pad_token():
    tokenizer = llama3()
    assert tokenizer.pad_token is None
    assert apply_training_chat_template(tokenizer) == "llama3"
    assert tokenizer.pad_token == "<|eot_id|>"
    # A tokenizer whose template already has markers keeps it.
    assert apply_training_chat_template(tokenizer, "auto") == "tokenizer"


def test_template_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match=r"needs the special tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
        apply_training_chat_template(llama3(), "chatml")
    with pytest.raises(ChatTemplateError, match="unknown chat template 'vicuna'"):
        apply_training_chat_template(llama3(), "vicuna")
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"plain.jinja' has no \{% generation %\}"):
        apply_training_chat_template(llama3(), str(plain))
    with pytest.raises(ChatTemplateError, match="does not exist"):
        apply_training_chat_template(llama3(), str(tmp_path / "missing.jinja"))
    marked = tmp_path / "marked.jinja"
    marked.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eot_id|>"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    tokenizer = llama3()
    assert apply_training_chat_template(tokenizer, str(marked)) == str(marked)
    encoded = tokenizer.apply_chat_template(
        CONVERSATION[1:3], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert sum(encoded["assistant_masks"]) > 0


@requires_smollm2
def test_trl_builds_the_same_mask(tmp_path):
    """TRL's assistant_only_loss takes its mask from these markers: check what it actually trains on."""
    from datasets import Dataset

    tokenizer = smollm2_tokenizer()
    apply_training_chat_template(tokenizer, "chatml")
    trainer = tokenizing_sft_trainer(tokenizer, Dataset.from_list([{"messages": CONVERSATION}]), str(tmp_path))
    row = trainer.train_dataset[0]
    expected_ids, expected_mask = _expected_mask(tokenizer, CONVERSATION, "<|im_end|>")
    assert row["input_ids"] == expected_ids
    assert row["labels"] == [t if m else -100 for t, m in zip(expected_ids, expected_mask)]


# ------------------------------------------------------------------------- the same text as the stock templates

NO_SYSTEM = CONVERSATION[1:]
LOGGER = "hf_tuning.llm.chat_templates"
QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Quotes, Jinja delimiters, a backslash, a newline and non-ASCII text: written into our template as a literal.
TRICKY_DEFAULT = 'Say "hi" {{ x }} %} back\\slash\nline two, é, 😀'
PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRICKY_CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n' + " + repr(TRICKY_DEFAULT) + " + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _trl_stock_template(name: str) -> str:
    """A stock chat template as the installed TRL ships it (byte copies it keeps to recognise models)."""
    spec = importlib.util.find_spec("trl")
    path = Path(spec.origin).parent / "chat_templates" / f"{name}.jinja" if spec and spec.origin else None
    # TRL is a dependency: if a release stops shipping these copies, this test must find another reference,
    # not quietly stop comparing
    assert path is not None and path.is_file(), f"the installed TRL has no copy of the stock {name} chat template"
    return path.read_text(encoding="utf-8")


def _renderings(tokenizer, conversations=None, **kwargs) -> list[str]:
    """Conversations with and without a system message, as training text and, ending with a user turn,
    as generation prompts."""
    texts = []
    for messages in conversations or (CONVERSATION, CONVERSATION[:2], NO_SYSTEM, NO_SYSTEM[:1], NO_SYSTEM[:2]):
        for prompt in (False, True) if messages[-1]["role"] == "user" else (False,):
            texts.append(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **kwargs)
            )
    return texts


@requires_smollm2
def test_chatml_adds_the_stock_smollm2_default_system_turn(caplog):
    stock = smollm2_tokenizer()
    trained = smollm2_tokenizer()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply_training_chat_template(trained, "chatml")
    assert not caplog.records  # nothing differs from the stock template, so nothing to warn about
    assert _renderings(trained) == _renderings(stock)
    assert trained.apply_chat_template(NO_SYSTEM[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHow often should I grease the PTO shaft?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert trained.apply_chat_template(CONVERSATION[:2], tokenize=False) == (
        "<|im_start|>system\nYou advise farmers on machinery.<|im_end|>\n"
        "<|im_start|>user\nHow often should I grease the PTO shaft?<|im_end|>\n"
    )
    # Opting out at render time, and the default turn is never learned.
    opted_out = trained.apply_chat_template(NO_SYSTEM[:1], tokenize=False, default_system_message="")
    assert opted_out == "<|im_start|>user\nHow often should I grease the PTO shaft?<|im_end|>\n"
    _check_mask(smollm2_tokenizer(), "chatml", NO_SYSTEM)


@requires_smollm2
@pytest.mark.parametrize(
    ("stock_name", "default"),
    [("qwen2_5", QWEN25_DEFAULT), ("tricky", TRICKY_DEFAULT), ("plain", "")],
    ids=["qwen2_5", "tricky", "plain"],
)
def test_chatml_keeps_each_models_own_default_system_turn_also_once_saved(tmp_path, stock_name, default):
    stock = smollm2_tokenizer()
    stock.chat_template = {"tricky": TRICKY_CHATML, "plain": PLAIN_CHATML}.get(stock_name) or _trl_stock_template(
        stock_name
    )
    assert stock_default_system_message(stock) == default
    trained = copy.deepcopy(stock)
    apply_training_chat_template(trained, "chatml")
    assert _renderings(trained) == _renderings(stock)
    first = trained.apply_chat_template(NO_SYSTEM[:1], tokenize=False)
    assert first.startswith(f"<|im_start|>system\n{default}<|im_end|>\n" if default else "<|im_start|>user\n")
    trained.save_pretrained(tmp_path)  # what the recipe saves beside the adapter, for inference
    assert _renderings(AutoTokenizer.from_pretrained(tmp_path)) == _renderings(stock)
    reapplied = copy.deepcopy(trained)  # applying it again to the saved template keeps the default
    apply_training_chat_template(reapplied, "chatml")
    assert reapplied.chat_template == trained.chat_template


# The stock Llama 3.1 layout, as written out by hand: the system header with its two date lines, and the
# first exchange of CONVERSATION.
LLAMA31_SYSTEM_HEADER = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
FIRST_EXCHANGE = (
    "<|start_header_id|>user<|end_header_id|>\n\nHow often should I grease the PTO shaft?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "Every 8 to 10 hours of use, or as the operator's manual says.<|eot_id|>"
)


@pytest.mark.parametrize(
    ("messages", "prompt", "expected"),
    [
        pytest.param(
            CONVERSATION[:3],
            False,
            LLAMA31_SYSTEM_HEADER + "You advise farmers on machinery.<|eot_id|>" + FIRST_EXCHANGE,
            id="system",
        ),
        pytest.param(
            CONVERSATION[1:3],
            False,
            LLAMA31_SYSTEM_HEADER + "<|eot_id|>" + FIRST_EXCHANGE,
            id="no-system",
        ),
        pytest.param(
            [{"role": m["role"], "content": f"  {m['content']}\n"} for m in CONVERSATION],
            False,
            LLAMA31_SYSTEM_HEADER
            + "You advise farmers on machinery.<|eot_id|>"
            + FIRST_EXCHANGE
            + "<|start_header_id|>user<|end_header_id|>\n\nAnd the cross journals?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
            "Grease them at the same interval until clean grease shows at the seals.<|eot_id|>",
            id="multi-turn-trimmed",
        ),
        pytest.param(
            CONVERSATION[1:4],
            True,
            LLAMA31_SYSTEM_HEADER
            + "<|eot_id|>"
            + FIRST_EXCHANGE
            + "<|start_header_id|>user<|end_header_id|>\n\nAnd the cross journals?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            id="generation-prompt",
        ),
    ],
)
def test_llama31_renders_the_documented_stock_layout(messages, prompt, expected):
    """What the stock Llama-3.1-Instruct template is documented to render for conversations without tools:
    BOS once, a system turn with the knowledge-cutoff and date lines (then the system message, if any), every
    content trimmed, and the assistant header as the generation prompt."""
    tokenizer = llama3()
    apply_training_chat_template(tokenizer, "llama3.1")
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == expected


@pytest.mark.parametrize(("name", "stock_file"), [("llama3", "llama3"), ("llama3.1", "llama3_1")])
def test_llama_templates_render_like_the_stock_templates(caplog, name, stock_file):
    stock = llama3()
    stock.chat_template = _trl_stock_template(stock_file)
    trained = copy.deepcopy(stock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert apply_training_chat_template(trained) == name  # auto: told apart by the stock template
    assert not caplog.records and compare_with_stock(trained, stock.chat_template) is None
    padded = [{"role": m["role"], "content": f"  {m['content']}\n"} for m in CONVERSATION]
    conversations = (CONVERSATION, CONVERSATION[:2], NO_SYSTEM, NO_SYSTEM[:1], padded, padded[1:4])
    assert _renderings(trained, conversations) == _renderings(stock, conversations)


def test_llama32_date_line_is_the_one_difference_and_it_is_reported(caplog):
    stock = llama3()
    stock.chat_template = _trl_stock_template("llama3_2")
    trained = copy.deepcopy(stock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert apply_training_chat_template(trained) == "llama3.1"
    today = time.strftime("%d %b %Y")  # what the stock Llama 3.2 template writes (strftime_now)
    assert "does not render the same text" in caplog.text
    assert f"Today Date: {today}" in caplog.text and "Today Date: 26 Jul 2024" in caplog.text
    fixed = {"date_string": "26 Jul 2024"}
    assert _renderings(trained, **fixed) == _renderings(stock, **fixed)


@requires_smollm2
def test_a_chatml_variant_that_renders_differently_is_reported(caplog):
    tokenizer = smollm2_tokenizer()
    tokenizer.chat_template = _trl_stock_template("qwen3")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply_training_chat_template(tokenizer, "chatml")
    assert "does not render the same text" in caplog.text and "<think>" in caplog.text
    assert compare_with_stock(tokenizer, "{{ raise_exception('no') }}") is None  # nothing to compare with
