"""DyT through ``hf_tuning.tuners``: counts, the gate, the efficient path against the masked one, the method's
loss with and without distillation, the MoE adapter, staged tuning, save / load / push and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_tuning.tuners import DyTConfig, PetlBackboneError, PetlConfigError, get_petl_model, load_petl_model
from hf_tuning.tuners.dyt.layer import MoEAdapter, token_gate
from tests.helpers.fake_hub import FAKE_TOKEN, FakeHub
from tests.helpers.tiny_vision import tiny_images, tiny_vision_model, train_dt_stages


def _trained_looking(model, seed: int = 1) -> None:
    """Non-zero adapters and routers that keep about half the tokens: zero-initialised up-projections would
    hide most bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dyt_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize(("bottleneck", "expected"), [(16, 313_548), (8, 165_996)])
def test_vit_b16_trainable_counts(bottleneck, expected):
    import timm

    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    petl = get_petl_model(model, DyTConfig(bottleneck=bottleneck))
    assert petl.get_nb_trainable_parameters()[0] == expected + 768 * 10 + 10


def test_transformers_vit_b16_has_the_same_count():
    from transformers import ViTConfig, ViTForImageClassification

    petl = get_petl_model(ViTForImageClassification(ViTConfig(num_labels=10)), DyTConfig(bottleneck=16))
    assert petl.get_nb_trainable_parameters()[0] == 313_548 + 768 * 10 + 10


def test_untrained_adapters_and_all_tokens_kept_give_the_backbone():
    model = tiny_vision_model("timm_vit").eval()
    x = tiny_images("timm_vit")
    with torch.no_grad():
        expected = model(x)
        petl = get_petl_model(model, DyTConfig()).eval()
        torch.testing.assert_close(petl(x, dispatch="complete"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["timm_vit", "hf_vit"])
@pytest.mark.parametrize("batch", [1, 5])
def test_efficient_path_equals_masked_path_and_skips_the_dropped_tokens(family, batch):
    petl = get_petl_model(tiny_vision_model(family), DyTConfig())
    _trained_looking(petl)
    petl.eval()
    mlps = [block.mlp for block in (petl.base_model.blocks if family == "timm_vit" else petl.base_model.vit.layers)]
    rows: list[int] = []
    for mlp in mlps:
        mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    x = tiny_images(family, batch=batch, seed=4)
    with torch.no_grad():
        masked = petl(x, dispatch="masked")
        gates = [g.clone() for g in petl.last_gates]
        rows.clear()
        efficient = petl(x)
    torch.testing.assert_close(efficient, masked, rtol=0, atol=1e-5)
    assert [int(g.sum()) + batch for g in gates] == rows  # class tokens always pass
    assert 0.2 < float(petl.keep_rate()) < 0.8 and sum(rows) < len(mlps) * batch * 17


def test_gate_is_hard_with_a_straight_through_gradient_and_deterministic_in_evaluation():
    torch.manual_seed(0)
    logits = torch.randn(4, 50, requires_grad=True)
    gates = token_gate(logits, temperature=5.0, training=True)
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    gates.sum().backward()
    soft_grad = torch.sigmoid(torch.zeros(1)) * (1 - torch.sigmoid(torch.zeros(1))) / 5
    assert logits.grad.abs().max() <= soft_grad + 1e-6 and logits.grad.abs().min() > 0
    assert torch.equal(token_gate(logits, 5.0, training=False), (logits > 0).float())
    keep = torch.stack([token_gate(torch.full((20000,), 1.0), 5.0, True).mean() for _ in range(3)]).mean()
    assert abs(float(keep) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.01  # logistic noise: P(keep) = sigmoid(l)


def test_rate_loss_and_distillation_terms():
    labels = torch.tensor([0, 1, 2, 3])
    petl = get_petl_model(tiny_vision_model("timm_vit"), DyTConfig(distillation=True, adapter_dropout=0.0))
    _trained_looking(petl)
    petl.train()
    logits = petl(tiny_images("timm_vit"))
    complete = petl.last_complete_logits
    rate = torch.cat([g.reshape(-1) for g in petl.last_gates]).mean()
    expected = 2.0 * (rate - 0.5) ** 2 + F.cross_entropy(complete, labels)
    expected = expected + F.kl_div(F.log_softmax(logits, -1), F.softmax(complete.detach(), -1), reduction="batchmean")
    loss = petl.extra_loss(logits, labels, F.cross_entropy)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the complete pass ignores the gates: the routers learn from the gated pass only
    F.cross_entropy(complete, labels).backward()
    assert all(p.grad is None for n, p in petl.named_parameters() if "dyt_router" in n)
    petl.zero_grad()
    petl(tiny_images("timm_vit"))
    petl.extra_loss(petl(tiny_images("timm_vit")), labels, F.cross_entropy).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in petl.named_parameters() if "dyt_router" in n)
    plain = get_petl_model(tiny_vision_model("timm_vit"), DyTConfig()).train()
    plain(tiny_images("timm_vit"))
    assert plain.last_complete_logits is None


def test_moe_experts_receive_distinct_gradients_and_cost_one_adapter_per_token():
    torch.manual_seed(0)
    moe = MoEAdapter(dim=32, bottleneck=8, num_experts=4, dropout=0.0)
    x, target = torch.randn(6, 17, 32), torch.randn(6, 17, 32)
    (moe(x) * target).sum().backward()  # at initialisation: up-projections zero, routing nearly uniform
    assert moe.router.weight.grad is None or moe.router.weight.grad.abs().sum() == 0  # nothing flows yet
    assert (moe.up_weight.grad.reshape(4, -1).norm(dim=1) > 0).all()
    with torch.no_grad():  # a trained state: non-zero experts, routing that differs between images
        moe.up_weight.normal_(std=0.1)
        moe.router.weight.normal_(std=1.0)
    moe.zero_grad()
    (moe(x) * target).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # the router learns from the experts' differences
    for grads in (moe.down_weight.grad.reshape(4, -1), moe.up_weight.grad.reshape(4, -1)):
        cosine = F.cosine_similarity(grads[:, None], grads[None], dim=-1)
        assert (cosine.triu(1).abs() < 0.99).all() and (grads.norm(dim=1) > 0).all()
    from torch.utils.flop_counter import FlopCounterMode

    def flops(module) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        return counter.get_total_flops()

    single = flops(torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 32)))
    assert flops(moe) < 1.5 * single  # the experts are mixed per image, not run per token
    petl = get_petl_model(tiny_vision_model("timm_vit"), DyTConfig(num_experts=4, bottleneck=8))
    assert isinstance(petl.base_model.blocks[0].dyt_adapter, MoEAdapter)
    assert petl(tiny_images("timm_vit")).shape == (4, 5)


def test_dt1_moves_exactly_the_active_stage_routers_and_adapters(tmp_path):
    petl = get_petl_model(tiny_vision_model("timm_vit"), DyTConfig(adapter_dropout=0.0))
    _trained_looking(petl)
    before = {n: p.detach().clone() for n, p in petl.named_parameters()}
    trainer, snapshots = train_dt_stages(petl, tmp_path)
    method = {n for n in before if "dyt_" in n}
    for stage, snapshot in enumerate(snapshots.seen):
        moved = {n for n, p in snapshot.items() if not torch.equal(p, before[n])}
        active = {
            n for n in method if n.startswith(tuple(f"base_model.blocks.{b}." for b in (2 * stage, 2 * stage + 1)))
        }
        assert moved == active | {"base_model.head.weight", "base_model.head.bias"}, stage
        before = snapshot


def test_save_load_and_push_give_identical_logits(tmp_path, fake_hub: FakeHub):
    petl = get_petl_model(tiny_vision_model("timm_vit"), DyTConfig(num_experts=2))
    _trained_looking(petl)
    petl.eval()
    x = tiny_images("timm_vit")
    with torch.no_grad():
        expected = petl(x)
    petl.save_pretrained(tmp_path / "dyt")
    reloaded = load_petl_model(tiny_vision_model("timm_vit"), tmp_path / "dyt")
    assert reloaded.petl_config == petl.petl_config
    petl.push_to_hub("user/vit-dyt", token=FAKE_TOKEN)
    pulled = load_petl_model(tiny_vision_model("timm_vit"), "user/vit-dyt")
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected) and torch.equal(pulled(x), expected)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: DyTConfig(target_rate=0.0), PetlConfigError, r"target_rate must be in \(0, 1\]"),
        (lambda: DyTConfig(target_rate=1.5), PetlConfigError, r"target_rate must be in \(0, 1\]"),
        (lambda: DyTConfig(bottleneck=0), PetlConfigError, "bottleneck must be a positive integer"),
        (lambda: get_petl_model(tiny_vision_model("timm_vit"), DyTConfig(bottleneck=33)), PetlConfigError,
         "bottleneck 33 is larger than the width 32"),
        (lambda: get_petl_model(tiny_vision_model("timm_swin"), DyTConfig()), PetlBackboneError,
         "DyT has no form for .*timm VisionTransformer; transformers"),
        (lambda: get_petl_model(tiny_vision_model("hf_convnext"), DyTConfig()), PetlBackboneError, "DyT has no form"),
        (lambda: DyTConfig.from_dict({"method": "dyt", "ratio": 0.5}), PetlConfigError, r"unknown dyt setting\(s\) ratio"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_the_gather_path_is_refused_in_training():
    petl = get_petl_model(tiny_vision_model("timm_vit"), DyTConfig()).train()
    with pytest.raises(ValueError, match="the gather path is for inference"):
        petl(tiny_images("timm_vit"), dispatch="gather")
