"""The benchmark scripts' analysis on synthetic measurements: no training, so the arithmetic is checked exactly."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import MIB, palindrome, parse_settings, ratio_ci, timing_stats
from tests.helpers.scripts import load_benchmark

KEY = {
    "steps_per_stage": 12,
    "train_batch_size": 8,
    "rouge_examples": 16,
    "max_new_tokens": 48,
    "heldout_examples": None,
    "config": "x.yaml",
}


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
    experiment = load_benchmark("experiment_dt_variants")
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
    experiment = load_benchmark("experiment_dt_variants")
    other = experiment_run("ost", "per_stage", 1, 2.2, 24.0)
    other["settings_key"] = {**KEY, "steps_per_stage": 2}
    with pytest.raises(ValueError, match="different settings"):
        experiment.aggregate([experiment_run("ost", "per_stage", 0, 2.0, 20.0), other])


def test_experiment_plan_runs_ost_once_per_seed():
    experiment = load_benchmark("experiment_dt_variants")
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
    bench = load_benchmark("bench_sft")
    assert palindrome(("a", "b", "c"), 2) == [("a", 1), ("b", 1), ("c", 1), ("c", 2), ("b", 2), ("a", 2)]
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


def test_bench_sft_settings():
    bench = load_benchmark("bench_sft")
    s = parse_settings(bench.SftBenchSettings, ["--smoke", "--configs", "dt3-padded,plain-padded"])
    # the configurations keep their canonical order; --smoke shrinks the run and the batch
    assert s.configs == ["plain-padded", "dt3-padded"]
    assert (s.steps, s.warmup_steps, s.repeats, s.batch_size) == (3, 1, 1, 2)
    s = parse_settings(bench.SftBenchSettings, ["--batch_size", "4", "--warmup-steps", "2", "--allow-slow"])
    assert s.batch_size == 4 and s.warmup_steps == 2 and s.allow_slow and s.configs == list(bench.ALL_CONFIGS)
    with pytest.raises(SystemExit):
        parse_settings(bench.SftBenchSettings, ["--configs", "plain-padded,bogus"])
    with pytest.raises(SystemExit):
        parse_settings(bench.SftBenchSettings, ["--steps", "2", "--warmup-steps", "2"])


def test_bench_engine_settings():
    bench = load_benchmark("bench_engine")
    s = parse_settings(bench.BenchSettings, ["--wait-idle", "600", "--kv-heads", "2", "--modes", "full,lora"])
    assert s.wait_idle_s == 600.0 and s.kv_heads == 2 and s.modes == ["full", "lora"] and not s.quick
    s = parse_settings(bench.BenchSettings, ["--wait_idle", "5", "--full_steps", "20", "--modes", "lora", "full"])
    assert s.wait_idle_s == 5.0 and s.steps_for("full") == 20 and s.steps_for("lora") == 10 and s.ffn == 1408
    quick = parse_settings(bench.BenchSettings, ["--quick", "--hidden", "1024"])
    assert (quick.hidden, quick.layers, quick.steps, quick.warmup_steps) == (128, 4, 3, 1)  # --quick wins
    with pytest.raises(SystemExit):
        parse_settings(bench.BenchSettings, ["--steps", "2", "--warmup-steps", "2"])
    with pytest.raises(SystemExit):
        parse_settings(bench.BenchSettings, ["--modes", "lora,qlora"])


def engine_run(
    bench: Any, label: str, rep: int, stages: list[dict[str, Any]], peak_mib: float, delta_mib: float, losses: list
) -> dict[str, Any]:
    """A run as ``bench_engine.run_one`` records it; every stage has one warm-up step (9 s) and timed steps."""
    for st in stages:
        st.update(timing_stats(st["step_times_s"][1:], st["step_foreign_cores"][1:]))
    timed = timing_stats(
        [t for st in stages for t in st["step_times_s"][1:]], [f for st in stages for f in st["step_foreign_cores"][1:]]
    )
    stages[-1]["losses"] = losses
    return {
        "mode": "lora",
        "label": label,
        "rep": rep,
        "trainer": label,
        "stages": stages,
        **timed,
        "peak_rss_bytes": peak_mib * MIB,
        "peak_rss_delta_bytes": delta_mib * MIB,
        "foreign_cpu_cores": 0.0,
    }


def engine_stage(index: int, layers: list[int], share: float, times: list[float]) -> dict[str, Any]:
    trainable = int(1000 * share)
    return {
        "index": index,
        "name": f"stage{index}",
        "trainable_params": trainable,
        "share": share,
        "trainable_layers": layers,
        "embeddings_trained": False,
        "head_trained": False,
        "step_times_s": [9.0, *times],
        "step_foreign_cores": [0.0] * (len(times) + 1),
        "optimizer_state_bytes": 8 * trainable,  # AdamW: two fp32 moments per parameter
        "opt_bytes_per_param": 8.0,
        "losses": [],
    }


def test_bench_engine_analysis_against_plain():
    bench = load_benchmark("bench_engine")
    s = bench.BenchSettings(quick=True, modes=["lora"])  # 4 layers, 3 steps per stage, 1 warm-up step
    every = [0, 1, 2, 3]
    plain_loss, ost_loss = [2.0, 1.9, 1.8], [2.0, 1.9, 1.85]
    runs = []
    for rep, (plain_t, ost_t, dt1_t) in enumerate(
        [([1.0, 1.2], [1.0, 1.2], [0.6, 0.8]), ([1.1, 1.3], [1.2, 1.2], [0.7, 0.7])], start=1
    ):
        runs += [
            engine_run(bench, "plain", rep, [engine_stage(0, every, 1.0, plain_t)], 1000, 200, plain_loss),
            engine_run(
                bench, "ost", rep, [engine_stage(0, every, 1.0, ost_t)], 1005 if rep == 1 else 1000, 210, ost_loss
            ),
            engine_run(
                bench, "dt1", rep, [engine_stage(k, [3 - k], 0.25, dt1_t) for k in range(4)], 900, 100, plain_loss
            ),
            engine_run(
                bench,
                "dt3",
                rep,
                [engine_stage(k, every[2 * k : 2 * k + 2], 0.5, [0.9, 1.1]) for k in range(2)],
                950,
                150,
                plain_loss,
            ),
        ]
    summary = bench.analyse(s, runs)["lora"]
    configs = summary["configs"]
    plain_times, ost_times = [1.0, 1.2, 1.1, 1.3], [1.0, 1.2, 1.2, 1.2]
    dt1_times = [0.6, 0.8] * 4 + [0.7, 0.7] * 4

    plain, ost, dt1, dt3 = configs["plain"], configs["ost"], configs["dt1"], configs["dt3"]
    assert plain["step_ratio"] == pytest.approx(1.0) and plain["flop_ratio"] == pytest.approx(1.0)
    # pooled over both repetitions, warm-up steps left out
    assert ost["timed_steps"] == 4 and ost["step_ratio"] == pytest.approx(statistics.fmean(ost_times) / 1.15)
    assert ost["step_ratio_ci95"] == pytest.approx(ratio_ci(ost_times, plain_times))
    assert dt1["timed_steps"] == 16 and dt1["step_ratio"] == pytest.approx(0.7 / 1.15)
    assert dt1["step_ratio_ci95"] == pytest.approx(ratio_ci(dt1_times, plain_times))
    assert dt3["step_ratio"] == pytest.approx(1.0 / 1.15)
    # paired: each repetition against plain's repetition of the same number
    assert ost["paired_step_ratios"] == pytest.approx([1.1 / 1.1, 1.2 / 1.2])
    assert dt1["paired_step_ratios"] == pytest.approx([0.7 / 1.1, 0.7 / 1.2])
    assert dt1["median_of_paired_step_ratios"] == pytest.approx((0.7 / 1.1 + 0.7 / 1.2) / 2)
    assert plain["rep_spread_step"] == pytest.approx(1.2 / 1.1)
    assert ost["peak_rss_ratios"] == pytest.approx([1.005, 1.0]) and ost["peak_rss_mean_ratio"] == pytest.approx(1.0025)
    assert ost["peak_rss_delta_mean_ratio"] == pytest.approx(1.05)
    assert ost["rep_spread_peak_rss"] == pytest.approx(1000 / 1005)
    # per stage: dt1's later stages back-propagate through fewer blocks, so their flop estimate falls
    stages = dt1["stages"]
    assert [st["timed_steps"] for st in stages] == [4, 4, 4, 4] and [st["share"] for st in stages] == [0.25] * 4
    assert [st["opt_share"] for st in stages] == pytest.approx([0.25] * 4)
    flops = [st["flop_ratio"] for st in stages]
    assert flops == sorted(flops) and 0 < flops[0] < flops[-1] < 1
    assert dt1["flop_ratio"] == pytest.approx(statistics.fmean(flops))
    assert summary["dt1_flop_ratio"] == dt1["flop_ratio"]
    # losses: ost against plain, every pair of repetitions
    assert summary["ost_vs_plain_max_loss_diff"] == pytest.approx(0.05)
    assert summary["plain_rep2_vs_rep1_max_loss_diff"] == 0.0
    assert {r["label"]: r["step_ratio_same_rep"] for r in runs if r["rep"] == 2}["dt1"] == pytest.approx(0.7 / 1.2)
    # the verdicts
    targets = summary["targets"]
    ost_speed = targets["ost step time within 2% of plain"]
    assert ost_speed["met"] is True and ost_speed["resolved"] is False  # 4 noisy steps do not resolve 2%
    assert targets["ost peak RSS within 1% of plain (mean of the per-repetition ratios)"]["met"] is True
    assert targets["dt1 mean step <= 0.8x plain"]["met"] is True
    proportional = targets["optimizer state proportional to stage share (worst relative error)"]
    assert proportional["value"] == 0.0 and proportional["met"] is True and proportional["applies"] is False
    # under LoRA the forward pass and the head's input gradient are paid whatever trains: a floor below 1
    assert dt1["flop_ratio"] > summary["forward_and_head_flop_share"] > 0
