"""StagedSFTTrainer: same results as plain TRL for OST, staged LoRA through peft_config."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from hf_tuning import StagedSFTConfig, StagedSFTTrainer
from tests.helpers.real_models import requires_smollm2, smollm2_tokenizer
from tests.helpers.tiny import text_dataset, tiny_llama, tiny_tokenizer, tokenizing_sft_trainer

COMMON = dict(
    max_steps=6,
    per_device_train_batch_size=4,
    learning_rate=5e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    disable_tqdm=True,
    bf16=False,
    seed=42,
    max_length=32,
)


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", modules_to_save=["lm_head"])


def losses(trainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def test_ost_matches_plain_sft_trainer(tmp_path):
    tokenizer, data = tiny_tokenizer(), text_dataset(48)
    plain = SFTTrainer(
        model=tiny_llama(seed=3),
        args=SFTConfig(output_dir=str(tmp_path / "plain"), **COMMON),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    plain.train()
    staged = StagedSFTTrainer(
        model=tiny_llama(seed=3),
        args=StagedSFTConfig(output_dir=str(tmp_path / "ost"), dt_variant="ost", **COMMON),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    staged.train()
    plain_losses = losses(plain)
    assert len(plain_losses) == 6
    assert [(s, round(v, 6)) for s, v in losses(staged)] == [(s, round(v, 6)) for s, v in plain_losses]
    for (name, a), (_, b) in zip(plain.model.named_parameters(), staged.model.named_parameters()):
        assert torch.equal(a, b), name


def test_dt3_lora_stages_only_adapters(tmp_path):
    trainer = StagedSFTTrainer(
        model=tiny_llama(layers=4),
        args=StagedSFTConfig(output_dir=str(tmp_path), dt_variant="dt3", **COMMON),
        train_dataset=text_dataset(32),
        processing_class=tiny_tokenizer(),
        peft_config=lora(),
    )
    plan = trainer.stage_plan
    assert [s.name for s in plan.stages] == ["even", "odd"]
    for stage in plan.stages:
        assert all("lora_" in n or "modules_to_save" in n for n in stage.params)
    output = trainer.train()
    assert output.global_step == 12
    report = json.loads((tmp_path / "dt_stages.json").read_text())
    assert [r["steps"] for r in report["stage_records"]] == [6, 6]
    assert all(r["final_train_loss"] > 0 for r in report["stage_records"])


@requires_smollm2
def test_rows_truncated_before_their_answer_are_counted_not_dropped_silently(tmp_path, caplog):
    """TRL drops a row whose every trained token lies beyond max_length; the trainer says how many went."""
    from datasets import Dataset

    from hf_tuning.llm.chat_templates import apply_training_chat_template

    tokenizer = smollm2_tokenizer()
    apply_training_chat_template(tokenizer, "chatml")
    short = [{"role": "user", "content": "Oil?"}, {"role": "assistant", "content": "Every 250 hours."}]
    long = [{"role": "user", "content": "Tell me about the tractor. " * 40}, {"role": "assistant", "content": "Yes."}]
    rows = Dataset.from_list([{"messages": short}, {"messages": long}, {"messages": short}])
    with caplog.at_level("WARNING", logger="hf_tuning.llm.sft"):
        trainer = tokenizing_sft_trainer(tokenizer, rows, str(tmp_path), max_length=64)
    assert len(trainer.train_dataset) == 2
    assert "1 of the 3 train rows were dropped: max_length=64 cut off every token they would train on" in caplog.text
