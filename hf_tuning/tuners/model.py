"""The wrapper every method returns, and the two entry points: :func:`get_petl_model`, :func:`load_petl_model`.

:class:`PetlModel` holds the frozen backbone (``base_model``) and whatever the method adds. The method's
modules are registered inside the blocks they belong to wherever that is possible, so the staged engine
partitions them by block and runs ``dt1``..``dt4`` over them unchanged; modules shared by several blocks
sit on the wrapper, after the backbone, and are trained in every stage like the head.

Saved like a PEFT adapter folder: ``adapter_config.json`` (``method``, its settings,
``base_model_name_or_path``), ``adapter_model.safetensors`` (the method's weights and the head, under the
wrapper's parameter names) and a model card. The base weights are never copied.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hf_tuning.io import atomic_output, atomic_write_json, read_json
from hf_tuning.tuners.config import PetlConfig, PetlConfigError

__all__ = [
    "METHODS",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "PetlModel",
    "get_petl_model",
    "load_petl_model",
    "method_config_class",
]

logger = logging.getLogger(__name__)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Every method: its package under hf_tuning/tuners/, its config class and its model class.
METHODS: dict[str, tuple[str, str, str]] = {
    "dtl": ("hf_tuning.tuners.dtl", "DTLConfig", "DTLModel"),
    "dyt": ("hf_tuning.tuners.dyt", "DyTConfig", "DyTModel"),
    "snell": ("hf_tuning.tuners.snell", "SNELLConfig", "SNELLModel"),
    "snella": ("hf_tuning.tuners.snell", "SNELLAConfig", "SNELLModel"),
}


def _method_classes(method: str) -> tuple[type[PetlConfig], type[PetlModel]]:
    if method not in METHODS:
        raise PetlConfigError(f"unknown method {method!r}; hf_tuning.tuners knows {', '.join(sorted(METHODS))}")
    package, config_name, model_name = METHODS[method]
    module = importlib.import_module(package)
    return getattr(module, config_name), getattr(module, model_name)


def method_config_class(method: str) -> type[PetlConfig]:
    return _method_classes(method)[0]


class PetlModel(nn.Module):
    """A frozen backbone with one method's modules; only those and the classifier head are trainable.

    Attributes:
        base_model: the backbone, with the method's per-block modules registered inside its blocks.
        petl_config: the method's config.
        adapter_names: the parameters the method trains (its modules and the head): what is saved.
        adapter_buffer_names: buffers the method needs at inference (SNELL's per-matrix sparsity): saved too.
    """

    config_class: ClassVar[type[PetlConfig]]
    pipeline_tag: ClassVar[str] = "image-classification"  # what the model card advertises

    def __init__(self, base_model: nn.Module, config: PetlConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.petl_config = config
        self.adapter_names: tuple[str, ...] = ()
        self.adapter_buffer_names: tuple[str, ...] = ()

    def _check_modules_to_save(self, names: list[str]) -> None:
        """Every module the method is asked to train beside its own must exist (checked before any change)."""
        for name in names:
            try:
                self.base_model.get_submodule(name)
            except AttributeError:
                raise PetlConfigError(
                    f"{self.petl_config.method} modules_to_save names {name!r}, which "
                    f"{type(self.base_model).__name__} lacks"
                ) from None

    def _freeze_all_but_adapters(self, head_names: list[str], extra_parameters: list[str] = ()) -> None:
        """Call at the end of a method's ``__init__``: freeze everything except the method's modules, the head
        and ``extra_parameters`` (parameter names in the base model, e.g. a class token)."""
        method_params = {id(p) for p in self.method_parameters()}
        head_params = {id(p) for name in head_names for p in self.base_model.get_submodule(name).parameters()}
        extra_params = {id(self.base_model.get_parameter(name)) for name in extra_parameters}
        keep = method_params | head_params | extra_params
        for param in self.parameters():
            param.requires_grad_(id(param) in keep)
        self.adapter_names = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def method_parameters(self) -> list[nn.Parameter]:
        """The parameters the method adds (not the head)."""
        raise NotImplementedError

    def extra_loss(self, logits: torch.Tensor, labels: torch.Tensor, criterion: Any) -> torch.Tensor | None:
        """The loss the method adds to the task loss for the last forward (``criterion(logits, labels)`` is the
        task loss); ``None`` for methods that add none. Trainers call it right after the forward."""
        return None

    def trainer_callbacks(self) -> list[Any]:
        """``transformers.TrainerCallback`` objects the method needs while training (SNELLA's allocator)."""
        return []

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """State a resumed run needs beyond the adapter weights (not needed for inference); checkpoints keep it."""
        return {}

    def load_training_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise PetlConfigError(f"{self.petl_config.method} keeps no training state, got {sorted(state)[:4]}")

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, like PEFT's."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved weights: the method's modules and the head, whatever a stage froze meanwhile."""
        params = dict(self.named_parameters())
        state = {name: params[name].detach().cpu().contiguous() for name in self.adapter_names}
        buffers = dict(self.named_buffers())
        state.update({name: buffers[name].detach().cpu().contiguous() for name in self.adapter_buffer_names})
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
        """Load saved weights; every name must be there and nothing else (a mismatch names what differs)."""
        expected = set(self.adapter_names) | set(self.adapter_buffer_names)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise PetlConfigError(
                f"{source} does not match this {self.petl_config.method} model: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]} (was it saved from another backbone or config?)"
            )
        targets = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name, value in state.items():
            if targets[name].shape != value.shape:
                raise PetlConfigError(
                    f"{source}: {name} has shape {tuple(value.shape)}, the model expects {tuple(targets[name].shape)}"
                )
        # through load_state_dict, so modules that cache a buffer on the host see the new value
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, save_directory: str | Path, *, model_card: bool = True) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and (optionally) ``README.md``, each atomically."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / WEIGHTS_FILE) as tmp:
            save_file(self.adapter_state_dict(), str(tmp), metadata={"format": "pt", "method": self.petl_config.method})
        atomic_write_json(folder / CONFIG_FILE, self.petl_config.to_dict())
        if model_card:
            from hf_tuning.tuners.card import write_adapter_card

            write_adapter_card(folder, self)
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> Any:
        """Save to a temporary folder and upload it in one commit (the token is never written to a file)."""
        from hf_tuning.hub import push_output_dir

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_output_dir(
                tmp, repo_id, private=private, token=token, revision=revision, commit_message=commit_message
            )


def get_petl_model(model: nn.Module, config: PetlConfig) -> PetlModel:
    """Attach ``config``'s method to ``model``: the backbone is frozen, the method's modules and the head train."""
    if isinstance(model, PetlModel):
        raise PetlConfigError(f"the model already carries a {model.petl_config.method} method")
    if not isinstance(config, PetlConfig) or not config.method:
        raise PetlConfigError(f"expected a method config such as DTLConfig, got {type(config).__name__}")
    _, model_class = _method_classes(config.method)
    return model_class(model, config)


def _resolve_files(source: str | Path, revision: str | None, token: str | None) -> tuple[Path, Path]:
    """``adapter_config.json`` and ``adapter_model.safetensors`` of a local folder or a Hub repo."""
    folder = Path(source)
    if folder.is_dir():
        files = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {source} is not a saved hf_tuning adapter folder")
        return files
    if str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise FileNotFoundError(f"{source} is neither an adapter folder nor a Hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download

    config_file = hf_hub_download(str(source), CONFIG_FILE, revision=revision, token=token)
    weights_file = hf_hub_download(str(source), WEIGHTS_FILE, revision=revision, token=token)
    return Path(config_file), Path(weights_file)


def load_petl_model(
    base_model: nn.Module,
    source: str | Path,
    *,
    is_trainable: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> PetlModel:
    """Rebuild a saved method on ``base_model`` (the same backbone it was trained on) from a folder or Hub repo.

    The method is read from ``adapter_config.json``. Like PEFT's ``from_pretrained``, the result is in eval
    mode with nothing trainable unless ``is_trainable``.
    """
    config_file, weights_file = _resolve_files(source, revision, token)
    saved = read_json(config_file)
    method = saved.get("method")
    if method is None:
        hint = " (a PEFT adapter: load it with peft.PeftModel)" if "peft_type" in saved else ""
        raise PetlConfigError(f"{config_file} names no `method`{hint}")
    config_class, _ = _method_classes(method)
    config = config_class.from_dict(saved, source=str(config_file))
    model = get_petl_model(base_model, config)
    from safetensors.torch import load_file

    model.load_adapter_state_dict(load_file(str(weights_file)), source=str(weights_file))
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model
