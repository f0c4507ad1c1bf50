"""`make gpu-check` (benchmarks/gpu_check.py): the stop without CUDA, the carried wheels against what the sections
import, the report rewritten after every section (a failed one included), and the machine section on this CPU."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from tests.helpers import REPO_ROOT, script_env
from tests.helpers.scripts import load_benchmark

gpu_check = load_benchmark("gpu_check")
NO_GPU = not gpu_check.cuda_device_present()


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA device")
def test_stops_at_once_without_cuda(tmp_path):
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr and "--rehearse-on-cpu --tiny" in done.stderr
    assert elapsed < 5, f"took {elapsed:.1f} s: something heavy was imported before the check"
    assert list(tmp_path.iterdir()) == []  # nothing written


def _requirements(distribution: str) -> set[str]:
    """The distribution's unconditional requirements on the GPU machine (Python 3.12, Linux x86-64)."""
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    environment |= {"platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    names = set()
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.add(gpu_check.normalise(requirement.name))
    return names


def _reach(roots: set[str], stop: set[str]) -> set[str]:
    """Every distribution the ``roots`` require, transitively, not walking past those in ``stop``."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in stop or name in roots:
            todo += _requirements(name) - seen
    return seen - roots


FIRST_PARTY = ("hf_tuning", "benchmarks", "recipes", "datasets_builders", "eval", "tests")


def _first_party_imports() -> set[str]:
    """Top-level names every import statement of our own code names (in functions too)."""
    names = set()
    for package in FIRST_PARTY:
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def sections_imported() -> dict:
    """One fresh interpreter imports every module the sections declare (what their processes import) and
    describes the machine as the check's first part does, with this environment's site-packages standing in
    for the carried-wheel folder."""
    modules = sorted({m for s in gpu_check.SECTIONS for m in s.modules} | {"benchmarks.gpu_check"})
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "tops = sorted({n.split('.')[0] for n in list(sys.modules)})\n"
        "from benchmarks.gpu_check import machine_worker\n"
        "print(json.dumps({'tops': tops, 'machine': machine_worker()}, default=str))\n"
    )
    site = Path(importlib.metadata.distribution("transformers").locate_file(""))
    env = script_env(GPU_CHECK_WHEEL_SITE=str(site))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_carried_wheels_cover_what_the_sections_import(sections_imported):
    """Each third-party distribution the sections load that our code imports, or that a loaded distribution
    requires, must be on the GPU machine or carried (or be a declared not-carried one, whose section is then
    skipped); a third party's own optional imports (torchvision's defusedxml) are its business. Every carried
    wheel's own requirements must be there too."""
    providers = importlib.metadata.packages_distributions()

    def dists(names) -> set[str]:
        return {gpu_check.normalise(d) for name in names for d in providers.get(name, [])} - {"hf-tuning"}

    loaded = dists(sections_imported["tops"])
    ours = dists(set(sections_imported["tops"]) & _first_party_imports())
    required = set().union(*(_requirements(d) for d in loaded))
    carried = {gpu_check.normalise(n) for n in gpu_check.CARRIED}
    not_carried = set(gpu_check.NOT_CARRIED)
    on_gpu = set(gpu_check.GPU_MACHINE_PACKAGES)
    assert not carried & not_carried
    # a package the GPU machine supplies (and we do not replace) brings its own version's requirements there
    brought_by_gpu_packages = _reach((loaded & on_gpu) - carried, stop=carried) - _reach(carried, stop=on_gpu - carried)
    needed = loaded & (ours | required)
    uncovered = needed - on_gpu - carried - not_carried - brought_by_gpu_packages
    assert not uncovered, f"loaded by the sections, absent on the GPU machine, not carried: {sorted(uncovered)}"
    assert {"transformers", "trl", "peft", "datasets", "deepspeed", "quicktok-v1", "diffusers"} <= needed & carried
    for name in carried:
        missing = _requirements(name) - on_gpu - carried
        assert not missing, f"the carried {name} requires {sorted(missing)}, neither on the GPU machine nor carried"


def test_machine_section_on_this_cpu(sections_imported):
    """The report's first part on this CPU: every library's imported version as installed here, and where
    it came from (the carried-wheel folder pretended to be this environment's site-packages)."""
    machine = sections_imported["machine"]
    assert machine["cuda_available"] is False and "gpu" not in machine
    assert machine["git"]["commit"]
    libraries = machine["libraries"]
    assert list(libraries) == list(gpu_check.LIBRARIES)
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed"):
        assert libraries[name]["version"].split("+")[0] == importlib.metadata.version(name)
        assert libraries[name]["origin"] == "carried wheel"
    assert gpu_check.library_origin(torch.__file__) == "system"  # WHEEL_SITE here: /tmp/site


def test_wheel_pins_are_this_environments_versions():
    pins = dict(pin.split("==") for pin in gpu_check.wheel_pins())
    assert list(pins) == list(gpu_check.CARRIED)
    assert all(pins[name] == importlib.metadata.version(name) for name in pins)


def _section(name: str, run) -> object:
    return gpu_check.Section(name, f"test section {name}", 30, (), run)


def test_report_is_rewritten_after_every_section_and_a_failure_is_kept(tmp_path, monkeypatch):
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    seen_by_second: dict = {}

    def fails(context, limit_s):
        gpu_check.run_logged(
            [sys.executable, "-c", "print('step 1 done'); raise SystemExit('CUDA error: out of memory')"],
            context, "fails", limit_s,
        )  # fmt: skip

    def hangs(context, limit_s):
        gpu_check.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], context, "hangs", 1.5)

    def reads_report(context, limit_s):
        seen_by_second.update(json.loads((out / "gpu_check.json").read_text()))
        return {"figures": {"tokens_per_s": 123.0}, "files": []}

    sections = (
        _section("fails", fails),
        _section("hangs", hangs),
        _section("reads", reads_report),
        gpu_check.Section("absent", "needs a missing module", 30, ("no_such_module_for_gpu_check",), reads_report),
    )
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    monkeypatch.setattr(gpu_check, "machine_section", lambda context: {"error": "not described in this test"})
    started = time.perf_counter()
    code = gpu_check.main(["--rehearse-on-cpu", "--tiny", "--output-dir", str(out), "--bundle-dir", str(bundle)])
    assert time.perf_counter() - started < 10  # the hanging section was killed at its limit
    assert code == 1

    # the report on disk when the third section ran already held the first two, with their statuses
    assert [(s["name"], s["status"]) for s in seen_by_second["sections"]] == [("fails", "failed"), ("hangs", "failed")]
    report = json.loads((out / "gpu_check.json").read_text())
    by_name = {s["name"]: s for s in report["sections"]}
    assert by_name["fails"]["error"].startswith("exit code 1")
    assert "step 1 done" in by_name["fails"]["error"] and "CUDA error: out of memory" in by_name["fails"]["error"]
    assert by_name["hangs"]["error"].startswith("timed out after 2 s")
    assert by_name["reads"] | {"seconds": 0} == {
        "name": "reads", "title": "test section reads", "status": "ok", "limit_s": 30.0 * gpu_check.CPU_LIMIT_FACTOR,
        "figures": {"tokens_per_s": 123.0}, "files": [], "seconds": 0,
    }  # fmt: skip
    assert by_name["absent"]["status"] == "skipped"
    assert by_name["absent"]["reason"] == "not importable here: no_such_module_for_gpu_check"
    markdown = (out / "gpu_check.md").read_text()
    assert "## fails: failed" in markdown and "CUDA error: out of memory" in markdown
    assert "Skipped: not importable here: no_such_module_for_gpu_check" in markdown
    assert (bundle / "gpu_check.md").read_text() == markdown
    with tarfile.open(bundle / "gpu_check_results.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"gpu_check_logs/fails.log", "gpu_check_logs/hangs.log", "gpu_check_logs/gpu_check.json"} <= names
