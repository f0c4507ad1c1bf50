"""The benchmark scripts' analysis on synthetic measurements: no training, so the arithmetic is checked exactly."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import REPO_ROOT

KEY = {
    "steps_per_stage": 12,
    "train_batch_size": 8,
    "rouge_examples": 16,
    "max_new_tokens": 48,
    "heldout_examples": None,
    "config": "x.yaml",
}


def load_script(name: str) -> ModuleType:
    """``benchmarks/`` is not a package: import a script by path."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def experiment_run(variant: str, budget: str | None, seed: int | None, loss: float, rouge: float) -> dict[str, Any]:
    name = "base" if variant == "base" else f"{variant}-{budget}-s{seed}"
    steps = {"base": 0, "ost": 12, "dt3": 24 if budget == "per_stage" else 12}[variant]
    return {
        "run": name,
        "variant": variant,
        "budget": budget,
        "seed": seed,
        "settings_key": KEY,
        "train_steps": steps,
        "train_loss": None if variant == "base" else 1.5,
        "train_runtime_s": 10.0 * steps,
        "wall_s": 10.0 * steps + 30.0,
        "eval": {"loss": loss, "rougeL": rouge, "bleu": 1.0, "loss_eval_s": 5.0, "generation_s": 7.0},
    }


def write_runs(folder: Path, runs: list[dict[str, Any]]) -> None:
    (folder / "experiment_dt").mkdir(parents=True)
    for run in runs:
        (folder / "experiment_dt" / f"{run['run']}.json").write_text(json.dumps(run), encoding="utf-8")


def test_experiment_aggregate_only(tmp_path, capsys):
    experiment = load_script("experiment_dt_variants")
    write_runs(
        tmp_path,
        [
            experiment_run("base", None, None, 2.5, 10.0),
            experiment_run("ost", "per_stage", 0, 2.0, 20.0),
            experiment_run("ost", "per_stage", 1, 2.2, 24.0),
            experiment_run("dt3", "per_stage", 0, 1.9, 22.0),
            experiment_run("dt3", "per_stage", 1, 1.7, 30.0),
            experiment_run("dt3", "split", 0, 2.1, 18.0),
        ],
    )
    assert experiment.main(["--aggregate-only", "--results-dir", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "experiment_dt_variants.json").read_text(encoding="utf-8"))
    rows = {(r["variant"], r["budget"]): r for r in report["rows"]}
    assert list(rows) == [("ost", "per_stage"), ("dt3", "per_stage"), ("ost", "split"), ("dt3", "split")]
    ost = rows["ost", "per_stage"]
    assert ost["n"] == 2 and ost["seeds"] == [0, 1]
    assert ost["loss_mean"] == pytest.approx(2.1)
    assert ost["loss_std"] == pytest.approx(0.2 / math.sqrt(2))  # sample std (n - 1) of 2.0 and 2.2
    assert ost["rougeL_std"] == pytest.approx(statistics.stdev([20.0, 24.0]))
    # ost has one stage: the same runs stand for both budgets
    assert rows["ost", "split"]["runs"] == ost["runs"] and rows["ost", "split"]["loss_mean"] == ost["loss_mean"]
    dt3 = rows["dt3", "per_stage"]
    assert dt3["loss_mean"] == pytest.approx(1.8) and dt3["train_steps"] == 24
    assert dt3["loss_delta_vs_ost"] == pytest.approx(-0.3)
    assert dt3["rougeL_delta_vs_ost"] == pytest.approx(26.0 - 22.0)
    single = rows["dt3", "split"]
    assert single["n"] == 1 and single["loss_std"] is None and single["train_steps"] == 12
    assert report["base"] == {"loss": 2.5, "rougeL": 10.0}

    markdown = (tmp_path / "experiment_dt_variants.md").read_text(encoding="utf-8")
    assert "| base (untuned) | — | — | 0 | 2.5000 |" in markdown
    assert "| ost | per_stage (same runs in both) | 2 | 12 | 2.1000 ± 0.1414 | +0.0000 | 22.00 ± 2.83 |" in markdown
    assert "| dt3 | per_stage | 2 | 24 | 1.8000 ± 0.1414 | -0.3000 | 26.00 ± 5.66 | +4.00 |" in markdown
    assert "| dt3 | split | 1 | 12 | 2.1000 ± n/a | +0.0000 |" in markdown
    assert "lowest held-out loss dt3" in markdown
    png = tmp_path / "experiment_dt_variants.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DT variants" in capsys.readouterr().out


def test_experiment_refuses_mixed_settings(tmp_path):
    experiment = load_script("experiment_dt_variants")
    other = experiment_run("ost", "per_stage", 1, 2.2, 24.0)
    other["settings_key"] = {**KEY, "steps_per_stage": 2}
    with pytest.raises(ValueError, match="different settings"):
        experiment.aggregate([experiment_run("ost", "per_stage", 0, 2.0, 20.0), other])


def test_experiment_plan_runs_ost_once_per_seed():
    experiment = load_script("experiment_dt_variants")
    settings = experiment.ExperimentSettings(seeds=[0, 1], variants=["ost", "dt1"], budgets=["per_stage", "split"])
    names = [run.name for run in experiment.plan_runs(settings)]
    assert names == [
        "base",
        "ost-per_stage-s0",
        "dt1-per_stage-s0",
        "dt1-split-s0",
        "ost-per_stage-s1",
        "dt1-per_stage-s1",
        "dt1-split-s1",
    ]
    steps = {run.name: run.planned_steps(12) for run in experiment.plan_runs(settings)}
    assert steps["dt1-per_stage-s0"] == 48 and steps["dt1-split-s0"] == 12 and steps["ost-per_stage-s1"] == 12


def sft_run(label: str, rep: int, tokens_per_s: float, peak_mib: float, delta_mib: float) -> dict[str, Any]:
    mib = 1024**2
    return {
        "label": label,
        "rep": rep,
        "tokens_per_s": tokens_per_s,
        "e2e_tokens_per_s": tokens_per_s / 2,
        "final_loss": 1.0,
        "memory": {"peak_bytes": peak_mib * mib, "peak_delta_bytes": delta_mib * mib},
    }


def test_bench_sft_summary_ratios_against_plain():
    bench = load_script("bench_sft")
    assert bench.schedule(("a", "b", "c"), 2) == [("a", 1), ("b", 1), ("c", 1), ("c", 2), ("b", 2), ("a", 2)]
    runs = [
        sft_run("plain-padded", 1, 100.0, 1000, 400),
        sft_run("dt3-padded", 1, 120.0, 900, 300),
        {"label": "plain-packing", "rep": 1, "error": "ValueError: padding-free needs flash attention"},
        sft_run("ost-packing", 1, 50.0, 800, 200),
        sft_run("ost-packing", 2, 60.0, 800, 200),
        sft_run("dt3-padded", 2, 99.0, 900, 300),
        sft_run("plain-padded", 2, 110.0, 1000, 400),
    ]
    summary = bench.summarize(runs)
    plain, dt3 = summary["plain-padded"], summary["dt3-padded"]
    assert plain["ratio_vs_plain"] == pytest.approx(1.0)
    assert plain["tokens_per_s"] == [100.0, 110.0] and plain["tokens_per_s_mean"] == pytest.approx(105.0)
    assert plain["tokens_per_s_spread"] == pytest.approx(10.0 / 105.0)
    assert dt3["ratio_vs_plain"] == pytest.approx(109.5 / 105.0)
    assert dt3["paired_ratios"] == pytest.approx([1.2, 0.9])
    assert dt3["peak_ratio_vs_plain"] == pytest.approx(0.9)
    assert dt3["peak_delta_ratio_vs_plain"] == pytest.approx(0.75)
    assert dt3["target_at_least_plain"] == "met (not resolved: repeats straddle 1)"
    # a failed plain run leaves its layout without a reference: no ratio, and the error is kept
    assert summary["ost-packing"]["ratio_vs_plain"] is None and summary["ost-packing"]["paired_ratios"] == []
    assert summary["plain-packing"]["errors"] == ["ValueError: padding-free needs flash attention"]

    table = "\n".join(bench.results_table(summary))
    assert "| dt3-padded | 109.5 | 120.0, 99.0 | 0.192 | 1.043 | 1.200, 0.900 | 1.043 | 900 | 300 | 0.750 |" in table
    assert "| plain-packing | failed: ValueError: padding-free needs flash attention |" in table
