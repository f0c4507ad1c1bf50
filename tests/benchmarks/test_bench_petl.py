"""Smoke test of ``benchmarks/bench_petl.py``: every mode at tiny size in its own worker process, the summary's
ratios and target on synthetic numbers, the settings, and the committed report's JSON -> markdown round trip.

The numbers of a one-step run on a tiny ViT are noise: what is checked is that each mode really trained what it
claims (its trainable parameters, DTL's blocks), that every measurement the report promises is there, and that
the report states the issue's 0.6 target. Nothing is timed.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.harness import MIB, parse_settings, render_saved
from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_benchmark

bench = load_benchmark("bench_petl")
MODES = ("full", "lora", "dtl", "dtl_plus", "dtl_autograd")


def test_bench_petl_quick(tmp_path):
    """Two modes end to end through ``main`` (a worker process each); the other three measured in-process, which
    checks what they train without paying three more worker start-ups."""
    # one torch thread: on a machine shared with other jobs two threads wait on each other for seconds
    returned = bench.main(["--quick", "--threads", "1", "--modes", "lora,dtl", "--output-dir", str(tmp_path)])

    report = json.loads((tmp_path / "bench_petl_cpu_quick.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "bench_petl_cpu_quick.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_petl_cpu_quick.json", "bench_petl_cpu_quick.md"]
    assert report["summary"]["targets"] == json.loads(json.dumps(returned["summary"]["targets"]))
    assert report["settings"]["quick"] and report["settings"]["batch_size"] == 4
    assert report["machine"]["timm"] and report["machine"]["cores_usable"] >= 1 and report["machine"]["git"]
    assert report["command"].endswith(f"--quick --threads 1 --modes lora,dtl --output-dir {tmp_path}")
    assert [[r["mode"], r["rep"]] for r in report["runs"]] == [["lora", 1], ["dtl", 1]]

    s = parse_settings(bench.PetlBenchSettings, ["--quick", "--threads", "1"])
    runs = {run["mode"]: run for run in report["runs"]}
    runs.update({mode: bench.measure_mode(s, mode) for mode in ("full", "dtl_plus", "dtl_autograd")})
    for run in runs.values():
        assert len(run["step_times_s"]) == 1 and run["step_times_s"][0] > 0
        assert run["peak_rss_bytes"] >= run["rss_before_bytes"] > 0 and run["peak_rise_bytes"] > 0
        assert run["saved_activation_bytes"] > 0 and all(math.isfinite(x) for x in run["losses"])
        assert run["cuda_max_allocated_bytes"] is None
    # what each mode trains: the whole ViT, LoRA on the blocks' linear layers, DTL's maps (and DTL+'s conv) + head
    trainable = {mode: run["trainable_params"] for mode, run in runs.items()}
    assert trainable["full"] == runs["full"]["total_params"] < runs["lora"]["total_params"]
    assert trainable["dtl"] == trainable["dtl_autograd"] < trainable["dtl_plus"] < trainable["lora"] < trainable["full"]
    assert runs["dtl"]["dtl_map_blocks"] == [0, 1, 2, 3] and runs["dtl"]["dtl_add_after_blocks"] == [2, 3]
    assert "dtl_map_blocks" not in runs["lora"]

    modes = report["summary"]["modes"]
    assert set(modes) == {"lora", "dtl"} and modes["lora"]["peak_rise_bytes_to_lora"] == 1.0
    assert modes["dtl"]["peak_rise_bytes_to_lora"] > 0 and modes["dtl"]["mean_step_s_to_lora"] > 0
    assert set(report["summary"]["targets"]) == {"dtl"}

    assert "## Target" in markdown and "## Per mode" in markdown and "## Runs in execution order" in markdown
    assert "* DTL peak rise / LoRA peak rise <= 0.6: **" in markdown
    for name in ("LoRA", "DTL"):
        assert f"\n| {name} | " in markdown


def _run(mode: str, rep: int, rise_mib: float, times: list[float]) -> dict:
    return {
        "mode": mode, "rep": rep, "trainable_params": 10, "total_params": 100, "peak_rise_bytes": rise_mib * MIB,
        "peak_rss_bytes": (1000 + rise_mib) * MIB, "saved_activation_bytes": rise_mib * MIB / 2,
        "cuda_max_allocated_bytes": None, "step_times_s": times, "step_foreign_cores": [0.0] * len(times),
    }  # fmt: skip


def test_summary_takes_the_largest_rise_and_checks_the_target():
    s = {"device": "cpu", "modes": ["full", "lora", "dtl", "dtl_plus"], "memory_limit": 0.6}
    runs = [_run("full", 1, 4000, [4.0, 4.2]), _run("lora", 1, 2000, [2.0, 2.2]), _run("dtl", 1, 1000, [1.0, 1.2]),
            _run("dtl_plus", 1, 1300, [1.1, 1.3]), _run("dtl_plus", 2, 1250, [1.1, 1.1]), _run("dtl", 2, 1100, [1.0]),
            _run("lora", 2, 1900, [2.0]), _run("full", 2, 4000, [4.0])]  # fmt: skip
    summary = bench.summarise(s, runs)
    dtl, plus = summary["modes"]["dtl"], summary["modes"]["dtl_plus"]
    assert dtl["peak_rise_bytes"] == 1100 * MIB  # the maximum over the repetitions
    assert dtl["peak_rise_bytes_to_lora"] == pytest.approx(1100 / 2000)
    assert dtl["peak_rise_bytes_to_full"] == pytest.approx(1100 / 4000)
    assert dtl["mean_step_s_to_lora"] == pytest.approx((3.2 / 3) / (6.2 / 3))
    lo, hi = dtl["step_to_lora_ci95"]
    assert lo < dtl["mean_step_s_to_lora"] < hi
    assert summary["targets"]["dtl"]["rss"]["met"] is True
    assert plus["peak_rise_bytes_to_lora"] == pytest.approx(0.65)
    assert summary["targets"]["dtl_plus"]["rss"]["met"] is False

    rendered = bench.target_lines({"settings": s, "summary": summary})
    assert rendered == [
        "* DTL peak rise / LoRA peak rise <= 0.6: **met** (0.550)",
        "* DTL+ peak rise / LoRA peak rise <= 0.6: **not met** (0.650)",
    ]


def test_bench_petl_settings():
    s = parse_settings(bench.PetlBenchSettings, [])
    assert (s.modes, s.batch_size, s.steps, s.warmup_steps, s.repeats) == (list(MODES), 16, 4, 1, 2)
    assert (s.concurrent_runs, s.device, s.result_stem) == (1, "cpu", "bench_petl_cpu")
    assert s.model_spec() == ("vit_base_patch16_224", {})
    s = parse_settings(bench.PetlBenchSettings, ["--quick", "--steps", "3", "--modes", "lora,dtl"])
    assert (s.modes, s.batch_size, s.steps, s.repeats) == (["lora", "dtl"], 4, 3, 1)
    assert s.result_stem == "bench_petl_cpu_quick" and s.concurrent_runs == 2
    assert parse_settings(bench.PetlBenchSettings, ["--modes", "dtl", "lora"]).modes == ["dtl", "lora"]
    for bad in (["--modes", "lora,dora"], ["--modes", "dtl,full"], ["--modes", ""], ["--device", "tpu"],
                ["--repeats", "0"], ["--steps", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_settings(bench.PetlBenchSettings, bad)


def test_committed_report_is_rendered_from_its_json():
    """``benchmarks/results/bench_petl_cpu.md`` is exactly its JSON rendered by today's code."""
    results = REPO_ROOT / "benchmarks" / "results"
    expected = (results / "bench_petl_cpu.md").read_text(encoding="utf-8")
    assert render_saved(results / "bench_petl_cpu.json", bench.render_markdown) == expected
