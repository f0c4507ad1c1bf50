"""Push the final output of a run to the Hugging Face Hub: the model and its reports, not the training leftovers.

``output_dir`` holds far more than a model repo should: per-stage checkpoints, TensorBoard runs, optimizer and RNG
state, atomic-write temp files, and ``training_args.bin`` (a pickle that can carry ``hub_token``). Only the
deliverables go up: adapter or full weights, tokenizer and chat template, model card, ``dt_stages.json``,
``dt_timeline.png``, plots and eval reports. The text files are checked for the token before anything is sent.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token

__all__ = ["push_output_dir", "select_upload_files"]

logger = logging.getLogger(__name__)

# Folder names (at any depth) whose whole content stays local.
SKIP_DIRS = ("checkpoint-*", "stage-*", "runs", "global_step*", "__pycache__", ".*")
# File names that are training state, not deliverables.
SKIP_FILES = (
    ".*",
    "*.tmp",
    "*.lock",
    "training_args.bin",
    "optimizer.*",
    "scheduler.*",
    "scaler.*",
    "rng_state*",
    "latest",
    "zero_to_fp32.py",
)
MODEL_MARKERS = ("adapter_config.json", "config.json")
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".yaml", ".yml", ".txt", ".jinja", ".csv", ".py")


def _skipped(rel: Path) -> bool:
    dirs, name = rel.parts[:-1], rel.name
    if any(fnmatch.fnmatch(part, pattern) for part in dirs for pattern in SKIP_DIRS):
        return True
    return any(fnmatch.fnmatch(name, pattern) for pattern in SKIP_FILES)


def select_upload_files(output_dir: str | os.PathLike) -> list[Path]:
    """The files of ``output_dir`` that belong in the model repo, as sorted paths relative to it."""
    root = Path(output_dir)
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(rel for rel in files if not _skipped(rel))


def _check_no_token(root: Path, files: list[Path], token: str | None) -> None:
    """Refuse to publish a token that leaked into a card, config or report (the message never shows it)."""
    if not token:
        return
    needle = token.encode()
    leaked = [str(rel) for rel in files if rel.suffix.lower() in TEXT_SUFFIXES and needle in (root / rel).read_bytes()]
    if leaked:
        raise ValueError(
            f"refusing to upload: the Hub token appears in {', '.join(leaked)}; remove it from these files first"
        )


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the deliverables of ``output_dir`` in one commit.

    ``token`` defaults to the logged-in one (``HF_TOKEN`` or the token file). An existing repo keeps its
    visibility. ``revision`` names a branch, created from ``main`` if missing. Returns the commit URL
    (a :class:`huggingface_hub.CommitInfo`, whose ``.oid`` and ``.repo_url`` give the commit and the repo).

    Raises:
        ValueError: the folder holds no model (neither ``adapter_config.json`` nor ``config.json``), or the
            token appears in one of the text files to upload.
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    files = select_upload_files(root)
    if not any(str(rel) in MODEL_MARKERS for rel in files):
        raise ValueError(
            f"{root} has neither adapter_config.json nor config.json: no saved model to push "
            "(call trainer.save_model() first, or pass the folder the model was saved to)"
        )
    _check_no_token(root, files, token or get_token())

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(root / rel)) for rel in files]
    logger.info("pushing %d files from %s to %s", len(files), root, repo_id)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload {root.name} ({len(files)} files) with hf_tuning",
        revision=revision,
        repo_type="model",
    )
