"""Smoke test of ``benchmarks/bench_vision.py``: the whole grid at tiny size, and its optimizer-state arithmetic."""

from __future__ import annotations

import json
from itertools import product

import pytest

from benchmarks.harness import parse_settings
from tests.helpers.scripts import load_benchmark as load_script

ARCHS, MODES, VARIANTS = ("vit", "swin"), ("full", "lora"), ("ost", "dt1", "dt3")
STAGES = {"ost": 1, "dt1": 4, "dt3": 2}
FP32 = 4


def test_bench_vision_quick(tmp_path):
    bench = load_script("bench_vision")
    # one torch thread: on a machine shared with other jobs two threads wait on each other for seconds
    bench.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])

    report = json.loads((tmp_path / "bench_vision_cpu.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "bench_vision_cpu.md").read_text(encoding="utf-8")
    settings, summary = report["settings"], report["summary"]
    timed = settings["steps"] - settings["warmup_steps"]
    assert report["machine"]["timm"] and report["machine"]["cores_usable"] >= 1

    palindrome = [["ost", 1], ["dt1", 1], ["dt3", 1], ["dt3", 2], ["dt1", 2], ["ost", 2]]
    for arch, mode in product(ARCHS, MODES):
        runs = [r for r in report["runs"] if r["arch"] == arch and r["mode"] == mode]
        assert [[r["variant"], r["rep"]] for r in runs] == palindrome
        assert all(r["images_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in runs)
        variants = summary[arch][mode]["variants"]
        assert set(variants) == set(VARIANTS)
        ost = variants["ost"]["stages"][0]
        assert variants["ost"]["images_per_s_ratio"] == pytest.approx(1.0)
        assert ost["share"] == 1.0 and ost["optimizer_ratio"] == 1.0
        for variant in VARIANTS:
            stages = variants[variant]["stages"]
            assert len(stages) == STAGES[variant]
            for st in stages:
                assert st["images_per_s"] > 0 and st["timed_steps"] == 2 * timed
                # AdamW: exp_avg and exp_avg_sq in fp32 per parameter, plus one fp32 step scalar per tensor
                assert st["optimizer_moment_bytes"] == 2 * FP32 * st["trainable_params"]
                if mode == "full":
                    ratio = st["optimizer_moment_bytes"] / ost["optimizer_moment_bytes"]
                    assert ratio == pytest.approx(st["share"], rel=1e-6)
        # every stage of every repetition: the step scalars are the only other optimizer state
        for run in runs:
            for st in run["stages"]:
                assert st["optimizer_other_bytes"] == FP32 * st["optimizer_params_with_state"]
                assert st["requires_grad_params"] == st["trainable_params"]
        assert f"## {arch} - {'LoRA' if mode == 'lora' else 'full fine-tuning'}" in markdown
        assert f"* **{arch} {mode}**: dt1 optimizer bytes / ost = " in markdown
    assert "## Expected vs measured" in markdown


def test_bench_vision_settings():
    bench = load_script("bench_vision")
    s = parse_settings(bench.VisionBenchSettings, ["--quick", "--steps", "4", "--archs", "swin", "--wait-idle", "60"])
    # --quick fills in what is not given: steps as given, warm-up and batch from the quick sizes
    assert (s.steps, s.warmup_steps, s.batch_size, s.archs, s.wait_idle_s) == (4, 1, 8, ["swin"], 60.0)
    s = parse_settings(bench.VisionBenchSettings, ["--variants", "ost", "dt3", "--modes", "lora"])
    assert (s.steps, s.warmup_steps, s.batch_size, s.variants, s.modes) == (12, 2, 32, ["ost", "dt3"], ["lora"])
    with pytest.raises(SystemExit):
        parse_settings(bench.VisionBenchSettings, ["--variants", "dt1,dt3"])  # every ratio is taken against ost
