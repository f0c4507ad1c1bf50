"""Smoke test of ``benchmarks/bench_dyt.py``: the quick run (a tiny ViT), the summary's ratios and targets on
synthetic numbers, the settings, and the committed report's JSON -> markdown round trip.

The timings of a tiny ViT are noise and are never asserted: what is checked is that every configuration and
batch size is measured, that the FLOPs come from the counter and fall when the routers skip tokens, that the
keep rate is a real fraction, and that the report states both targets.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.harness import parse_settings, render_saved
from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_benchmark

bench = load_benchmark("bench_dyt")
CONFIGS = ("plain", "dyt", "dyt_masked")


def test_bench_dyt_quick(tmp_path):
    # one torch thread: on a machine shared with other jobs two threads wait on each other
    returned = bench.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])

    report = json.loads((tmp_path / "bench_dyt_cpu_quick.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "bench_dyt_cpu_quick.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_dyt_cpu_quick.json", "bench_dyt_cpu_quick.md"]
    assert report["summary"]["targets"] == json.loads(json.dumps(returned["summary"]["targets"]))
    assert report["settings"]["quick"] and report["settings"]["batch_sizes"] == [1, 4]
    assert report["machine"]["timm"] and report["machine"]["git"]
    assert report["command"].endswith(f"--quick --threads 1 --output-dir {tmp_path}")

    expected = [[c, b, 1] for b in (1, 4) for c in CONFIGS]
    assert report["schedule"] == expected
    assert [[r["config"], r["batch_size"], r["rep"]] for r in report["runs"]] == expected
    for run in report["runs"]:
        assert len(run["step_times_s"]) >= 2 and min(run["step_times_s"]) > 0 and run["minor_faults_per_forward"] >= 0

    flops = {(f["batch_size"], f["config"]): f for f in report["flops"]}
    keep = {k["batch_size"]: k for k in report["routers"]["keep_rate"]}
    for batch in (1, 4):
        rate = keep[batch]["mean"]
        assert 0 < rate < 1 and len(keep[batch]["per_block"]) == 4
        plain, dyt, masked = (flops[(batch, c)] for c in CONFIGS)
        assert plain["router_adapter_flops"] == 0 and dyt["router_adapter_flops"] == masked["router_adapter_flops"] > 0
        assert plain["flops"] == plain["mlp_flops"] + plain["other_flops"]
        # the efficient path skips the MLP of the dropped tokens: its MLP FLOPs follow the keep rate
        assert dyt["mlp_flops"] < masked["mlp_flops"] == plain["mlp_flops"]
        assert dyt["flops"] < plain["flops"] < masked["flops"]
    gaps = report["routers"]["dyt_vs_masked_logits"]
    assert all(g["max_abs_logit_difference"] < 1e-4 for g in gaps)  # the two paths give the same logits

    rows = {(r["batch_size"], r["config"]): r for r in report["summary"]["rows"]}
    assert set(rows) == {(b, c) for b in (1, 4) for c in CONFIGS}
    for (batch, config), row in rows.items():
        assert row["images_per_s"] > 0 and row["speedup"] > 0 and row["flops_to_plain"] > 0
        assert row["gflops_per_image"] == pytest.approx(flops[(batch, config)]["flops"] / batch / 1e9)
    assert rows[(4, "plain")]["speedup"] == 1.0 and rows[(4, "plain")]["flops_to_plain"] == 1.0
    assert report["summary"]["targets"]["batch_size"] == 4
    assert {(p["batch_size"], p["config"]) for p in report["profile"]} == set(rows)

    assert "## Targets" in markdown and "## Throughput and FLOPs" in markdown and "## Keep rate per block" in markdown
    assert "* DyT (efficient) throughput at batch 4 >= 1.25x the plain ViT: **" in markdown
    assert "* DyT (efficient) FLOPs <= 0.75 of the plain ViT: **" in markdown
    for name in ("plain ViT", "DyT (efficient)", "DyT (masked)"):
        assert f"| 1 | {name} | " in markdown and f"| 4 | {name} | " in markdown


def _run(config: str, batch: int, rep: int, times: list[float]) -> dict:
    return {"config": config, "batch_size": batch, "rep": rep, "step_times_s": times,
            "step_foreign_cores": [0.0] * len(times), "mean_step_s": sum(times) / len(times),
            "minor_faults_per_forward": 10.0}  # fmt: skip


def test_summary_ratios_and_targets():
    s = {"batch_sizes": [1, 32], "speedup_target": 1.25, "flops_limit": 0.75}
    runs = [_run("plain", 1, 1, [0.2, 0.2]), _run("dyt", 1, 1, [0.2, 0.2]), _run("dyt_masked", 1, 1, [0.2, 0.2]),
            _run("plain", 32, 1, [10.0, 10.2]), _run("dyt", 32, 1, [7.0, 7.2]), _run("dyt_masked", 32, 1, [10.4]),
            _run("dyt_masked", 32, 2, [10.4]), _run("dyt", 32, 2, [7.4]), _run("plain", 32, 2, [9.8])]  # fmt: skip
    flops = [{"batch_size": b, "config": c, "flops": n * b} for b in (1, 32)
             for c, n in (("plain", 100), ("dyt", 70), ("dyt_masked", 101))]  # fmt: skip
    summary = bench.summarise(s, runs, flops)
    row = {(r["batch_size"], r["config"]): r for r in summary["rows"]}
    dyt = row[(32, "dyt")]
    assert dyt["speedup"] == pytest.approx(10.0 / 7.2)
    assert dyt["images_per_s"] == pytest.approx(32 / 7.2)
    assert dyt["speedup_per_rep"] == pytest.approx([10.1 / 7.1, 9.8 / 7.4])
    lo, hi = dyt["speedup_ci95"]
    assert lo < dyt["speedup"] < hi
    assert dyt["flops_to_plain"] == pytest.approx(0.7) and dyt["gflops_per_image"] == pytest.approx(70e-9)
    assert row[(1, "dyt")]["speedup"] == pytest.approx(1.0)
    targets = summary["targets"]
    assert targets["batch_size"] == 32 and targets["speedup"]["met"] is True and targets["flops"]["met"] is True

    flops[4]["flops"] = 80 * 32  # DyT at batch 32 now does 0.8 of the plain FLOPs
    runs[4]["step_times_s"] = [9.0, 9.2]
    summary = bench.summarise(s, runs, flops)
    report = {"settings": s, "summary": summary}
    assert bench.target_lines(report)[0].startswith(
        "* DyT (efficient) throughput at batch 32 >= 1.25x the plain ViT: **not met** (1.1"
    )
    assert bench.target_lines(report)[1].startswith(
        "* DyT (efficient) FLOPs <= 0.75 of the plain ViT: **not met** (0.800"
    )


def test_bench_dyt_settings():
    s = parse_settings(bench.DyTBenchSettings, [])
    assert (s.batch_sizes, s.warmup, s.iterations, s.min_time_s, s.repeats) == ([1, 32], 1, 3, 5.0, 4)
    assert (s.device, s.result_stem, s.model_spec()) == ("cpu", "bench_dyt_cpu", ("vit_base_patch16_224", {}))
    s = parse_settings(bench.DyTBenchSettings, ["--quick", "--iterations", "3", "--batch-sizes", "8", "2"])
    assert (s.batch_sizes, s.iterations, s.repeats, s.min_time_s) == ([2, 8], 3, 1, 0.0)
    assert s.result_stem == "bench_dyt_cpu_quick" and s.model_spec()[0] == "vit_tiny_patch16_224"
    for bad in (["--batch-sizes", "0"], ["--batch-sizes", "x"], ["--iterations", "0"], ["--warmup", "-1"],
                ["--repeats", "0"], ["--min-time-s", "-1"], ["--device", "tpu"], ["--bottleneck", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_settings(bench.DyTBenchSettings, bad)


def test_committed_report_is_rendered_from_its_json():
    """``benchmarks/results/bench_dyt_cpu.md`` is exactly its JSON rendered by today's code."""
    results = REPO_ROOT / "benchmarks" / "results"
    expected = (results / "bench_dyt_cpu.md").read_text(encoding="utf-8")
    assert render_saved(results / "bench_dyt_cpu.json", bench.render_markdown) == expected
