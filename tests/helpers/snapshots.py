"""Checks on the per-stage parameter snapshots written by tests/helpers/staged_run.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_snapshots(snap_dir: Path, rank: int, stage: int) -> tuple[dict, dict]:
    begin = load_file(str(snap_dir / f"rank{rank}_stage{stage}_begin.safetensors"))
    end = load_file(str(snap_dir / f"rank{rank}_stage{stage}_end.safetensors"))
    return begin, end


def check_staged_run(output_dir: Path, snap_dir: Path, world_size: int) -> dict:
    """Assert the invariants of a staged run; returns world.json for further checks.

    At every stage switch the previous stage's optimizer is released before the next one is built. Within
    every stage: parameters outside the stage are bit-identical at its start and end, every
    parameter of the stage changed, the always-trainable ones change in every stage. Across stages:
    each stage starts where the previous one ended. Across ranks: identical parameters.
    """
    info = json.loads((output_dir / "world.json").read_text())
    assert info["world_size"] == world_size, info
    # no stage switch held two optimizers: the previous one was gone when the next was built (checked at
    # least once per stage run here, so an empty list cannot pass for a clean one)
    alive = info["previous_optimizer_alive_at_creation"]
    assert len(alive) >= len(info["stages_run"]) and not any(alive), alive
    stages = info["stages"]
    always = set(info["always"])
    previous_end = None
    for index, stage_params in enumerate(stages):
        active = set(stage_params)
        assert always <= active
        begin, end = load_snapshots(snap_dir, 0, index)
        for name, before in begin.items():
            after = end[name]
            if name in active:
                assert not torch.equal(before, after), f"stage {index}: active {name} did not change"
            else:
                assert torch.equal(before, after), (
                    f"stage {index}: inactive {name} moved by {(after - before).abs().max().item():.3e}"
                )
        if previous_end is not None:
            for name, value in begin.items():
                assert torch.equal(value, previous_end[name]), (
                    f"stage {index} did not start from stage {index - 1}'s end"
                )
        previous_end = end
        for rank in range(1, world_size):
            _, other_end = load_snapshots(snap_dir, rank, index)
            for name, value in end.items():
                assert torch.equal(value, other_end[name]), f"stage {index}: rank {rank} differs on {name}"
    return info
