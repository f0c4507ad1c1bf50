"""Image classifiers from timm or transformers, with pretrained weights from the Hub, a local
safetensors file or a timm checkpoint, and a head that follows the task's class count.

One entry point, :func:`load_vision_model`, so a recipe does not care which library a backbone
comes from. A head whose shape does not match the task is either re-initialised or, with
``head_class_map`` (one source class index per target class, like the 22k->1k map of the
Swin paper), rebuilt from the matching rows of the pretrained head.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LIBRARIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VisionModelArguments",
    "VisionModelError",
    "load_vision_model",
    "load_state_dict_file",
    "vision_data_config",
    "classifier_head",
    "logits_of",
    "model_library",
    "read_class_map",
]

logger = logging.getLogger(__name__)
LIBRARIES = ("auto", "timm", "transformers")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STATE_DICT_KEYS = ("state_dict", "model", "module", "model_ema", "state_dict_ema")


class VisionModelError(ValueError):
    """A backbone, checkpoint or head map that cannot be used as asked."""


@dataclass
class VisionModelArguments:
    """Which backbone to build and which weights to start from."""

    model_name_or_path: str = field(
        default="vit_base_patch16_224",
        metadata={
            "help": "timm architecture name (e.g. swin_base_patch4_window7_224, or hf-hub:timm/<repo> with "
            "pretrained), or a transformers Hub id / local folder (e.g. google/vit-base-patch16-224-in21k)."
        },
    )
    library: str = field(default="auto", metadata={"help": "timm, transformers or auto.", "choices": list(LIBRARIES)})
    pretrained: bool = field(
        default=False,
        metadata={"help": "Load the architecture's pretrained weights (timm: from its pretrained tag on the Hub)."},
    )
    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Local weights to start from: .safetensors, or a timm/original .pth/.pt/.bin checkpoint "
            "(read with weights_only=True; original Swin/ViT layouts are converted by timm's filter)."
        },
    )
    head_class_map: str | None = field(
        default=None,
        metadata={
            "help": "Text file with one source class index per target class (e.g. map22kto1k.txt): the new head "
            "is built from those rows of the pretrained head instead of being re-initialised."
        },
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth rate; 0 turns it off. Unset: the architecture's own default (timm's Swin "
            "and ConvNeXt use 0.1, its ViT 0)."
        },
    )
    model_kwargs: dict | str | None = field(  # str: a JSON object given on the command line
        default=None,
        metadata={
            "help": "Extra architecture arguments: timm create_model kwargs (img_size, window_size, depths, ...) "
            "or transformers config overrides (image_size, num_hidden_layers, ...)."
        },
    )
    image_mean: list[float] | None = field(default=None, metadata={"help": "Override the normalisation mean."})
    image_std: list[float] | None = field(default=None, metadata={"help": "Override the normalisation std."})
    crop_pct: float | None = field(default=None, metadata={"help": "Override the eval centre-crop fraction."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub (off)."})

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise VisionModelError(f"library={self.library!r} is not one of {', '.join(LIBRARIES)}")
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise VisionModelError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.model_kwargs is None:
            self.model_kwargs = {}
        if isinstance(self.model_kwargs, str):
            try:
                self.model_kwargs = json.loads(self.model_kwargs)
            except json.JSONDecodeError as err:
                raise VisionModelError(f"model_kwargs must be a JSON object, got {self.model_kwargs!r}: {err}") from err
        if not isinstance(self.model_kwargs, dict):
            raise VisionModelError(f"model_kwargs must be a mapping, got {type(self.model_kwargs).__name__}")


def model_library(model: nn.Module) -> str:
    """``transformers`` for a ``PreTrainedModel`` (also under PEFT), else ``timm``."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "transformers" if isinstance(base, PreTrainedModel) else "timm"


def _resolve_library(args: VisionModelArguments) -> str:
    if args.library != "auto":
        return args.library
    import timm

    source = Path(args.model_name_or_path)
    if source.is_dir():
        config = source / "config.json"
        if config.is_file() and "architecture" in json.loads(config.read_text()):
            return "timm"  # timm's Hub/folder layout: config.json with "architecture"
        return "transformers"
    name = args.model_name_or_path.removeprefix("timm/")
    if args.model_name_or_path.startswith("hf-hub:") or timm.is_model(name.split(".")[0]):
        return "timm"
    return "transformers"


def read_class_map(path: str | Path) -> list[int]:
    """One integer per non-empty line: the source class of each target class, in target order."""
    path = Path(path)
    if not path.is_file():
        raise VisionModelError(f"head_class_map {path} does not exist")
    indices = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            indices.append(int(line.split()[0]))
        except ValueError:
            raise VisionModelError(f"{path}:{number}: expected a source class index, got {line!r}") from None
    if not indices:
        raise VisionModelError(f"head_class_map {path} is empty")
    return indices


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors`` or a pickled checkpoint (``weights_only=True``, never arbitrary code);
    unwraps the usual ``state_dict`` / ``model`` / ``module.`` nesting."""
    path = Path(path)
    if not path.is_file():
        raise VisionModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is reported the same way
            raise VisionModelError(
                f"could not read {path} with torch.load(weights_only=True): {err}. Convert it to safetensors, "
                "or re-save it as a plain state dict"
            ) from err
    for key in _STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VisionModelError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final linear classifier: its module path and the module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if model_library(base) == "timm" and hasattr(base, "get_classifier"):
        head = base.get_classifier()
        for name, module in base.named_modules():
            if module is head:
                return name, head
    if isinstance(getattr(base, "classifier", None), nn.Linear):
        return "classifier", base.classifier
    raise VisionModelError(
        f"cannot find the classifier head of {type(base).__name__} (expected timm get_classifier() or .classifier)"
    )


def _build_timm(args: VisionModelArguments, num_classes: int) -> nn.Module:
    import timm

    kwargs = dict(args.model_kwargs)
    if args.drop_path_rate is not None:  # 0.0 included: "off" must reach an architecture whose default is not 0
        kwargs["drop_path_rate"] = args.drop_path_rate
    # with a checkpoint or a head map the head is sized from the weights first, then fitted
    if args.checkpoint is None and args.head_class_map is None:
        kwargs["num_classes"] = num_classes
    pretrained = args.pretrained and args.checkpoint is None
    source = Path(args.model_name_or_path)
    if source.is_dir():  # a timm folder: config.json (+ model.safetensors)
        config = json.loads((source / "config.json").read_text())
        overlay = {"file": str(source / "model.safetensors"), "num_classes": config.get("num_classes", 1000)}
        return timm.create_model(
            config["architecture"],
            pretrained=pretrained,
            pretrained_cfg_overlay=overlay,
            **{**config.get("model_args", {}), **kwargs},
        )
    return timm.create_model(args.model_name_or_path, pretrained=pretrained, **kwargs)


def _build_transformers(args: VisionModelArguments, num_classes: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    overrides = dict(args.model_kwargs)
    remote = {"trust_remote_code": args.trust_remote_code}
    config = AutoConfig.from_pretrained(args.model_name_or_path, **remote, **overrides)
    if args.drop_path_rate is not None:
        if hasattr(config, "drop_path_rate"):
            config.drop_path_rate = args.drop_path_rate
        elif args.drop_path_rate > 0:
            raise VisionModelError(f"{type(config).__name__} has no stochastic depth: drop_path_rate cannot apply")
    head_from_weights = args.checkpoint is not None or args.head_class_map is not None
    if args.pretrained and args.checkpoint is None:
        resize = {} if head_from_weights else {"num_labels": num_classes, "ignore_mismatched_sizes": True}
        return AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path, config=config, **remote, **resize
        )
    if not head_from_weights:
        config.num_labels = num_classes
    return AutoModelForImageClassification.from_config(config, **remote)


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """Load ``path`` into ``model``; the head may differ (it is resized afterwards), nothing else may."""
    state = load_state_dict_file(path)
    if model_library(model) == "timm":
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
    head_name, head = classifier_head(model)
    own = model.state_dict()
    head_keys = {f"{head_name}.{k}" for k in head.state_dict()}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if any(k not in head_keys for k in mismatched):
        bad = ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if k not in head_keys
        )
        raise VisionModelError(f"{path} does not fit {type(model).__name__}: shape mismatch in {bad}")
    if mismatched:  # the head has another class count: resize the model's head to the checkpoint's first
        rows = state[f"{head_name}.weight"].shape[0]
        _replace_head(model, head_name, nn.Linear(head.in_features, rows, bias=head.bias is not None))
    result = model.load_state_dict(state, strict=False)
    if not head_keys & state.keys():
        logger.info("%s has no classifier head (a backbone checkpoint): the head starts fresh", path)
    missing = [
        k
        for k in result.missing_keys
        if not k.endswith(("relative_position_index", "attn_mask")) and k not in head_keys
    ]
    if missing or result.unexpected_keys:
        raise VisionModelError(
            f"{path} does not match {type(model).__name__}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
        )


def _replace_head(model: nn.Module, head_name: str, new_head: nn.Linear) -> None:
    parent_name, _, attr = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new_head)
    if hasattr(model, "num_classes"):
        model.num_classes = new_head.out_features
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        config.num_labels = new_head.out_features


def _fit_head(model: nn.Module, num_classes: int, class_map: list[int] | None) -> None:
    head_name, head = classifier_head(model)
    if class_map is not None:
        if len(class_map) != num_classes:
            raise VisionModelError(
                f"head_class_map has {len(class_map)} entries but the data has {num_classes} classes"
            )
        if max(class_map) >= head.out_features or min(class_map) < 0:
            raise VisionModelError(
                f"head_class_map refers to class {max(class_map)} but the pretrained head has {head.out_features} classes"
            )
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        with torch.no_grad():
            new.weight.copy_(head.weight[class_map])
            if head.bias is not None:
                new.bias.copy_(head.bias[class_map])
        _replace_head(model, head_name, new)
        logger.info("head rebuilt from %d rows of the pretrained %d-class head", num_classes, head.out_features)
    elif head.out_features != num_classes:
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        nn.init.trunc_normal_(new.weight, std=0.02)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        _replace_head(model, head_name, new)
        logger.info("head re-initialised: %d -> %d classes", head.out_features, num_classes)


def load_vision_model(args: VisionModelArguments, num_classes: int) -> nn.Module:
    """Build the backbone, load its starting weights and size its head for ``num_classes``."""
    library = _resolve_library(args)
    try:
        model = _build_timm(args, num_classes) if library == "timm" else _build_transformers(args, num_classes)
    except (OSError, RuntimeError) as err:
        raise VisionModelError(
            f"could not build {library} model {args.model_name_or_path!r}: {err}. Without network access, "
            "point model_name_or_path at a local folder or pass checkpoint=<file>"
        ) from err
    if args.checkpoint is not None:
        _load_checkpoint(model, args.checkpoint)
    class_map = read_class_map(args.head_class_map) if args.head_class_map else None
    _fit_head(model, num_classes, class_map)
    return model


def vision_data_config(model: nn.Module, args: VisionModelArguments | None = None) -> dict[str, Any]:
    """timm-style preprocessing settings (input_size, interpolation, mean, std, crop_pct) of the backbone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if model_library(base) == "timm":
        from timm.data import resolve_data_config

        config = dict(resolve_data_config({}, model=base))
        built_size = getattr(getattr(base, "patch_embed", None), "img_size", None)
        if built_size is not None:  # built with img_size=...: the pretrained config still says 224
            config["input_size"] = (config["input_size"][0], *built_size)
    else:
        hf_config = base.config
        size = hf_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        mean, std, crop_pct = IMAGENET_MEAN, IMAGENET_STD, 0.875
        processor_file = Path(getattr(hf_config, "_name_or_path", "") or "") / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            mean = tuple(processor.get("image_mean", mean))
            std = tuple(processor.get("image_std", std))
            crop_pct = processor.get("crop_pct") or (1.0 if not processor.get("do_center_crop") else crop_pct)
        config = {
            "input_size": (getattr(hf_config, "num_channels", 3), *size),
            "interpolation": "bicubic",
            "mean": tuple(mean),
            "std": tuple(std),
            "crop_pct": crop_pct,
            "crop_mode": "center",
        }
    if args is not None:
        if args.image_mean is not None:
            config["mean"] = tuple(args.image_mean)
        if args.image_std is not None:
            config["std"] = tuple(args.image_std)
        if args.crop_pct is not None:
            config["crop_pct"] = args.crop_pct
    config["input_size"] = tuple(int(x) for x in config["input_size"])
    config["mean"] = tuple(float(x) for x in config["mean"])
    config["std"] = tuple(float(x) for x in config["std"])
    return config


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a forward pass: timm returns a tensor, transformers an output object (or mapping) with
    ``logits``, some models a tuple whose first element they are."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, tuple) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"the model returned {type(outputs).__name__}; expected a logits tensor or an object with .logits")
