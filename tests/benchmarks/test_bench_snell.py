"""``benchmarks/bench_snell.py`` in-process at tiny size: each mode trains what it claims, the inference worker's
merged model matches the unmerged one, and the summary, targets and report are built from the measurements.
Nothing is timed; the worker processes themselves are exercised by the bench_petl smoke test (same harness)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.harness import parse_settings, render_saved
from tests.helpers.scripts import load_benchmark

bench = load_benchmark("bench_snell")
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks/results/bench_snell_cpu.json"


def test_every_mode_and_the_inference_worker_at_tiny_size():
    s = parse_settings(bench.SnellBenchSettings, ["--quick", "--threads", "1"])
    runs = [{"mode": mode, "rep": 1, "start_s": 0.0, **bench.measure_mode(s, mode)} for mode in s.modes]
    trainable = {run["mode"]: run["trainable_params"] for run in runs}
    # tiny ViT: 4 blocks 64 wide, 100 classes; the head (6,500) and the class token (64) train beside the deltas
    per_block_r8 = 8 * (4 * (64 + 64) + 2 * (64 + 256))
    assert trainable["snell8"] == trainable["snell8_stored"] == 4 * per_block_r8 + 6_500 + 64
    assert trainable["snell32"] == 4 * 4 * per_block_r8 + 6_500 + 64
    assert trainable["dense_delta"] == 4 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 6_500
    assert trainable["lora"] == 4 * 8 * ((64 + 192) + (64 + 64) + 2 * (64 + 256)) + 6_500 + 128  # + final norm
    saved = {run["mode"]: run["saved_activation_bytes"] for run in runs}
    assert saved["snell8_stored"] > saved["snell8"]  # checkpointing keeps the dense deltas out of the graph
    inference = bench.measure_inference(s)
    assert inference["merge_max_abs_error"] < 1e-5
    assert [(r["config"], r["rep"]) for r in inference["runs"]] == [(c, 1) for c in bench.INFERENCE]

    summary = bench.summarise({**vars(s), "modes": s.modes}, runs, inference)
    assert summary["modes"]["lora"]["peak_rise_bytes_to_lora"] == 1.0
    assert set(summary["targets"]) == {"snell8", "snell32", "merged_throughput"}
    assert "below_dense" in summary["targets"]["snell8"]
    report = {"command": "x", "settings": vars(s), "machine": {}, "model": {"timm_name": "t", "model_kwargs": {},
              "img_size": 32, "total_params": 1}, "schedule": [[m, 1] for m in s.modes], "runs": runs,
              "summary": summary, "total_wall_s": 1.0}  # fmt: skip
    lines = bench.target_lines(report)
    assert lines[0].startswith("* SNELL-8 peak RSS / LoRA peak RSS <= 1.15: **")
    assert lines[-1].startswith("* merged SNELL-8 throughput / plain ViT >= 0.98: **")


def test_settings_need_lora_and_a_valid_sparsity(capsys):
    for argv, message in ((["--modes", "snell8"], "must include lora"), (["--sparsity", "1.0"], "--sparsity")):
        with pytest.raises(SystemExit):
            parse_settings(bench.SnellBenchSettings, argv)
        assert message in capsys.readouterr().err


@pytest.mark.skipif(not RESULTS.is_file(), reason="the benchmark has not been run in this checkout")
def test_the_committed_report_renders_from_its_json():
    assert render_saved(RESULTS, bench.render_markdown) == RESULTS.with_suffix(".md").read_text()
