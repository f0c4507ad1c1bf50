"""Smoke test of ``benchmarks/bench_dit.py``: the three arms at tiny size, in palindromic order, and the report.

The numbers of a 3-step run are noise; what is checked is that every arm really ran the batch it claims
(26 target + 6 bank of 32, the bank from cached moments only in ``cof_cached``), that every measurement
and ratio the report promises is there, and that the report states the issue's 1.05x target.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.scripts import load_benchmark as load_script

ARMS = ("finetune", "cof_cached", "cof_uncached")


def test_bench_dit_quick(tmp_path):
    bench = load_script("bench_dit")
    # one torch thread: on a machine shared with other jobs two threads wait on each other for seconds
    returned = bench.main(["--quick", "--threads", "1", "--device", "cpu", "--output-dir", str(tmp_path)])

    report = json.loads((tmp_path / "bench_dit_cpu.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "bench_dit_cpu.md").read_text(encoding="utf-8")
    assert report["summary"]["target"] == json.loads(json.dumps(returned["summary"]["target"]))
    settings, arms = report["settings"], report["summary"]["arms"]
    timed = settings["steps"] - settings["warmup_steps"]
    assert settings["quick"] and settings["batch_size"] == 32
    assert report["machine"]["cores_usable"] >= 1 and report["model"]["dit_parameters"] > 0

    order = [[r["arm"], r["rep"]] for r in report["runs"]]
    assert order == [[a, 1] for a in ARMS] + [[a, 2] for a in reversed(ARMS)]
    for run in report["runs"]:
        assert len(run["step_times_s"]) == settings["steps"] and all(t > 0 for t in run["step_times_s"])
        assert run["peak_rss_bytes"] > 0 and run["final_loss"] is not None

    assert set(arms) == set(ARMS)
    for name, arm in arms.items():
        assert arm["median_step_s"] > 0 and arm["mean_step_s"] > 0 and arm["images_per_s"] > 0
        assert arm["timed_steps"] == 2 * timed
        assert arm["step_time_ratio"] > 0 and arm["median_step_time_ratio"] > 0
        assert arm["peak_memory_ratio"] > 0 and all(m > 0 for m in arm["peak_memory_bytes"])
        assert arm["mean_encode_s"] > 0
        assert f"| {name} |" in markdown
    assert arms["finetune"]["step_time_ratio"] == pytest.approx(1.0)
    assert arms["finetune"]["peak_memory_ratio"] == pytest.approx(1.0)
    for name in ("cof_cached", "cof_uncached"):
        low, high = arms[name]["step_time_ratio_ci95"]
        assert low <= arms[name]["step_time_ratio"] <= high

    # the batch composition the arms are defined by
    assert (arms["finetune"]["target_per_batch"], arms["finetune"]["bank_per_batch"]) == (32, 0)
    for name in ("cof_cached", "cof_uncached"):
        assert (arms[name]["target_per_batch"], arms[name]["bank_per_batch"]) == (26, 6)
        assert arms[name]["mean_encode_bank_s"] > 0 and arms[name]["mean_bank_read_s"] > 0
    assert arms["finetune"]["mean_encode_bank_s"] == 0 and arms["finetune"]["mean_bank_read_s"] == 0

    target = report["summary"]["target"]
    assert target["arm"] == "cof_cached" and target["limit"] == 1.05
    assert target["met"] == (target["ratio"] <= 1.05)
    assert "1.05x" in markdown and "Target: cof_cached step time <= 1.05x finetune" in markdown
    assert "## Reading the numbers" in markdown and "Expected:" in markdown
