"""What every benchmark in this folder shares, so each ``bench_*.py`` keeps only its own set-up and measurement.

* settings: a dataclass per benchmark (extending :class:`BenchmarkSettings`, the options they all take), parsed
  with ``transformers.HfArgumentParser``;
* the machine: CPU, usable cores, torch threads, RAM, GPU, Python and library versions, git commit;
* measurement: peak memory (RSS through ``/proc``, CUDA's allocator on a GPU), CPU contention (other
  processes' cores and the hypervisor's steal per step, waiting for an idle machine), a step timer;
* training: the ``TrainingArguments`` every benchmark shares, the optimizer state a stage leaves;
* the palindromic schedule (A B C C B A: repetitions symmetric about the middle, so linear drift cancels);
* statistics: pooled timing, ratios with a delta-method 95% interval, paired per-repetition ratios, limits;
* reports: number formatting, markdown tables, the shared header, and the JSON + markdown pair written
  atomically, the markdown rendered from the saved JSON (so any saved report can be re-rendered);
* the driver of a benchmark's ``main``: :func:`benchmark_session` (the process, the wait for an idle machine,
  the clock) and its :class:`Benchmark` (every run timed and reported as it finishes, the report's common parts).

Modelled on diffusers' ``benchmarks/benchmarking_utils.py``: one shared helper, a short file per benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from transformers import HfArgumentParser, TrainerCallback

from hf_tuning.io import atomic_write_json, atomic_write_text, read_json

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2
# a step during which other processes used at least this many cores counts as contended
CONTENDED_CORES = 0.1
# other processes using more cores than this at the start: wait for them, or warn that timings will be noisy
BUSY_CORES = 0.15

T = TypeVar("T")
Report = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Settings and the process
# ---------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default beside its help, except None (the help then says what stands in for it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_settings(cls: type[T], argv: list[str] | None = None, doc: str | None = None) -> T:
    """Command line -> the benchmark's settings dataclass.

    ``HfArgumentParser`` accepts ``--dash-case`` and ``--snake_case`` spellings of every field (and the
    ``aliases`` in a field's metadata); a ``ValueError`` from the dataclass's ``__post_init__`` becomes a
    usage error, as argparse reports a bad option.
    """
    parser = HfArgumentParser(cls, description=(doc or "").split("\n\n")[0], formatter_class=_HelpFormatter)
    try:
        (settings,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    return settings


@dataclass
class BenchmarkSettings:
    """The options every in-process benchmark takes; its settings dataclass extends this one (and redefines
    ``quick`` where its help can say what the smoke test shrinks). With these settings
    :func:`benchmark_session` waits for an idle machine first (``--wait-idle``)."""

    seed: int = 0
    threads: int = field(default=0, metadata={"help": "torch threads (0: usable cores)"})
    output_dir: str = "benchmarks/results"
    quick: bool = field(default=False, metadata={"help": "tiny sizes and a few steps: a smoke test"})
    wait_idle_s: float = field(
        default=0.0,
        metadata={
            "aliases": ["--wait-idle", "--wait_idle"],
            "metavar": "SECONDS",
            "help": "wait up to SECONDS for other processes to leave the CPUs idle before starting",
        },
    )


def comma_list(values: Iterable[str], allowed: Sequence[str], option: str) -> list[str]:
    """``["lora,full"]`` or ``["lora", "full"]`` -> ``["lora", "full"]``: the comma spelling the usage lines
    document and the space-separated one ``HfArgumentParser`` gives a list field both work."""
    values = list(values)
    chosen = list(dict.fromkeys(x.strip() for value in values for x in value.split(",") if x.strip()))
    if not chosen or any(x not in allowed for x in chosen):
        raise ValueError(f"{option} must be a comma-separated subset of {','.join(allowed)}, got {values!r}")
    return chosen


def command_line(module: str, argv: list[str] | None = None) -> str:
    """How to repeat this run, stored with its results (``argv`` as given to ``main``, else ``sys.argv``)."""
    args = sys.argv[1:] if argv is None else argv
    python = Path(sys.executable)
    # the interpreter relative to the repository (.venv/bin/python), so results name no machine's paths
    python_text = str(python.relative_to(ROOT)) if python.is_relative_to(ROOT) else "python"
    return " ".join(["HF_HUB_OFFLINE=1", shlex.quote(python_text), "-m", module, *map(shlex.quote, args)])


@contextlib.contextmanager
def benchmark_process(threads: int = 0) -> Iterator[int]:
    """Torch threads set (0: every usable core), library warnings and info logs silenced; on exit all of it
    restored and any :func:`park_heap` undone, so a benchmark run from a test leaves the process as it was.
    Yields the number of threads used."""
    previous = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    used = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(used)
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield used
    finally:
        gc.unfreeze()
        torch.set_num_threads(previous)
        transformers.logging.set_verbosity(verbosity)


def park_heap() -> None:
    """``gc.freeze`` every object alive now: the collections the trainers and :func:`reset_peak_rss` trigger
    then skip the ~10^6 objects of torch and transformers (tenths of a second each), and no automatic full
    collection of them lands inside a timed step. Models and trainers built later are collected as usual."""
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------
def _proc_kib(path: str, key: str) -> int:
    with open(path, encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} not in {path}")


def git_revision() -> dict[str, Any]:
    """The commit measured, and whether ``hf_tuning/`` differs from it (both None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "hf_tuning")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "hf_tuning_modified": None if status is None else bool(status),
    }


def machine_info(device: str = "cpu", libraries: Sequence[str] = ("torch", "transformers")) -> dict[str, Any]:
    """What the numbers were measured on, so results from different machines (or commits) are told apart.
    ``libraries`` are importable module names whose ``__version__`` is recorded, in that order."""
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "unknown")
    cuda = device == "cuda"
    versions = {name: importlib.import_module(name).__version__ for name in libraries}
    return {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_online": os.cpu_count(),
        "ram_gib": round(_proc_kib("/proc/meminfo", "MemTotal") / MIB, 1),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
        "git": git_revision(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def machine_line(machine: dict[str, Any], libraries: Sequence[str]) -> str:
    """The report's ``Machine:`` sentence. Reports saved before this harness existed stored a bare ``commit``
    (vision, DiT) or none at all (SFT): they render as they were written."""
    gpu = ""
    if machine.get("gpu"):
        gpu = f", GPU {machine['gpu']}" + (f" (CUDA {machine['cuda']})" if machine.get("cuda") else "")
    versions = ", ".join(f"{name} {machine[name]}" for name in libraries)
    if "git" in machine:
        git = machine["git"]
        local = " with local changes in hf_tuning/" if git["hf_tuning_modified"] else ""
        commit = f"; repository at {git['commit'] or 'unknown'}{local}"
    else:
        commit = f"; commit {machine['commit'] or 'unknown'}" if "commit" in machine else ""
    return (
        f"Machine: {machine['cpu']}, {machine['cores_usable']} usable cores ({machine['torch_threads']} torch "
        f"threads), {machine['ram_gib']} GiB RAM{gpu}; Python {machine['python']}, {versions}; {machine['date']}"
        f"{commit}."
    )


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _proc_kib("/proc/self/status", "VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS (``VmHWM``) since the last :func:`reset_peak_rss`, else since the process started."""
    return _proc_kib("/proc/self/status", "VmHWM") * 1024


def reset_peak_rss() -> int:
    """Collect garbage, hand freed heap pages back to the kernel and reset its RSS high-water mark
    (``clear_refs`` 5), so the next :func:`peak_rss` is this section's own; returns the RSS now."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return rss_bytes()


def reset_peak_memory(device: str = "cpu") -> int:
    """Reset the peak counters (RSS always, CUDA's allocator on a GPU); returns the RSS now, the baseline."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return reset_peak_rss()


# ---------------------------------------------------------------------------------------------
# CPU contention
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy and steal time and this process's CPU time (clock ticks), with a wall clock: two
    samples tell how many cores other processes (and the hypervisor) took in between."""

    busy: int
    steal: int
    own: int
    wall: float

    @classmethod
    def now(cls) -> CpuSample:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        with open("/proc/self/stat", encoding="ascii") as handle:
            own = handle.read().rsplit(")", 1)[1].split()
        return cls(user + nice + system + irq + softirq, steal, int(own[11]) + int(own[12]), time.perf_counter())

    def foreign_cores(self, later: CpuSample) -> tuple[float, float]:
        """(cores used by other processes, cores stolen by the hypervisor) on average since ``self``."""
        ticks = os.sysconf("SC_CLK_TCK") * max(later.wall - self.wall, 1e-9)
        others = (later.busy - self.busy) - (later.own - self.own)
        return max(others, 0) / ticks, (later.steal - self.steal) / ticks


def wait_for_idle(limit_s: float = 0.0, threshold: float = BUSY_CORES) -> float:
    """Other processes' cores at the start, after waiting up to ``limit_s`` seconds for them to drop under
    ``threshold``; warns when they did not, since timings taken on a busy machine are noisy."""
    deadline = time.monotonic() + limit_s
    while True:
        first = CpuSample.now()
        time.sleep(2.0)
        others, _ = first.foreign_cores(CpuSample.now())
        if others < threshold or time.monotonic() >= deadline:
            break
        print(f"[bench] other processes use {others:.2f} cores; waiting for an idle machine", flush=True)
        time.sleep(8.0)
    if others > threshold:
        print(f"[bench] WARNING: other processes use {others:.2f} cores; timings will be noisy", flush=True)
    return others


@dataclass
class RunMeter:
    """Peak memory, wall time and CPU contention of one run: :meth:`start` resets the peak counters,
    :meth:`stop` reads them (call it before the run's models are freed)."""

    device: str = "cpu"
    rss_before_bytes: int = 0
    peak_rss_bytes: int = 0
    cuda_max_allocated_bytes: int | None = None
    wall_s: float = 0.0
    foreign_cpu_cores: float = 0.0
    steal_cpu_cores: float = 0.0
    _started: float = field(default=0.0, init=False, repr=False)
    _cpu: CpuSample | None = field(default=None, init=False, repr=False)

    def start(self) -> RunMeter:
        self.rss_before_bytes = reset_peak_memory(self.device)
        self._started = time.perf_counter()
        self._cpu = CpuSample.now()
        return self

    def stop(self) -> RunMeter:
        self.peak_rss_bytes = peak_rss()
        self.cuda_max_allocated_bytes = torch.cuda.max_memory_allocated() if self.device == "cuda" else None
        self.foreign_cpu_cores, self.steal_cpu_cores = self._cpu.foreign_cores(CpuSample.now())
        self.wall_s = time.perf_counter() - self._started
        return self

    @property
    def peak_memory_bytes(self) -> int:
        """The peak that limits this device: CUDA's allocator on a GPU, the RSS on a CPU."""
        return self.peak_rss_bytes if self.cuda_max_allocated_bytes is None else self.cuda_max_allocated_bytes


class StepTimer(TrainerCallback):
    """Times every optimizer step (``on_step_begin`` .. ``on_step_end``) and what other processes used
    meanwhile; on CUDA the device is synchronised at both ends, so the time is the step's, not its launch's.
    Subclasses record each step in :meth:`step_timed`."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self._t0 = 0.0
        self._cpu0: CpuSample | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self._cpu0 = CpuSample.now()
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        seconds = time.perf_counter() - self._t0
        others, steal = self._cpu0.foreign_cores(CpuSample.now())
        self.step_timed(seconds, others, steal)

    def step_timed(self, seconds: float, other_cores: float, steal_cores: float) -> None:
        """One optimizer step took ``seconds``, while other processes used ``other_cores`` on average."""


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def trainer_kwargs(settings: Any, output_dir: str, max_steps: int, **overrides: Any) -> dict[str, Any]:
    """The ``TrainingArguments`` every benchmark trains with (``settings`` gives ``batch_size``, ``learning_rate``
    and ``seed``): one batch per optimizer step, so a step timer pairs steps and batches one to one; the loss
    logged every step; no checkpoints, evaluation, reporting or progress bar; fp32 on the CPU; data loaded in the
    main process. ``overrides`` add to these or replace them."""
    return {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": settings.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "bf16": False,
        "fp16": False,
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": settings.seed,
        "dataloader_num_workers": 0,
        **overrides,
    }


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """Bytes of every tensor in ``optimizer.state``, split into per-element state (a tensor shaped like its
    parameter: ``exp_avg``, ``exp_avg_sq``) and the rest (``step`` scalars), which is not proportional to size;
    with the elements of the parameters it optimises and its class (accelerate's wrapper looked through)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    total = per_element = tensors = 0
    for param, per_param in inner.state.items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                total += value.nbytes
                tensors += 1
                if key != "step" and value.shape == param.shape:
                    per_element += value.nbytes
    return {
        "optimizer_state_bytes": total,
        "optimizer_moment_bytes": per_element,
        "optimizer_other_bytes": total - per_element,
        "optimizer_state_tensors": tensors,
        "optimizer_params_with_state": len(inner.state),
        "optimizer_param_numel": sum(p.numel() for group in inner.param_groups for p in group["params"]),
        "optimizer_class": type(inner).__name__,
    }


# ---------------------------------------------------------------------------------------------
# Schedule and statistics
# ---------------------------------------------------------------------------------------------
WORKER_OPTION = "--worker"  # the hidden option a benchmark's parent passes to run one mode in a fresh process


def run_worker(
    module: str, argv: list[str], threads: int, mode: str, rep: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m module *argv --worker mode`` in a fresh process (so one mode's heap never inflates
    another's peak RSS) with ``threads`` torch threads and ``env`` added to the environment; returns the JSON
    line it printed last, with the mode, the repetition, its launch time (``launched_at``, on this process's perf
    counter) and wall time."""
    command = [sys.executable, "-m", module, *argv, "--threads", str(threads), WORKER_OPTION, mode]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    launched = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"the {mode} worker failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    wall_s = time.perf_counter() - launched
    return {"mode": mode, "rep": rep, "launched_at": launched, "wall_s": wall_s, **json.loads(lines[-1])}


def worker_mode(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(mode, the other arguments)`` when this process is a worker (``--worker MODE`` given), else ``(None, argv)``."""
    if WORKER_OPTION not in argv:
        return None, argv
    at = argv.index(WORKER_OPTION)
    return argv[at + 1], argv[:at] + argv[at + 2 :]


def saved_activation_bytes(loss_of: Callable[[], torch.Tensor], existing: set[int]) -> int:
    """Bytes of the storages autograd saves for backward in one forward, those in ``existing`` (parameters,
    buffers, the batch: allocated before the peak was reset) left out. Unlike RSS this depends on the graph
    alone, so it tells why one mode's rise is larger than another's."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in existing:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of()
    del loss  # frees the graph and what it saved, without a backward
    return sum(storages.values())


def measure_training(
    model: torch.nn.Module,
    loss_of: Callable[[], torch.Tensor],
    batch: Sequence[torch.Tensor],
    *,
    device: str,
    learning_rate: float,
    warmup_steps: int,
    steps: int,
) -> dict[str, Any]:
    """Train ``model`` on one fixed batch (``loss_of()`` runs the forward and the loss) with AdamW over its
    trainable parameters, ``warmup_steps`` untimed and ``steps`` timed steps, from a reset of the peak memory
    counters taken once the optimizer exists. Returns the counts, the peak RSS and its rise (with CUDA also
    ``max_memory_allocated``), the bytes saved for backward, every step's time with the cores other processes
    used meanwhile, and the losses."""
    cuda = device == "cuda"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    cuda_before = torch.cuda.memory_allocated() if cuda else None
    rss_before = reset_peak_memory(device)
    times, foreign, steal, losses = [], [], [], []
    for _ in range(warmup_steps + steps):
        sync()
        cpu0, start = CpuSample.now(), time.perf_counter()
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        others, stolen = cpu0.foreign_cores(CpuSample.now())
        foreign.append(others)
        steal.append(stolen)
        losses.append(loss.item())
        del loss
    peak = peak_rss()
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    existing = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *batch]}
    saved = saved_activation_bytes(loss_of, existing)
    w = warmup_steps
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "peak_rise_bytes": peak - rss_before,
        "cuda_allocated_before_bytes": cuda_before,
        "cuda_max_allocated_bytes": cuda_peak,
        "cuda_peak_rise_bytes": None if cuda_peak is None else cuda_peak - cuda_before,
        "saved_activation_bytes": saved,
        "warmup_times_s": times[:w],
        "step_times_s": times[w:],
        "step_foreign_cores": foreign[w:],
        "foreign_cpu_cores": sum(foreign[w:]) / len(foreign[w:]),
        "steal_cpu_cores": sum(steal[w:]) / len(steal[w:]),
        "losses": losses,
    }


def measure_classifier_training(
    model: torch.nn.Module,
    *,
    batch_size: int,
    img_size: int,
    num_classes: int,
    seed: int,
    device: str,
    learning_rate: float,
    warmup_steps: int,
    steps: int,
) -> dict[str, Any]:
    """:func:`measure_training` of an image classifier on one fixed seeded batch of random images and labels,
    with cross-entropy on its logits (the forward under bf16 autocast on CUDA)."""
    import torch.nn.functional as F  # noqa: N812

    from hf_tuning.vision import logits_of

    model.train()
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)

    def loss_of() -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
        with autocast:
            logits = logits_of(model(pixel_values))
        return F.cross_entropy(logits.float(), labels)

    return measure_training(
        model, loss_of, (pixel_values, labels), device=device, learning_rate=learning_rate,
        warmup_steps=warmup_steps, steps=steps,
    )  # fmt: skip


def time_forwards(
    run: Callable[[torch.Tensor], Any], x: torch.Tensor, *, device: str, warmup: int, iterations: int, min_time_s: float
) -> dict[str, Any]:
    """``warmup`` untimed calls of ``run(x)``, then timed ones until ``iterations`` and ``min_time_s`` are both
    reached; with the minor page faults per timed call: glibc hands large tensors back to the kernel when freed,
    so a big batch's activations are zero-filled pages again in every forward, which costs time outside the FLOPs."""
    import resource

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        run(x)
    sync()
    times, foreign, steal = [], [], []
    faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    while len(times) < iterations or time.perf_counter() - started < min_time_s:
        cpu0, t0 = CpuSample.now(), time.perf_counter()
        run(x)
        sync()
        times.append(time.perf_counter() - t0)
        others, stolen = cpu0.foreign_cores(CpuSample.now())
        foreign.append(others)
        steal.append(stolen)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {
        "step_times_s": times,
        "step_foreign_cores": foreign,
        "mean_step_s": sum(times) / len(times),
        "minor_faults_per_forward": faults / len(times),
        "foreign_cpu_cores": sum(foreign) / len(foreign),
        "steal_cpu_cores": sum(steal) / len(steal),
    }


def palindrome(items: Sequence[T], repeats: int = 2) -> list[tuple[T, int]]:
    """(item, repetition) in palindromic order A B C, C B A, A B C, ...: with an even number of repeats every
    item's repetitions sit symmetrically about the middle, so pooling them cancels drift linear in time."""
    order: list[tuple[T, int]] = []
    for rep in range(1, repeats + 1):
        order += [(item, rep) for item in (items if rep % 2 else tuple(reversed(items)))]
    return order


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of at least one value; the deviation of a single value is 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def timing_stats(times: list[float], foreign: list[float]) -> dict[str, Any]:
    """Mean/median/stdev of the timed steps, and the mean of the uncontended ones (other processes under
    :data:`CONTENDED_CORES`) alone."""
    clean = [t for t, f in zip(times, foreign, strict=True) if f < CONTENDED_CORES]
    mean, stdev = mean_std(times)
    return {
        "mean_step_s": mean,
        "median_step_s": statistics.median(times),
        "stdev_step_s": stdev,
        "timed_steps": len(times),
        "clean_mean_step_s": statistics.fmean(clean) if clean else None,
        "clean_steps": len(clean),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None


def ratio_ci(times: list[float], reference: list[float], z: float = 1.96) -> tuple[float, float] | None:
    """Approximate 95% interval of ``mean(times) / mean(reference)``: the delta method for two independent
    samples, relative variance ``s_a^2 / (n_a a^2) + s_b^2 / (n_b b^2)``. None with under two values."""
    if len(times) < 2 or len(reference) < 2:
        return None
    a, b = statistics.fmean(times), statistics.fmean(reference)
    rel = (statistics.stdev(times) / a) ** 2 / len(times) + (statistics.stdev(reference) / b) ** 2 / len(reference)
    value, half = a / b, z * (a / b) * rel**0.5
    return value - half, value + half


def pool(records: Iterable[dict[str, Any]], key: str, warmup: int = 0) -> list[float]:
    """The series ``key`` of every record concatenated, each record's first ``warmup`` values left out."""
    return [x for record in records for x in record[key][warmup:]]


def stages_of(runs: Iterable[dict[str, Any]], index: int | None = None) -> list[dict[str, Any]]:
    """The stage records of ``runs`` (only stage ``index`` when given), for :func:`pool`."""
    return [st for run in runs for st in run["stages"] if index is None or st["index"] == index]


def by_rep(runs: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Runs keyed by their repetition number."""
    return {run["rep"]: run for run in runs}


def paired_ratios(runs: Iterable[dict[str, Any]], reference: Iterable[dict[str, Any]], key: str) -> list[float]:
    """``run[key] / reference[key]`` of the reference run of the same repetition: both measured close in time,
    so slow drift of the machine mostly cancels. Repetitions the reference lacks are skipped."""
    ref = by_rep(reference)
    return [run[key] / ref[run["rep"]][key] for run in runs if run["rep"] in ref]


def against_limit(
    value: float | None, limit: float, around_one: bool = False, ci: tuple[float, float] | None = None
) -> dict[str, Any]:
    """``value <= limit``, or ``|value - 1| <= limit`` with ``around_one``; ``met`` is None without a value.

    ``resolved`` says whether the whole 95% interval ``ci`` (when given) falls on the same side of the limit
    as the value, i.e. whether the verdict survives the measurement noise.
    """
    if value is None:
        return {"value": None, "met": None, "ci95": ci, "resolved": None}

    def ok(x: float) -> bool:
        return (abs(x - 1) if around_one else x) <= limit

    met, resolved = ok(value), None
    if ci is not None:
        lo, hi = ci
        if around_one:
            resolved = (lo >= 1 - limit and hi <= 1 + limit) if met else (lo > 1 + limit or hi < 1 - limit)
        else:
            resolved = ok(hi) if met else not ok(lo)
    return {"value": value, "met": met, "ci95": ci, "resolved": resolved}


# ---------------------------------------------------------------------------------------------
# Formatting and markdown
# ---------------------------------------------------------------------------------------------
def num(value: float | None, digits: int = 3) -> str:
    """A number with fixed decimals; ``n/a`` for a measurement that does not exist (no uncontended step)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def mib(n: float | None, digits: int = 1) -> str:
    """Bytes as MiB with thousands separators."""
    return "n/a" if n is None else f"{n / MIB:,.{digits}f}"


def params(n: int | None, digits: int = 2) -> str:
    """A parameter count: ``68.17M``, or ``52.3k`` under 100k."""
    if n is None:
        return "n/a"
    return f"{n / 1e6:,.{digits}f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def ci(interval: Sequence[float] | None, digits: int = 3) -> str:
    """``(lo-hi)``, or nothing without an interval."""
    return "" if interval is None else f"({interval[0]:.{digits}f}-{interval[1]:.{digits}f})"


def optimizer_mib(stage: dict[str, Any]) -> str:
    """A stage's optimizer state in MiB, marked when its repetitions did not leave the same bytes."""
    same = stage["optimizer_state_same_in_reps"]
    return mib(stage["optimizer_state_bytes"]) + ("" if same else " (differs between reps)")


def with_ci(value: float, interval: Sequence[float] | None, digits: int = 3) -> str:
    """``1.234 (1.100-1.368)``: a ratio followed by its interval when there is one."""
    return f"{value:.{digits}f}" + (f" {ci(interval, digits)}" if interval is not None else "")


def joined(values: Iterable[float], digits: int = 3, sep: str = ", ") -> str:
    """Per-repetition values in one cell; ``n/a`` when there are none."""
    return sep.join(f"{v:.{digits}f}" for v in values) or "n/a"


def as_tuples(value: Any) -> Any:
    """JSON lists back to the tuples they were saved from, so a report reads the same rendered from the
    saved JSON as from memory (``{'depths': (2, 2, 6, 2)}``)."""
    if isinstance(value, list | tuple):
        return tuple(as_tuples(x) for x in value)
    if isinstance(value, dict):
        return {k: as_tuples(v) for k, v in value.items()}
    return value


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table as lines: header, rule, one line per row (a row may have fewer cells than the header:
    a note spanning the rest)."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def report_header(title: str, report: Report, libraries: Sequence[str]) -> list[str]:
    """Title, the command that produced the report and the machine it ran on."""
    return [f"# {title}", "", f"Command: `{report['command']}`", "", machine_line(report["machine"], libraries), ""]


def contention_warning(runs: list[dict[str, Any]], at_start: float, advice: str) -> list[str]:
    """A bold warning paragraph when other processes used the CPUs during any run (or at the start)."""
    busy = [r for r in runs if r["foreign_cpu_cores"] > CONTENDED_CORES]
    if not busy and at_start <= CONTENDED_CORES:
        return []
    worst = max([r["foreign_cpu_cores"] for r in runs] + [at_start])
    return [
        f"**Warning:** other processes used the CPUs during {len(busy)} of {len(runs)} runs (up to {worst:.2f} "
        f"cores on average); {advice}",
        "",
    ]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
def save_report(json_path: str | os.PathLike, report: Report, render: Callable[[Report], str]) -> str:
    """Write ``report`` to ``json_path`` and its markdown beside it (``.md``), each atomically; the markdown
    is rendered from the report as saved (JSON round trip), so re-rendering the file gives the same text."""
    json_path = Path(json_path)
    saved = json.loads(json.dumps(report, default=str))
    atomic_write_json(json_path, saved)
    markdown = render(saved)
    atomic_write_text(json_path.with_suffix(".md"), markdown)
    return markdown


def render_saved(json_path: str | os.PathLike, render: Callable[[Report], str]) -> str:
    """The markdown of a saved report, e.g. to re-render results after a change of wording."""
    return render(read_json(json_path))


# ---------------------------------------------------------------------------------------------
# The driver of a benchmark's main()
# ---------------------------------------------------------------------------------------------
class Benchmark:
    """One invocation of a benchmark script, as :func:`benchmark_session` opens it: the clock that the runs' start
    times are read from, the runs measured so far, and the parts of the report every benchmark has."""

    def __init__(self, settings: Any, command: str, foreign_at_start: float | None) -> None:
        self.settings = settings
        self.command = command
        self.foreign_at_start = foreign_at_start
        self.runs: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def measure(
        self,
        progress: Callable[[dict[str, Any], float], str],
        run: Callable[..., dict[str, Any]],
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``run(*args, **kwargs)``, one measured run: its result is stamped with its start (``start_s``, seconds
        on the session's clock) and kept in :attr:`runs`, and ``progress(result, seconds it took)`` printed."""
        t0 = time.perf_counter()
        result = run(*args, **kwargs)
        result["start_s"] = t0 - self.started
        self.runs.append(result)
        print(progress(result, time.perf_counter() - t0), flush=True)
        return result

    def report(
        self,
        schedule: Iterable[Sequence[Any]],
        libraries: Sequence[str],
        device: str = "cpu",
        setup: dict[str, Any] | None = None,
        **results: Any,
    ) -> Report:
        """The report: command line, settings, machine, the benchmark's ``setup`` sections, the schedule, the
        other processes' cores at the start (where it waited for them), the runs, the ``results`` of their analysis
        and the total wall time. Call it inside the session: the machine's torch threads are the benchmark's."""
        waited = {} if self.foreign_at_start is None else {"foreign_cpu_cores_at_start": self.foreign_at_start}
        return {
            "command": self.command,
            "settings": asdict(self.settings),
            "machine": machine_info(device, libraries),
            **(setup or {}),
            "schedule": [list(item) for item in schedule],
            **waited,
            "runs": self.runs,
            **results,
            "total_wall_s": time.perf_counter() - self.started,
        }


@contextlib.contextmanager
def benchmark_session(settings: Any, module: str, argv: list[str] | None = None) -> Iterator[Benchmark]:
    """The frame of a benchmark's ``main``: :func:`benchmark_process` with ``settings.threads`` (set to the number
    used), then, for :class:`BenchmarkSettings`, :func:`wait_for_idle` up to ``settings.wait_idle_s``; yields the
    :class:`Benchmark` whose clock starts there. ``module`` and ``argv`` give the command line stored."""
    command = command_line(module, argv)
    with benchmark_process(settings.threads) as threads:
        settings.threads = threads
        waited = wait_for_idle(settings.wait_idle_s) if isinstance(settings, BenchmarkSettings) else None
        yield Benchmark(settings, command, waited)
