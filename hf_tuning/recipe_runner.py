"""Run a recipe script the way users type it: ``accelerate launch recipes/<recipe>.py [--config F] [--debug]``.

Two things every recipe needs around its ``main(argv)``:

* **A default configuration.** With no ``--config`` the recipe reads its main YAML file and says which one, so
  ``accelerate launch recipes/agrimatech_llama_dt3.py`` runs the flagship configuration as documented.
* **Mistakes reported, not dumped.** A mistake the user can fix (no model, a model that is neither local nor in
  the offline cache, a bad key, a malformed data row, a missing file) raises ``ValueError`` or ``OSError`` (or is a YAML syntax error)
  before training starts. :func:`run_recipe` turns those into one message on stderr and exit status 2;
  ``--debug`` shows the traceback. Once the recipe calls :func:`training_started`, errors keep their
  traceback: a failure hours into a run is a bug report, not a typo.

A recipe that ends, finished or stopped by such a mistake, leaves the distributed process group itself
(PyTorch's NCCL warns at exit about a group left behind, and its threads should stop while the process is whole).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["USER_ERRORS", "check_setting_names", "run_recipe", "training_started", "with_default_config"]

DEBUG_FLAG = "--debug"
CONFIG_FLAG = "--config"
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, yaml.YAMLError)
USER_ERROR_EXIT_STATUS = 2

_state = {"training_started": False}


def training_started() -> None:
    """Called by a recipe right before ``trainer.train()``: from here on errors keep their traceback."""
    _state["training_started"] = True


def check_setting_names(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse a misspelt setting with its closest valid name, on the command line or in the ``--config`` file.

    TRL's parser also refuses unknown names, but lists them without saying what was meant; a typo in a YAML key
    deserves ``did you mean``.
    """
    options = {option for action in parser._actions for option in action.option_strings}
    names = sorted({action.dest for action in parser._actions if action.option_strings} - {"help"})
    args = list(argv)
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag != CONFIG_FLAG and flag not in options:
            raise ValueError(f"unknown option {flag}{_did_you_mean(flag[2:].replace('-', '_'), names, '--')}")
    if CONFIG_FLAG in args and args.index(CONFIG_FLAG) + 1 < len(args):
        config = args[args.index(CONFIG_FLAG) + 1]
        with open(config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
        if not isinstance(values, dict):
            raise ValueError(f"{config}: expected a YAML mapping of setting: value, got {type(values).__name__}")
        for key in values:
            if key != "env" and key not in names:
                raise ValueError(f"{config}: unknown setting {key!r}{_did_you_mean(str(key), names, '')}")


def _did_you_mean(name: str, names: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + match for match in close)}?)" if close else ""


def with_default_config(argv: Sequence[str], default_config: str | os.PathLike) -> tuple[list[str], str, bool]:
    """``argv`` with ``--config`` in the two-token form TRL's parser reads (``--config=F`` is split), adding the
    default configuration when none is given; returns ``(argv, config path, whether it is the default)``."""
    args: list[str] = []
    for arg in argv:
        args.extend(arg.split("=", 1) if arg.startswith(f"{CONFIG_FLAG}=") else [arg])
    if CONFIG_FLAG in args:
        index = args.index(CONFIG_FLAG)
        if index + 1 >= len(args):
            raise ValueError(f"{CONFIG_FLAG} needs a YAML file path")
        return args, args[index + 1], False
    return [CONFIG_FLAG, str(default_config), *args], str(default_config), True


def run_recipe(
    main: Callable[[list[str]], Any],
    *,
    default_config: str | os.PathLike,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
) -> int:
    """Run ``main`` with the default configuration filled in; returns the process exit status."""
    prog = prog or Path(sys.argv[0]).name
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [arg for arg in args if arg != DEBUG_FLAG]
    _state["training_started"] = False
    try:
        args, config, is_default = with_default_config(args, default_config)
        if not Path(config).is_file():
            raise FileNotFoundError(f"configuration file {config!r} does not exist")
        _say(f"{prog}: reading {config}" + (f" (the default; choose another with {CONFIG_FLAG})" if is_default else ""))
        main(args)
    except USER_ERRORS as error:
        if _state["training_started"]:
            raise
        if debug:
            traceback.print_exc()
        _say(f"{prog}: error: {error}")
        if not debug:
            _say(f"{prog}: (stopped before training; run again with {DEBUG_FLAG} to see the traceback)")
        leave_process_group()
        return USER_ERROR_EXIT_STATUS
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Destroy the default process group if the run created one. A crash does not come here: tearing down a
    group that a failed collective left half-done can hang, and the launcher ends the processes anyway."""
    torch = sys.modules.get("torch")  # a run that never imported torch has no group to leave
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _say(message: str) -> None:
    """One line on stderr, from the first process only (under ``accelerate launch`` every rank runs the script)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
