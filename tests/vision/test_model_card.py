"""Vision model cards: the core card machinery under image-classification metadata and each mode's loading snippet."""

from __future__ import annotations

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_tuning.model_card import update_eval_results
from hf_tuning.records import StageRecord
from hf_tuning.stages import build_stage_plan
from hf_tuning.vision import update_vision_eval_results, write_vision_model_card
from tests.helpers.tiny_vision import tiny_vision_model

CLASSES = ["cat", "dog", "bird"]


def header(path) -> dict:
    return yaml.safe_load(path.read_text().split("---")[1])


@pytest.fixture(scope="module")
def staged():
    plan = build_stage_plan(tiny_vision_model("timm_vit", num_classes=len(CLASSES)), "dt3")
    records = [
        StageRecord(
            index=s.index, name=s.name, groups=s.groups, trainable_params=s.num_params, steps=4,
            planned_steps=4, start_step=4 * s.index, final_train_loss=1.5 - s.index,
        )
        for s in plan.stages[:1]
    ]  # fmt: skip
    return plan, records


def write(folder, staged, tuning_mode="lora", library="timm", base_model="vit_tiny_patch16_224", **kwargs):
    plan, records = staged
    return write_vision_model_card(
        folder,
        model_name="vit-pets",
        base_model=base_model,
        library=library,
        tuning_mode=tuning_mode,
        class_names=kwargs.pop("class_names", CLASSES),
        stage_plan=kwargs.pop("stage_plan", plan),
        stage_records=kwargs.pop("stage_records", records),
        dt_budget="per_stage",
        hyperparameters={"learning_rate": 1e-3},
        **kwargs,
    )


@pytest.mark.parametrize(
    ("tuning_mode", "library", "library_name"),
    [
        ("full", "timm", "timm"),
        ("adapter", "transformers", "transformers"),
        ("lora", "timm", "peft"),
        ("dtl", "timm", "hf_tuning"),
        ("dtl_plus", "transformers", "hf_tuning"),
    ],
)
def test_a_staged_run_gets_image_classification_metadata_and_its_stages(
    tmp_path, staged, tuning_mode, library, library_name
):
    plan, _ = staged
    path = write(tmp_path, staged, tuning_mode, library, trainable_parameters=1234)
    meta = header(path)
    assert meta["pipeline_tag"] == "image-classification" and meta["library_name"] == library_name
    assert {tuning_mode, "image-classification", "dt3", "hf-tuning", "staged-tuning"} <= set(meta["tags"])
    block = meta["hf_tuning"]
    assert block["dt_variant"] == "dt3" and block["tuning_mode"] == tuning_mode and block["num_classes"] == 3
    assert [s["trainable_params"] for s in block["stages"]] == [s.num_params for s in plan.stages]
    assert [s["steps"] for s in block["stages"]] == [4, None]
    assert "base_model" not in meta  # a bare timm architecture name is no Hub repository
    text = path.read_text()
    assert "## Stages" in text and f"| 0 | even | {plan.stages[0].num_params:,} | 4 | 1.5000 |" in text
    assert "3 classes (cat, dog, bird)" in text and "**DT3**" in text and "1,234 parameters" in text
    assert 'load_trained_classifier("<this folder>")' in text
    assert ("PeftModel.from_pretrained(base" in text) is (tuning_mode == "lora")
    assert ("load_petl_model(backbone" in text) is (tuning_mode in ("dtl", "dtl_plus"))
    assert ("not in PEFT's list of methods" in text) is (tuning_mode in ("dtl", "dtl_plus"))


def test_a_hub_backbone_is_linked_and_many_classes_are_only_counted(tmp_path, staged):
    classes = [f"c{i}" for i in range(25)]
    path = write(tmp_path, staged, "full", "timm", base_model="hf-hub:timm/vit_tiny_patch16_224", class_names=classes)
    assert header(path)["base_model"] == "timm/vit_tiny_patch16_224"
    text = path.read_text()
    assert "[timm/vit_tiny_patch16_224](https://huggingface.co/timm/vit_tiny_patch16_224)" in text
    assert "25 classes," in text and "c24" not in text.split("## Usage")[0]


def test_the_core_update_merges_top1_into_a_vision_card(tmp_path, staged):
    path = write(tmp_path, staged, eval_results={"eval_loss": 0.8})
    assert "No evaluation has been run yet" not in path.read_text()
    update_eval_results(path, {"top1": 91.25})  # domain-neutral: the labels come from the card itself
    update_vision_eval_results(path, {"top1": 92.5, "top5": 99.0})
    results = ModelCard.load(path).data.eval_results
    assert {r.metric_name: r.metric_value for r in results} == {
        "validation loss": 0.8,
        "top-1 accuracy": 92.5,
        "top-5 accuracy": 99.0,
    }
    assert {(r.task_type, r.metric_type) for r in results if r.metric_type == "accuracy"} == {
        ("image-classification", "accuracy")
    }
    text = path.read_text()
    assert "| top-1 accuracy | 92.5000 |" in text and text.count("<!-- hf_tuning:results -->") == 1


def test_a_bare_adapter_folder_has_no_stages(tmp_path, staged):
    path = write(tmp_path, staged, "dtl", stage_plan=None, stage_records=None)
    meta, text = header(path), path.read_text()
    assert "## Stages" not in text and "stages" not in meta["hf_tuning"] and "dt_variant" not in meta["hf_tuning"]
    assert "outside a staged run" in text and "No evaluation has been run yet" in text
    assert meta["library_name"] == "hf_tuning" and "load_petl_model(backbone" in text


def test_a_token_in_the_environment_never_reaches_the_card(tmp_path, staged, monkeypatch):
    token = "hf_NotARealTokenButLooksLikeOne1234"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    assert token not in write(tmp_path, staged).read_text()
