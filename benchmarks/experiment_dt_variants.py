"""Experiment: ``ost`` against ``dt1``..``dt4`` (LoRA) on SmolLM2-135M and the AgriMachine sample.

One recipe run (``recipes/agrimatech_llama_dt3.py`` with ``recipes/configs/agrimatech_smollm2_dt3.yaml``) per
(variant, budget, seed), then, on the trained PeftModel itself (no reload), the held-out assistant-token
loss on the fixed ``test`` split and ROUGE-L of greedy answers to its first questions, both computed by
``eval.evaluate_sft`` (the SFT evaluation's own functions, as its CLI runs them). Budgets, with
``--steps-per-stage`` S optimizer steps at batch 8:

* ``per_stage``: every stage trains S steps (the paper): ost S, dt1/dt2 4xS, dt3/dt4 2xS;
* ``split``: S steps in total, divided across the stages by the engine (equal compute).

``ost`` has one stage, so both budgets are the same run: it is trained once per seed and its result
appears in both tables. The untuned base model is evaluated once as a reference.

Every run writes ``<results-dir>/experiment_dt/<run>.json`` atomically and a run whose file exists is
skipped, so the experiment can be stopped and restarted. The aggregation (also alone with
``--aggregate-only``) writes ``<results-dir>/experiment_dt_variants.{json,md,png}``. Run it as a module from
the repository root (each run is a worker subprocess started the same way):

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiment_dt_variants            # the full experiment
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiment_dt_variants --aggregate-only
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiment_dt_variants --smoke --results-dir /tmp/exp_smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WORKER_STARTED = time.perf_counter()  # before the heavy imports a worker makes: its wall time includes them

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.experiment_dt_variants"  # what workers run: python -m MODULE --worker ...

from hf_tuning.io import atomic_output, atomic_write_json, atomic_write_text, read_json  # noqa: E402

CONFIG = ROOT / "recipes" / "configs" / "agrimatech_smollm2_dt3.yaml"
VARIANTS = ("ost", "dt1", "dt2", "dt3", "dt4")
BUDGETS = ("per_stage", "split")
STAGES = {"ost": 1, "dt1": 4, "dt2": 4, "dt3": 2, "dt4": 2}  # the engine's defaults: 4 adjacent, 2 cross groups
RUNS_DIR = "experiment_dt"
RESULT_STEM = "experiment_dt_variants"
BASE = "base"
HELDOUT_MAX_LENGTH = 1024  # longer than every held-out conversation: the loss sees all assistant tokens


# ---------------------------------------------------------------------------------------------
# Settings and the run plan
# ---------------------------------------------------------------------------------------------
@dataclass
class ExperimentSettings:
    """What defines the experiment; ``key()`` is what a stored result must match to be reused."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    budgets: list[str] = field(default_factory=lambda: list(BUDGETS))
    steps_per_stage: int = 12
    train_batch_size: int = 8
    rouge_examples: int = 16
    max_new_tokens: int = 48
    eval_batch_size: int = 16
    heldout_examples: int | None = None  # None: all 40 held-out rows
    warmup_steps: float | None = None  # None: the YAML's (0.05: ceil(0.05 x stage steps) = 1 step at LR 0 per stage)
    results_dir: str = str(ROOT / "benchmarks" / "results")
    output_root: str = str(ROOT / "outputs" / "experiment_dt")
    config: str = str(CONFIG)
    smoke: bool = False

    def key(self) -> dict[str, Any]:
        keys = (
            "steps_per_stage",
            "train_batch_size",
            "rouge_examples",
            "max_new_tokens",
            "heldout_examples",
            "warmup_steps",
        )
        return {k: getattr(self, k) for k in keys} | {"config": Path(self.config).name}

    @property
    def runs_dir(self) -> Path:
        return Path(self.results_dir) / RUNS_DIR


@dataclass(frozen=True)
class RunSpec:
    """One run: a variant trained under a budget with a seed, or the untuned base model (``variant='base'``)."""

    variant: str
    budget: str | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        return BASE if self.variant == BASE else f"{self.variant}-{self.budget}-s{self.seed}"

    def planned_steps(self, steps_per_stage: int) -> int:
        """Optimizer steps the run trains: S per stage under per_stage, S in all under split."""
        if self.variant == BASE:
            return 0
        return steps_per_stage * (STAGES[self.variant] if self.budget == "per_stage" else 1)


def plan_runs(s: ExperimentSettings) -> list[RunSpec]:
    """The base model first, then seed by seed (a finished seed gives a complete first table); ost once per seed."""
    runs = [RunSpec(BASE)]
    for seed in s.seeds:
        for variant in s.variants:
            budgets = ["per_stage"] if variant == "ost" else s.budgets  # ost: one stage, both budgets identical
            runs += [RunSpec(variant, budget, seed) for budget in budgets]
    return runs


def parse_args(argv: list[str] | None = None) -> tuple[ExperimentSettings, argparse.Namespace]:
    d = ExperimentSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=d.variants)
    p.add_argument("--budgets", nargs="+", choices=BUDGETS, default=d.budgets)
    p.add_argument("--steps-per-stage", type=int, default=d.steps_per_stage, help="S (default %(default)s)")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--rouge-examples", type=int, default=d.rouge_examples, help="held-out questions answered")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--heldout-examples", type=int, default=None, help="rows for the loss (default: all 40)")
    p.add_argument(
        "--warmup-steps",
        type=float,
        default=None,
        help="LR warm-up per stage, as the recipe reads it (a fraction < 1 of the stage's steps, rounded up, or a\n"
        "step count); default: the YAML's. Its first warm-up step has LR 0, in every stage",
    )
    p.add_argument("--results-dir", default=d.results_dir)
    p.add_argument("--output-root", default=None, help="training outputs (default outputs/experiment_dt)")
    p.add_argument("--config", default=d.config, help="recipe YAML (default: the SmolLM2 config)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table, JSON and plot")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="2 steps per stage, seed 0, ost and dt3, 2 ROUGE examples, 8 new tokens; also training batch 2 and the\n"
        "loss on 8 held-out rows, so it stays a few minutes on 2 shared CPU cores",
    )
    ns = p.parse_args(argv)
    s = ExperimentSettings(
        seeds=list(dict.fromkeys(ns.seeds)),
        variants=[v for v in VARIANTS if v in ns.variants],
        budgets=[b for b in BUDGETS if b in ns.budgets],
        steps_per_stage=ns.steps_per_stage,
        train_batch_size=ns.train_batch_size,
        rouge_examples=ns.rouge_examples,
        max_new_tokens=ns.max_new_tokens,
        eval_batch_size=ns.eval_batch_size,
        heldout_examples=ns.heldout_examples,
        warmup_steps=ns.warmup_steps,
        results_dir=str(Path(ns.results_dir).resolve()),
        config=str(Path(ns.config).resolve()),
        smoke=ns.smoke,
    )
    if s.smoke:
        s.steps_per_stage, s.rouge_examples, s.max_new_tokens, s.seeds = 2, 2, 8, [0]
        s.variants, s.train_batch_size, s.heldout_examples = ["ost", "dt3"], 2, 8
    default_root = Path(s.results_dir) / "outputs" if s.smoke else ROOT / "outputs" / "experiment_dt"
    s.output_root = str(Path(ns.output_root).resolve() if ns.output_root else default_root)
    too_few = [v for v in s.variants if "split" in s.budgets and s.steps_per_stage < STAGES[v]]
    if too_few:
        p.error(f"--steps-per-stage {s.steps_per_stage} leaves a stage of {too_few} without a step under split")
    return s, ns


# ---------------------------------------------------------------------------------------------
# The worker: one run, trained and evaluated in its own process
# ---------------------------------------------------------------------------------------------
# Why a subprocess per run: repeated in-process training keeps growing the process (glibc keeps the freed
# multi-GB activation arenas of every run, accelerate's state singletons and the recipe's logging handlers
# persist), and one run's failure would end the whole experiment. A fresh interpreter costs ~15-20 s of
# imports and model loading, small against the minutes a run trains, and the trained PeftModel is still
# evaluated where it was trained (trainer.model, no reload).
def load_recipe() -> Any:
    """The flagship recipe's module (imported on first use: the experiment's parent process never trains)."""
    return importlib.import_module("recipes.agrimatech_llama_dt3")


def recipe_argv(s: ExperimentSettings, run: RunSpec) -> list[str]:
    """The recipe's command line for one run: the YAML plus the experiment's overrides."""
    return [
        "--config",
        s.config,
        "--dt_variant",
        run.variant,
        "--dt_budget",
        run.budget,
        "--max_steps",
        str(s.steps_per_stage),  # per stage under per_stage; the total under split
        "--per_device_train_batch_size",
        str(s.train_batch_size),
        "--seed",
        str(run.seed),
        "--output_dir",
        str(Path(s.output_root) / run.name),
        "--save_strategy",
        "no",
        "--validation_size",
        "0",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        *([] if s.warmup_steps is None else ["--warmup_steps", str(s.warmup_steps)]),
    ]


def recipe_yaml(s: ExperimentSettings) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(s.config).read_text(encoding="utf-8"))


def heldout_conversations(s: ExperimentSettings) -> list[list[dict[str, Any]]]:
    """The fixed held-out ``test`` split of the data the recipe trains on, read as the SFT evaluation reads it."""
    from eval.evaluate_sft import load_conversations

    return load_conversations(recipe_yaml(s).get("dataset_name_or_path", "agrimachine_sample"), "test", None)


def evaluate(s: ExperimentSettings, model: Any, tokenizer: Any, chat_template: str) -> dict[str, Any]:
    """Held-out loss on the test rows, ROUGE-L (and friends) of greedy answers to the first questions, by
    ``eval.evaluate_sft.evaluate_model``; generation stops on ``chat_template``'s end of turn and the EOS."""
    from eval.evaluate_sft import evaluate_model

    conversations = heldout_conversations(s)
    scored = conversations[: s.heldout_examples] if s.heldout_examples else conversations
    asked = conversations[: s.rouge_examples]
    metrics, answers = evaluate_model(
        model,
        tokenizer,
        asked,
        loss_conversations=scored,
        batch_size=s.eval_batch_size,
        max_new_tokens=s.max_new_tokens,
        max_length=HELDOUT_MAX_LENGTH,
        chat_template=chat_template,
    )
    return {
        **{key: metrics[key] for key in ("loss", "perplexity", "tokens")},
        **{key: metrics[key] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")},
        "heldout_rows": len(scored),
        "rouge_rows": len(asked),
        "loss_eval_s": metrics["loss_seconds"],
        "generation_s": metrics["generation_seconds"],
        "answers": answers,
    }


def run_trained(s: ExperimentSettings, run: RunSpec) -> dict[str, Any]:
    """Train through the recipe, then evaluate ``trainer.model`` (the PeftModel) in place."""
    recipe = load_recipe()
    t0 = time.perf_counter()
    result = recipe.main(recipe_argv(s, run))
    train_wall = time.perf_counter() - t0
    trainer = result["trainer"]
    records = trainer.stage_records
    # the recipe applied its template (an 'auto' one resolved there) and put its stop ids on the generation config
    template = recipe_yaml(s).get("chat_template", "auto")
    evaluation = evaluate(s, trainer.model, trainer.processing_class, template)
    stage_steps = [r.steps for r in records]
    return {
        "stages": len(trainer.stage_plan),
        "train_steps": records[-1].end_step if records else 0,
        "stage_steps": stage_steps,
        "warmup_steps_arg": trainer.args.warmup_steps,
        # the schedule restarts per stage, and a warm-up's first step has LR 0: those steps do not train
        "zero_lr_steps": sum(1 for n in stage_steps if trainer.args.get_warmup_steps(n) > 0),
        "stage_final_train_loss": [r.final_train_loss for r in records],
        "train_loss": result["train"].get("train_loss"),
        "train_runtime_s": result["train"].get("train_runtime"),
        "recipe_wall_s": train_wall,
        "output_dir": result["output_dir"],
        "eval": evaluation,
    }


def run_base(s: ExperimentSettings) -> dict[str, Any]:
    """The untuned model, loaded and prompted the way the recipe sets it up (as the SFT evaluation loads it)."""
    from eval.evaluate_sft import load_model_and_tokenizer

    config = recipe_yaml(s)
    model, tokenizer, template = load_model_and_tokenizer(
        config["model_name_or_path"],
        chat_template=config.get("chat_template", "auto"),
        dtype="float32",
        device="cpu",
        gguf_file=config.get("gguf_file"),
    )
    return {"stages": 0, "train_steps": 0, "eval": evaluate(s, model, tokenizer, template)}


def worker_main(s: ExperimentSettings, name: str) -> int:
    """Subprocess entry: run ``name`` and write its result JSON (a failure writes nothing: it reruns next time)."""
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    transformers.logging.set_verbosity_error()
    run = next(r for r in plan_runs(s) if r.name == name) if name != BASE else RunSpec(BASE)
    outcome = run_base(s) if run.variant == BASE else run_trained(s, run)
    result = {
        "run": run.name,
        "variant": run.variant,
        "budget": run.budget,
        "budgets_covered": list(BUDGETS) if run.variant == "ost" else [run.budget] if run.budget else [],
        "seed": run.seed,
        "settings_key": s.key(),
        **outcome,
        "wall_s": time.perf_counter() - WORKER_STARTED,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(s.runs_dir / f"{run.name}.json", result)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: run what is missing, with progress and ETA
# ---------------------------------------------------------------------------------------------
def existing_result(s: ExperimentSettings, run: RunSpec) -> dict[str, Any] | None:
    """A stored result for ``run``; one made with other settings is refused rather than mixed in."""
    path = s.runs_dir / f"{run.name}.json"
    if not path.is_file():
        return None
    result = read_json(path)
    if result.get("settings_key") != s.key():
        raise SystemExit(
            f"{path} was made with other settings ({result.get('settings_key')} vs {s.key()}); "
            "use another --results-dir or delete it"
        )
    return result


def launch(s: ExperimentSettings, run: RunSpec) -> bool:
    """Run one worker; its output goes to ``experiment_dt/logs/<run>.log``. True when its result was written."""
    log_path = s.runs_dir / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", MODULE, "--worker", run.name, "--worker-settings"]
    command.append(json.dumps(asdict(s)))
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if done.returncode != 0 or not (s.runs_dir / f"{run.name}.json").is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        print(f"[experiment] {run.name} FAILED (exit {done.returncode}); end of {log_path}:", flush=True)
        print("\n".join("    " + line for line in tail), flush=True)
        return False
    return True


def estimate_remaining(s: ExperimentSettings, done: list[dict[str, Any]], todo: list[RunSpec]) -> float | None:
    """Seconds left: remaining training steps x the mean step time so far, plus each remaining run's
    fixed part (start-up, model load, data, evaluation: run wall minus training) at its mean so far."""
    trained = [r for r in done if r["train_steps"]]
    if not trained:
        return None
    step_s = sum(r["train_runtime_s"] for r in trained) / sum(r["train_steps"] for r in trained)
    fixed_s = statistics.fmean(r["wall_s"] - (r.get("train_runtime_s") or 0.0) for r in done)
    return sum(run.planned_steps(s.steps_per_stage) for run in todo) * step_s + len(todo) * fixed_s


def run_experiment(s: ExperimentSettings) -> int:
    """Run every missing run of the plan in order; returns the number of failed runs."""
    runs, started, failures = plan_runs(s), time.perf_counter(), 0
    done = [r for r in (existing_result(s, run) for run in runs) if r is not None]
    print(f"[experiment] {len(runs)} runs, {len(done)} already done, results in {s.runs_dir}", flush=True)
    for index, run in enumerate(runs, start=1):
        if existing_result(s, run) is not None:
            print(f"[experiment] run {index}/{len(runs)} {run.name}: done before, skipped", flush=True)
            continue
        steps = run.planned_steps(s.steps_per_stage)
        print(f"[experiment] run {index}/{len(runs)} {run.name} ({steps} steps) ...", flush=True)
        if launch(s, run):
            done.append(existing_result(s, run))
        else:
            failures += 1
        todo = [r for r in runs[index:] if not (s.runs_dir / f"{r.name}.json").is_file()]
        eta = estimate_remaining(s, done, todo)
        print(
            f"[experiment] run {index}/{len(runs)} {run.name} finished; elapsed {_clock(time.perf_counter() - started)}"
            f", ETA {'unknown until a trained run finished' if eta is None else _clock(eta)}"
            f"{'' if not done else _last_line(done[-1])}",
            flush=True,
        )
    return failures


def _last_line(result: dict[str, Any]) -> str:
    e = result["eval"]
    return f" (last: {result['run']} loss {e['loss']:.4f}, ROUGE-L {e['rougeL']:.2f}, {result['wall_s']:.0f}s)"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------
# Aggregation: table, JSON, plot
# ---------------------------------------------------------------------------------------------
def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every per-run result in ``runs_dir``, in file-name order."""
    return [read_json(path) for path in sorted(Path(runs_dir).glob("*.json"))]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def row_stats(variant: str, budget: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the seeds of a (variant, budget), their loss and ROUGE-L mean and spread."""
    loss_mean, loss_std = mean_std([r["eval"]["loss"] for r in members])
    rouge_mean, rouge_std = mean_std([r["eval"]["rougeL"] for r in members])
    steps = sorted({r["train_steps"] for r in members})
    idle = sorted({r.get("zero_lr_steps") for r in members}, key=str)
    return {
        "variant": variant,
        "budget": budget,
        "shared_with_other_budget": variant == "ost",
        "seeds": sorted(r["seed"] for r in members),
        "runs": [r["run"] for r in members],
        "n": len(members),
        "train_steps": steps[0] if len(steps) == 1 else steps,
        "zero_lr_steps": idle[0] if len(idle) == 1 else idle,
        "loss_mean": loss_mean,
        "loss_std": loss_std,
        "rougeL_mean": rouge_mean,
        "rougeL_std": rouge_std,
        "train_runtime_s_mean": mean_std([r["train_runtime_s"] for r in members])[0],
        "wall_s_mean": mean_std([r["wall_s"] for r in members])[0],
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows per (variant, budget) over seeds; ost's runs fill both budgets. Mixed settings are refused."""
    keys = {json.dumps(r.get("settings_key"), sort_keys=True) for r in runs}
    if len(keys) > 1:
        raise ValueError(f"the per-run results were made with different settings: {sorted(keys)}")
    trained = [r for r in runs if r["variant"] != BASE]
    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in trained if r["variant"] != "ost")] or ["per_stage"]
    rows = []
    for budget in budgets:
        for variant in VARIANTS:
            members = [r for r in trained if r["variant"] == variant and (variant == "ost" or r["budget"] == budget)]
            if members:
                rows.append(row_stats(variant, budget, members))
    for row in rows:
        ost = next((o for o in rows if o["variant"] == "ost" and o["budget"] == row["budget"]), None)
        row["loss_delta_vs_ost"] = None if ost is None else row["loss_mean"] - ost["loss_mean"]
        row["rougeL_delta_vs_ost"] = None if ost is None else row["rougeL_mean"] - ost["rougeL_mean"]
    base = next((r for r in runs if r["variant"] == BASE), None)
    return {
        "settings_key": runs[0].get("settings_key") if runs else None,
        "budgets": budgets,
        "warmup_steps": next((r["warmup_steps_arg"] for r in trained if "warmup_steps_arg" in r), None),
        "rows": rows,
        "base": None if base is None else {"loss": base["eval"]["loss"], "rougeL": base["eval"]["rougeL"]},
        "runs": runs,
    }


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {'n/a' if std is None else f'{std:.{digits}f}'}"


def _warmup_text(value: float | None) -> str:
    if value is None:
        return "not recorded"
    return f"`warmup_steps={value:g}`" + (" (a fraction of each stage's steps, rounded up)" if value < 1 else "")


def _idle(value: Any) -> str:
    return "" if value is None else f" ({value})"


def _signed(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def summary_table(report: dict[str, Any]) -> list[str]:
    """variant x budget: loss and ROUGE-L mean ± std over seeds, steps and wall time."""
    lines = [
        "| variant | budget | seeds | optimizer steps (at LR 0) | held-out loss | Δ loss vs ost | ROUGE-L "
        "| Δ ROUGE-L vs ost "
        "| training (s) | run wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = report["base"]
    if base is not None:
        lines.append(f"| base (untuned) | — | — | 0 | {base['loss']:.4f} | | {base['rougeL']:.2f} | | — | — |")
    for row in report["rows"]:
        budget = f"{row['budget']}{' (same runs in both)' if row['shared_with_other_budget'] else ''}"
        lines.append(
            f"| {row['variant']} | {budget} | {row['n']} | {row['train_steps']}{_idle(row.get('zero_lr_steps'))} "
            f"| {_pm(row['loss_mean'], row['loss_std'], 4)} | {_signed(row['loss_delta_vs_ost'], 4)} "
            f"| {_pm(row['rougeL_mean'], row['rougeL_std'], 2)} | {_signed(row['rougeL_delta_vs_ost'], 2)} "
            f"| {row['train_runtime_s_mean']:.0f} | {row['wall_s_mean']:.0f} |"
        )
    return lines


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | steps (at LR 0) | train loss | held-out loss | ROUGE-L | BLEU | training (s) | loss eval (s) "
        "| generation (s) "
        "| run wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        e = r["eval"]
        train_loss = "—" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        training = "—" if r.get("train_runtime_s") is None else f"{r['train_runtime_s']:.0f}"
        lines.append(
            f"| {r['run']} | {r['train_steps']}{_idle(r.get('zero_lr_steps'))} | {train_loss} | {e['loss']:.4f} "
            f"| {e['rougeL']:.2f} | {e['bleu']:.2f} | {training} | {e['loss_eval_s']:.0f} | {e['generation_s']:.0f} "
            f"| {r['wall_s']:.0f} |"
        )
    return lines


def findings(report: dict[str, Any]) -> list[str]:
    """What comes out, in numbers: per budget the best variant by loss and by ROUGE-L, and whether the gap to ost
    exceeds the seed spread (the two stds added, a rough bar)."""
    lines = []
    for budget in report["budgets"]:
        rows = [r for r in report["rows"] if r["budget"] == budget]
        ost = next((r for r in rows if r["variant"] == "ost"), None)
        best_loss = min(rows, key=lambda r: r["loss_mean"])
        best_rouge = max(rows, key=lambda r: r["rougeL_mean"])
        loss_text = _pm(best_loss["loss_mean"], best_loss["loss_std"], 4)
        rouge_text = _pm(best_rouge["rougeL_mean"], best_rouge["rougeL_std"], 2)
        text = (
            f"- **{budget}**: lowest held-out loss {best_loss['variant']} ({loss_text}), "
            f"highest ROUGE-L {best_rouge['variant']} ({rouge_text})."
        )
        if ost is not None:
            text += " Against ost: " + "; ".join(_versus(r, ost) for r in rows if r["variant"] != "ost") + "."
        lines.append(text)
    return lines


def _versus(row: dict[str, Any], ost: dict[str, Any]) -> str:
    bar = (row["loss_std"] or 0.0) + (ost["loss_std"] or 0.0)
    gap = row["loss_delta_vs_ost"]
    verdict = "within the seed spread" if bar == 0.0 or abs(gap) <= bar else ("better" if gap < 0 else "worse")
    if bar == 0.0:
        verdict = "no spread to judge (one seed)"
    return f"{row['variant']} loss {gap:+.4f} ({verdict})"


def render_markdown(report: dict[str, Any]) -> str:
    key = report["settings_key"] or {}
    heldout = key.get("heldout_examples") or "all 40"
    lines = [
        "# DT variants on SmolLM2-135M (AgriMachine sample)",
        "",
        f"Recipe `recipes/agrimatech_llama_dt3.py` with `{key.get('config')}`, LoRA r=16 all-linear; "
        f"{key.get('steps_per_stage')} optimizer steps per stage at batch {key.get('train_batch_size')} under "
        "`per_stage` (ost 1x, dt1/dt2 4x, dt3/dt4 2x), the same steps in total under `split`. Held-out set: the "
        f"fixed `test` split; loss over the assistant tokens of {heldout} rows, ROUGE-L (0-100) of greedy answers to "
        f"the first {key.get('rouge_examples')} questions ({key.get('max_new_tokens')} new tokens at most), both on "
        "the trained PeftModel. Mean ± sample std (n - 1) over seeds. ost has a single stage, so `per_stage` and "
        "`split` are the same runs: they are trained once per seed and shown under both budgets. LR warm-up: "
        f"{_warmup_text(report.get('warmup_steps'))}; the schedule restarts in every stage and a warm-up's first step "
        "has LR 0, so *(at LR 0)* counts steps that did not change the weights. Generated "
        f"{report['date']}.",
        "",
        *summary_table(report),
        "",
        "![held-out loss and ROUGE-L per variant](experiment_dt_variants.png)",
        "",
        "## What comes out",
        "",
        *findings(report),
        "",
        "## Every run",
        "",
        *runs_table(report["runs"]),
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Two panels (loss, ROUGE-L) per variant; per_stage and split side by side; base model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if any(r["variant"] == v for r in report["rows"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("loss", "held-out loss (lower is better)", "loss"), ("rougeL", "ROUGE-L (higher is better)", "rougeL"))
    offsets = {budget: (i - (len(report["budgets"]) - 1) / 2) * 0.25 for i, budget in enumerate(report["budgets"])}
    for ax, (metric, title, base_key) in zip(axes, panels):
        for budget, offset in offsets.items():
            rows = {r["variant"]: r for r in report["rows"] if r["budget"] == budget}
            xs = [i + offset for i, v in enumerate(variants) if v in rows]
            ys = [rows[v][f"{metric}_mean"] for v in variants if v in rows]
            errs = [rows[v][f"{metric}_std"] or 0.0 for v in variants if v in rows]
            ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=4, label=budget)
        if report["base"] is not None:
            ax.axhline(report["base"][base_key], linestyle="--", color="gray", label="base (untuned)")
        ax.set_xticks(range(len(variants)), variants)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("ost vs dt1-dt4 (LoRA), SmolLM2-135M; error bars: std over seeds (ost: same runs in both budgets)")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_aggregate(results_dir: Path) -> dict[str, Any]:
    """Read the per-run JSONs and write ``experiment_dt_variants.{json,md,png}`` beside their folder."""
    runs = load_runs(Path(results_dir) / RUNS_DIR)
    if not runs:
        raise SystemExit(f"no per-run results in {Path(results_dir) / RUNS_DIR}")
    report = aggregate(runs)
    report["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    markdown = render_markdown(report)
    atomic_write_json(Path(results_dir) / f"{RESULT_STEM}.json", report)
    atomic_write_text(Path(results_dir) / f"{RESULT_STEM}.md", markdown)
    plot(report, Path(results_dir) / f"{RESULT_STEM}.png")
    print(markdown)
    return report


def main(argv: list[str] | None = None) -> int:
    s, ns = parse_args(argv)
    if ns.aggregate_only:
        write_aggregate(Path(s.results_dir))
        return 0
    failures = run_experiment(s)
    write_aggregate(Path(s.results_dir))
    if failures:
        print(f"[experiment] {failures} run(s) failed; rerun the same command to retry them", flush=True)
    return 1 if failures else 0


def worker_entry(argv: list[str]) -> int:
    """``--worker NAME --worker-settings JSON``: what the parent launches for one run."""
    name = argv[argv.index("--worker") + 1]
    s = ExperimentSettings(**json.loads(argv[argv.index("--worker-settings") + 1]))
    return worker_main(s, name)


if __name__ == "__main__":
    sys.exit(worker_entry(sys.argv) if "--worker" in sys.argv else main())
