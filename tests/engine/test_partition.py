"""Subspace partitions: block discovery, membership rules and errors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_tuning import (
    BlockFamily,
    BlocksNotFoundError,
    PartitionError,
    partition_subspaces,
    register_block_family,
)
from tests.helpers.tiny import tiny_llama, tiny_opt


def layers_of(names):
    return sorted({int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n})


def test_adjacent_llama_groups_embeddings_head():
    model = tiny_llama(layers=8)
    part = partition_subspaces(model, "adjacent")
    assert part.family == "decoder_layers" and part.num_blocks == 8
    assert [g.name for g in part.groups] == ["G0", "G1", "G2", "G3"]
    assert [layers_of(g.params) for g in part.groups] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert "model.embed_tokens.weight" in part.groups[0].params
    assert set(part.always_trainable) == {"model.norm.weight", "lm_head.weight"}
    assert part.frozen == ()
    everything = {n for n, _ in model.named_parameters()}
    assert set(part.trainable) == everything


def test_adjacent_near_equal_sizes():
    part = partition_subspaces(tiny_llama(layers=10), "adjacent", 4)
    assert [len(layers_of(g.params)) for g in part.groups] == [3, 3, 2, 2]
    part3 = partition_subspaces(tiny_llama(layers=8), "adjacent", 3)
    assert [layers_of(g.params) for g in part3.groups] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_cross_even_odd_and_embeddings_everywhere():
    part = partition_subspaces(tiny_llama(layers=6), "cross")
    assert [g.name for g in part.groups] == ["even", "odd"]
    assert layers_of(part.groups[0].params) == [0, 2, 4]
    assert layers_of(part.groups[1].params) == [1, 3, 5]
    assert "model.embed_tokens.weight" in part.always_trainable
    three = partition_subspaces(tiny_llama(layers=6), "cross", 3)
    assert [layers_of(g.params) for g in three.groups] == [[0, 3], [1, 4], [2, 5]]


def test_peft_only_adapters_partitioned_modules_to_save_always():
    model = get_peft_model(
        tiny_llama(layers=4), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    part = partition_subspaces(model, "adjacent", 2)
    for group in part.groups:
        assert group.params and all("lora_" in n for n in group.params)
    assert layers_of(part.groups[0].params) == [0, 1] and layers_of(part.groups[1].params) == [2, 3]
    assert part.always_trainable == ("base_model.model.lm_head.modules_to_save.default.weight",)
    base = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert base and not set(base) & set(part.trainable)


def test_bert_encoder_family_head_and_pooler_always():
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)
    part = partition_subspaces(BertForSequenceClassification(config), "adjacent")
    assert part.family == "bert_encoder" and part.num_blocks == 4
    assert any("embeddings" in n for n in part.groups[0].params)
    assert set(part.always_trainable) == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }


def test_tied_head_is_always_trainable():
    model = tiny_llama(layers=4)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    part = partition_subspaces(model, "adjacent", 2)
    assert "model.embed_tokens.weight" in part.always_trainable
    assert "model.embed_tokens.weight" not in part.groups[0].params


def test_always_trainable_and_frozen_overrides():
    model = tiny_llama(layers=4)
    part = partition_subspaces(model, "adjacent", 2, always_trainable=[], frozen=[r"embed_tokens"])
    assert part.always_trainable == ()
    assert set(part.frozen) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    part = partition_subspaces(model, "adjacent", 2, always_trainable=[r"^lm_head\."])
    assert part.always_trainable == ("lm_head.weight",) and part.frozen == ("model.norm.weight",)


def test_regex_groups():
    model = tiny_llama(layers=4)
    part = partition_subspaces(model, groups={"attn": r"self_attn", "mlp": r"\.mlp\."})
    assert part.scheme == "regex" and [g.name for g in part.groups] == ["attn", "mlp"]
    assert all("self_attn" in n for n in part.groups[0].params)
    assert set(part.always_trainable) == {"model.norm.weight", "lm_head.weight"}
    assert "model.embed_tokens.weight" in part.frozen  # matched by no group
    with pytest.raises(PartitionError, match="several groups"):
        partition_subspaces(model, groups=[r"layers\.0\.", r"layers\.0\.self"])
    with pytest.raises(PartitionError, match="matches no trainable"):
        partition_subspaces(model, groups=[r"layers\.0\.", r"nothing_here"])


class Stage(nn.Module):
    def __init__(self, depth: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ToyBlock(dim) for _ in range(depth)])
        self.downsample = nn.Linear(dim, dim)


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)


class ToyHierarchical(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.stages = nn.ModuleList([Stage(2, 4), Stage(3, 4), Stage(2, 4)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


register_block_family(BlockFamily("toy_stages", container="stages", block_class=r"^Stage$", stage_blocks="blocks"))


def test_hierarchical_family_stages_and_parity_within_stage():
    model = ToyHierarchical()
    part = partition_subspaces(model, "adjacent")
    assert len(part.groups) == 3
    assert "stem.weight" in part.groups[0].params
    assert "stages.1.downsample.weight" in part.groups[1].params
    assert {"head.weight", "norm.weight"} <= set(part.always_trainable)
    with pytest.raises(PartitionError, match="one group per stage"):
        partition_subspaces(model, "adjacent", 2)
    cross = partition_subspaces(model, "cross")
    even = {n.rsplit(".", 2)[0] for n in cross.groups[0].params}
    assert even == {"stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.2", "stages.2.blocks.0"}
    assert {"stem.weight", "stages.0.downsample.weight"} <= set(cross.always_trainable)


def test_errors_name_the_problem():
    with pytest.raises(PartitionError, match="unknown partition scheme"):
        partition_subspaces(tiny_llama(layers=2), "diagonal")
    with pytest.raises(PartitionError, match="more than the 4 blocks"):
        partition_subspaces(tiny_llama(layers=4), "adjacent", 6)
    mlp = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(BlocksNotFoundError, match=r"dt_groups|regex groups") as info:
        partition_subspaces(mlp, "adjacent")
    assert "Linear" in str(info.value)  # lists the stacks it did find
    lora = get_peft_model(tiny_llama(layers=8), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 1]))
    with pytest.raises(PartitionError, match="no trainable parameters"):
        partition_subspaces(lora, "adjacent")
    frozen = tiny_llama(layers=2)
    frozen.requires_grad_(False)
    with pytest.raises(PartitionError, match="no trainable parameters"):
        partition_subspaces(frozen, "adjacent")


def test_zero3_style_partitioned_params_report_real_size():
    model = tiny_llama(layers=2)
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.ds_numel = weight.numel()
    weight.data = torch.empty(0)
    part = partition_subspaces(model, "adjacent", 2)
    assert part.param_numel["model.layers.0.mlp.up_proj.weight"] == 32 * 64


@pytest.mark.parametrize("project", [False, True], ids=["final-norm", "projections"])
def test_output_side_is_where_a_module_runs_not_where_it_is_registered(project):
    """OPT registers final_layer_norm / project_out (and project_in) before its layers: the first two run after
    the blocks and belong to every stage, project_in runs before them and belongs to the first group."""
    model = tiny_opt(project)
    registered = [name for name, _ in model.named_parameters()]
    first_block = min(i for i, name in enumerate(registered) if ".layers." in name)
    late = [n for n in registered[:first_block] if "final_layer_norm" in n or "project_out" in n]
    assert late  # registered before the blocks
    part = partition_subspaces(model, "adjacent")
    assert set(late) <= set(part.always_trainable)
    assert not set(late) & set(part.groups[0].params)
    assert "model.decoder.embed_positions.weight" in part.groups[0].params
    if project:
        assert {"model.decoder.project_in.weight"} <= set(part.groups[0].params)


def test_the_output_side_is_the_same_wherever_the_plan_is_computed():
    """Declared by the family, not probed: a skeleton on the meta device (hf-tuning plan, ZeRO-3) gets the same
    plan, so the same fingerprint, as the real model; explicit regex groups keep the same output side."""
    from hf_tuning import build_stage_plan

    model = tiny_opt()
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    assert build_stage_plan(skeleton, "dt1").fingerprint == build_stage_plan(model, "dt1").fingerprint
    regex = partition_subspaces(model, groups=[r"layers\.[01]\.", r"layers\.[23]\."])
    assert "model.decoder.final_layer_norm.weight" in regex.always_trainable
    assert "model.decoder.final_layer_norm.weight" not in regex.frozen


def test_frozen_and_always_trainable_reach_a_head_tied_to_the_embeddings():
    model = tiny_llama(layers=4)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # the shared tensor is listed once, as the embeddings
    frozen = partition_subspaces(model, "adjacent", frozen=["lm_head"])
    assert frozen.frozen == ("model.embed_tokens.weight",)
    always = partition_subspaces(model, "adjacent", always_trainable=[r"^lm_head\."])
    assert always.always_trainable == ("model.embed_tokens.weight",)  # not only in the first group
    assert "model.embed_tokens.weight" not in always.groups[0].params
