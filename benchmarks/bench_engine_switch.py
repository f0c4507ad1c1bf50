"""Peak memory at stage switches under DeepSpeed ZeRO-2, full fine-tuning: the engine now against a baseline.

At every stage switch the engine builds a new DeepSpeed engine for the next stage, and DeepSpeed allocates
that stage's fp32 partition and Adam moments while it builds it. If anything still holds the previous stage's
engine, the switch holds both stages' optimizer state at once. This benchmark measures, in each stage switch
of a ``dt1`` run, the process RSS at the last step of the finished stage and the peak RSS from there to the end
of the next stage's first step, for the current library and for a baseline commit of it (default: the last
commit before the engine released the finished stage's state; ``--baseline-commit`` to choose another), in
the same invocation and in the order baseline, current, current, baseline.

Each measurement is a fresh worker process (``--worker``) that runs DeepSpeed in-process on one rank over gloo,
so the two library versions never share a heap. The model is a random-initialised Llama (fp32, untied head);
under dt1 full fine-tuning every stage also trains the embeddings and the head, so each switch replaces about
half of the model's optimizer state.

Results go to ``<output-dir>/bench_engine_switch_cpu.json`` and ``.md``.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_engine_switch              # ~6 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_engine_switch --quick      # smoke test
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import harness
from hf_tuning.io import atomic_write_json, read_json

RESULT_STEM = "bench_engine_switch_cpu"
LIBRARIES = ("torch", "transformers", "deepspeed")
BASELINE_COMMIT = "0155adb"  # the engine before it released the finished stage's optimizer state
DEEPSPEED_CONFIG = harness.ROOT / "deepspeed_configs" / "zero2.json"
STATE_BYTES_PER_PARAM = 12  # ZeRO's fp32 partition plus Adam's two moments, per trained parameter


@dataclass
class SwitchSettings(harness.BenchmarkSettings):
    hidden: int = 512
    layers: int = 12
    vocab: int = 32000
    seq_len: int = 64
    batch_size: int = 2
    steps: int = 3
    learning_rate: float = 1e-4
    baseline_commit: str = field(
        default=BASELINE_COMMIT, metadata={"help": "the library version compared against (a git revision)"}
    )
    quick: bool = field(default=False, metadata={"help": "tiny model, 2 steps per stage: a smoke test"})

    def __post_init__(self) -> None:
        if self.quick:
            self.hidden, self.layers, self.vocab, self.seq_len, self.steps = 64, 4, 1000, 16, 2
        if self.steps < 1:
            raise ValueError("--steps must be at least 1")


# ---------------------------------------------------------------------------------------------
# The worker: one dt1 run under ZeRO-2 with whatever hf_tuning is importable
# ---------------------------------------------------------------------------------------------
def measure_switches(s: SwitchSettings) -> dict[str, Any]:
    """Train dt1 under ZeRO-2 on one rank; per switch: RSS at the finished stage's last step, and the peak from
    there to the end of the next stage's first step (the high-water mark is reset at the first point)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29771")
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    import hf_tuning
    from hf_tuning import StagedTrainer, StagedTrainingArguments

    class SwitchProbe(TrainerCallback):
        def __init__(self) -> None:
            self.stage_steps = 0
            self.points: list[dict[str, Any]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stage_steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.stage_steps += 1
            if self.stage_steps == 1 and self.points:
                self.points[-1]["peak_bytes"] = harness.peak_rss()
                self.points[-1]["after_first_step_bytes"] = harness.rss_bytes()
            if state.global_step >= state.max_steps:  # the stage's last step: the switch starts here
                self.points.append({"before_bytes": harness.reset_peak_rss()})

    torch.manual_seed(s.seed)
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=int(round(2.75 * s.hidden / 64) * 64),
        num_hidden_layers=s.layers,
        num_attention_heads=8 if s.hidden >= 512 else 4,
        num_key_value_heads=4 if s.hidden >= 512 else 2,
        max_position_embeddings=max(s.seq_len, 128),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float()
    generator = torch.Generator().manual_seed(s.seed)
    rows = [torch.randint(4, s.vocab, (s.seq_len,), generator=generator).tolist() for _ in range(64)]
    data = Dataset.from_list([{"input_ids": r, "labels": r, "attention_mask": [1] * s.seq_len} for r in rows])
    probe = SwitchProbe()
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as out:
        args = StagedTrainingArguments(
            **harness.trainer_kwargs(s, out, s.steps, dt_variant="dt1", weight_decay=0.0),
            deepspeed=json.loads(DEEPSPEED_CONFIG.read_text()),
        )
        trainer = StagedTrainer(model=model, args=args, train_dataset=data, callbacks=[probe])
        stages = [{"name": st.name, "trainable_params": st.num_params} for st in trainer.stage_plan.stages]
        trainer.train()
    switches = []
    for index, point in enumerate(probe.points[: len(stages) - 1]):
        before, nxt = stages[index], stages[index + 1]
        switches.append(
            {
                "from": before["name"],
                "to": nxt["name"],
                **point,
                "rise_bytes": point["peak_bytes"] - point["before_bytes"],
                "state_from_bytes": before["trainable_params"] * STATE_BYTES_PER_PARAM,
                "state_to_bytes": nxt["trainable_params"] * STATE_BYTES_PER_PARAM,
            }
        )
    return {"library": str(Path(hf_tuning.__file__).parent), "stages": stages, "switches": switches}


def worker_main(s: SwitchSettings, output: str) -> None:
    with harness.benchmark_process(s.threads):
        atomic_write_json(output, measure_switches(s))


# ---------------------------------------------------------------------------------------------
# The parent: both library versions, palindromic
# ---------------------------------------------------------------------------------------------
def export_library(commit: str, into: Path) -> Path:
    """The ``hf_tuning`` package as it was at ``commit``, extracted into ``into`` (nothing in the checkout changes)."""
    archive = subprocess.run(
        ["git", "archive", commit, "hf_tuning"], cwd=harness.ROOT, capture_output=True, check=True
    ).stdout
    into.mkdir(parents=True, exist_ok=True)
    archive_path = into / "library.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into, filter="data")
    return into


def run_worker(s: SwitchSettings, argv: list[str], label: str, library: Path | None, work: Path, rep: int) -> dict:
    """One measurement in a fresh process; ``library`` (a folder holding ``hf_tuning``) shadows the installed one."""
    output = work / f"{label}-{rep}.json"
    path = [str(library)] if library is not None else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(harness.ROOT)]), "OMP_NUM_THREADS": str(s.threads)}
    command = [sys.executable, "-m", "benchmarks.bench_engine_switch", *argv, "--worker", str(output)]
    # `python -m` puts the working directory first on sys.path: the library's folder, so its hf_tuning is the one
    cwd = library if library is not None else harness.ROOT
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{label} worker failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    result = read_json(output)
    # the worker says which hf_tuning it imported: check it is the one asked for, then name it portably
    imported = Path(result.pop("library")).resolve()
    expected = (library if library is not None else harness.ROOT).resolve() / "hf_tuning"
    if imported != expected:
        raise RuntimeError(f"the {label} worker imported {imported}, not {expected}")
    result["library"] = "checkout" if library is None else f"commit {s.baseline_commit}"
    return {"label": label, "rep": rep, **result}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per switch and library version: the mean rise of the peak RSS over both repetitions, and its ratio."""
    labels = sorted({r["label"] for r in runs})
    count = len(runs[0]["switches"])
    rows = []
    for index in range(count):
        row: dict[str, Any] = {"from": runs[0]["switches"][index]["from"], "to": runs[0]["switches"][index]["to"]}
        row["state_from_bytes"] = runs[0]["switches"][index]["state_from_bytes"]
        row["state_to_bytes"] = runs[0]["switches"][index]["state_to_bytes"]
        for label in labels:
            rises = [r["switches"][index]["rise_bytes"] for r in runs if r["label"] == label]
            peaks = [r["switches"][index]["peak_bytes"] for r in runs if r["label"] == label]
            row[f"{label}_rise_bytes"] = harness.mean_std(rises)[0]
            row[f"{label}_peak_bytes"] = harness.mean_std(peaks)[0]
        row["rise_ratio"] = harness.ratio(row["current_rise_bytes"], row["baseline_rise_bytes"])
        row["peak_ratio"] = harness.ratio(row["current_peak_bytes"], row["baseline_peak_bytes"])
        rows.append(row)
    return {"switches": rows}


def render_markdown(report: dict[str, Any]) -> str:
    s, summary = report["settings"], report["summary"]
    lines = [
        *harness.report_header("Stage switches under DeepSpeed ZeRO-2 (CPU)", report, LIBRARIES),
        f"Model: random-init LlamaForCausalLM, hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, "
        f"fp32, untied head; full fine-tuning, `dt1` (4 stages of {s['steps']} steps, batch {s['batch_size']}, "
        f"sequence {s['seq_len']}); DeepSpeed ZeRO-2 (`deepspeed_configs/zero2.json`) on one rank over gloo, "
        "in-process. *Baseline* is the library at commit "
        f"`{s['baseline_commit']}`, *current* the checkout; each ran twice, in the order "
        f"{', '.join(f'{label} {rep}' for label, rep in report['schedule'])}, each run in a fresh process.",
        "",
        "Per switch: *before* = RSS at the finished stage's last step (where the high-water mark is reset), *peak* "
        "= highest RSS from there to the end of the next stage's first step, *rise* = peak - before, the mean of "
        "the two repetitions. *State* = the stage's trained parameters x 12 bytes (ZeRO's fp32 partition and "
        "Adam's two moments), what DeepSpeed allocates for a stage when it builds its engine.",
        "",
        *harness.table(
            (
                "switch",
                "state of the finished stage (MiB)",
                "state of the next stage (MiB)",
                "baseline rise (MiB)",
                "current rise (MiB)",
                "rise ratio",
                "baseline peak (MiB)",
                "current peak (MiB)",
                "peak ratio",
            ),
            (
                (
                    f"{row['from']} -> {row['to']}",
                    harness.mib(row["state_from_bytes"]),
                    harness.mib(row["state_to_bytes"]),
                    harness.mib(row["baseline_rise_bytes"]),
                    harness.mib(row["current_rise_bytes"]),
                    harness.num(row["rise_ratio"]),
                    harness.mib(row["baseline_peak_bytes"]),
                    harness.mib(row["current_peak_bytes"]),
                    harness.num(row["peak_ratio"]),
                )
                for row in summary["switches"]
            ),
        ),
        "",
        "Runs:",
        "",
        *harness.table(
            ("run", "rep", "switch", "before (MiB)", "peak (MiB)", "rise (MiB)", "library"),
            (
                (
                    r["label"],
                    r["rep"],
                    f"{sw['from']} -> {sw['to']}",
                    harness.mib(sw["before_bytes"]),
                    harness.mib(sw["peak_bytes"]),
                    harness.mib(sw["rise_bytes"]),
                    r["library"],
                )
                for r in report["runs"]
                for sw in r["switches"]
            ),
        ),  # fmt: skip
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--worker" in argv:
        at = argv.index("--worker")
        output, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
        worker_main(harness.parse_settings(SwitchSettings, rest, __doc__), output)
        return {}
    s = harness.parse_settings(SwitchSettings, argv, __doc__)
    schedule = [(label, rep) for label, rep in harness.palindrome(["baseline", "current"])]
    with harness.benchmark_session(s, "benchmarks.bench_engine_switch", argv) as bench:
        with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
            work = Path(tmp)
            baseline = export_library(s.baseline_commit, work / "baseline")
            for label, rep in schedule:
                library = baseline if label == "baseline" else None
                bench.measure(
                    lambda run, seconds: (
                        f"[bench] {run['label']} rep {run['rep']}: rises "
                        + ", ".join(harness.mib(sw["rise_bytes"]) for sw in run["switches"])
                        + f" MiB ({seconds:.0f}s)"
                    ),
                    run_worker,
                    s,
                    argv,
                    label,
                    library,
                    work,
                    rep,
                )
        report = bench.report(schedule, LIBRARIES, summary=summarise(bench.runs))
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(harness.save_report(out / f"{RESULT_STEM}.json", report, render_markdown))
    return report


if __name__ == "__main__":
    main()
