"""The stage-switch benchmark's arithmetic on synthetic measurements, and how it obtains the baseline library."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.scripts import load_benchmark

bench = load_benchmark("bench_engine_switch")
MIB = 1024**2


def run(label: str, rep: int, rises: list[float], before: float = 1000.0) -> dict:
    switches = [
        {
            "from": f"G{i}", "to": f"G{i + 1}", "before_bytes": before * MIB, "peak_bytes": (before + rise) * MIB,
            "rise_bytes": rise * MIB, "state_from_bytes": 300 * MIB, "state_to_bytes": 200 * MIB,
        }
        for i, rise in enumerate(rises)
    ]  # fmt: skip
    return {"label": label, "rep": rep, "library": "x", "stages": [], "switches": switches}


def test_summary_pools_the_repetitions_and_compares_the_libraries():
    runs = [run("baseline", 1, [600, 500]), run("current", 1, [200, 100]), run("current", 2, [220, 140]),
            run("baseline", 2, [640, 500])]  # fmt: skip
    rows = bench.summarise(runs)["switches"]
    assert [(r["from"], r["to"]) for r in rows] == [("G0", "G1"), ("G1", "G2")]
    assert rows[0]["baseline_rise_bytes"] == 620 * MIB and rows[0]["current_rise_bytes"] == 210 * MIB
    assert rows[0]["rise_ratio"] == pytest.approx(210 / 620)
    assert rows[1]["peak_ratio"] == pytest.approx((1000 + 120) / (1000 + 500))


def test_the_baseline_library_is_extracted_from_git_without_touching_the_checkout(tmp_path):
    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True).stdout

    before = status()
    folder = bench.export_library("HEAD", tmp_path / "baseline")
    assert (folder / "hf_tuning" / "__init__.py").is_file() and (folder / "hf_tuning" / "trainer.py").is_file()
    assert status() == before
