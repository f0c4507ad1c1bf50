"""SNELL / SNELLA through ``hf_tuning.tuners``: counts, the checkpointed delta, the sparsification, the allocator,
merge / unmerge, a LLaMA, staged tuning, save / load / push and the errors."""

from __future__ import annotations

import pytest
import torch

from hf_tuning.tuners import (
    PetlBackboneError,
    PetlConfigError,
    SNELLAConfig,
    SNELLConfig,
    get_petl_model,
    load_petl_model,
)
from hf_tuning.tuners.snell.allocator import SparsityAllocator, share_budget
from hf_tuning.tuners.snell.layer import KernelDelta, sparsify
from tests.helpers.fake_hub import FAKE_TOKEN, FakeHub
from tests.helpers.tiny import tiny_llama
from tests.helpers.tiny_vision import tiny_images, tiny_vision_model, train_dt_stages


def _trained_looking(model, seed: int = 1) -> None:
    """Factors far from their tiny initial values, so the deltas change the logits visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_factors" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(("rank", "expected"), [(32, 5_308_416), (8, 1_327_104)])
def test_vit_b16_counts_and_rank_8_equals_lora_8_on_the_six_matrices(rank, expected):
    import timm

    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    petl = get_petl_model(model, SNELLConfig(rank=rank))
    head, class_token = 768 * 10 + 10, 768  # the class token is trained, as in the method
    assert petl.get_nb_trainable_parameters()[0] == expected + head + class_token
    assert len(petl.deltas()) == 72 and {n.rsplit(".", 1)[1] for n in petl.deltas()} == {"q", "k", "v", "delta"}
    # LoRA of the same rank on q, k, v (counted separately), proj, fc1 and fc2
    lora = 12 * rank * (3 * (768 + 768) + (768 + 768) + 2 * (768 + 3072))
    assert (rank != 8) or lora == expected


def test_transformers_vit_b16_has_the_same_count():
    from transformers import ViTConfig, ViTForImageClassification

    petl = get_petl_model(ViTForImageClassification(ViTConfig(num_labels=10)), SNELLConfig(rank=8))
    assert petl.get_nb_trainable_parameters()[0] == 1_327_104 + 768 * 10 + 10 + 768


def test_checkpointed_and_plain_delta_give_the_same_gradients():
    grads = []
    for checkpointed in (True, False):
        petl = get_petl_model(tiny_vision_model("timm_vit"), SNELLConfig(rank=4, checkpoint_delta=checkpointed))
        _trained_looking(petl)
        petl.train()
        torch.manual_seed(3)  # the same dropout and drop-path draws in both runs
        petl(tiny_images("timm_vit")).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in petl.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "_factors" in n)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_sparsify_keeps_the_configured_fraction_and_the_largest_entries(sparsity):
    dense = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    sparse = sparsify(dense, sparsity)
    kept = sparse != 0
    assert kept.sum().item() == dense.numel() - round(sparsity * dense.numel())
    assert dense.abs()[kept].min() > dense.abs()[~kept].max()  # a competition: the largest survive
    torch.testing.assert_close(sparse[kept], (dense * dense.abs())[kept])
    assert sparsify(dense, 0.0) is dense  # sparsity 0 is the dense kernel delta


def test_each_matrix_of_a_model_keeps_its_fraction():
    petl = get_petl_model(tiny_vision_model("timm_vit"), SNELLConfig(rank=4, sparsity=0.75))
    for name, delta in petl.deltas().items():
        with torch.no_grad():
            fraction = (delta() != 0).float().mean().item()
        assert fraction == pytest.approx(0.25, abs=1.0 / delta().numel()), name


def test_allocator_budget_follows_its_cubic_schedule():
    deltas = {f"m{i}": KernelDelta(16, 16 * (i + 1), 4, 0.1, mixing=True) for i in range(3)}
    allocator = SparsityAllocator(deltas, initial_sparsity=0.1, target_sparsity=0.8, beta1=0.85, beta2=0.85)
    total = sum(16 * 16 * (i + 1) for i in range(3))
    budgets = [allocator.budget(e, 10) for e in range(11)]
    assert budgets[0] == pytest.approx(0.9 * total) and budgets[10] == pytest.approx(0.2 * total)
    assert all(a > b for a, b in zip(budgets, budgets[1:]))
    assert budgets[5] == pytest.approx(0.2 * total + 0.7 * total * 0.5**3)
    sparsities = allocator.reallocate(5, 10)
    nonzeros = sum((1 - s) * 16 * 16 * (i + 1) for i, s in enumerate(sparsities.values()))
    assert budgets[5] - 3 <= nonzeros <= budgets[5]


def test_allocator_moves_budget_towards_the_more_important_matrix():
    deltas = {"busy": KernelDelta(32, 32, 4, 0.5, mixing=True), "idle": KernelDelta(32, 32, 4, 0.5, mixing=True)}
    allocator = SparsityAllocator(deltas, initial_sparsity=0.5, target_sparsity=0.9, beta1=0.85, beta2=0.85)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):  # noisy, large gradients on one matrix, small on the other
        for name, scale in (("busy", 1.0), ("idle", 0.01)):
            for factors in (deltas[name].in_factors, deltas[name].out_factors):
                factors.grad = scale * torch.randn(factors.shape, generator=generator)
        assert allocator.update_importance() == 4
    scores = allocator.scores()
    assert scores["busy"] > 0.9 and sum(scores.values()) == pytest.approx(1.0)
    allocator.reallocate(1, 4)
    assert deltas["busy"]._sparsity < 0.5 < deltas["idle"]._sparsity
    assert float(deltas["busy"].sparsity) == pytest.approx(deltas["busy"]._sparsity)


def test_share_budget_hands_what_a_full_matrix_cannot_take_to_the_others():
    given = share_budget(150, {"a": 0.9, "b": 0.1}, {"a": 100, "b": 100})
    assert given == {"a": 100, "b": 50}


@pytest.mark.parametrize("config", [SNELLConfig(rank=4, sparsity=0.8), SNELLAConfig(rank=4)])
def test_merged_equals_unmerged_and_unmerge_restores_the_weights(config):
    petl = get_petl_model(tiny_vision_model("timm_vit"), config)
    _trained_looking(petl)
    petl.eval()
    weights = {n: p.detach().clone() for n, p in petl.base_model.named_parameters() if "base_layer" in n}
    x = tiny_images("timm_vit")
    with torch.no_grad():
        unmerged = petl(x)
        petl.merge()
        assert petl.merged
        merged = petl(x)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    changed = [n for n, p in petl.base_model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert len(changed) == len(weights) // 2  # every adapted weight moved (the biases did not)
    petl.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        petl(x)
    petl.unmerge()
    for name, weight in petl.base_model.named_parameters():
        if name in weights:
            torch.testing.assert_close(weight, weights[name], rtol=0, atol=1e-6)


def test_snell_on_a_llama_targets_its_seven_projections_and_merges(tmp_path):
    llama = tiny_llama(layers=2)
    petl = get_petl_model(llama, SNELLConfig(rank=4, sparsity=0.5, dropout=0.0, drop_path=0.0))
    assert {name.split(".")[-1] for name in petl.snell_layers()} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    assert petl.pipeline_tag == "text-generation" and petl.config is llama.config  # the base model's attributes
    trainable = {n for n, p in petl.named_parameters() if p.requires_grad}
    assert trainable and all("_factors" in n for n in trainable)  # no head, no class token on a causal LM
    _trained_looking(petl)
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    out = petl(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(petl.get_parameter(n).grad is not None for n in trainable)
    petl.eval()
    with torch.no_grad():
        unmerged = petl(input_ids=ids).logits
        petl.merge()
        torch.testing.assert_close(petl(input_ids=ids).logits, unmerged, rtol=0, atol=1e-5)
        generated = petl.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    card = (petl.save_pretrained(tmp_path / "llama-snell") / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
    assert "classifier" not in card and "imagefolder" not in card


def test_dt1_stages_move_only_the_active_blocks_deltas(tmp_path):
    petl = get_petl_model(tiny_vision_model("timm_vit"), SNELLConfig(rank=4, sparsity=0.5))
    before = {n: p.detach().clone() for n, p in petl.named_parameters()}
    _, snapshots = train_dt_stages(petl, tmp_path)
    method = {n for n in before if "_factors" in n}
    for stage, snapshot in enumerate(snapshots.seen):
        moved = {n for n, p in snapshot.items() if not torch.equal(p, before[n])}
        blocks = tuple(f"base_model.blocks.{b}." for b in (2 * stage, 2 * stage + 1))
        active = {n for n in method if n.startswith(blocks)}
        extra = {"base_model.head.weight", "base_model.head.bias"} | ({"base_model.cls_token"} if stage == 0 else set())
        assert moved == active | extra, stage
        before = snapshot


def test_snella_allocates_inside_the_trainer_after_the_first_epoch(tmp_path):
    petl = get_petl_model(tiny_vision_model("timm_vit"), SNELLAConfig(rank=4, sparsity=0.1, target_sparsity=0.9))
    start = {n: d._sparsity for n, d in petl.deltas().items()}
    trainer, _ = train_dt_stages(petl, tmp_path, variant="ost", steps=6)  # 24 images / batch 8: two epochs
    after = {n: d._sparsity for n, d in petl.deltas().items()}
    assert petl.allocator.allocated_epoch == 1
    assert after != start and len(set(after.values())) > 1  # the matrices now differ
    sizes = {n: d.kernel().numel() for n, d in petl.deltas().items()}
    nonzeros = sum((1 - after[n]) * sizes[n] for n in sizes)
    assert nonzeros == pytest.approx(petl.allocator.budget(1, trainer.state.num_train_epochs), abs=len(sizes))


def test_save_load_and_push_give_identical_logits_merged_or_not(tmp_path, fake_hub: FakeHub):
    petl = get_petl_model(tiny_vision_model("timm_vit"), SNELLAConfig(rank=4))
    _trained_looking(petl)
    for i, delta in enumerate(petl.deltas().values()):
        delta.set_sparsity(0.1 + 0.05 * (i % 10))  # as an allocator leaves them: saved, not rebuilt from the config
    petl.eval()
    x = tiny_images("timm_vit")
    with torch.no_grad():
        expected = petl(x)
    petl.save_pretrained(tmp_path / "snella")
    petl.push_to_hub("user/vit-snella", token=FAKE_TOKEN)
    for source in (tmp_path / "snella", "user/vit-snella"):
        reloaded = load_petl_model(tiny_vision_model("timm_vit"), source)
        assert reloaded.petl_config == petl.petl_config
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
            reloaded.merge()
            torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"rank": 3}, "even integer"),
        ({"dropout": 1.5}, "dropout"),
        ({"target_modules": "qkv"}, "list of names"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(PetlConfigError, match=message):
        SNELLConfig(**settings)


def test_models_the_config_does_not_fit_are_refused_before_any_change():
    model = tiny_vision_model("timm_vit")  # width 32
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(PetlConfigError, match=r"rank 34 is larger than the width 32 of blocks.0.attn.qkv"):
        get_petl_model(model, SNELLConfig(rank=34))
    with pytest.raises(PetlConfigError, match="no nn.Linear of VisionTransformer matches target_modules"):
        get_petl_model(model, SNELLConfig(target_modules=["q_proj"]))
    with pytest.raises(PetlConfigError, match="modules_to_save names 'classifier'"):
        get_petl_model(model, SNELLConfig(modules_to_save=["classifier"]))
    assert [n for n, _ in model.named_modules()] == names  # untouched
    with pytest.raises(PetlConfigError, match="target_sparsity"):
        SNELLAConfig(sparsity=0.5, target_sparsity=0.2)
    with pytest.raises(PetlConfigError, match="unknown snell setting"):
        SNELLConfig.from_dict({"method": "snell", "rnak": 8})


def test_a_model_without_blocks_or_head_gets_a_clear_error():
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(PetlBackboneError, match="name them with target_modules"):
        get_petl_model(plain, SNELLConfig(rank=4))
    with pytest.raises(PetlConfigError, match="pass modules_to_save"):
        get_petl_model(plain, SNELLConfig(rank=4, target_modules=["0"]))
    petl = get_petl_model(plain, SNELLConfig(rank=4, target_modules=["0"], modules_to_save=["2"]))
    assert petl.get_nb_trainable_parameters()[0] == (8 + 8) * 4 + 8 * 2 + 2


def test_snella_resumes_exactly_with_its_allocator_state(tmp_path):
    """Resumed mid-run (after one reallocation, before the next), SNELLA ends where the straight run ends: the
    importance statistics travel in the checkpoint, and an epoch already allocated is not allocated again."""
    import shutil

    from hf_tuning import StagedTrainingArguments
    from hf_tuning.tuners.checkpoints import TRAINING_STATE_FILE
    from hf_tuning.vision import StagedImageClassificationTrainer
    from tests.helpers.tiny_vision import TinyImages

    def run(out, resume=None):
        petl = get_petl_model(tiny_vision_model("timm_vit"), SNELLAConfig(rank=4, sparsity=0.1, target_sparsity=0.9))
        args = StagedTrainingArguments(
            output_dir=str(out), dt_variant="ost", max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
            report_to=[], save_strategy="steps", save_steps=4, use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        StagedImageClassificationTrainer(model=petl, args=args, train_dataset=TinyImages()).train(resume)
        return petl

    straight = run(tmp_path / "straight")  # 3 steps per epoch: allocations at steps 3 and 6
    checkpoint = next((tmp_path / "straight").glob("stage-*/checkpoint-4"))
    assert (checkpoint / TRAINING_STATE_FILE).is_file()
    resumed_dir = tmp_path / "resumed" / checkpoint.parent.name
    shutil.copytree(checkpoint, resumed_dir / checkpoint.name)
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.allocator.allocated_epoch == straight.allocator.allocated_epoch == 2
    for mine, theirs in ((resumed.adapter_state_dict(), straight.adapter_state_dict()),
                         (resumed.training_state_dict(), straight.training_state_dict())):  # fmt: skip
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
