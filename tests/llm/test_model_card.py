"""Model cards: rendered from the stage plan and the stage records, results merged in by later evaluations."""

from __future__ import annotations

import yaml
from huggingface_hub import ModelCard

from hf_tuning.llm.model_card import update_eval_results, write_model_card
from hf_tuning.records import StageRecord
from hf_tuning.stages import build_stage_plan
from tests.helpers.tiny import tiny_llama


def header(path) -> dict:
    return yaml.safe_load(path.read_text().split("---")[1])


def write_card(folder, records_done: int = 2):
    plan = build_stage_plan(tiny_llama(layers=4), "dt3")
    records = [
        StageRecord(
            index=s.index, name=s.name, groups=s.groups, trainable_params=s.num_params, steps=5,
            planned_steps=5, start_step=5 * s.index, final_train_loss=2.0 - s.index,
        )
        for s in plan.stages[:records_done]
    ]  # fmt: skip
    return plan, write_model_card(
        folder,
        model_name="agri-tiny",
        base_model="me/base",
        stage_plan=plan,
        stage_records=records,
        dt_budget="per_stage",
        hyperparameters={"learning_rate": 1e-4},
        eval_results={"eval_loss": 1.25},
    )


def test_the_card_describes_every_stage_from_the_plan_and_the_records(tmp_path):
    plan, path = write_card(tmp_path, records_done=1)  # a run that stopped after its first stage
    meta = header(path)
    assert meta["base_model"] == "me/base" and meta["library_name"] == "peft" and "dt3" in meta["tags"]
    stages = meta["hf_tuning"]["stages"]
    assert [s["name"] for s in stages] == ["even", "odd"]
    assert [s["trainable_params"] for s in stages] == [s.num_params for s in plan.stages]
    assert [s["steps"] for s in stages] == [5, None]  # the unfinished stage has no steps yet
    text = path.read_text()
    assert f"| 0 | even | {plan.stages[0].num_params:,} | 5 | 2.0000 |" in text
    assert f"| 1 | odd | {plan.stages[1].num_params:,} |  |  |" in text


def test_later_results_are_merged_into_our_card(tmp_path):
    _, path = write_card(tmp_path)
    update_eval_results(path, {"rougeL": 21.5})
    update_eval_results(path, {"rougeL": 22.0, "test_loss": 1.1})
    results = {r.metric_name: r.metric_value for r in ModelCard.load(path).data.eval_results}
    assert results == {"validation loss": 1.25, "ROUGE-L": 22.0, "held-out test loss": 1.1}
    assert path.read_text().count("<!-- hf_tuning:results -->") == 1


def test_results_can_be_added_twice_to_a_card_we_did_not_write(tmp_path):
    """PEFT writes its own README.md beside an adapter, without a model name: the model-index written into it
    must still be readable the next time (it raised KeyError 'name' before)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    card = folder / "README.md"
    card.write_text("---\nbase_model: me/base\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n")
    update_eval_results(card, {"test_loss": 1.0})
    update_eval_results(card, {"test_loss": 0.9, "rougeL": 20.0})
    loaded = ModelCard.load(card)
    assert loaded.data.model_name == "adapter"
    assert {r.metric_name: r.metric_value for r in loaded.data.eval_results} == {
        "held-out test loss": 0.9,
        "ROUGE-L": 20.0,
    }
    assert "| ROUGE-L | 20.0000 |" in card.read_text()


def test_the_card_names_the_training_chat_template_and_how_it_differs_from_the_stock_one(tmp_path):
    plan = build_stage_plan(tiny_llama(layers=4), "dt3")
    common = dict(model_name="agri", base_model="me/base", stage_plan=plan, stage_records=[], dt_budget="per_stage")

    def template_line(folder, **kwargs) -> str | None:
        text = write_model_card(tmp_path / folder, **common, **kwargs).read_text()
        return next((line for line in text.splitlines() if line.startswith("Chat template in training:")), None)

    line = template_line("llama", hyperparameters={}, chat_template="llama3.1")
    assert line is not None and "`llama3.1`" in line and "`{% generation %}` markers" in line
    assert "fixed at 'Today Date: 26 Jul 2024'" in line and "Llama 3.2 template writes the current date" in line
    line = template_line("chatml", hyperparameters={}, chat_template="chatml")
    assert "default system turn" in line
    assert template_line("none", hyperparameters={"chat_template": "chatml"}) is None  # only the argument counts
    # what was measured against the base model's own template is said too
    measured = "the stock template renders 'Today Date: 30 Nov 2026' where the training template renders ..."
    text = write_model_card(
        tmp_path / "measured", **common, hyperparameters={}, chat_template="llama3.1", chat_template_difference=measured
    ).read_text()
    assert f"Compared with the base model's own template: {measured}." in text


def test_card_text_is_written_as_given_not_read_as_a_template(tmp_path):
    description = "Rows with {{ braces }} and {% raw %} stay as written."
    plan = build_stage_plan(tiny_llama(layers=4), "dt3")
    path = write_model_card(
        tmp_path / "braces",
        model_name="agri",
        base_model="me/base",
        stage_plan=plan,
        stage_records=[],
        dt_budget="per_stage",
        hyperparameters={},
        dataset_description=description,
    )
    text = path.read_text()
    assert description in text and header(path)["base_model"] == "me/base"
