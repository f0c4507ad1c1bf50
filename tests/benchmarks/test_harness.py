"""The shared benchmark harness: schedule, statistics, formatting, markdown and the JSON -> markdown round trip.

Everything here is arithmetic on given numbers or on the process's own /proc readings; nothing is timed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import (
    CONTENDED_CORES,
    MIB,
    BenchmarkSettings,
    CpuSample,
    RunMeter,
    against_limit,
    as_tuples,
    benchmark_process,
    benchmark_session,
    ci,
    comma_list,
    command_line,
    contention_warning,
    joined,
    machine_line,
    mean_std,
    mib,
    num,
    optimizer_mib,
    optimizer_state,
    paired_ratios,
    palindrome,
    params,
    parse_settings,
    pool,
    ratio,
    ratio_ci,
    render_saved,
    report_header,
    save_report,
    stages_of,
    table,
    timing_stats,
    trainer_kwargs,
    with_ci,
)
from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_benchmark

BENCHMARKS = ("bench_engine", "bench_sft", "bench_vision", "bench_dit", "bench_engine_switch")
MACHINE = {
    "cpu": "Test CPU",
    "cores_usable": 2,
    "torch_threads": 1,
    "ram_gib": 7.5,
    "python": "3.11.7",
    "torch": "2.0",
    "peft": "0.1",
    "date": "2026-01-01 00:00:00 UTC",
}


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------
def test_palindrome_order():
    assert palindrome(("a", "b", "c"), 2) == [("a", 1), ("b", 1), ("c", 1), ("c", 2), ("b", 2), ("a", 2)]
    assert palindrome(["a", "b"], 3) == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    assert palindrome(("a",), 1) == [("a", 1)]


@pytest.mark.parametrize("repeats", [2, 4])
def test_palindrome_is_symmetric_about_the_middle(repeats):
    """With an even number of repeats every item's mean position is the middle: linear drift cancels."""
    order = palindrome(("a", "b", "c", "d"), repeats)
    middle = (len(order) - 1) / 2
    for item in "abcd":
        positions = [i for i, (x, _) in enumerate(order) if x == item]
        assert len(positions) == repeats
        assert statistics.fmean(positions) == pytest.approx(middle)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def test_ratio_ci_matches_the_delta_method_by_hand():
    times, reference = [1.0, 2.0, 3.0], [2.0, 2.0, 4.0]
    # means 2 and 8/3, so the ratio is 3/4; sample variances 1 and 4/3; relative variance of the ratio
    # var_a / (n a^2) + var_b / (n b^2) = 1 / (3 * 4) + (4/3) / (3 * 64/9) = 1/12 + 1/16 = 7/48
    half = 1.96 * 0.75 * math.sqrt(7 / 48)
    lo, hi = ratio_ci(times, reference)
    assert lo == pytest.approx(0.75 - half) and hi == pytest.approx(0.75 + half)
    lo99, hi99 = ratio_ci(times, reference, z=2.576)
    assert hi99 - lo99 == pytest.approx(2 * 2.576 * 0.75 * math.sqrt(7 / 48))
    assert ratio_ci([1.0], reference) is None and ratio_ci(times, [2.0]) is None
    # identical constant samples: no spread, a zero-width interval at 1
    assert ratio_ci([2.0, 2.0], [2.0, 2.0]) == (1.0, 1.0)


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)  # one value: no spread


def test_timing_stats_and_uncontended_steps():
    stats = timing_stats([1.0, 2.0, 3.0, 6.0], [0.0, CONTENDED_CORES, 0.05, 1.5])
    assert stats["mean_step_s"] == 3.0 and stats["median_step_s"] == 2.5 and stats["timed_steps"] == 4
    assert stats["stdev_step_s"] == pytest.approx(statistics.stdev([1.0, 2.0, 3.0, 6.0]))
    # a step counts as contended from CONTENDED_CORES on
    assert stats["clean_steps"] == 2 and stats["clean_mean_step_s"] == 2.0
    busy = timing_stats([1.0], [1.0])
    assert busy["clean_mean_step_s"] is None and busy["stdev_step_s"] == 0.0


def test_pool_stages_and_paired_ratios():
    runs = [
        {"rep": 1, "x": 2.0, "stages": [{"index": 0, "t": [9.0, 1.0, 2.0]}, {"index": 1, "t": [9.0, 3.0]}]},
        {"rep": 2, "x": 3.0, "stages": [{"index": 0, "t": [9.0, 4.0]}, {"index": 1, "t": [9.0, 5.0, 6.0]}]},
    ]
    assert pool(stages_of(runs), "t", 1) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert pool(stages_of(runs, 1), "t", 1) == [3.0, 5.0, 6.0]
    assert pool([{"t": [1.0, 2.0]}, {"t": [3.0]}], "t") == [1.0, 2.0, 3.0]
    reference = [{"rep": 2, "x": 6.0}, {"rep": 1, "x": 4.0}]
    assert paired_ratios(runs, reference, "x") == [0.5, 0.5]  # matched by repetition, not by position
    assert paired_ratios(runs, reference[:1], "x") == [0.5]  # a repetition the reference lacks is skipped
    assert ratio(1.0, 4.0) == 0.25 and ratio(None, 4.0) is None and ratio(1.0, None) is None and ratio(1.0, 0) is None


def test_against_limit():
    assert against_limit(0.7, 0.8, ci=(0.6, 0.75)) == {"value": 0.7, "met": True, "ci95": (0.6, 0.75), "resolved": True}
    assert against_limit(0.7, 0.8, ci=(0.6, 0.85))["resolved"] is False  # the interval crosses the limit
    assert against_limit(0.9, 0.8, ci=(0.85, 0.95)) == {
        "value": 0.9,
        "met": False,
        "ci95": (0.85, 0.95),
        "resolved": True,
    }
    # around one: |value - 1| <= limit
    assert against_limit(1.01, 0.02, around_one=True, ci=(0.99, 1.015))["resolved"] is True
    assert against_limit(1.01, 0.02, around_one=True, ci=(0.97, 1.05))["resolved"] is False
    assert against_limit(0.95, 0.02, around_one=True, ci=(0.9, 0.97))["met"] is False
    assert against_limit(0.95, 0.02, around_one=True, ci=(0.9, 0.97))["resolved"] is True
    assert against_limit(1.01, 0.02, around_one=True)["resolved"] is None
    assert against_limit(None, 0.02) == {"value": None, "met": None, "ci95": None, "resolved": None}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def test_cpu_sample_foreign_cores_arithmetic():
    tck = os.sysconf("SC_CLK_TCK")
    start = CpuSample(busy=0, steal=0, own=0, wall=0.0)
    later = CpuSample(busy=3 * tck, steal=tck, own=tck, wall=2.0)
    # 3 core-seconds busy over 2 s, 1 of them this process's: others used 1 core on average, steal 0.5
    assert start.foreign_cores(later) == pytest.approx((1.0, 0.5))
    # this process alone: other processes never count negative
    assert start.foreign_cores(CpuSample(busy=tck, steal=0, own=2 * tck, wall=1.0))[0] == 0.0
    now = CpuSample.now()
    assert now.busy >= 0 and now.own >= 0


def test_run_meter_sees_a_peak_of_this_run():
    meter = RunMeter().start()
    block = bytearray(b"\x01") * (64 * MIB)  # touched, so resident
    meter.stop()
    del block
    assert meter.peak_rss_bytes - meter.rss_before_bytes >= 60 * MIB
    assert meter.peak_memory_bytes == meter.peak_rss_bytes and meter.cuda_max_allocated_bytes is None
    assert meter.wall_s >= 0 and meter.foreign_cpu_cores >= 0


def test_benchmark_process_restores_threads():
    before = torch.get_num_threads()
    with benchmark_process(1) as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with benchmark_process(0) as threads:
        assert threads == len(os.sched_getaffinity(0))
    assert torch.get_num_threads() == before


def test_optimizer_state_splits_moments_from_step_scalars():
    weight = torch.nn.Parameter(torch.ones(3, 4))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    state = optimizer_state(optimizer)
    # AdamW: exp_avg and exp_avg_sq in fp32 (2 x 12 x 4 bytes), plus a 4-byte fp32 step scalar
    assert state == {
        "optimizer_state_bytes": 100,
        "optimizer_moment_bytes": 96,
        "optimizer_other_bytes": 4,
        "optimizer_state_tensors": 3,
        "optimizer_params_with_state": 1,
        "optimizer_param_numel": 12,
        "optimizer_class": "AdamW",
    }
    assert optimizer_state(SimpleNamespace(optimizer=optimizer)) == state  # accelerate's wrapper looked through


# ---------------------------------------------------------------------------------------------
# Settings, command line and the driver
# ---------------------------------------------------------------------------------------------
@dataclass
class DemoSettings(BenchmarkSettings):
    steps: int = 3
    quick: bool = field(default=False, metadata={"help": "a demo's own help"})


@dataclass
class OwnSettings:
    """Settings of a benchmark with options of its own only (as bench_sft's)."""

    threads: int = 0


def test_benchmark_settings_are_shared_by_extension():
    s = parse_settings(DemoSettings, [])
    assert (s.seed, s.threads, s.output_dir, s.quick, s.wait_idle_s, s.steps) == (
        0,
        0,
        "benchmarks/results",
        False,
        0.0,
        3,
    )
    argv = ["--wait-idle", "60", "--seed", "7", "--output-dir", "out", "--quick", "--steps", "5", "--threads", "1"]
    s = parse_settings(DemoSettings, argv)
    assert (s.seed, s.threads, s.output_dir, s.quick, s.wait_idle_s, s.steps) == (7, 1, "out", True, 60.0, 5)
    assert parse_settings(DemoSettings, ["--wait_idle", "5", "--wait_idle_s", "6"]).wait_idle_s == 6.0


def test_trainer_kwargs():
    s = SimpleNamespace(batch_size=4, learning_rate=1e-3, seed=7)
    kwargs = trainer_kwargs(s, "out", 12, warmup_steps=0, use_cpu=False)
    assert kwargs["output_dir"] == "out" and kwargs["max_steps"] == 12 and kwargs["seed"] == 7
    assert kwargs["per_device_train_batch_size"] == 4 and kwargs["learning_rate"] == 1e-3
    assert kwargs["gradient_accumulation_steps"] == 1 and kwargs["logging_steps"] == 1 and kwargs["report_to"] == []
    assert kwargs["warmup_steps"] == 0 and kwargs["use_cpu"] is False  # overrides add and replace


def test_benchmark_session_times_the_runs_and_writes_the_common_report(monkeypatch, capsys):
    monkeypatch.setattr(harness, "wait_for_idle", lambda limit_s: 0.25 if limit_s == 9.0 else None)
    before = torch.get_num_threads()
    s = DemoSettings(threads=1, wait_idle_s=9.0)
    with benchmark_session(s, "benchmarks.demo", ["--threads", "1"]) as bench:
        assert s.threads == 1 and torch.get_num_threads() == 1
        for label, rep in palindrome(("a", "b"), 1):
            run = bench.measure(lambda r, seconds: f"[demo] {r['label']}", dict, label=label, rep=rep)
        assert run == {"label": "b", "rep": 1, "start_s": run["start_s"]} and bench.runs[-1] is run
        report = bench.report(palindrome(("a", "b"), 1), ("torch",), setup={"model": "m"}, summary={"x": 1})
    assert torch.get_num_threads() == before
    assert capsys.readouterr().out == "[demo] a\n[demo] b\n"
    sections = ["command", "settings", "machine", "model", "schedule", "foreign_cpu_cores_at_start", "runs"]
    assert list(report) == [*sections, "summary", "total_wall_s"]
    assert report["command"].endswith("-m benchmarks.demo --threads 1") and report["settings"]["steps"] == 3
    assert report["machine"]["torch_threads"] == 1 and report["schedule"] == [["a", 1], ["b", 1]]
    assert report["foreign_cpu_cores_at_start"] == 0.25 and [r["label"] for r in report["runs"]] == ["a", "b"]
    assert 0 <= report["runs"][0]["start_s"] <= report["runs"][1]["start_s"] <= report["total_wall_s"]
    # settings that are not BenchmarkSettings (no --wait-idle): no wait, and nothing about it in the report
    with benchmark_session(OwnSettings(threads=1), "benchmarks.demo", []) as bench:
        report = bench.report([], ("torch",))
    assert bench.foreign_at_start is None and "foreign_cpu_cores_at_start" not in report
    assert report["settings"] == {"threads": 1}


def test_comma_list_accepts_both_spellings():
    assert comma_list(["lora,full"], ("lora", "full"), "--modes") == ["lora", "full"]
    assert comma_list(["full", "lora"], ("lora", "full"), "--modes") == ["full", "lora"]
    assert comma_list([" lora , lora"], ("lora", "full"), "--modes") == ["lora"]
    with pytest.raises(ValueError, match="--modes must be a comma-separated subset of lora,full"):
        comma_list(["lora,bogus"], ("lora", "full"), "--modes")
    with pytest.raises(ValueError):
        comma_list([","], ("lora", "full"), "--modes")


def test_command_line_repeats_the_run_as_a_module():
    command = command_line("benchmarks.bench_x", ["--quick", "--output-dir", "a b"])
    assert command.startswith("HF_HUB_OFFLINE=1 ")
    assert command.endswith(" -m benchmarks.bench_x --quick --output-dir 'a b'")


# ---------------------------------------------------------------------------------------------
# Formatting and markdown
# ---------------------------------------------------------------------------------------------
def test_number_formatting():
    assert num(None) == "n/a" and num(1.23456) == "1.235" and num(1.23456, 1) == "1.2"
    assert mib(1536 * MIB) == "1,536.0" and mib(1536 * MIB, 0) == "1,536" and mib(None) == "n/a"
    assert params(68_170_000) == "68.17M" and params(134_520_000, 1) == "134.5M" and params(52_300) == "52.3k"
    assert params(None) == "n/a"
    assert ci((0.9, 1.1)) == "(0.900-1.100)" and ci([0.9, 1.1], 2) == "(0.90-1.10)" and ci(None) == ""
    assert with_ci(1.0, [0.9, 1.1]) == "1.000 (0.900-1.100)" and with_ci(1.0, None, 2) == "1.00"
    assert joined([1.0, 2.5]) == "1.000, 2.500" and joined([1.0, 2.5], 1, "/") == "1.0/2.5" and joined([]) == "n/a"
    stage = {"optimizer_state_bytes": 3 * MIB // 2, "optimizer_state_same_in_reps": True}
    assert optimizer_mib(stage) == "1.5"
    assert optimizer_mib({**stage, "optimizer_state_same_in_reps": False}) == "1.5 (differs between reps)"
    assert as_tuples({"depths": [2, [3, 4]], "size": 32}) == {"depths": (2, (3, 4)), "size": 32}


def test_table_rendering():
    assert table(["a", "b", "c"], [[1, "x", ""], ["only a note"]]) == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | x |  |",
        "| only a note |",
    ]
    assert table(["a"], []) == ["| a |", "|---|"]


def test_machine_line_reads_every_saved_form():
    libraries = ("torch", "peft")
    base = "Machine: Test CPU, 2 usable cores (1 torch threads), 7.5 GiB RAM; Python 3.11.7, torch 2.0, peft 0.1; "
    date = "2026-01-01 00:00:00 UTC"
    # what the harness records now
    current = {**MACHINE, "gpu": None, "git": {"commit": "abc1234", "hf_tuning_modified": True}}
    assert machine_line(current, libraries) == f"{base}{date}; repository at abc1234 with local changes in hf_tuning/."
    unknown = {**MACHINE, "git": {"commit": None, "hf_tuning_modified": None}}
    assert machine_line(unknown, libraries) == f"{base}{date}; repository at unknown."
    # reports written before the harness: a bare commit (vision, DiT), or none at all (SFT)
    assert machine_line({**MACHINE, "commit": "ccda6c43a4cf"}, libraries) == f"{base}{date}; commit ccda6c43a4cf."
    assert machine_line(MACHINE, libraries) == f"{base}{date}."
    gpu = machine_line({**MACHINE, "gpu": "H200", "cuda": "13.0"}, libraries)
    assert "7.5 GiB RAM, GPU H200 (CUDA 13.0); Python" in gpu


def test_contention_warning():
    quiet = [{"foreign_cpu_cores": 0.0}, {"foreign_cpu_cores": CONTENDED_CORES}]
    assert contention_warning(quiet, 0.0, "careful.") == []
    busy = contention_warning([*quiet, {"foreign_cpu_cores": 0.75}], 0.2, "careful.")
    assert busy == [
        "**Warning:** other processes used the CPUs during 1 of 3 runs (up to 0.75 cores on average); careful.",
        "",
    ]
    assert contention_warning(quiet, 0.5, "careful.")[0].startswith(
        "**Warning:** other processes used the CPUs during 0"
    )


# ---------------------------------------------------------------------------------------------
# Results: the markdown is a function of the saved JSON
# ---------------------------------------------------------------------------------------------
def _demo_render(report: dict) -> str:
    return "\n".join(
        [
            *report_header("Demo", report, ("torch", "peft")),
            f"Model kwargs: {as_tuples(report['kwargs'])}.",
            "",
            *table(
                ["config", "ratio (95% CI)"], [[r["label"], with_ci(r["ratio"], r["ci95"])] for r in report["rows"]]
            ),
            "",
        ]
    )


def test_save_report_round_trip(tmp_path):
    report = {
        "command": "HF_HUB_OFFLINE=1 python -m benchmarks.demo",
        "machine": {**MACHINE, "git": {"commit": "abc1234", "hf_tuning_modified": False}},
        "kwargs": {"depths": (2, 2, 6, 2), "size": 32},
        "rows": [{"label": "plain", "ratio": 1.0, "ci95": (0.95, 1.05)}, {"label": "dt1", "ratio": 0.8, "ci95": None}],
    }
    path = tmp_path / "results" / "demo_cpu.json"
    markdown = save_report(path, report, _demo_render)

    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["kwargs"]["depths"] == [2, 2, 6, 2] and saved["rows"][0]["ci95"] == [0.95, 1.05]
    assert path.with_suffix(".md").read_text(encoding="utf-8") == markdown
    # rendered from memory (tuples), from the saved JSON (lists) and from the file: the same text
    assert markdown == _demo_render(report) == _demo_render(saved) == render_saved(path, _demo_render)
    assert markdown.startswith("# Demo\n\nCommand: `HF_HUB_OFFLINE=1 python -m benchmarks.demo`\n\nMachine: Test CPU")
    assert "Model kwargs: {'depths': (2, 2, 6, 2), 'size': 32}." in markdown
    assert "| plain | 1.000 (0.950-1.050) |\n| dt1 | 0.800 |" in markdown
    assert sorted(p.name for p in path.parent.iterdir()) == ["demo_cpu.json", "demo_cpu.md"]  # no temporary left


@pytest.mark.parametrize("name", BENCHMARKS)
def test_committed_report_is_rendered_from_its_json(name):
    """Every committed ``benchmarks/results/<bench>_cpu.md`` is exactly its JSON rendered by today's code."""
    bench = load_benchmark(name)
    results = REPO_ROOT / "benchmarks" / "results"
    expected = (results / f"{name}_cpu.md").read_text(encoding="utf-8")
    assert render_saved(results / f"{name}_cpu.json", bench.render_markdown) == expected
