"""``make gpu-check``: one prepared command that measures everything GPU-specific on a lent CUDA GPU.

A session is only sometimes lent a GPU (one H200, 15 minutes of device time with the machine's start), so every
GPU measurement the project needs runs in one command of about 8 minutes. Each section runs in fresh processes
with its own time limit, a failure or timeout in one leaves the others running, and the report
(``gpu_check.md`` and ``gpu_check.json``) is rewritten after every section, so a command cut short still returns
what it measured. Sections, the most valuable first:

* ``sft``: bf16 SFT of a random ~1B LLaMA (Llama-3 vocabulary and GQA) on the AgriMachine sample: plain
  ``trl.SFTTrainer`` + PEFT LoRA against ``StagedSFTTrainer`` ost and dt3, each in a fresh process, through
  ``benchmarks/bench_sft.py`` (tokens/s and ``torch.cuda.max_memory_allocated``, ratios against plain);
* ``qlora``: one QLoRA step (4-bit bitsandbytes, gradient checkpointing) of the same model through the recipe,
  skipped when bitsandbytes is not importable (its wheel does not fit the carry budget: see gpu_wheels.sh);
* ``zero2`` / ``zero3``: the recipe ``recipes/agrimatech_llama_dt3.py`` under ``accelerate launch`` with DeepSpeed
  ZeRO-2 / ZeRO-3 on one process, on a small random LLaMA; the saved adapter must be complete and trained;
* ``petl``, ``snell``, ``dyt``, ``dit``: the PETL speed/memory benchmarks with ``--device cuda``.

Where the results go: ``--output-dir`` (default ``benchmarks/results``) receives ``gpu_check.{md,json}`` and
each benchmark's usual files (``bench_sft_cuda_llama-1b-random``, ``bench_petl_cuda``, ``bench_snell_cuda``,
``bench_dyt_cuda``, ``bench_dit_cuda``, each ``.json`` + ``.md``); with ``--bundle-dir`` (the Makefile passes
the device machine's ``$OUT``) the report and ``gpu_check_results.tar.gz`` (every file written, with each
section's log) are copied there after every section: three files, within what the device tool brings back.

How the lead runs it (here first ``make gpu-wheels``, which fills ``.whl/`` and checks the size budget), the
device tool's call::

    run(command="make gpu-check", carry=[".whl"], timeout_s=540)

then here: ``tar xzf <files_at>/gpu_check_results.tar.gz`` in the repository root puts the results in place.

Rehearsal without a GPU: ``python -m benchmarks.gpu_check --rehearse-on-cpu --tiny`` runs every section on the
CPU at toy scale (fp32, DeepSpeed over gloo, bitsandbytes' CPU 4-bit path) into a temporary folder, so that each
code path has run before the one chance on a GPU. Without CUDA and without that flag it stops at once.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.gpu_check"
REPORT_NAME = "gpu_check"
BUNDLE_NAME = "gpu_check_results.tar.gz"
DEFAULT_BUDGET_S = 470.0  # the whole check; the device tool's call gets 540 s, the machine's start is extra
# where `make gpu-check` installs the carried wheels (first on PYTHONPATH there)
WHEEL_SITE = Path(os.environ.get("GPU_CHECK_WHEEL_SITE", "/tmp/site"))
LOG_TAIL_LINES = 40
CPU_LIMIT_FACTOR = 4  # a CPU rehearsal's section limits, in multiples of the GPU's

# Distributions the check needs that the GPU machine lacks, or has at a version older than our setup.cfg wants
# (transformers 5.17 < 5.23; peft and trl pinned to the versions the test suite runs). gpu_wheels.sh downloads
# exactly these, pinned to this virtual environment's versions (`--wheel-pins`); tests/benchmarks/test_gpu_check.py
# checks that they cover what the sections import.
CARRIED = (
    "transformers",
    "peft",
    "trl",
    "datasets",
    "dill",
    "multiprocess",
    "quicktok-v1",
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "diffusers",
    "importlib-metadata",
    "lazy-importer",
)
# needed by a section but not carried, and why: that section is skipped when the module is missing
NOT_CARRIED = {
    "bitsandbytes": "its manylinux wheel is 41 MiB: the tree and the other wheels would exceed the 60 MiB carry budget"
}
# The GPU machine's Python packages, as /work/.library/device/KINDS.md lists them for the 'cuda' image
# (normalised names; versions there: torch 2.11, transformers 5.17, accelerate 1.15, tokenizers 0.23.2).
GPU_MACHINE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
    safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)
# the libraries whose imported version and origin (system or carried wheel) the report records
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "deepspeed",
    "datasets",
    "bitsandbytes",
    "diffusers",
    "timm",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "pyarrow",
    "quicktok",
)
# the random LLaMA the recipe runs under DeepSpeed on a GPU (the 1B model's shape, narrower)
DEEPSPEED_LLAMA = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 1408,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
RECIPE = ROOT / "recipes" / "agrimatech_llama_dt3.py"
RECIPE_CONFIG = ROOT / "recipes" / "configs" / "agrimatech_smollm2_dt3.yaml"


def normalise(name: str) -> str:
    """A distribution's name as PyPI compares them (``Typing_Extensions`` -> ``typing-extensions``)."""
    return name.lower().replace("_", "-").replace(".", "-")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
class SectionSkipped(Exception):
    """A section that cannot run here; the message says why (it is reported, not hidden)."""


class SectionFailed(Exception):
    """A section whose process failed or timed out; the message ends with the last lines of its log."""


@dataclass
class Context:
    """Where and at what scale the sections run, and the deadline they share."""

    device: str  # "cuda", or "cpu" in a rehearsal
    tiny: bool
    output_dir: Path
    work_dir: Path
    deadline: float
    logs: list[Path] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Section:
    """One guarded measurement: ``run(context, limit_s)`` returns its figures and the files it wrote.
    ``modules`` are what its processes import; a missing one skips the section before anything starts."""

    name: str
    title: str
    limit_s: float
    modules: tuple[str, ...]
    run: Callable[[Context, float], dict[str, Any]]


def run_logged(command: list[str], context: Context, name: str, limit_s: float, env: dict[str, str] | None = None):
    """Run ``command`` in the repository root, in its own process group, output to ``<work>/<name>.log``;
    kill the whole group at ``limit_s``. Returns the log's text; a non-zero exit or a timeout raises
    :class:`SectionFailed` with the log's last lines."""
    log_path = context.work_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context.logs.append(log_path)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if code is None:
        raise SectionFailed(f"timed out after {limit_s:.0f} s\n{tail(text)}")
    if code != 0:
        raise SectionFailed(f"exit code {code}\n{tail(text)}")
    return text


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def sft_section(context: Context, limit_s: float) -> dict[str, Any]:
    """Plain TRL + LoRA against StagedSFTTrainer ost and dt3 on the random ~1B LLaMA (bench_sft)."""
    model = "llama-tiny-random" if context.tiny else "llama-1b-random"
    output = context.output_dir / f"bench_sft_{context.device}_{model}.json"
    args = ["--model", model, "--tokenizer", "llama3", "--configs", "plain-padded,ost-padded,dt3-padded"]
    args += ["--output", str(output)]
    if context.tiny:
        args += ["--smoke", "--allow-slow"]
    else:  # one repetition: the GPU is steadier than a shared CPU, and the budget is 8 minutes for everything
        args += ["--steps", "30", "--warmup-steps", "5", "--repeats", "1", "--batch-size", "8", "--max-length", "512"]
    run_logged(python_module("benchmarks.bench_sft", *args), context, "sft", limit_s)
    report = json.loads(output.read_text(encoding="utf-8"))
    keep = (
        "tokens_per_s_mean", "ratio_vs_plain", "e2e_ratio_vs_plain", "peak_bytes_mean", "peak_delta_bytes_mean",
        "peak_ratio_vs_plain", "final_loss",
    )  # fmt: skip
    figures = {label: {k: c.get(k) for k in keep} for label, c in report["summary"].items()}
    failed = {label: c["errors"] for label, c in report["summary"].items() if c.get("errors")}
    if failed:
        raise SectionFailed(f"configurations failed: {json.dumps(failed)[:3000]}")
    return {
        "figures": {"model_params": report.get("model_params"), "configs": figures},
        "files": [output, output.with_suffix(".md")],
    }


def save_random_llama(folder: Path, shape: dict[str, Any], device: str) -> Path:
    """A seeded random LLaMA of ``shape`` with the Llama-3 vocabulary and its stock tokenizer, saved as
    safetensors (bf16 on CUDA), for the recipe to load like any local model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.llama3_tokenizer import llama3_tokenizer

    tokenizer = llama3_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe_args(model_dir: Path, output_dir: Path, context: Context, max_steps: int, *extra: str) -> list[str]:
    """The recipe's command line on a saved random LLaMA and the bundled AgriMachine sample."""
    args = [
        "--config", str(RECIPE_CONFIG), "--model_name_or_path", str(model_dir), "--chat_template", "auto",
        "--base_model_id", "gpu-check/random-llama", "--dataset_name_or_path", "agrimachine_sample",
        "--validation_size", "8", "--output_dir", str(output_dir), "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--disable_tqdm", "true", "--report_to", "none",
    ]  # fmt: skip
    if context.cuda:
        args += ["--use_cpu", "false", "--bf16", "true"]
    return [*args, *extra]


def logged_metrics(text: str) -> dict[str, Any]:
    """The training losses and the final metrics the Trainer printed (Python dict reprs, one per line)."""
    losses, final = [], {}
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            record = ast.literal_eval(line)
            if "loss" in record:
                losses.append(float(record["loss"]))
            if "train_runtime" in record:
                final = {k: float(v) for k, v in record.items() if isinstance(v, int | float | str) and k != "epoch"}
    return {"losses": losses, **final}


def adapter_figures(output_dir: Path) -> dict[str, Any]:
    """The saved adapter: tensor count, bytes, and whether every lora_B is finite and non-zero (ZeRO-3's
    best-known failure saves empty or untrained tensors)."""
    import torch
    from safetensors.torch import load_file

    path = output_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise SectionFailed(f"{path}: the recipe saved no adapter")
    weights = load_file(path)
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    complete = bool(lora_b) and all(t.numel() > 0 and torch.isfinite(t).all() and t.abs().sum() > 0 for t in lora_b)
    if not complete:
        raise SectionFailed(f"{path}: a lora_B tensor is empty, untrained or not finite")
    return {"adapter_tensors": len(weights), "adapter_bytes": path.stat().st_size, "lora_b_trained": complete}


def deepspeed_section(stage: int) -> Callable[[Context, float], dict[str, Any]]:
    """The recipe under ``accelerate launch`` with DeepSpeed ZeRO-``stage`` on one process."""

    def run(context: Context, limit_s: float) -> dict[str, Any]:
        from benchmarks.bench_sft import LLAMA_TINY

        started = time.perf_counter()  # saving the model counts against the section's limit too
        model_dir = context.work_dir / "deepspeed-llama"
        if not model_dir.exists():
            save_random_llama(model_dir, LLAMA_TINY if context.tiny else DEEPSPEED_LLAMA, context.device)
        output_dir = context.work_dir / f"zero{stage}"
        command = python_module(
            "accelerate.commands.launch",
            "--config_file", str(ROOT / "accelerate_configs" / f"deepspeed_zero{stage}.yaml"),
            "--num_processes", "1", "--main_process_port", "0",
            str(RECIPE), *recipe_args(model_dir, output_dir, context, 2 if context.tiny else 10),
        )  # fmt: skip
        launched = time.perf_counter()
        left = limit_s - (launched - started)
        text = run_logged(command, context, f"zero{stage}", left, env={"OMP_NUM_THREADS": "1"})
        figures = {
            "launch_wall_s": time.perf_counter() - launched,
            **logged_metrics(text),
            **adapter_figures(output_dir),
        }
        return {"figures": figures, "files": []}

    return run


def qlora_section(context: Context, limit_s: float) -> dict[str, Any]:
    """One QLoRA step of the SFT section's model through the recipe, in a worker of this module."""
    spec = context.work_dir / "qlora.spec.json"
    spec.write_text(json.dumps({"device": context.device, "tiny": context.tiny, "work_dir": str(context.work_dir)}))
    text = run_logged(python_module(MODULE, "--worker", "qlora", str(spec)), context, "qlora", limit_s)
    return {"figures": last_json(text), "files": []}


def last_json(text: str) -> dict[str, Any]:
    """The last line of a worker's output that is a JSON object (what it printed last)."""
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    raise SectionFailed(f"the worker printed no JSON result\n{tail(text)}")


def qlora_worker(spec_path: str) -> dict[str, Any]:
    """Save the random LLaMA, run the recipe for one 4-bit QLoRA step with gradient checkpointing, and report
    the step's time and CUDA's peak allocation (this process's own)."""
    import torch

    from benchmarks.bench_sft import LLAMA_1B, LLAMA_TINY

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    work, cuda = Path(spec["work_dir"]), spec["device"] == "cuda"
    model_dir = save_random_llama(work / "qlora-llama", LLAMA_TINY if spec["tiny"] else LLAMA_1B, spec["device"])
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    context = Context(spec["device"], spec["tiny"], work, work, 0.0)
    args = recipe_args(
        model_dir, work / "qlora", context, 1, "--load_in_4bit", "true", "--gradient_checkpointing", "true",
        "--dt_variant", "ost", "--validation_size", "0",
    )  # fmt: skip
    started = time.perf_counter()
    result = importlib.import_module(f"recipes.{RECIPE.stem}").main(args)
    wall = time.perf_counter() - started
    base = result["trainer"].model.get_base_model()
    return {
        "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in base.modules()),
        "activation_checkpointing": bool(getattr(base, "is_activation_checkpointing", False)),
        "recipe_wall_s": wall,
        "train": {k: v for k, v in result["train"].items() if isinstance(v, int | float)},
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        **adapter_figures(work / "qlora"),
    }


def petl_benchmark(module: str, gpu_args: tuple[str, ...] = ()) -> Callable[[Context, float], dict[str, Any]]:
    """An existing PETL benchmark with ``--device cuda`` (``--quick`` on the CPU), writing its usual files."""
    name = module.rsplit(".", 1)[1]

    def run(context: Context, limit_s: float) -> dict[str, Any]:
        args = ["--device", context.device, "--output-dir", str(context.output_dir)]
        args += ["--quick", "--threads", "1"] if context.tiny else list(gpu_args)
        run_logged(python_module(module, *args), context, name, limit_s)
        stem = f"{name}_{context.device}" + ("_quick" if context.tiny and name != "bench_dit" else "")
        output = context.output_dir / f"{stem}.json"
        if not output.is_file():
            raise SectionFailed(f"{output}: the benchmark wrote no results file")
        report = json.loads(output.read_text(encoding="utf-8"))
        figures = {"total_wall_s": report.get("total_wall_s"), "summary": report.get("summary")}
        return {"figures": figures, "files": [output, output.with_suffix(".md")]}

    return run


SECTIONS = (
    Section(
        "sft",
        "bf16 SFT, random ~1B LLaMA: trl.SFTTrainer + LoRA vs StagedSFTTrainer ost / dt3",
        240,
        ("benchmarks.bench_sft", "trl", "peft", "datasets", "hf_tuning", "datasets_builders.agrimachine", "quicktok"),
        sft_section,
    ),
    Section(
        "qlora",
        "one QLoRA step (4-bit bitsandbytes) of the same model, through the recipe",
        120,
        ("bitsandbytes", "recipes.agrimatech_llama_dt3", "quicktok"),
        qlora_section,
    ),
    Section(
        "zero2",
        "recipe under accelerate launch, DeepSpeed ZeRO-2, 1 process",
        120,
        ("deepspeed", "accelerate", "recipes.agrimatech_llama_dt3", "quicktok"),
        deepspeed_section(2),
    ),
    Section(
        "zero3",
        "recipe under accelerate launch, DeepSpeed ZeRO-3, 1 process",
        120,
        ("deepspeed", "accelerate", "recipes.agrimatech_llama_dt3", "quicktok"),
        deepspeed_section(3),
    ),
    Section(
        "petl",
        "PETL training speed/memory (bench_petl: full, LoRA, DTL variants)",
        90,
        ("benchmarks.bench_petl", "timm"),
        petl_benchmark("benchmarks.bench_petl", ("--repeats", "1")),
    ),
    Section(
        "snell",
        "SNELL training and merged inference (bench_snell)",
        100,
        ("benchmarks.bench_snell", "timm"),
        petl_benchmark("benchmarks.bench_snell", ("--repeats", "1", "--inference-repeats", "1")),
    ),
    Section(
        "dyt",
        "DyT inference speed (bench_dyt)",
        70,
        ("benchmarks.bench_dyt", "timm"),
        petl_benchmark("benchmarks.bench_dyt", ("--repeats", "2")),
    ),
    Section(
        "dit",
        "DiT knowledge-bank fine-tuning speed/memory (bench_dit)",
        70,
        ("benchmarks.bench_dit", "diffusers"),
        petl_benchmark("benchmarks.bench_dit"),
    ),
)


def missing_modules(section: Section) -> list[str]:
    """The section's modules that cannot be found here (checked without importing them)."""
    missing = []
    for module in section.modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def run_section(section: Section, context: Context) -> dict[str, Any]:
    """Run one section under its limit (and what is left of the budget); whatever happens, return its status."""
    record: dict[str, Any] = {"name": section.name, "title": section.title, "status": "ok", "figures": {}, "files": []}
    # the limits are sized for the GPU; a rehearsal shares a slow CPU with other work
    limit = min(section.limit_s * (1 if context.cuda else CPU_LIMIT_FACTOR), context.remaining())
    record["limit_s"] = round(limit, 1)
    started = time.perf_counter()
    try:
        missing = missing_modules(section)
        if missing:
            why = "; ".join(f"{m}: {NOT_CARRIED[m]}" for m in missing if m in NOT_CARRIED)
            raise SectionSkipped(f"not importable here: {', '.join(missing)}" + (f" ({why})" if why else ""))
        if limit < 15:
            raise SectionSkipped(f"only {max(limit, 0):.0f} s of the check's time budget left")
        result = section.run(context, limit)
        record["figures"], record["files"] = result["figures"], [str(p) for p in result["files"]]
    except SectionSkipped as reason:
        record.update(status="skipped", reason=str(reason))
    except Exception as error:  # a section's failure is a result: the rest still runs
        detail = str(error) if isinstance(error, SectionFailed) else tail(traceback.format_exc())
        record.update(status="failed", error=detail)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------
def library_origin(path: str | None) -> str:
    """``carried`` for a module loaded from the wheels ``make gpu-check`` installed, else ``system``."""
    if path and Path(path).resolve().is_relative_to(WHEEL_SITE.resolve()):
        return "carried wheel"
    return "system"


def machine_worker() -> dict[str, Any]:
    """The GPU, driver, CUDA, Python and every library's imported version and origin (run in a worker, so an
    import that crashes cannot take the check with it)."""
    import torch

    libraries: dict[str, Any] = {}
    for name in LIBRARIES:
        try:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", None)
            libraries[name] = {"version": version, "origin": library_origin(getattr(module, "__file__", None))}
        except Exception as error:  # recorded: a library that does not import is a finding
            libraries[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    machine: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "libraries": libraries,
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        machine.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 1024**3, 1),
            compute_capability=f"{properties.major}.{properties.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
        machine["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    from benchmarks.harness import git_revision

    machine["git"] = git_revision()
    return machine


def machine_section(context: Context) -> dict[str, Any]:
    """:func:`machine_worker` in a fresh process; its failure is recorded like a section's."""
    try:
        return last_json(run_logged(python_module(MODULE, "--worker", "machine"), context, "machine", 120))
    except SectionFailed as error:
        return {"error": str(error)}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def render_markdown(report: dict[str, Any]) -> str:
    """The report a person reads: the machine, then one part per section with its status and figures."""
    machine = report["machine"]
    lines = [f"# GPU check ({report['device']}{', tiny rehearsal' if report['tiny'] else ''})", ""]
    lines += [f"Command: `{report['command']}`", "", f"Started {report['started']}; {report['wall_s']:.0f} s.", ""]
    if "error" in machine:
        lines += ["Machine: could not be described:", "", "```", machine["error"], "```", ""]
    else:
        lines += [
            f"Machine: {machine.get('gpu', 'no GPU')} ({machine.get('gpu_memory_gib', 'n/a')} GiB, compute "
            f"capability {machine.get('compute_capability', 'n/a')}); nvidia-smi: {machine.get('nvidia_smi', 'n/a')}; "
            f"torch CUDA {machine.get('torch_cuda')}; Python {machine['python']}; {machine['cpu_cores']} CPU cores; "
            f"repository at {machine['git'].get('commit')}.",
            "",
            "| library | version | from |",
            "|---|---|---|",
        ]
        for name, library in machine["libraries"].items():
            if "error" in library:
                lines.append(f"| {name} | not importable: {library['error'][:200]} | |")
            else:
                lines.append(f"| {name} | {library['version']} | {library['origin']} |")
        lines.append("")
    lines += ["| section | status | seconds (limit) |", "|---|---|---|"]
    for s in report["sections"]:
        lines.append(f"| {s['name']}: {s['title']} | {s['status']} | {s['seconds']} ({s['limit_s']}) |")
    lines.append("")
    for s in report["sections"]:
        lines += [f"## {s['name']}: {s['status']}", ""]
        if s["status"] == "skipped":
            lines += [f"Skipped: {s['reason']}", ""]
        elif s["status"] == "failed":
            lines += ["Failed; the error's last lines:", "", "```", s["error"], "```", ""]
        if s["figures"]:
            lines += ["```json", json.dumps(s["figures"], indent=1, default=str), "```", ""]
        if s["files"]:
            lines += ["Files: " + ", ".join(f"`{Path(f).name}`" for f in s["files"]), ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], context: Context, bundle_dir: Path | None) -> None:
    """The JSON and markdown, atomically; with ``bundle_dir`` also copies of both and a tarball of every
    file written so far with the sections' logs (a killed command still leaves the latest)."""
    from hf_tuning.io import atomic_output, atomic_write_json, atomic_write_text

    json_path = context.output_dir / f"{REPORT_NAME}.json"
    saved = json.loads(json.dumps(report, default=str))
    atomic_write_json(json_path, saved)
    atomic_write_text(json_path.with_suffix(".md"), render_markdown(saved))
    if bundle_dir is None:
        return
    bundle_dir.mkdir(parents=True, exist_ok=True)
    for path in (json_path, json_path.with_suffix(".md")):
        atomic_write_text(bundle_dir / path.name, path.read_text(encoding="utf-8"))
    files = [json_path, json_path.with_suffix(".md")]
    files += [Path(f) for s in report["sections"] for f in s["files"]] + context.logs
    with atomic_output(bundle_dir / BUNDLE_NAME) as staging, tarfile.open(staging, "w:gz") as archive:
        for path in dict.fromkeys(files):
            if path.is_file():
                inside = path.resolve().is_relative_to(ROOT)
                arcname = path.resolve().relative_to(ROOT) if inside else Path("gpu_check_logs") / path.name
                archive.add(path, arcname=str(arcname))


# ---------------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------------
def cuda_device_present() -> bool:
    """A cheap look for an NVIDIA device before torch is imported (device nodes or nvidia-smi)."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def wheel_pins() -> list[str]:
    """``name==version`` of every carried distribution, as installed in this environment."""
    pins = []
    for name in CARRIED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError as error:
            raise SystemExit(f"gpu_check: {name} is not installed here, so its version cannot be pinned") from error
    return pins


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="results folder (default benchmarks/results; a temporary "
                        "folder with --rehearse-on-cpu)")  # fmt: skip
    parser.add_argument("--bundle-dir", default=None, help="also copy the report and a tarball of every result here")
    parser.add_argument("--sections", default=",".join(s.name for s in SECTIONS), help="comma-separated subset")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all sections together")
    parser.add_argument("--tiny", action="store_true", help="toy sizes and a few steps in every section")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help="run on the CPU (needs --tiny)")
    parser.add_argument("--wheel-pins", action="store_true", help="print name==version of the carried wheels")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in SECTIONS})
    if unknown or not names:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(s.name for s in SECTIONS)}")
    args.sections = names
    if args.rehearse_on_cpu and not args.tiny:
        parser.error("--rehearse-on-cpu runs the GPU sizes on a CPU (hours); add --tiny")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wheel_pins:
        print("\n".join(wheel_pins()))
        return 0
    if args.worker:
        mode, *rest = args.worker
        result = machine_worker() if mode == "machine" else qlora_worker(rest[0])
        print(json.dumps(result, default=str), flush=True)
        return 0
    if not args.rehearse_on_cpu and not cuda_device_present():
        print(
            "gpu_check: no CUDA device here (no /dev/nvidia* and no nvidia-smi). This check runs on a lent GPU: "
            "`make gpu-check` through the device tool; rehearse it on a CPU with --rehearse-on-cpu --tiny.",
            file=sys.stderr,
        )
        return 2
    import torch

    if not args.rehearse_on_cpu and not torch.cuda.is_available():
        print("gpu_check: an NVIDIA device is present but torch sees no CUDA; nothing was measured", file=sys.stderr)
        return 2
    device = "cpu" if args.rehearse_on_cpu else "cuda"
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        if args.output_dir:
            output_dir = Path(args.output_dir)
        elif args.rehearse_on_cpu:  # kept after the run, never over the committed CPU results
            output_dir = Path(tempfile.mkdtemp(prefix="gpu-check-rehearsal-"))
        else:
            output_dir = ROOT / "benchmarks" / "results"
        output_dir.mkdir(parents=True, exist_ok=True)
        context = Context(device, args.tiny, output_dir, work, time.monotonic() + args.budget_s)
        bundle = Path(args.bundle_dir) if args.bundle_dir else None
        started = time.perf_counter()
        report: dict[str, Any] = {
            "command": shlex.join(["python3", "-m", MODULE, *(sys.argv[1:] if argv is None else argv)]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "device": device,
            "tiny": args.tiny,
            "budget_s": args.budget_s,
            "carried_wheels": sorted(p.name for p in (ROOT / ".whl").glob("*.whl")),
            "machine": {},
            "sections": [],
            "wall_s": 0.0,
        }
        report["machine"] = machine_section(context)
        report["wall_s"] = time.perf_counter() - started
        write_report(report, context, bundle)
        for section in (s for s in SECTIONS if s.name in args.sections):
            print(f"[gpu_check] {section.name}: {section.title}", flush=True)
            record = run_section(section, context)
            report["sections"].append(record)
            report["wall_s"] = time.perf_counter() - started
            write_report(report, context, bundle)
            detail = record.get("reason") or (record.get("error") or "").splitlines()[-1:] or ""
            print(f"[gpu_check] {section.name}: {record['status']} in {record['seconds']} s {detail}", flush=True)
        print(f"[gpu_check] report: {output_dir / (REPORT_NAME + '.md')}", flush=True)
        failed = [s["name"] for s in report["sections"] if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
