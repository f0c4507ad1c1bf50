"""``hf-tuning`` command line: ``hf-tuning plan`` prints a stage plan without training.

Other commands belong to the domain packages and register themselves through the ``hf_tuning.commands``
entry-point group (``setup.cfg``): each entry names a ``register(subparsers)`` function that adds its
sub-parser and sets ``handler``. The core therefore never imports a domain (``hf-tuning merge``,
``export-gguf`` and ``chat`` live in :mod:`hf_tuning.llm`).

The model is built from its config on the ``meta`` device, so planning an 8B model needs no
weights, no GPU and no memory: ``hf-tuning plan --model meta-llama/Llama-3.1-8B-Instruct --variant dt3 --lora``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
import traceback
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from hf_tuning.stages import ORDERS, StagePlan, build_stage_plan
from hf_tuning.variants import VARIANTS

__all__ = ["COMMAND_GROUP", "main", "format_plan", "load_model_skeleton", "name_patterns"]

COMMAND_GROUP = "hf_tuning.commands"

_INDEX = re.compile(r"\.(\d+)\.")


def name_patterns(names: Sequence[str], limit: int = 8) -> list[str]:
    """Compress parameter names: the first numeric path component becomes ``{indices}``."""
    templates: dict[str, list[int]] = defaultdict(list)
    for name in names:
        match = _INDEX.search(name)
        if match is None:
            templates[name] = []
        else:
            template = name[: match.start()] + ".{N}." + name[match.end() :]
            templates[template].append(int(match.group(1)))
    # group templates that share the same index set, e.g. all projections of the same layers
    by_indices: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for template, indices in templates.items():
        by_indices[tuple(sorted(set(indices)))].append(template)
    lines = []
    for indices, members in by_indices.items():
        lines.append(f"{_factor(members, limit)}  N in {_compact(indices)}" if indices else ", ".join(members))
    return lines


def _factor(templates: list[str], limit: int) -> str:
    """``a.{N}.x.w, a.{N}.y.w`` -> ``a.{N}.{x, y}.w``."""
    if len(templates) == 1:
        return templates[0]
    parts = [t.split(".") for t in templates]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middles = [".".join(p[head : len(p) - tail]) for p in parts]
    shown = ", ".join(middles[:limit]) + (f", ... (+{len(middles) - limit})" if len(middles) > limit else "")
    prefix = ".".join(parts[0][:head])
    suffix = ".".join(parts[0][len(parts[0]) - tail :]) if tail else ""
    return f"{prefix}.{{{shown}}}" + (f".{suffix}" if suffix else "")


def _compact(indices: Sequence[int]) -> str:
    if len(indices) > 2 and indices == tuple(range(indices[0], indices[-1] + 1)):
        return f"{{{indices[0]}..{indices[-1]}}}"
    step = indices[1] - indices[0] if len(indices) > 2 else 0
    if step > 1 and indices == tuple(range(indices[0], indices[-1] + 1, step)):
        return f"{{{indices[0]},{indices[1]}..{indices[-1]}}}"
    return "{" + ",".join(map(str, indices)) + "}"


def format_plan(plan: StagePlan, model_name: str = "") -> str:
    partition = plan.partition
    total = partition.numel(tuple(partition.param_numel))
    lines = [
        f"hf-tuning plan: {plan.variant} ({VARIANTS[plan.variant].description})"
        + (f" on {model_name}" if model_name else ""),
        f"  partition: {partition.scheme}"
        + (f", block family {partition.family}, {partition.num_blocks} blocks" if partition.family else "")
        + f", order {plan.order}",
        f"  trainable before staging: {total:,} parameters",
        "  subspaces:",
    ]
    for group in partition.groups:
        count = partition.numel(group.params)
        lines.append(f"    {group.name:<6} {group.blocks}: {count:,} ({100 * count / total:.1f}%)")
        lines.extend(f"           {pattern}" for pattern in name_patterns(group.params))
    always = partition.numel(partition.always_trainable)
    lines.append(f"  trained in every stage: {always:,} ({100 * always / total:.1f}%)")
    lines.extend(f"           {pattern}" for pattern in name_patterns(partition.always_trainable))
    if partition.frozen:
        frozen = partition.numel(partition.frozen)
        lines.append(f"  never trained (dt_frozen / unmatched): {frozen:,}")
        lines.extend(f"           {pattern}" for pattern in name_patterns(partition.frozen))
    lines.append("  stages:")
    for stage in plan.stages:
        lines.append(
            f"    {stage.index + 1}. {stage.name:<14} groups [{', '.join(stage.groups)}]: "
            f"{stage.num_params:,} trainable ({100 * stage.num_params / total:.1f}%)"
        )
    return "\n".join(lines)


def load_model_skeleton(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """Build a model from its config on the meta device (no weights are read)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    model_cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    with torch.device("meta"):
        if model_cls is not None:
            return model_cls(config)
        from transformers import AutoModel

        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def _plan_command(args: argparse.Namespace) -> int:
    model = load_model_skeleton(args.model, trust_remote_code=args.trust_remote_code)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = args.lora_target_modules
        target = targets[0] if len(targets) == 1 and targets[0] == "all-linear" else targets
        with torch.device("meta"):
            model = get_peft_model(
                model, LoraConfig(r=args.lora_r, target_modules=target, modules_to_save=args.modules_to_save)
            )
    plan = build_stage_plan(
        model,
        args.variant,
        order=args.order,
        seed=args.seed,
        num_groups=args.num_groups,
        groups=args.groups,
        always_trainable=args.always_trainable,
        frozen=args.frozen,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, f"{type(model).__name__} ({args.model})"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-tuning", description="Staged subspace tuning (Diffusion Tuning) tools")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="print the stage plan of a model and variant without training")
    plan.add_argument("--model", required=True, help="Hub id or local folder with a config.json")
    plan.add_argument("--variant", default="dt3", choices=list(VARIANTS))
    plan.add_argument("--num-groups", type=int, default=None)
    plan.add_argument("--order", default="forward", choices=list(ORDERS))
    plan.add_argument("--seed", type=int, default=0, help="seed of --order random")
    plan.add_argument("--groups", nargs="+", default=None, help="explicit regex per subspace")
    plan.add_argument("--always-trainable", nargs="*", default=None, help="regexes trained in every stage")
    plan.add_argument("--frozen", nargs="*", default=None, help="regexes no stage trains")
    plan.add_argument("--lora", action="store_true", help="plan for a LoRA adapter instead of full fine-tuning")
    plan.add_argument("--lora-r", type=int, default=16)
    plan.add_argument("--lora-target-modules", nargs="+", default=["all-linear"])
    plan.add_argument("--modules-to-save", nargs="*", default=None)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    plan.set_defaults(handler=_plan_command)
    for entry in sorted(importlib.metadata.entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        entry.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user-fixable error (``ValueError``, ``OSError``) is one line on stderr and exit
    status 2, with the traceback only under ``--debug``."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"hf-tuning {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
