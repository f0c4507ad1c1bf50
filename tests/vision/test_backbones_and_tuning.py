"""Vision backbones in the staged engine: block families, the paper's membership rules, tuning
modes, weight loading with head fitting, and the image-classification trainer."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from hf_tuning import StagedTrainingArguments, find_block_stack, partition_subspaces
from hf_tuning.vision import (
    StagedImageClassificationTrainer,
    VisionModelArguments,
    VisionModelError,
    VisionTuningArguments,
    load_vision_model,
    logits_of,
    prepare_for_tuning,
    vision_data_config,
)
from tests.helpers.tiny_vision import FAMILIES, TIMM_KWARGS, TrainEndSnapshots, tiny_images, tiny_vision_model


def _prefixes(names, depth: int) -> set[str]:
    return {".".join(n.split(".")[:depth]) for n in names}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_found_and_head_and_final_norm_train_in_every_stage(family):
    model = tiny_vision_model(family)
    stack = find_block_stack(model)
    assert stack.family.name == family
    head_like = re.compile(r"^(head|norm\.|classifier|vit\.layernorm|swin\.layernorm|convnext\.layernorm)")
    for scheme in ("adjacent", "cross"):
        partition = partition_subspaces(model, scheme)
        outputs = {n for n in partition.param_numel if head_like.match(n)}
        assert outputs and outputs <= set(partition.always_trainable), (
            scheme,
            outputs - set(partition.always_trainable),
        )
        assert set(partition.trainable) == set(partition.param_numel)  # nothing left out in full fine-tuning


def test_timm_swin_follows_the_paper_membership():
    partition = partition_subspaces(tiny_vision_model("timm_swin"), "adjacent")
    groups = [_prefixes(g.params, 3) for g in partition.groups]
    assert len(groups) == 4  # one per stage
    # stage 0 = patch embedding + its blocks + the patch merging that ends it (timm: layers.1.downsample)
    assert {"patch_embed.proj.weight", "layers.1.downsample"} <= groups[0] | _prefixes(partition.groups[0].params, 2)
    assert "layers.1.downsample" not in groups[1]
    assert "layers.2.downsample" in groups[1] and "layers.3.downsample" in groups[2]
    assert not any(n.startswith("patch_embed") for g in partition.groups[1:] for n in g.params)
    cross = partition_subspaces(tiny_vision_model("timm_swin"), "cross")
    even, odd = (_prefixes(g.params, 4) for g in cross.groups)
    assert even == {f"layers.{s}.blocks.0" for s in range(4)} and odd == {f"layers.{s}.blocks.1" for s in range(4)}
    assert any(n.startswith("layers.1.downsample") for n in cross.always_trainable)
    assert any(n.startswith("patch_embed") for n in cross.always_trainable)


def test_convnext_stem_trains_in_every_stage_and_downsample_goes_with_the_stage_before():
    for family, stem, downsample in (
        ("timm_convnext", "stem.", "stages.{}.downsample"),
        ("hf_convnext", "convnext.embeddings.", "convnext.encoder.stages.{}.downsampling_layer"),
    ):
        partition = partition_subspaces(tiny_vision_model(family), "adjacent")
        assert any(n.startswith(stem) for n in partition.always_trainable)
        assert any(n.startswith(downsample.format(1)) for n in partition.groups[0].params)
        assert not any(n.startswith(downsample.format(1)) for n in partition.groups[1].params)


def test_hf_swin_downsample_closes_its_own_stage_and_vit_embeddings_join_g0():
    partition = partition_subspaces(tiny_vision_model("hf_swin"), "adjacent")
    assert any(n.startswith("swin.encoder.layers.0.downsample") for n in partition.groups[0].params)
    assert any(n.startswith("swin.embeddings") for n in partition.groups[0].params)
    vit = partition_subspaces(tiny_vision_model("timm_vit"), "adjacent")
    assert [g.blocks for g in vit.groups] == ["blocks 0-1", "blocks 2-3", "blocks 4-5", "blocks 6-7"]
    assert {"cls_token", "pos_embed"} <= set(vit.groups[0].params)
    assert {"cls_token", "pos_embed"} <= set(
        partition_subspaces(tiny_vision_model("timm_vit"), "cross").always_trainable
    )


@pytest.mark.parametrize("family", ["timm_vit", "timm_swin", "timm_convnext", "hf_vit", "hf_swin", "hf_convnext"])
def test_adapter_mode_stages_only_adapters(family):
    model = prepare_for_tuning(tiny_vision_model(family), VisionTuningArguments(tuning_mode="adapter"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    partition = partition_subspaces(model, "cross")
    staged = [n for g in partition.groups for n in g.params]
    assert staged and all(".adapter." in n for n in staged)
    assert set(trainable) == set(staged) | set(partition.always_trainable)
    assert not any(".adapter." in n for n in partition.always_trainable)
    logits = logits_of(model(tiny_images(family)))
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()


def test_adapter_is_parallel_to_attention_with_paper_init():
    model = tiny_vision_model("timm_vit")
    x = tiny_images("timm_vit")
    plain = logits_of(model(x)).detach()
    prepare_for_tuning(model, VisionTuningArguments(tuning_mode="adapter"))
    adapter = model.blocks[0].attn.adapter
    assert adapter.down.out_features == 32 // 4 and adapter.up.out_features == 32
    assert adapter.up.weight.abs().sum() > 0  # trunc-normal, not zero-init (the reference)
    assert not torch.allclose(logits_of(model(x)), plain)
    for block in model.blocks:
        block.attn.adapter.up.weight.data.zero_()
        block.attn.adapter.up.bias.data.zero_()
    torch.testing.assert_close(logits_of(model(x)), plain)  # adds to the attention output, nothing else


def test_lora_targets_block_projections_and_keeps_the_adapter_reloadable():
    model = prepare_for_tuning(tiny_vision_model("timm_swin"), VisionTuningArguments(tuning_mode="lora"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("attn.qkv.lora_A" in n for n in names) and any("mlp.fc2.lora_B" in n for n in names)
    assert not any("downsample" in n for n in names)
    # timm Swin's final `norm` is also the suffix of patch_embed.norm and downsample.norm: PEFT could not
    # reload it, so only the head is saved with the adapter
    assert _prefixes([n for n in names if ".modules_to_save." in n], 3) == {"base_model.model.head"}
    partition = partition_subspaces(model, "adjacent")
    assert len(partition.groups) == 4 and all("lora_" in n for g in partition.groups for n in g.params)
    vit = prepare_for_tuning(tiny_vision_model("timm_vit"), VisionTuningArguments(tuning_mode="lora"))
    saved = {n for n, p in vit.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    assert _prefixes(saved, 3) == {"base_model.model.norm", "base_model.model.head"}


def _vit_args(tmp_path, **extra) -> VisionModelArguments:
    name, kwargs = TIMM_KWARGS["timm_vit"]
    return VisionModelArguments(model_name_or_path=name, model_kwargs=dict(kwargs), **extra)


def test_checkpoint_loading_with_head_map_backbone_only_and_errors(tmp_path):
    source = load_vision_model(_vit_args(tmp_path), 10)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "map.txt").write_text("7\n8\n9\n")
    mapped = load_vision_model(
        _vit_args(tmp_path, checkpoint=str(tmp_path / "w.safetensors"), head_class_map=str(tmp_path / "map.txt")), 3
    )
    assert torch.equal(mapped.head.weight, source.head.weight[[7, 8, 9]])
    assert torch.equal(mapped.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    resized = load_vision_model(_vit_args(tmp_path, checkpoint=str(tmp_path / "w.safetensors")), 4)
    assert resized.head.out_features == 4 and torch.equal(resized.pos_embed, source.pos_embed)
    # a backbone without its head; a pickled timm checkpoint read with weights_only=True
    torch.save(
        {"model": {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}}, tmp_path / "b.pth"
    )
    backbone = load_vision_model(_vit_args(tmp_path, checkpoint=str(tmp_path / "b.pth")), 5)
    assert torch.equal(backbone.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    with pytest.raises(VisionModelError, match="does not exist"):
        load_vision_model(_vit_args(tmp_path, checkpoint=str(tmp_path / "missing.safetensors")), 5)
    bad = dict(source.state_dict(), pos_embed=torch.zeros(1, 3, 32))
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(VisionModelError, match="pos_embed"):
        load_vision_model(_vit_args(tmp_path, checkpoint=str(tmp_path / "bad.safetensors")), 5)
    with pytest.raises(VisionModelError, match="3 entries but the data has 5"):
        load_vision_model(
            _vit_args(tmp_path, checkpoint=str(tmp_path / "w.safetensors"), head_class_map=str(tmp_path / "map.txt")), 5
        )
    with pytest.raises(VisionModelError, match="JSON object"):
        VisionModelArguments(model_kwargs="{img_size: 16")
    assert vision_data_config(mapped)["input_size"] == (3, 16, 16)


class _Images(Dataset):
    def __init__(self, n: int = 32, size: int = 16, classes: int = 5) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": int(self.y[i])}


def _stack(batch):
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": torch.tensor([b["labels"] for b in batch]),
    }


def _soft(batch):
    out = _stack(batch)
    out["labels"] = torch.nn.functional.one_hot(out["labels"], 5).float()
    return out


def _refuse(batch):
    raise AssertionError("the training collator was used for evaluation")


def test_trainer_dt1_trains_one_stage_at_a_time_with_soft_labels(tmp_path):
    model = tiny_vision_model("timm_vit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = StagedTrainingArguments(
        output_dir=str(tmp_path),
        dt_variant="dt1",
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    snapshots = TrainEndSnapshots()
    trainer = StagedImageClassificationTrainer(
        model=model, args=args, train_dataset=_Images(), eval_dataset=_Images(8), data_collator=_soft,
        eval_data_collator=_stack,
    )  # fmt: skip
    trainer.add_callback(snapshots)
    trainer.train()
    assert [r.steps for r in trainer.stage_records] == [3, 3, 3, 3]
    for stage, snapshot in enumerate(snapshots.seen):
        moved = {n for n, p in snapshot.items() if not torch.equal(p, before[n])}
        assert {n for n in moved if n.startswith("blocks.")} == {
            n for n in before if n.startswith(tuple(f"blocks.{b}." for b in (2 * stage, 2 * stage + 1)))
        }, stage
        assert "head.weight" in moved
        before = snapshot
    trainer.data_collator = _refuse
    assert "eval_loss" in trainer.evaluate()  # mixup-style collators never touch evaluation


def test_drop_path_zero_turns_off_an_architecture_default():
    """timm's Swin defaults to drop-path 0.1: an explicit 0 must reach it, and unset keeps the default."""
    from hf_tuning.tuners.backbones import random_modules

    name, kwargs = TIMM_KWARGS["timm_swin"]
    default = load_vision_model(VisionModelArguments(name, model_kwargs=dict(kwargs)), 5)
    off = load_vision_model(VisionModelArguments(name, model_kwargs=dict(kwargs), drop_path_rate=0.0), 5)
    assert any("drop_path" in found for found in random_modules(default)) and random_modules(off) == []
