"""The package's layers: imports only go down, each domain declares its own block families, and importing
the package stays cheap.

Layers, top to bottom: the scripts (recipes/, datasets_builders/, eval/, benchmarks/) -> the application
domains hf_tuning.{llm,vision,diffusion} -> the transfer methods hf_tuning.tuners (used by several domains:
SNELL tunes ViTs and LLaMAs alike) -> the engine core (modules directly in hf_tuning/).
``hf_tuning/__init__.py`` is the public facade over the library layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, script_env

PACKAGE = REPO_ROOT / "hf_tuning"
SCRIPT_PACKAGES = ("datasets_builders", "eval", "benchmarks", "recipes", "tests")
DOMAINS = ("llm", "vision", "diffusion")
METHODS_LAYER = "tuners"


def layer_of(path: Path) -> str:
    """``facade``, ``core`` or the domain package a module of hf_tuning belongs to."""
    parts = path.relative_to(PACKAGE).parts
    if parts == ("__init__.py",):
        return "facade"
    return parts[0] if len(parts) > 1 else "core"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file of the repository imports (see :func:`imports_in`)."""
    module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return imports_in(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, at any depth (function-level imports included),
    relative ones resolved against ``module``; ``from a import b`` yields both ``a`` and ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def allowed(layer: str, target: str) -> bool:
    top, _, rest = target.partition(".")
    if top in SCRIPT_PACKAGES:
        return False  # the library never reaches up into the scripts
    if top != "hf_tuning" or layer == "facade":
        return True
    target_layer = rest.split(".")[0]
    if target_layer == METHODS_LAYER:
        return layer in (*DOMAINS, METHODS_LAYER)  # the methods serve the domains; the core imports none
    if target_layer not in DOMAINS:
        return True  # the core is open to everyone
    return layer == target_layer  # neither the core nor the methods import a domain; no domain imports another


def test_imports_only_go_down():
    violations = [
        f"{path.relative_to(REPO_ROOT)}:{line} ({layer_of(path)}) imports {target}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, target in imported_modules(path)
        if not allowed(layer_of(path), target)
    ]
    assert not violations, "imports that go up or sideways:\n" + "\n".join(violations)


def test_no_script_imports_the_tests():
    """The scripts ship to users without ``tests/`` (a lent GPU machine gets the working tree, a user a wheel
    and the scripts): what a benchmark and a test both need lives in the script layer."""
    violations = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {target}"
        for package in SCRIPT_PACKAGES
        if package != "tests"
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for line, target in imported_modules(path)
        if target.partition(".")[0] == "tests"
    ]
    assert not violations, "scripts that reach up into the tests:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("layer", "target", "expected"),
    [
        ("core", "hf_tuning.stages", True),
        ("core", "hf_tuning.llm.sft", False),
        ("core", "datasets_builders.vision", False),
        ("vision", "hf_tuning.vision.backbones", True),
        ("vision", "hf_tuning.diffusion.loading", False),
        ("diffusion", "eval.fid", False),
        ("facade", "hf_tuning.llm.sft", True),
        ("llm", "transformers", True),
        ("vision", "hf_tuning.tuners.dtl", True),
        ("tuners", "hf_tuning.vision.backbones", False),
        ("tuners", "hf_tuning.stages", True),
        ("core", "hf_tuning.tuners.model", False),
    ],
)
def test_the_rule_itself(layer, target, expected):
    assert allowed(layer, target) is expected


def test_relative_and_nested_imports_are_seen():
    source = "from ..llm import sft\nfrom . import tuning\n\ndef f():\n    import datasets_builders.vision\n"
    assert [name for _, name in imports_in(source, "hf_tuning.vision.probe")] == [
        "hf_tuning.llm",
        "hf_tuning.llm.sft",
        "hf_tuning.vision",
        "hf_tuning.vision.tuning",
        "datasets_builders.vision",
    ]


def test_the_core_registers_no_block_family():
    """Families are declared by the domain that knows the architecture, never hard-coded in the engine."""
    registering = [
        path.relative_to(REPO_ROOT)
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "__init__.py"
        and any(
            isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_block_family"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    ]
    assert registering == []


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], env=script_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_each_domain_registers_its_families_whichever_module_is_imported_first():
    # entering through a core module still runs the facade, which registers every domain's families
    names = run_python(
        "from hf_tuning.partition import partition_subspaces\n"
        "from hf_tuning.families import registered_block_families\n"
        "print(' '.join(f.name for f in registered_block_families()))"
    ).split()
    assert names == [
        "decoder_layers",
        "bert_encoder",
        "gpt2_blocks",
        "timm_swin",
        "timm_convnext",
        "hf_swin",
        "hf_convnext",
        "hf_vit",
        "timm_vit",
        "diffusers_dit",
    ]


def test_importing_the_package_loads_no_heavy_library():
    loaded = run_python(
        "import sys, hf_tuning, hf_tuning.llm, hf_tuning.vision, hf_tuning.diffusion, hf_tuning.tuners\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'trl', 'timm', 'diffusers') if m in sys.modules))"
    )
    assert loaded == ""


def test_the_public_names_still_resolve():
    from hf_tuning import (
        StagedSFTConfig,
        StagedSFTTrainer,
        StagedTrainer,
        StagedTrainingArguments,
        build_stage_plan,
        partition_subspaces,
    )

    assert StagedSFTTrainer.__module__ == "hf_tuning.llm.sft" and StagedTrainer.__module__ == "hf_tuning.trainer"
    assert StagedSFTConfig and StagedTrainingArguments and build_stage_plan and partition_subspaces
    import hf_tuning

    for name in hf_tuning.__all__:
        assert getattr(hf_tuning, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        hf_tuning.NotAThing  # noqa: B018
