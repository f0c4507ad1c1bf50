"""The card an adapter folder gets from ``save_pretrained``: the method, its settings and how to load it.

A recipe that knows more (the stages trained, the data, the results) writes its own richer card over it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hf_tuning.model_card import HF_TUNING_LINK, hub_repo_id, write_card

if TYPE_CHECKING:
    from hf_tuning.tuners.model import PetlModel

__all__ = ["write_adapter_card"]


def write_adapter_card(folder: Path, model: PetlModel) -> Path:
    config = model.petl_config
    base = config.base_model_name_or_path
    trainable = len(model.adapter_names) and sum(p.numel() for p in model.adapter_state_dict().values())
    settings = {k: v for k, v in config.to_dict().items() if k not in ("method", "base_model_name_or_path")}
    language_model = model.pipeline_tag == "text-generation"
    backbone = (
        f'AutoModelForCausalLM.from_pretrained("{base or "<the base model>"}")  # the base the adapter was trained on'
        if language_model
        else "...  # the same backbone, built with its pretrained weights and the trained class count"
    )
    usage = (
        "```python\n"
        + ("from transformers import AutoModelForCausalLM\n\n" if language_model else "")
        + "from hf_tuning.tuners import load_petl_model\n\n"
        f"backbone = {backbone}\n"
        'model = load_petl_model(backbone, "<this repo or folder>")\n'
        "```\n\n"
        f"PEFT cannot load this folder: `{config.method}` is not one of PEFT's methods; "
        "`hf_tuning.tuners.load_petl_model` reads `adapter_config.json` and rebuilds it."
    )
    return write_card(
        folder,
        model_name=folder.resolve().name,
        base_model=hub_repo_id(base) if base else None,
        intro=(
            f"A `{config.method}` adapter ({trainable:,} saved parameters: the method's modules"
            f"{'' if language_model else ' and the classifier head'}) for `{base or 'its backbone'}`, made with "
            f"{HF_TUNING_LINK}."
        ),
        pipeline_tag=model.pipeline_tag,
        task_type=model.pipeline_tag,
        dataset_type="instruction-following" if language_model else "imagefolder",
        library_name="hf_tuning",
        stage_plan=None,
        stage_records=None,
        dt_budget=None,
        hyperparameters=settings,
        usage=usage,
        tags=[config.method, "petl"],
    )
