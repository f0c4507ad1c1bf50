"""The backward pass stopped at the lowest active block computes exactly the gradients the full backward would."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_tuning.backward import BackwardStopper
from hf_tuning.families import find_block_stack
from hf_tuning.stages import build_stage_plan
from tests.helpers.tiny import lm_dataset, tiny_llama, tiny_opt


def lora_llama(checkpointing: str | None):
    model = get_peft_model(tiny_llama(layers=8), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # non-zero B: every adapter shapes the output, so every gradient is non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()  # what PEFT and TRL install for checkpointing
    return model


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_truncated_backward_gives_the_same_gradients_to_the_active_parameters(checkpointing):
    model = lora_llama(checkpointing).train()
    stage = build_stage_plan(model, "dt1").stages[2]  # blocks 4-5 (and the always-trainable output side)
    for name, param in model.named_parameters():
        param.requires_grad_(name in set(stage.params))
    batch = torch.tensor(lm_dataset(4, 16, seed=3)["input_ids"])
    stopper = BackwardStopper(model, [prefix for prefix, _, _ in find_block_stack(model).blocks])
    first_block = model.get_submodule(stopper.block_prefixes[0].rstrip("."))
    reached: list[bool] = []
    first_block.register_forward_hook(lambda module, inputs, output: reached.append(output[0].requires_grad))

    def gradients(truncated: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if truncated:
            assert stopper.apply(set(stage.params)) == 4
        try:
            model(input_ids=batch, labels=batch).loss.backward()
        finally:
            stopper.restore()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    full, truncated = gradients(False), gradients(True)
    assert full.keys() == truncated.keys() == set(stage.params)
    for name in full:
        torch.testing.assert_close(truncated[name], full[name], rtol=0, atol=0, msg=name)
    assert reached[-1] is False  # the truncated pass built no graph through the frozen bottom block
    if checkpointing:
        assert reached[0] is True  # the input-require-grads hook would have made the full pass build one


def test_backward_stops_above_a_module_registered_before_the_blocks_that_runs_after_them():
    """OPT's final_layer_norm (trained in every stage) is registered before the layers: by registration order
    it would look like an embedding, and backward would always run to the input."""
    model = tiny_opt()
    plan = build_stage_plan(model, "dt1")
    stopper = BackwardStopper(
        model, [p for p, _, _ in find_block_stack(model).blocks], plan.partition.runs_before_blocks
    )
    assert [stopper.apply(set(stage.params)) for stage in plan.stages] == [-1, 1, 2, 3]  # G0 trains the embeddings
    stopper.restore()
