"""Training chat templates: the loss mask token by token, and prompts that tokenize the same at inference."""

from __future__ import annotations

import copy

import pytest

from hf_tuning.llm.chat_templates import (
    ChatTemplateError,
    apply_training_chat_template,
    detect_template_name,
    end_of_turn_token,
)
from tests.helpers.llama3_tokenizer import llama3_tokenizer
from tests.helpers.real_models import requires_smollm2, smollm2_tokenizer
from tests.helpers.tiny import tiny_tokenizer

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
    if name == "llama3.1" and roles[0] != "system":
        roles.insert(0, "system")  # Llama 3.1 always opens with a system turn
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
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_tuning import StagedSFTConfig, StagedSFTTrainer

    tokenizer = smollm2_tokenizer()
    apply_training_chat_template(tokenizer, "chatml")
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    args = StagedSFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        max_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dt_variant="ost",
        save_strategy="no",
    )
    trainer = StagedSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": CONVERSATION}]),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    expected_ids, expected_mask = _expected_mask(tokenizer, CONVERSATION, "<|im_end|>")
    assert row["input_ids"] == expected_ids
    assert row["labels"] == [t if m else -100 for t, m in zip(expected_ids, expected_mask)]
