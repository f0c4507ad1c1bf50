"""``dt_timeline.png``: training (and eval) loss against the global step, stages drawn as bands."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hf_tuning.io import atomic_output
from hf_tuning.records import StageRecord

__all__ = ["TIMELINE_FILE", "plot_stage_timeline"]

TIMELINE_FILE = "dt_timeline.png"


def plot_stage_timeline(
    stages: Sequence[StageRecord], log_history: Sequence[dict], path: str | os.PathLike, title: str = ""
) -> Path:
    """Draw the loss curve with one shaded band per finished stage, labelled with its name.

    ``log_history`` entries carry the global ``step`` and ``loss`` / ``eval_loss``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    colours = plt.get_cmap("tab10")
    for stage in stages:
        start, end = stage.start_step, max(stage.end_step, stage.start_step + 1e-9)
        ax.axvspan(start, end, color=colours(stage.index % 10), alpha=0.12, linewidth=0)
        label = f"S{stage.index}: {stage.name}"
        ax.text(
            (start + end) / 2,
            1.0,
            label,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            clip_on=False,
        )
        ax.axvline(start, color="grey", linewidth=0.6, linestyle=":")
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=1.2, label="train loss")
    if evals:
        ax.plot(*zip(*evals), color="tab:red", marker="o", markersize=3, linewidth=1, label="eval loss")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    if train or evals:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, pad=18)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
