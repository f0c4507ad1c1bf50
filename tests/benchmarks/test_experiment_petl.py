"""The PETL digits experiment's protocol: the learning rate is chosen on validation, the score is test."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.experiment_petl_digits import PetlExperimentSettings, render_markdown, summarise

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks/results/experiment_petl_digits.json"


def _run(mode: str, lr: float, split: str, seed: int, top1: float, variant: str = "ost") -> dict:
    return {
        "arch": "vit", "mode": mode, "variant": variant, "learning_rate": lr, "seed": seed, "split": split,
        "top1": top1, "loss": 1.0, "trainable_params": 2949, "steps": 190, "wall_seconds": 1.0,
    }  # fmt: skip


def test_the_rate_is_chosen_on_validation_and_only_its_test_runs_are_scored():
    runs = [
        _run("dtl", 1e-3, "val", 0, 60.0),
        _run("dtl", 1e-2, "val", 0, 80.0),
        _run("dtl", 1e-3, "test", 0, 99.0),  # a better test score at the rate validation did not choose
        *(_run("dtl", 1e-2, "test", seed, top1) for seed, top1 in ((0, 70.0), (1, 72.0), (2, 74.0))),
    ]
    entry = summarise(runs)["vit/dtl"]
    assert entry["learning_rate"] == 1e-2 and entry["top1"] == [70.0, 72.0, 74.0]
    assert entry["mean"] == pytest.approx(72.0) and entry["std"] == pytest.approx(2.0)
    ties = summarise([_run("full", 1e-3, "val", 0, 50.0), _run("full", 3e-3, "val", 0, 50.0)])["vit/full"]
    assert ties["learning_rate"] == 1e-3 and ties["top1"] == []


def test_the_staged_rows_reuse_the_ost_rate_and_the_costs_join_the_ost_row():
    runs = [
        _run("snell", 1e-3, "val", 0, 60.0),
        _run("snell", 1e-2, "val", 0, 80.0),
        *(_run("snell", 1e-2, "test", seed, 70.0 + seed) for seed in range(3)),
        *(_run("snell", 1e-2, "test", seed, 75.0 + seed, variant="dt2") for seed in range(3)),
        _run("snell", 1e-3, "test", 0, 99.0, variant="dt2"),  # not at the chosen rate: not scored
        {**_run("snell", 1e-2, "test", 0, 70.0), "kind": "costs", "saved_activation_bytes": 3 * 2**20,
         "gradient_and_optimizer_bytes": 2**20, "images_per_s": 90.0, "plain_images_per_s": 100.0},
    ]  # fmt: skip
    summary = summarise(runs)
    assert set(summary) == {"vit/snell", "vit/snell@dt2"}
    assert summary["vit/snell"]["top1"] == [70.0, 71.0, 72.0]  # the cost run is not a fourth seed
    assert summary["vit/snell@dt2"]["learning_rate"] == 1e-2 and summary["vit/snell@dt2"]["top1"] == [75.0, 76.0, 77.0]
    assert summary["vit/snell"]["training_memory_bytes"] == 4 * 2**20
    assert summary["vit/snell"]["throughput_to_plain"] == pytest.approx(0.9)
    meta = {"machine": "m", "torch": "t", "timm": "t", "epochs": 10, "batch_size": 32, "learning_rates": [1e-3, 1e-2],
            "target_test_images": 224, "seeds": 3, "command": "c", "dt_variant": "dt2", "dt_budget": "split"}  # fmt: skip
    markdown = render_markdown({"meta": meta, "pretrained": {"vit": 99.0}, "summary": summary, "runs": runs})
    assert "| snell | 71.00 ± 1.00 | 2,949 | 4.0 | 0.90 |" in markdown
    assert "| snell + dt2 | 76.00 ± 1.00 | 2,949 |  |  |" in markdown


def test_settings():
    s = harness.parse_settings(PetlExperimentSettings, ["--modes", "dtl,lora", "--quick"])
    assert s.modes == ["dtl", "lora"] and s.seeds == [0] and s.epochs == 1 and s.archs == ["vit"]
    assert s.dt_modes == ["lora", "dtl"] and s.dt_variant == "dt2" and s.dt_budget == "split"
    with pytest.raises(SystemExit):
        harness.parse_settings(PetlExperimentSettings, ["--modes", "dtl,magic"])


@pytest.mark.skipif(not RESULTS.is_file(), reason="the experiment has not been run in this checkout")
def test_the_committed_report_renders_from_its_json():
    assert harness.render_saved(RESULTS, render_markdown) == RESULTS.with_suffix(".md").read_text()
