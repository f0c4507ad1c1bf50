"""SFT evaluation: local metrics, batched generation, held-out loss, base vs adapter, reports, CLI."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.helpers.tiny import WORDS, tiny_llama, tiny_tokenizer

pytest.importorskip("rouge_score", reason="the metrics extra (rouge_score, sacrebleu) is not installed")
pytest.importorskip("sacrebleu", reason="the metrics extra (rouge_score, sacrebleu) is not installed")

evaluate_sft = importlib.import_module("eval.evaluate_sft")

# Roles are not in the tiny vocabulary (they become <unk>); the WordLevel tokenizer splits on whitespace,
# so every piece is followed by a space. The reply and its </s> are the generation (assistant) tokens.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} </s>{% endgeneration %} "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
NO_MARKERS = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


def chat_tokenizer(template: str = TEMPLATE):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def conversations(count: int = 7, seed: int = 1) -> list[list[dict[str, str]]]:
    """Questions and answers of uneven lengths, so batches need padding."""
    generator = torch.Generator().manual_seed(seed)

    def words(n: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())

    rows = []
    for index in range(count):
        length = 2 + (index * 5) % 11
        rows.append(
            [{"role": "user", "content": words(length)}, {"role": "assistant", "content": words(length // 2 + 1)}]
        )
    return rows


def save_adapter(path: Path, seed: int = 0) -> Path:
    """A LoRA adapter with random (non-zero) B weights, so the tuned model differs from the base."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(layers=2, seed=seed), config).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- metrics


def test_rouge_hand_computed_values() -> None:
    rouge = evaluate_sft.load_local_metric("rouge")
    same = rouge.compute(predictions=["check the engine oil"], references=["check the engine oil"])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})
    disjoint = rouge.compute(predictions=["tractor seed drill"], references=["grain tank filter"])
    assert disjoint == pytest.approx({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0})
    # unigrams: 2 of 3 shared both ways -> F = 2/3; bigrams: "the cat" of 2 -> 1/2; LCS "the cat" -> 2/3
    small = rouge.compute(predictions=["the cat sat"], references=["the cat ran"])
    assert small == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.5, "rougeL": 2 / 3, "rougeLsum": 2 / 3})
    # the mean over examples: (1 + 0) / 2
    mean = rouge.compute(predictions=["oil filter", "tyre"], references=["oil filter", "belt"])
    assert mean["rouge1"] == pytest.approx(0.5)


def test_rouge_stemming_sentences_and_multiple_references() -> None:
    rouge = evaluate_sft.load_local_metric("rouge")
    stemmed = rouge.compute(predictions=["cleaning filters"], references=["cleaned filter"])
    plain = rouge.compute(predictions=["cleaning filters"], references=["cleaned filter"], use_stemmer=False)
    assert stemmed["rouge1"] == pytest.approx(1.0) and plain["rouge1"] == pytest.approx(0.0)
    # sentences swapped: one LCS over the whole text keeps 2 of 4 tokens, sentence-level LCS keeps all
    swapped = rouge.compute(predictions=["tractor engine. oil filter!"], references=["oil filter. tractor engine?"])
    assert swapped["rougeL"] == pytest.approx(0.5) and swapped["rougeLsum"] == pytest.approx(1.0)
    best = rouge.compute(predictions=["the cat sat"], references=[["grain tank", "the cat sat"]])
    assert best["rouge1"] == pytest.approx(1.0)
    per_example = rouge.compute(predictions=["a b", "c"], references=["a b", "d"], use_aggregator=False)
    assert per_example["rouge1"] == pytest.approx([1.0, 0.0])


def test_bleu_hand_computed_values() -> None:
    bleu = evaluate_sft.load_local_metric("bleu")
    same = bleu.compute(predictions=["check the engine oil daily"], references=["check the engine oil daily"])
    assert same["score"] == pytest.approx(100.0) and same["brevity_penalty"] == pytest.approx(1.0)
    assert bleu.compute(predictions=["tractor seed drill boom"], references=["grain tank oil filter"])["score"] == 0.0
    # every n-gram matches, but 6 hypothesis tokens against 7 reference tokens: BP = exp(1 - 7/6)
    short = bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat today"])
    assert short["score"] == pytest.approx(100 * math.exp(1 - 7 / 6))
    assert short["precisions"] == pytest.approx([100.0] * 4)
    assert (short["sys_len"], short["ref_len"]) == (6, 7)
    # a list of references per prediction, of different lengths: the matching one counts
    several = bleu.compute(
        predictions=["the cat sat on the mat", "clean the oil filter now"],
        references=[["a dog", "the cat sat on the mat"], ["clean the oil filter now"]],
    )
    assert several["score"] == pytest.approx(100.0)


def test_score_answers_scale_and_unknown_metric() -> None:
    scores = evaluate_sft.score_answers(["check the engine oil daily"], ["check the engine oil daily"])
    assert scores == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0, "bleu": 100.0}
    )
    with pytest.raises(FileNotFoundError, match="no local metric 'meteor'"):
        evaluate_sft.load_local_metric("meteor")


# --------------------------------------------------------------------------- generation and loss


def test_prompt_drops_the_reference_and_ends_with_generation_prompt() -> None:
    tokenizer = chat_tokenizer()
    conversation = [{"role": "user", "content": "check the oil"}, {"role": "assistant", "content": "clean the filter"}]
    (ids,) = evaluate_sft.encode_prompts(tokenizer, [conversation])
    assert tokenizer.convert_ids_to_tokens(ids) == ["<unk>", "check", "the", "oil", "<unk>"]  # no BOS added twice
    with pytest.raises(ValueError, match="must end with an assistant message"):
        evaluate_sft.encode_prompts(tokenizer, [conversation[:1]])


def test_batched_generation_matches_one_by_one() -> None:
    """Left padding with its attention mask gives the same greedy answers as unpadded generation.

    fp32 and seed 0: with this model no near-tied logits flip a greedy token (seeds 0-4 all hold).
    """
    model, tokenizer, rows = tiny_llama(layers=2, seed=0), chat_tokenizer(), conversations()
    batched = evaluate_sft.generate_answers(model, tokenizer, rows, batch_size=3, max_new_tokens=8)
    single = [evaluate_sft.generate_answers(model, tokenizer, [row], batch_size=1, max_new_tokens=8)[0] for row in rows]
    assert batched == single
    assert all(answer for answer in batched)  # it generated something, not an immediate end of sequence
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<pad>"  # restored


def test_heldout_loss_equals_per_example_loss() -> None:
    model, tokenizer, rows = tiny_llama(layers=2, seed=0), chat_tokenizer(), conversations()
    result = evaluate_sft.heldout_loss(model, tokenizer, rows, batch_size=3)
    weighted, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            encoded = tokenizer.apply_chat_template(row, return_dict=True, return_assistant_tokens_mask=True)
            ids = torch.tensor([encoded["input_ids"]])
            labels = torch.where(torch.tensor([encoded["assistant_masks"]]) == 1, ids, -100)
            count = int((labels[:, 1:] != -100).sum())
            weighted += model(input_ids=ids, labels=labels).loss.item() * count
            tokens += count
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(weighted / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(weighted / tokens), rel=1e-5)


def test_heldout_loss_needs_generation_markers() -> None:
    with pytest.raises(ValueError, match="generation %}"):
        evaluate_sft.heldout_loss(tiny_llama(layers=2), chat_tokenizer(NO_MARKERS), conversations(2))


# --------------------------------------------------------------------------- base vs adapter and reports


def test_evaluate_base_and_adapter_end_to_end(tmp_path: Path) -> None:
    adapter = save_adapter(tmp_path / "adapter")
    base, tokenizer, rows = tiny_llama(layers=2, seed=0), chat_tokenizer(), conversations(5)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    base_only = evaluate_sft.evaluate_models(base, tokenizer, rows, batch_size=2, max_new_tokens=6)
    results = evaluate_sft.evaluate_models(base, tokenizer, rows, adapter, batch_size=2, max_new_tokens=6)

    keys = {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "loss", "perplexity", "tokens", "tokens_per_second"}
    assert set(results) == {"num_examples", "base", "tuned", "examples"} and results["num_examples"] == 5
    assert keys <= set(results["base"]) and keys <= set(results["tuned"])
    assert results["base"]["loss"] == pytest.approx(base_only["base"]["loss"])  # the true base, not the adapter
    assert results["tuned"]["loss"] != pytest.approx(results["base"]["loss"])
    assert [e["base"] for e in results["examples"]] == [e["base"] for e in base_only["examples"]]
    assert [e["tuned"] for e in results["examples"]] != [e["base"] for e in results["examples"]]
    assert results["examples"][0]["question"] == rows[0][0]["content"]
    assert results["examples"][0]["reference"] == rows[0][1]["content"]
    # the caller gets its base model back: no LoRA layers, weights unchanged
    assert not any("lora" in name for name, _ in base.named_modules())
    assert all(torch.equal(before[name], tensor) for name, tensor in base.state_dict().items())

    json_path, md_path = evaluate_sft.write_reports(results, tmp_path / "report", show=2)
    assert json.loads(json_path.read_text())["tuned"]["loss"] == results["tuned"]["loss"]
    markdown = md_path.read_text()
    assert "| metric | base | tuned | delta |" in markdown
    assert "| ROUGE-1 |" in markdown and "| perplexity |" in markdown
    assert "| # | question | reference | base | tuned |" in markdown
    assert "## Examples (first 2 of 5)" in markdown


def test_adapter_folder_errors_come_before_any_work(tmp_path: Path) -> None:
    model, tokenizer, rows = tiny_llama(layers=2), chat_tokenizer(), conversations(2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_sft.evaluate_models(model, tokenizer, rows, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        evaluate_sft.evaluate_models(model, tokenizer, rows, tmp_path / "empty")
    with pytest.raises(ValueError, match="generation %}"):
        evaluate_sft.evaluate_models(model, chat_tokenizer(NO_MARKERS), rows)


def test_base_only_report_escapes_cells(tmp_path: Path) -> None:
    metrics = {
        "rouge1": 12.345,
        "rouge2": 1.0,
        "rougeL": 2.0,
        "rougeLsum": 3.0,
        "bleu": 4.0,
        "loss": 2.5,
        "perplexity": 12.18,
    }
    example = {"question": "a | b", "reference": "line one\nline two", "base": ""}
    results = {"num_examples": 1, "base": metrics, "examples": [example]}
    _, md_path = evaluate_sft.write_reports(results, tmp_path)
    markdown = md_path.read_text()
    assert "| metric | base |" in markdown and "tuned" not in markdown
    assert "| ROUGE-1 | 12.35 |" in markdown
    assert "| 1 | a \\| b | line one<br>line two |   |" in markdown


def test_cli_writes_reports_into_the_adapter_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    model_dir = tmp_path / "model"
    tiny_llama(layers=2, seed=0).save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    adapter = save_adapter(tmp_path / "adapter")
    rows = conversations(3)
    requested = {}

    def fake_conversations(name, split, count):  # the dataset builder is tested on its own
        requested.update(name=name, split=split, count=count)
        return rows[:count]

    monkeypatch.setattr(evaluate_sft, "load_conversations", fake_conversations)
    argv = ["--base_model", str(model_dir), "--adapter", str(adapter), "--num_examples", "2", "--batch_size", "2"]
    assert evaluate_sft.main([*argv, "--max_new_tokens", "4", "--show", "1", "--dtype", "float32"]) == 0
    assert requested == {"name": None, "split": "test", "count": 2}
    results = json.loads((adapter / "eval_results.json").read_text())
    assert results["config"]["chat_template"] == "tokenizer" and results["num_examples"] == 2
    assert (adapter / "eval_report.md").is_file()
    out = capsys.readouterr().out
    assert "=== example 1 ===" in out and "REFERENCE" in out and "=== example 2 ===" not in out


def test_cli_argument_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        evaluate_sft.parse_args(["--base_model", "x"])
    assert "--output_dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_sft.parse_args(["--base_model", "x", "--adapter", str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- one rule with the library


def chatml_tokenizer():
    """The tiny vocabulary with ChatML's end-of-turn token in place of the last word (same size as the model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<|im_end|>", *WORDS[:-1]])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.mark.parametrize("template", [None, "chatml"])
def test_generation_stops_on_the_library_stop_tokens(template, monkeypatch) -> None:
    """generate_answers stops where the recipe's generation config does: hf_tuning's stop_token_ids."""
    from hf_tuning.llm.chat_templates import stop_token_ids

    model, tokenizer = tiny_llama(layers=2, seed=0), chatml_tokenizer()
    model.generation_config.eos_token_id = [2, 7]  # a configured extra stop id is kept too
    seen = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["eos_token_id"]) or generate(**kw))
    evaluate_sft.generate_answers(model, tokenizer, conversations(2), max_new_tokens=3, chat_template=template)
    assert seen[0] == stop_token_ids(tokenizer, template or "", generation_config=model.generation_config)
    assert seen[0] == ([2, 4, 7] if template == "chatml" else [2, 7])  # <|im_end|> is id 4


@pytest.mark.parametrize(
    "template",
    [TEMPLATE, TEMPLATE.replace("{% generation %}", "{%- generation -%}"), NO_MARKERS, None],
)
def test_generation_marker_check_is_the_library_check(template) -> None:
    """The held-out loss accepts exactly the templates the trainer's loss mask accepts."""
    from hf_tuning.llm.chat_templates import has_generation_markers

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    if has_generation_markers(template):
        evaluate_sft.require_generation_markers(tokenizer)
    else:
        with pytest.raises(ValueError, match="apply_training_chat_template"):
            evaluate_sft.require_generation_markers(tokenizer)


def test_evaluate_model_scores_answers_and_loss_on_separate_rows() -> None:
    """What the experiments call: answers to some conversations, the loss over others, with timings."""
    model, tokenizer, rows = tiny_llama(layers=2, seed=0), chat_tokenizer(), conversations(6)
    metrics, answers = evaluate_sft.evaluate_model(
        model, tokenizer, rows[:2], loss_conversations=rows, batch_size=3, max_new_tokens=4
    )
    assert metrics["loss"] == pytest.approx(evaluate_sft.heldout_loss(model, tokenizer, rows)["loss"])
    assert answers == evaluate_sft.generate_answers(model, tokenizer, rows[:2], max_new_tokens=4)
    references = [row[-1]["content"] for row in rows[:2]]
    assert {k: metrics[k] for k in ("rougeL", "bleu")} == pytest.approx(
        {k: v for k, v in evaluate_sft.score_answers(answers, references).items() if k in ("rougeL", "bleu")}
    )
    assert metrics["loss_seconds"] >= 0 and metrics["generation_seconds"] >= 0


def test_evaluate_models_with_values_matches_the_cli(tmp_path: Path, monkeypatch) -> None:
    """The CLI is a thin wrapper: the loaded model, the settings dataclass and evaluate_models give its numbers."""
    model_dir = tmp_path / "model"
    tiny_llama(layers=2, seed=0).save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    adapter = save_adapter(tmp_path / "adapter")
    (adapter / "README.md").unlink()  # no model card to update: the CLI and run_evaluation below both run
    rows = conversations(3)
    monkeypatch.setattr(evaluate_sft, "load_conversations", lambda name, split, count: rows[:count])
    argv = ["--base_model", str(model_dir), "--adapter", str(adapter), "--num_examples", "3", "--batch_size", "2"]
    argv += ["--max_new_tokens", "4", "--dtype", "float32", "--device", "cpu", "--output_dir", str(tmp_path / "cli")]
    assert evaluate_sft.main(argv) == 0
    from_cli = json.loads((tmp_path / "cli" / "eval_results.json").read_text())

    settings = evaluate_sft.parse_args(argv)
    assert settings == evaluate_sft.SftEvalSettings(
        base_model=str(model_dir),
        adapter=str(adapter),
        num_examples=3,
        batch_size=2,
        max_new_tokens=4,
        dtype="float32",
        device="cpu",
        output_dir=str(tmp_path / "cli"),
    )
    model, tokenizer, template = evaluate_sft.load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu")
    assert template == from_cli["config"]["chat_template"] == "tokenizer"
    results = evaluate_sft.evaluate_models(
        model, tokenizer, rows, adapter, batch_size=2, max_new_tokens=4, chat_template=template
    )
    timing = ("generation_seconds", "tokens_per_second", "loss_seconds")
    for label in ("base", "tuned"):
        assert {k: v for k, v in results[label].items() if k not in timing} == pytest.approx(
            {k: v for k, v in from_cli[label].items() if k not in timing}
        )
    assert results["examples"] == from_cli["examples"]
    run, _, _ = evaluate_sft.run_evaluation(settings)  # what main does, from the dataclass
    assert run["examples"] == from_cli["examples"] and run["config"] == from_cli["config"]


def test_settings_validate_in_code_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--output_dir is required"):
        evaluate_sft.SftEvalSettings(base_model="x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_sft.SftEvalSettings(base_model="x", adapter=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--batch_size must be at least 1"):
        evaluate_sft.SftEvalSettings(base_model="x", output_dir=str(tmp_path), batch_size=0)
    settings = evaluate_sft.parse_args(["--base_model", "x", "--output_dir", str(tmp_path), "--trust_remote_code"])
    assert settings.trust_remote_code is True and settings.split == "test" and settings.chat_template == "auto"


# --------------------------------------------------------------------------- hf_tuning.tuners adapters (SNELL)


def save_snell_adapter(path: Path, seed: int = 0) -> Path:
    """A SNELL adapter folder (adapter_config.json names `method`) with trained-looking factors, so the tuned model
    differs visibly from the base."""
    from hf_tuning.tuners import SNELLConfig, get_petl_model

    config = SNELLConfig(rank=4, sparsity=0.5, dropout=0.0, drop_path=0.0, base_model_name_or_path="tests/tiny")
    model = get_petl_model(tiny_llama(layers=2, seed=seed), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_factors"):
                param.copy_(torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    return path


def test_snell_adapter_is_loaded_by_its_method_merged_or_not(tmp_path: Path) -> None:
    adapter = save_snell_adapter(tmp_path / "snell")
    base, tokenizer, rows = tiny_llama(layers=2, seed=0), chat_tokenizer(), conversations(4)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with evaluate_sft.tuned_model(base, adapter) as tuned:
            assert type(tuned).__name__ == "SNELLModel" and not tuned.merged
            unmerged = tuned(input_ids=ids).logits
        with evaluate_sft.tuned_model(base, adapter, merge=True) as tuned:
            assert tuned.merged
            merged = tuned(input_ids=ids).logits
    assert (unmerged - plain).abs().max() > 0.1
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)

    results = evaluate_sft.evaluate_models(base, tokenizer, rows, adapter, batch_size=2, max_new_tokens=5)
    fast = evaluate_sft.evaluate_models(
        base, tokenizer, rows, adapter, batch_size=2, max_new_tokens=5, merge_adapter=True
    )
    assert results["tuned"]["loss"] != pytest.approx(results["base"]["loss"])
    assert fast["tuned"]["loss"] == pytest.approx(results["tuned"]["loss"], rel=1e-5)
    assert [e["tuned"] for e in fast["examples"]] == [e["tuned"] for e in results["examples"]]
    assert [e["tuned"] for e in results["examples"]] != [e["base"] for e in results["examples"]]
    # the caller gets its plain base back: no SNELL layers; weights untouched, or unmerged to float rounding
    assert not any(type(module).__name__ == "SnellLinear" for module in base.modules())
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-6)


def test_cli_evaluates_a_snell_folder(tmp_path: Path, monkeypatch) -> None:
    model_dir = tmp_path / "model"
    tiny_llama(layers=2, seed=0).save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    adapter = save_snell_adapter(tmp_path / "snell")
    rows = conversations(2)
    monkeypatch.setattr(evaluate_sft, "load_conversations", lambda name, split, count: rows[:count])
    argv = ["--base_model", str(model_dir), "--adapter", str(adapter), "--merge_adapter", "--num_examples", "2"]
    assert evaluate_sft.main([*argv, "--max_new_tokens", "3", "--dtype", "float32", "--device", "cpu"]) == 0
    results = json.loads((adapter / "eval_results.json").read_text())
    assert (results["config"]["adapter_method"], results["config"]["merge_adapter"]) == ("snell", True)
    assert "- adapter_method: `snell`" in (adapter / "eval_report.md").read_text()
    assert "held-out test loss" in (adapter / "README.md").read_text()  # the adapter card records the scores


def test_a_vision_method_folder_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    folder = tmp_path / "dtl"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"method": "dtl", "rank": 2}))
    with pytest.raises(ValueError, match="'dtl' adapter .* does not attach to a causal LM"):
        evaluate_sft.SftEvalSettings(base_model="x", adapter=str(folder))


def test_merged_lora_gives_the_unmerged_scores_and_the_base_back(tmp_path: Path) -> None:
    adapter = save_adapter(tmp_path / "lora")
    base, tokenizer, rows = tiny_llama(layers=2, seed=0), chat_tokenizer(), conversations(3)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    plain = evaluate_sft.evaluate_models(base, tokenizer, rows, adapter, batch_size=3, max_new_tokens=4)
    merged = evaluate_sft.evaluate_models(
        base, tokenizer, rows, adapter, batch_size=3, max_new_tokens=4, merge_adapter=True
    )
    assert merged["tuned"]["loss"] == pytest.approx(plain["tuned"]["loss"], rel=1e-5)
    assert not any("lora" in name for name, _ in base.named_modules())
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-6)
