"""DTL / DTL+ through ``hf_tuning.tuners``: counts, the walk's invariants, the no-grad prefix and the feature
cache, staged tuning over the side network, save / load / push, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hf_tuning import StagedTrainingArguments
from hf_tuning.tuners import (
    DTLConfig,
    PetlBackboneError,
    PetlConfigError,
    get_petl_model,
    load_petl_model,
)
from hf_tuning.tuners.config import parse_block_indices
from hf_tuning.vision import StagedImageClassificationTrainer
from tests.helpers.fake_hub import FAKE_TOKEN, FakeHub
from tests.helpers.tiny_vision import TIMM_KWARGS, TinyImages, tiny_images, tiny_vision_model, train_dt_stages


def _vit_b16(library: str = "timm"):
    if library == "timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(num_labels=10))  # the ViT-B/16 layout


def _head_numel(model) -> int:
    head = model.head if hasattr(model, "head") else model.classifier
    return sum(p.numel() for p in head.parameters())


def _randomise_side_network(model, seed: int = 1) -> None:
    """Trained-looking side network: the up-projections start at zero, which would hide most bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dtl_map" in name or "dtl_fuse" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize(("kernel_size", "expected"), [(0, 36_864), (3, 43_776), (5, 56_064)])
def test_vit_b16_trainable_counts(kernel_size, expected):
    model = _vit_b16()
    head = _head_numel(model)
    petl = get_petl_model(model, DTLConfig(rank=2, kernel_size=kernel_size))
    trainable, total = petl.get_nb_trainable_parameters()
    assert trainable == expected + head
    assert petl.map_blocks == tuple(range(12)) and petl.add_after_blocks == tuple(range(6, 12))
    assert total == sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in petl.dtl_fuse.parameters())


def test_transformers_vit_b16_has_the_same_count_as_timm():
    model = _vit_b16("transformers")
    petl = get_petl_model(model, DTLConfig(rank=2))
    assert petl.get_nb_trainable_parameters()[0] == 36_864 + _head_numel(model)
    assert petl(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_print_trainable_parameters(capsys):
    petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig())
    petl.print_trainable_parameters()
    assert capsys.readouterr().out.startswith(f"trainable params: {petl.get_nb_trainable_parameters()[0]:,} ||")


def test_untrained_side_network_is_the_frozen_backbone_with_patch_mean_pooling():
    """The up-projections start at zero, so DTL starts as the backbone read out by the mean of its patch
    tokens, which is exactly a timm ViT built with global_pool='avg'."""
    name, kwargs = TIMM_KWARGS["timm_vit"]
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model(name, num_classes=5, global_pool="avg", **kwargs).eval()
    x = tiny_images("timm_vit")
    with torch.no_grad():
        expected = backbone(x)
        petl = get_petl_model(backbone, DTLConfig(kernel_size=3)).eval()
        torch.testing.assert_close(petl(x), expected, rtol=0, atol=1e-6)


def test_only_the_side_network_and_head_train_and_maps_sit_in_their_blocks():
    petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(kernel_size=3))
    trainable = [n for n, p in petl.named_parameters() if p.requires_grad]
    assert trainable == list(petl.adapter_names)
    assert {n.split(".dtl_map")[0] for n in trainable if "dtl_map" in n} == {f"base_model.blocks.{i}" for i in range(8)}
    assert set(trainable) - {n for n in trainable if "dtl_map" in n} == {
        "base_model.head.weight",
        "base_model.head.bias",
        "dtl_fuse.0.conv.weight",
    }
    layer = petl.base_model.blocks[0].dtl_map
    assert torch.count_nonzero(layer.up) == 0 and torch.count_nonzero(layer.down) > 0


def test_dtl_plus_convolution_skips_the_class_token():
    petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(kernel_size=3))
    conv = petl.dtl_fuse["0"]
    tokens = torch.randn(2, 1 + 16, 32)
    out = conv(tokens, num_prefix=1, grid=(4, 4))
    assert torch.equal(out[:, 0], tokens[:, 0]) and not torch.equal(out[:, 1:], tokens[:, 1:])


def test_swin_sum_restarts_at_every_stage():
    """The side output added after stage 3's block 7 holds stage 3's maps only, not stage 2's."""
    model = tiny_vision_model("timm_swin")  # depths 2,2,2,2: blocks 4-5 in stage 2, 6-7 in stage 3
    petl = get_petl_model(model, DTLConfig(rank=2, map_blocks="4-7", add_after_blocks="5,7"))
    _randomise_side_network(petl)
    inputs, sums = {}, {}
    for index, block in ((6, model.layers[3].blocks[0]), (7, model.layers[3].blocks[1])):
        block.register_forward_pre_hook(lambda m, args, index=index: inputs.__setitem__(index, args[0]))
    add_back = petl._add_back
    petl._add_back = lambda index, x, h: (sums.__setitem__(index, h), add_back(index, x, h))[1]
    with torch.no_grad():
        petl(tiny_images("timm_swin"))
        expected = model.layers[3].blocks[0].dtl_map(inputs[6]) + model.layers[3].blocks[1].dtl_map(inputs[7])
    torch.testing.assert_close(sums[7], expected, rtol=1e-6, atol=1e-7)
    assert sorted(sums) == [5, 7]


def test_swin_defaults_follow_the_last_two_stages_and_one_convolution_per_stage():
    petl = get_petl_model(tiny_vision_model("timm_swin"), DTLConfig(rank=2, kernel_size=3))
    # the second half of the mapped blocks, and stage 2's last block so its maps reach the output
    assert petl.map_blocks == (4, 5, 6, 7) and petl.add_after_blocks == (5, 6, 7)
    assert sorted(petl.dtl_fuse) == ["2", "3"]
    petl = get_petl_model(tiny_vision_model("timm_swin"), DTLConfig(kernel_size=3, map_blocks="6-7"))
    assert petl.add_after_blocks == (7,) and sorted(petl.dtl_fuse) == ["3"]
    assert petl(tiny_images("timm_swin")).shape == (4, 5)


@pytest.mark.parametrize("family", ["timm_vit", "hf_vit", "timm_swin"])
def test_no_grad_prefix_gives_the_same_outputs_and_gradients(family):
    results = []
    for no_grad_prefix in (True, False):
        petl = get_petl_model(tiny_vision_model(family), DTLConfig(kernel_size=3, no_grad_prefix=no_grad_prefix))
        _randomise_side_network(petl)
        logits = petl(tiny_images(family))
        logits.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in petl.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for g in grads.values())
        results.append((logits.detach(), grads))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)


def _train(petl, images: torch.Tensor, labels: torch.Tensor, epochs: int = 3) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.AdamW([p for p in petl.parameters() if p.requires_grad], lr=1e-2)
    order = torch.Generator().manual_seed(0)
    petl.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=order).split(4):
            loss = torch.nn.functional.cross_entropy(petl(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {n: p.detach().clone() for n, p in petl.named_parameters() if p.requires_grad}


def test_feature_cache_trains_like_no_cache_and_runs_the_prefix_once_per_image():
    images, labels = tiny_images("timm_vit", batch=12, seed=3), torch.arange(12) % 5
    trained, prefix_calls = [], []
    for cache in (False, True):
        petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(kernel_size=3, cache_prefix_features=cache))
        calls = []
        petl.base_model.blocks[0].register_forward_hook(lambda m, i, o, calls=calls: calls.append(len(i[0])))
        trained.append(_train(petl, images, labels))
        prefix_calls.append(sum(calls))
    assert prefix_calls == [36, 12]  # 3 epochs of 12 images, or each image once
    assert len(petl._cache) == 12
    petl.eval()
    with torch.no_grad():
        petl(images[:4])
    assert sum(calls) == 12 + 4  # evaluation runs the prefix: its images are not kept
    for name in trained[0]:
        torch.testing.assert_close(trained[1][name], trained[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_feature_cache_is_refused_with_drop_path_in_front_of_it():
    name, kwargs = TIMM_KWARGS["timm_vit"]
    from hf_tuning.vision import VisionModelArguments, load_vision_model

    model = load_vision_model(VisionModelArguments(name, model_kwargs=dict(kwargs), drop_path_rate=0.1), 5)
    with pytest.raises(PetlConfigError, match=r"cache_prefix_features .*blocks\.1\.drop_path1 \(p=0\.01"):
        get_petl_model(model, DTLConfig(cache_prefix_features=True))
    get_petl_model(load_vision_model(VisionModelArguments(name, model_kwargs=dict(kwargs)), 5), DTLConfig())


def test_dt1_moves_exactly_the_active_stage_maps(tmp_path):
    petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(kernel_size=3))
    before = {n: p.detach().clone() for n, p in petl.named_parameters()}
    trainer, snapshots = train_dt_stages(petl, tmp_path)
    assert [r.steps for r in trainer.stage_records] == [2, 2, 2, 2]
    always = {"base_model.head.weight", "base_model.head.bias", "dtl_fuse.0.conv.weight"}
    for stage, snapshot in enumerate(snapshots.seen):
        moved = {n for n, p in snapshot.items() if not torch.equal(p, before[n])}
        active = {f"base_model.blocks.{b}.dtl_map.{w}" for b in (2 * stage, 2 * stage + 1) for w in ("down", "up")}
        assert moved == active | always, stage
        before = snapshot


def test_save_and_load_give_identical_logits(tmp_path):
    petl = get_petl_model(tiny_vision_model("hf_vit"), DTLConfig(kernel_size=3, base_model_name_or_path="tiny-vit"))
    _randomise_side_network(petl)
    folder = petl.save_pretrained(tmp_path / "dtl")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["method"] == "dtl" and saved["kernel_size"] == 3 and saved["base_model_name_or_path"] == "tiny-vit"
    card = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert card["library_name"] == "hf_tuning" and "dtl" in card["tags"]

    reloaded = load_petl_model(tiny_vision_model("hf_vit"), folder)
    x = tiny_images("hf_vit")
    with torch.no_grad():
        assert torch.equal(reloaded(x), petl.eval()(x))
    assert not any(p.requires_grad for p in reloaded.parameters()) and not reloaded.training
    trainable = load_petl_model(tiny_vision_model("hf_vit"), folder, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == petl.get_nb_trainable_parameters()[0]


def test_push_to_the_hub_and_load_back(fake_hub: FakeHub):
    petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(kernel_size=3))
    _randomise_side_network(petl)
    petl.push_to_hub("user/vit-dtl", token=FAKE_TOKEN)
    repo = fake_hub.repo("user/vit-dtl")
    assert repo.files() == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert all(FAKE_TOKEN.encode() not in (repo.folder / f).read_bytes() for f in repo.files())
    reloaded = load_petl_model(tiny_vision_model("timm_vit"), "user/vit-dtl")
    x = tiny_images("timm_vit")
    with torch.no_grad():
        assert torch.equal(reloaded(x), petl.eval()(x))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: DTLConfig(rank=0), "rank must be a positive integer"),
        (lambda: DTLConfig(kernel_size=-1), "kernel_size must be 0"),
        (
            lambda: DTLConfig(map_blocks="4-7", add_after_blocks="2-7"),
            r"starts at block 2, before the first map \(block 4\)",
        ),
        (lambda: DTLConfig(map_blocks="7-4"), "runs backwards"),
        (lambda: DTLConfig(add_after_blocks="six"), "expected block indices like '6-11'"),
        (lambda: DTLConfig(pooling="max"), "pooling must be"),
        (lambda: DTLConfig.from_dict({"method": "dtl", "rnak": 2}), r"unknown dtl setting\(s\) rnak"),
        (lambda: DTLConfig.from_dict({"method": "snell"}), "is a 'snell' config, not 'dtl'"),
    ],
)
def test_bad_configs_are_refused(config, message):
    with pytest.raises(PetlConfigError, match=message):
        config()


@pytest.mark.parametrize(
    ("family", "config", "message"),
    [
        ("timm_vit", DTLConfig(rank=33), "rank 33 is larger than the width 32 of block 0"),
        ("timm_vit", DTLConfig(add_after_blocks="6-8"), r"names block 8, beyond the depth .* \(8 blocks: 0-7\)"),
        (
            "timm_swin",
            DTLConfig(add_after_blocks="2"),
            "add_after_blocks has block 2, but no mapped block comes at or before",
        ),
        (
            "timm_swin",
            DTLConfig(map_blocks="4-5", add_after_blocks="5-6"),
            r"block 6, but no mapped block .* in stage 3 \(the sum restarts",
        ),
        ("timm_swin", DTLConfig(map_blocks="4-7", add_after_blocks="6-7"), r"map_blocks has block 4, but no add-back"),
        ("timm_vit", DTLConfig(map_blocks="0-7", add_after_blocks="3"), r"map_blocks has block 4, but no add-back"),
    ],
)
def test_configs_that_do_not_fit_the_backbone_are_refused(family, config, message):
    with pytest.raises(PetlConfigError, match=message):
        get_petl_model(tiny_vision_model(family), config)


@pytest.mark.parametrize("family", ["timm_convnext", "hf_swin", "hf_convnext"])
def test_a_backbone_without_a_dtl_form_is_refused(family):
    with pytest.raises(PetlBackboneError, match="DTL has no form for .* it supports: timm VisionTransformer"):
        get_petl_model(tiny_vision_model(family), DTLConfig())


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an adapter folder nor a Hub repo id"):
        load_petl_model(tiny_vision_model("timm_vit"), tmp_path / "nowhere" / "deeper")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(PetlConfigError, match="a PEFT adapter: load it with peft.PeftModel"):
        load_petl_model(tiny_vision_model("timm_vit"), tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "adapter_config.json").write_text("{}")
        load_petl_model(tiny_vision_model("timm_vit"), tmp_path / "half")
    folder = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig()).save_pretrained(tmp_path / "dtl")
    with pytest.raises(PetlConfigError, match="does not match this dtl model: missing .*unexpected"):
        load_petl_model(tiny_vision_model("timm_vit"), folder, is_trainable=True).load_adapter_state_dict(
            {"nothing": torch.zeros(1)}
        )
    with pytest.raises(PetlConfigError, match="unknown method 'magic'"):
        (folder / "adapter_config.json").write_text(json.dumps({"method": "magic"}))
        load_petl_model(tiny_vision_model("timm_vit"), folder)


def test_modules_to_save_in_front_of_the_first_add_back_need_the_autograd_prefix():
    model = tiny_vision_model("timm_vit")
    with pytest.raises(PetlConfigError, match=r"patch_embed\.proj\.weight, .* train in front of the first add-back"):
        get_petl_model(model, DTLConfig(modules_to_save=["head", "patch_embed"]))
    assert not any("dtl_map" in name for name, _ in model.named_parameters())  # refused before any change
    petl = get_petl_model(model, DTLConfig(modules_to_save=["head", "patch_embed"], no_grad_prefix=False))
    assert "base_model.patch_embed.proj.weight" in petl.adapter_names
    petl(tiny_images("timm_vit")).sum().backward()
    assert petl.base_model.patch_embed.proj.weight.grad is not None
    with pytest.raises(PetlConfigError, match="modules_to_save names 'classifier'"):
        get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(modules_to_save=["classifier"]))


def test_a_model_takes_one_method_only():
    petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig())
    with pytest.raises(PetlConfigError, match="already carries a dtl method"):
        get_petl_model(petl, DTLConfig())


def test_block_index_parsing():
    assert parse_block_indices("0-3,8, 5", "x") == (0, 1, 2, 3, 5, 8)
    assert parse_block_indices(7, "x") == (7,) and parse_block_indices([3, 1, 3], "x") == (1, 3)
    assert parse_block_indices(None, "x") is None
    with pytest.raises(PetlConfigError, match="block indices start at 0"):
        parse_block_indices([-1], "x")


def test_the_saved_state_is_what_a_checkpoint_holds(tmp_path: Path):
    """Checkpoints of the trainer are adapter folders and resume reads them back (not the frozen backbone)."""
    petl = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(kernel_size=3))
    args = StagedTrainingArguments(
        output_dir=str(tmp_path), dt_variant="ost", max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="steps", save_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = StagedImageClassificationTrainer(model=petl, args=args, train_dataset=TinyImages())
    trainer.train()
    checkpoint = next(tmp_path.rglob("checkpoint-1"))
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    fresh = get_petl_model(tiny_vision_model("timm_vit"), DTLConfig(kernel_size=3))
    StagedImageClassificationTrainer(model=fresh, args=args, train_dataset=TinyImages())._load_from_checkpoint(
        str(checkpoint)
    )
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert all(torch.equal(fresh.adapter_state_dict()[n], saved[n]) for n in saved)
