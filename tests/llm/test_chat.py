"""``hf-tuning chat``: the session against ``model.generate``, history and reset, sampling, stop tokens, the
context limit, the line loop, loading (adapter, merged folder, templates), bad input, the command itself."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_tuning.cli import main as cli_main
from hf_tuning.llm.chat import COMMANDS_HELP, ChatModel, ChatSession, GenerationSettings, load_chat_model, run_chat
from tests.helpers import REPO_ROOT
from tests.helpers.real_models import SMOLLM2, requires_smollm2, smollm2_tokenizer
from tests.helpers.tiny import tiny_llama, tiny_tokenizer

# The training template: roles are not in the tiny vocabulary (they become <unk>); every reply ends with </s>,
# the tokenizer's EOS, which is therefore the end-of-turn token.
TRAINING_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} </s>{% endgeneration %} "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
# The base model's own (different) template: what chat falls back to when the adapter has no tokenizer.
BASE_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}reply {% endif %}"
QUESTION = "check the engine oil before each start"
OTHER = "replace the filter after every harvest"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny base (its tokenizer with the base template), a LoRA adapter that records the base and carries the
    training template, the same adapter without a tokenizer, and the adapter merged into a model folder."""
    root = tmp_path_factory.mktemp("chat")
    base = root / "base"
    tiny_llama(layers=2).save_pretrained(base)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = BASE_TEMPLATE
    tokenizer.save_pretrained(base)
    adapter = root / "adapter"
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)  # records base as its base model
    tuned.save_pretrained(adapter)
    tokenizer.chat_template = TRAINING_TEMPLATE
    tokenizer.save_pretrained(adapter)
    bare = root / "adapter-without-tokenizer"
    tuned.save_pretrained(bare)
    merged = root / "merged"
    tuned.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    return {"base": base, "adapter": adapter, "bare": bare, "merged": merged}


@pytest.fixture(scope="module")
def reference(folders) -> tuple[PeftModel, object]:
    """The adapter attached by hand, for comparison."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), folders["adapter"])
    return model.eval(), AutoTokenizer.from_pretrained(folders["adapter"])


@pytest.fixture(scope="module")
def loaded(folders) -> ChatModel:
    """The base with the adapter, loaded the way the command loads it (sessions only read it)."""
    return load_chat_model(base=str(folders["base"]), adapter=str(folders["adapter"]), device="cpu")


def session_for(loaded: ChatModel, system_prompt: str | None = None, **settings) -> ChatSession:
    settings.setdefault("max_new_tokens", NEW_TOKENS)
    return ChatSession(
        loaded.model,
        loaded.tokenizer,
        settings=GenerationSettings(**settings),
        system_prompt=system_prompt,
        template=loaded.template,
    )


def generate_tokens(model, tokenizer, prompt: str, **kwargs) -> list[int]:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
    return output[0, ids.shape[1] :].tolist()


def test_greedy_reply_streams_what_generate_gives_and_history_resets(loaded, reference) -> None:
    model, tokenizer = reference
    session = session_for(loaded, system_prompt="you are a tractor engine")
    assert session.stop_token_ids == [tokenizer.eos_token_id]  # the training template ends turns with </s>
    streamed = io.StringIO()
    first = session.reply(QUESTION, stream_to=streamed)
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "you are a tractor engine"}, {"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert session.last_prompt == prompt and prompt.startswith("system you are a tractor engine user check")
    expected = generate_tokens(model, tokenizer, prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2)
    assert first == tokenizer.decode(expected, skip_special_tokens=True) and first
    assert streamed.getvalue() == first
    with model.disable_adapter():  # the adapter changes the answer: the session really uses it
        base_tokens = generate_tokens(model, tokenizer, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert base_tokens != expected

    second = session.reply(OTHER)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first and session.history[3]["content"] == second
    assert f"user {QUESTION} assistant {first} </s> user {OTHER} assistant " in session.last_prompt

    session.reset()
    assert session.history == [] and session.system_prompt == "you are a tractor engine"
    assert session.reply(QUESTION) == first
    assert session.last_prompt == prompt  # only the system prompt and the new question


def test_sampling_is_reproducible_per_seed_and_differs_from_greedy(loaded) -> None:
    greedy = session_for(loaded).reply(QUESTION)
    sampled = {}
    for seed in range(4):
        one, two = (session_for(loaded, temperature=1.5, seed=seed) for _ in range(2))
        sampled[seed] = one.reply(QUESTION)
        assert two.reply(QUESTION) == sampled[seed]
        one.reset()
        assert one.reply(QUESTION) == sampled[seed]  # the seed restarts with the conversation
    assert any(reply != greedy for reply in sampled.values())
    assert len(set(sampled.values())) > 1
    with pytest.raises(ValueError, match="--top_p, --seed only apply to sampling"):
        GenerationSettings(top_p=0.9, seed=1)


def test_an_end_of_turn_token_of_the_generation_config_ends_the_reply(folders, loaded, reference) -> None:
    model, tokenizer = reference
    prompt = session_for(loaded).render(QUESTION)
    tokens = generate_tokens(model, tokenizer, prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2)
    assert len(tokens) == NEW_TOKENS and 2 not in tokens  # the free run does not stop by itself
    stop_at = next(i for i in range(1, NEW_TOKENS) if tokens[i] not in tokens[:i])
    merged = load_chat_model(model=str(folders["merged"]), device="cpu")
    merged.model.generation_config.eos_token_id = [2, tokens[stop_at]]  # as the recipe sets it
    session = ChatSession(merged.model, merged.tokenizer, settings=GenerationSettings(max_new_tokens=NEW_TOKENS))
    assert session.stop_token_ids == sorted({2, tokens[stop_at]})
    assert session.reply(QUESTION) == tokenizer.decode(tokens[:stop_at], skip_special_tokens=True)


def test_history_beyond_the_context_drops_the_oldest_turns(loaded) -> None:
    notes = io.StringIO()
    session = session_for(loaded, system_prompt="be brief")
    session.notes = notes
    long_question = " ".join([QUESTION] * 5)  # 35 words: a turn is about 50 of the 128 positions
    for _ in range(2):
        session.reply(long_question)
    assert len(session.history) == 4 and notes.getvalue() == ""
    session.reply(OTHER + " " + long_question)
    assert "dropped the oldest 1 turn (the system prompt stays)" in notes.getvalue()
    assert len(session.history) == 4 and session.history[0]["content"] == long_question
    assert session.last_prompt.startswith("system be brief user " + long_question)
    assert len(session.tokenizer(session.last_prompt)["input_ids"]) <= 128 - NEW_TOKENS
    with pytest.raises(ValueError, match="the message is too long: its prompt has"):
        session.reply(" ".join([QUESTION] * 20))
    assert len(session.history) == 4 and session.history[0]["content"] == long_question  # left as it was


def test_the_line_loop_answers_commands_and_keeps_stdout_clean(loaded) -> None:
    session = session_for(loaded)
    script = f"{QUESTION}\n\n/help\n/bogus\n/system be brief\n{OTHER}\n/prompt\n/reset\n{QUESTION}\n/exit\n{OTHER}\n"
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, io.StringIO(script), out, err, interactive=False) == 0
    replies = out.getvalue().split("\n")
    assert len(replies) == 4 and replies[-1] == ""  # three replies, each ended by a newline
    fresh = session_for(loaded)
    assert replies[0] == fresh.reply(QUESTION)
    fresh.system_prompt = "be brief"
    assert replies[1] == fresh.reply(OTHER)
    assert replies[2] == session_for(loaded, system_prompt="be brief").reply(QUESTION)  # /reset keeps it
    assert COMMANDS_HELP in err.getvalue() and "unknown command '/bogus'" in err.getvalue()
    assert f"\nsystem be brief user {QUESTION} assistant {replies[0]} </s> user {OTHER} assistant \n" in err.getvalue()
    assert "you>" not in err.getvalue()

    out, err = io.StringIO(), io.StringIO()
    lines = io.StringIO(" ".join([QUESTION] * 20) + f"\n{QUESTION}\n")
    assert run_chat(session_for(loaded), lines, out, err, interactive=True, banner="tiny") == 1
    assert out.getvalue() == replies[0] + "\n"  # the failed message printed no reply; the loop went on
    assert err.getvalue().startswith("tiny\n/help lists") and err.getvalue().count("you> ") == 3
    assert "error: the message is too long" in err.getvalue()


def test_ctrl_c_in_a_terminal_stops_the_reply_and_forgets_the_exchange(loaded, monkeypatch) -> None:
    session = session_for(loaded)
    generate = session.model.generate
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(session.model, "generate", interrupted_once)
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(session, io.StringIO(f"{OTHER}\n{QUESTION}\n"), out, err, interactive=True) == 0
    assert "(reply stopped; that message and its partial reply are not kept)" in err.getvalue()
    assert out.getvalue() == "\n" + session_for(loaded).reply(QUESTION) + "\n"  # as if OTHER was never asked
    assert [m["content"] for m in session.history if m["role"] == "user"] == [QUESTION]

    calls.clear()  # in a script there is nobody to give the prompt back to: Ctrl-C ends the chat
    with pytest.raises(KeyboardInterrupt):
        run_chat(session_for(loaded), io.StringIO(f"{QUESTION}\n"), io.StringIO(), io.StringIO(), interactive=False)


def test_loading_picks_the_saved_template_or_falls_back_with_a_note(folders, loaded, tmp_path) -> None:
    assert isinstance(loaded.model, PeftModel) and loaded.tokenizer.chat_template == TRAINING_TEMPLATE
    assert loaded.notes == [] and loaded.template == ""
    bare = load_chat_model(adapter=str(folders["bare"]), device="cpu")  # the adapter names its base
    assert bare.tokenizer.chat_template == BASE_TEMPLATE and "has no tokenizer" in bare.notes[0]
    template = tmp_path / "mine.jinja"
    template.write_text(TRAINING_TEMPLATE.replace("assistant ", "answer "), encoding="utf-8")
    custom = load_chat_model(model=str(folders["merged"]), chat_template=str(template), device="cpu")
    assert custom.tokenizer.chat_template == template.read_text(encoding="utf-8")
    merged = load_chat_model(model=str(folders["merged"]), device="cpu")
    assert merged.tokenizer.chat_template == TRAINING_TEMPLATE
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(merged.model(ids).logits, loaded.model(ids).logits, atol=1e-5, rtol=1e-4)


def test_bad_arguments_exit_2_with_a_clear_message(folders, tmp_path, capsys) -> None:
    no_base = tmp_path / "no-base"
    no_base.mkdir()
    config = json.loads((folders["adapter"] / "adapter_config.json").read_text())
    (no_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    no_template = tmp_path / "no-template"
    AutoModelForCausalLM.from_pretrained(folders["base"]).config.save_pretrained(no_template)
    tiny_tokenizer().save_pretrained(no_template)
    base, adapter = str(folders["base"]), str(folders["adapter"])
    cases = [
        (["--adapter", adapter, "--model", str(folders["merged"])], "takes neither --adapter nor --base"),
        (["--model", str(tmp_path / "missing")], "does not exist: expected a merged model folder"),
        (["--model", str(tmp_path)], "has no config.json"),
        (["--base", base, "--adapter", str(tmp_path / "missing")], "adapter folder .* does not exist"),
        (["--adapter", str(no_base)], "records no base model: pass --base"),
        (["--base", str(no_template), "--max_new_tokens", "8"], "has no chat template: pass --chat_template"),
        (["--base", base, "--max_new_tokens", "8", "--chat_template", "mistral"], "unknown chat template 'mistral'"),
        (["--base", base, "--top-k", "5"], "--top_k only apply to sampling"),
        (["--base", base, "--max_new_tokens", "128"], "leaves no room for a prompt"),
        ([], "nothing to chat with"),
    ]
    capsys.readouterr()  # what building the folders printed
    for arguments, message in cases:
        assert cli_main(["chat", *arguments]) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith("hf-tuning chat: error: ") and error.count("\n") == 1, (arguments, error)
        assert re.search(message, error), (arguments, error)


def test_the_command_through_standard_input(folders, reference) -> None:
    """The installed command in a subprocess, its base read from the adapter; stdout holds the replies only."""
    model, tokenizer = reference
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = tokenizer.decode(
        generate_tokens(model, tokenizer, prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2),
        skip_special_tokens=True,
    )
    result = subprocess.run(
        [sys.executable, "-m", "hf_tuning.cli", "chat", "--adapter", str(folders["adapter"]), "--max-new-tokens", "8"],
        input=f"{QUESTION}\n/reset\n{QUESTION}\n/exit\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{expected}\n{expected}\n"
    assert "you>" not in result.stderr and "/help" not in result.stderr


@requires_smollm2
def test_smollm2_with_a_lora_adapter_stops_at_im_end(tmp_path) -> None:
    from hf_tuning.llm.chat_templates import apply_training_chat_template
    from hf_tuning.llm.loading import load_causal_lm

    base = load_causal_lm(SMOLLM2)
    torch.manual_seed(0)
    adapter_config = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(base, adapter_config).save_pretrained(tmp_path)
    tokenizer = smollm2_tokenizer()
    assert apply_training_chat_template(tokenizer, "chatml") == "chatml"
    tokenizer.save_pretrained(tmp_path)

    loaded = load_chat_model(base=SMOLLM2, adapter=str(tmp_path), device="cpu")
    assert loaded.template == "chatml"
    session = ChatSession(
        loaded.model,
        loaded.tokenizer,
        settings=GenerationSettings(max_new_tokens=24),
        system_prompt="Answer in one short sentence.",
        template=loaded.template,
    )
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in session.stop_token_ids
    streamed = io.StringIO()
    reply = session.reply("What is the capital of France?", stream_to=streamed)
    prompt = session.last_prompt
    assert prompt.startswith("<|im_start|>system\nAnswer in one short sentence.<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    tokens = generate_tokens(
        loaded.model, loaded.tokenizer, prompt, max_new_tokens=24, do_sample=False, eos_token_id=session.stop_token_ids
    )
    assert reply == streamed.getvalue() == loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in reply and tokens[-1] == im_end  # a whole answer, ended by the end-of-turn token


def test_what_libraries_print_while_loading_goes_to_stderr(monkeypatch, capsys):
    """DeepSpeed prints its accelerator notice on stdout when a GGUF base loads; a scripted chat's stdout holds the
    replies alone."""
    from hf_tuning import cli
    from hf_tuning.llm import chat

    def noisy_load(**kwargs):
        print("[WARNING] Setting accelerator to CPU.")
        raise ValueError("stop after loading")

    monkeypatch.setattr(chat, "load_chat_model", noisy_load)
    assert cli.main(["chat", "--base", "some/model"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Setting accelerator to CPU" in err and "stop after loading" in err
