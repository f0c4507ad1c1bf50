"""What every evaluation CLI shares: the device choice and parsing a settings dataclass.

Each ``eval/evaluate_*.py`` keeps its settings in a dataclass that validates itself in ``__post_init__``;
:func:`parse_settings` turns its command line into that dataclass and reports a rejected value the way
argparse reports a bad option (usage, message, exit status 2), so a script fails before any model work.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["parse_settings", "pick_device"]


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as torch reads it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_settings(
    settings_types: type | Sequence[type], argv: Sequence[str] | None, *, description: str = ""
) -> tuple[Any, ...]:
    """Parse ``argv`` (None: ``sys.argv[1:]``) into one instance of each settings dataclass, with
    ``transformers.HfArgumentParser``: every field is an option of the same name.

    A ``ValueError`` or ``FileNotFoundError`` from a dataclass's ``__post_init__`` (and an unknown option)
    becomes an argparse error: the message on stderr, ``SystemExit(2)``.
    """
    from transformers import HfArgumentParser

    types = [settings_types] if isinstance(settings_types, type) else list(settings_types)
    # the plain formatter: the help texts say where a default comes from (e.g. "default: the adapter folder")
    parser = HfArgumentParser(types, description=description, formatter_class=argparse.HelpFormatter)
    try:
        return tuple(
            parser.parse_args_into_dataclasses(args=None if argv is None else list(argv), look_for_args_file=False)
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
