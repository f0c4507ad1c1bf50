"""ChainOfForgettingTrainer: batch composition, timesteps, labels, loss, EMA, resume, staging, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datasets_builders.diffusion import DiffusionDataArguments, load_target_dataset
from hf_tuning.diffusion import (
    EMA_FILE,
    EMA_SUBFOLDER,
    ChainOfForgettingConfig,
    ChainOfForgettingTrainer,
    DiffusionSetupError,
    KnowledgeBank,
    check_vae_matches,
)
from tests.helpers.tiny_dit import bank_folder, image_folder, tiny_dit, tiny_vae

NULL = 5  # tiny_dit(classes=5): label rows 0..4, null row 5


def make_config(tmp_path: Path, **overrides) -> ChainOfForgettingConfig:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "cof_bank_fraction": 0.25,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return ChainOfForgettingConfig(**settings)


def target_data(tmp_path: Path, size: int = 8, channels: int = 1):
    root = image_folder(tmp_path / "target", classes=3, per_class=6, size=size, mode="L" if channels == 1 else "RGB")
    return load_target_dataset(DiffusionDataArguments(data_dir=str(root), image_size=size, image_channels=channels))


def bank(tmp_path: Path, size: int = 8, channels: int = 1, **kwargs) -> KnowledgeBank:
    folder = bank_folder(tmp_path / "bank", count=10, size=size, mode="L" if channels == 1 else "RGB")
    return KnowledgeBank(folder, image_size=size, channels=channels, **kwargs)


def record_forward_inputs(model) -> list[dict[str, torch.Tensor]]:
    calls: list[dict[str, torch.Tensor]] = []

    def hook(module, args, kwargs):
        calls.append({"timestep": kwargs["timestep"].clone(), "labels": kwargs["class_labels"].clone()})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_batch_mixes_target_and_bank_and_bank_samples_carry_the_null_label(tmp_path):
    model = tiny_dit()
    trainer = ChainOfForgettingTrainer(
        model=model,
        args=make_config(tmp_path, cof_label_dropout=0.0),
        train_dataset=target_data(tmp_path),
        knowledge_bank=bank(tmp_path),
    )
    assert (trainer.bank_batch, trainer.target_batch_size) == (2, 6)
    calls = record_forward_inputs(model)
    trainer.train()
    assert len(calls) == 3
    for call in calls:
        labels = call["labels"]
        assert labels.shape == (8,)
        assert ((labels[:6] >= 0) & (labels[:6] < 3)).all()  # target classes reuse the first rows
        assert (labels[6:] == NULL).all()


def test_reference_split_of_32_is_26_target_and_6_bank(tmp_path):
    trainer = ChainOfForgettingTrainer(
        model=tiny_dit(),
        args=make_config(tmp_path, per_device_train_batch_size=32, cof_bank_fraction=0.2),
        train_dataset=target_data(tmp_path),
        knowledge_bank=bank(tmp_path),
    )
    assert (trainer.target_batch_size, trainer.bank_batch) == (26, 6)
    assert trainer.get_train_dataloader().total_batch_size == 26


def test_label_dropout_is_drawn_once_per_sample_not_per_block(tmp_path):
    model = tiny_dit()
    trainer = ChainOfForgettingTrainer(
        model=model,
        args=make_config(tmp_path, cof_label_dropout=0.5, max_steps=12, per_device_train_batch_size=16),
        train_dataset=target_data(tmp_path),
    )
    embedders = [m for m in model.modules() if hasattr(m, "embedding_table")]
    assert len(embedders) == 4 and all(m.dropout_prob == 0.0 for m in embedders)
    calls = record_forward_inputs(model)
    seen_by_blocks: list[list[torch.Tensor]] = []

    def capture(module, args):
        seen_by_blocks[-1].append(args[0].clone())

    model.register_forward_pre_hook(lambda *_: seen_by_blocks.append([]))
    for embedder in embedders:
        embedder.register_forward_pre_hook(capture)
    trainer.train()
    for call, seen in zip(calls, seen_by_blocks, strict=True):
        assert all(torch.equal(labels, call["labels"]) for labels in seen)  # every block: the same labels
    labels = torch.cat([call["labels"] for call in calls])
    assert 0.35 < (labels == NULL).float().mean().item() < 0.65


def test_timesteps_follow_the_chain_of_forgetting_distributions(tmp_path):
    model = tiny_dit(layers=1)
    trainer = ChainOfForgettingTrainer(
        model=model,
        args=make_config(
            tmp_path, max_steps=8, per_device_train_batch_size=128, cof_bank_fraction=0.5, cof_label_dropout=0.0
        ),
        train_dataset=target_data(tmp_path),  # 18 images: batches of 18 target + 64 bank samples
        knowledge_bank=bank(tmp_path),
    )
    calls = record_forward_inputs(model)
    trainer.train()
    target = torch.cat([c["timestep"][c["labels"] != NULL] for c in calls]).double()
    retained = torch.cat([c["timestep"][c["labels"] == NULL] for c in calls]).double()
    assert len(target) == 8 * 18 and len(retained) == 8 * 64
    # P(t) ~ (t+1): mean 666; Q(t) ~ (1000-t): mean 333; sd about 236: se 20 (target) and 10 (bank)
    assert abs(target.mean().item() - 666.3) < 80
    assert abs(retained.mean().item() - 333.7) < 45


def test_uniform_without_bank_is_plain_finetuning(tmp_path):
    model = tiny_dit(layers=1)
    trainer = ChainOfForgettingTrainer(
        model=model,
        args=make_config(
            tmp_path, cof_timesteps="uniform", cof_label_dropout=0.0, max_steps=8, per_device_train_batch_size=64
        ),
        train_dataset=target_data(tmp_path),
    )
    calls = record_forward_inputs(model)
    trainer.train()
    assert trainer.bank_batch == 0
    assert all(len(c["labels"]) == 18 for c in calls)  # the whole (18-image) dataset, no bank samples
    assert all((c["labels"] < 3).all() for c in calls)
    steps = torch.cat([c["timestep"] for c in calls]).double()
    assert abs(steps.mean().item() - 499.5) < 80  # sd 289 over 144 draws: se 24


def test_loss_is_target_mean_plus_weighted_bank_mean(tmp_path):
    trainer = ChainOfForgettingTrainer(
        model=tiny_dit(layers=1),
        args=make_config(tmp_path, cof_retention_weight=0.1),
        train_dataset=target_data(tmp_path),
        knowledge_bank=bank(tmp_path),
    )
    per_sample = torch.arange(1.0, 9.0)

    def fake_losses(output, x0, xt, t, noise):
        assert len(x0) == 8
        return {"loss": per_sample + 0 * output.sum(), "mse": per_sample, "vb": torch.zeros(8)}

    trainer.diffusion.training_losses = fake_losses
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(per_sample[:6].mean().item() + 0.1 * per_sample[6:].mean().item())


def test_learned_variance_trains_through_the_bound_and_epsilon_through_the_mse(tmp_path):
    trainer = ChainOfForgettingTrainer(
        model=tiny_dit(layers=1), args=make_config(tmp_path), train_dataset=target_data(tmp_path)
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    head = trainer.model.proj_out_2.weight.grad  # rows: patch x patch x (eps, v) channels
    assert head.abs().sum() > 0
    logged = trainer._metrics
    assert logged["cof/vb"] and logged["cof/mse"]


def test_ema_has_a_constant_decay_from_the_pretrained_weights(tmp_path):
    model = tiny_dit(layers=1)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ChainOfForgettingTrainer(
        model=model, args=make_config(tmp_path, max_steps=1, ema_decay=0.9), train_dataset=target_data(tmp_path)
    )
    trainer.train()
    for name, param in model.named_parameters():
        expected = 0.9 * start[name] + 0.1 * param.detach()
        torch.testing.assert_close(trainer.ema.shadow[name], expected, rtol=0, atol=1e-6)
    assert trainer.ema.num_updates == 1


def test_resume_mid_run_is_exact_for_model_ema_and_bank_draws(tmp_path):
    def run(output: str, resume: str | None = None, max_steps: int = 6):
        args = make_config(
            tmp_path,
            output_dir=str(tmp_path / output),
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=3,
            cof_label_dropout=0.3,
            ema_decay=0.5,
        )
        trainer = ChainOfForgettingTrainer(
            model=tiny_dit(layers=2), args=args, train_dataset=target_data(tmp_path), knowledge_bank=bank(tmp_path)
        )
        calls = record_forward_inputs(trainer.model)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, calls

    whole, whole_calls = run("whole")
    checkpoint = tmp_path / "whole" / "stage-0" / "checkpoint-3"
    assert (checkpoint / EMA_FILE).is_file() and (checkpoint / "optimizer.pt").is_file()
    resumed, resumed_calls = run("resumed", resume=str(checkpoint))
    assert len(resumed_calls) == 3
    for a, b in zip(whole_calls[3:], resumed_calls, strict=True):
        assert torch.equal(a["timestep"], b["timestep"]) and torch.equal(a["labels"], b["labels"])
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    for name in whole.ema.shadow:
        assert torch.equal(whole.ema.shadow[name], resumed.ema.shadow[name]), name


def test_resume_from_a_checkpoint_without_ema_is_refused(tmp_path):
    args = make_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    ChainOfForgettingTrainer(model=tiny_dit(layers=1), args=args, train_dataset=target_data(tmp_path)).train()
    checkpoint = Path(args.output_dir) / "stage-0" / "checkpoint-2"
    (checkpoint / EMA_FILE).unlink()
    trainer = ChainOfForgettingTrainer(model=tiny_dit(layers=1), args=args, train_dataset=target_data(tmp_path))
    with pytest.raises(DiffusionSetupError, match="ema.safetensors"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_final_save_writes_the_ema_as_a_diffusers_model(tmp_path):
    from diffusers import DiTTransformer2DModel

    args = make_config(tmp_path, max_steps=2, ema_decay=0.5)
    trainer = ChainOfForgettingTrainer(model=tiny_dit(layers=1), args=args, train_dataset=target_data(tmp_path))
    trainer.train()
    trainer.save_model(args.output_dir)
    reloaded = DiTTransformer2DModel.from_pretrained(str(Path(args.output_dir) / EMA_SUBFOLDER))
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, trainer.ema.shadow[name], rtol=0, atol=0)


def test_staged_tuning_over_dit_blocks(tmp_path):
    model = tiny_dit(layers=4)
    args = make_config(tmp_path, dt_variant="dt1", max_steps=2)
    trainer = ChainOfForgettingTrainer(model=model, args=args, train_dataset=target_data(tmp_path))
    plan = trainer.stage_plan
    assert len(plan.stages) == 4
    for index, stage in enumerate(plan.stages):
        blocks = {name.split(".")[1] for name in stage.params if name.startswith("transformer_blocks.")}
        assert blocks == {str(index)}
        assert {"proj_out_2.weight", "proj_out_1.weight"} <= set(stage.params)  # output side: every stage
    assert any(name.startswith("pos_embed.") for name in plan.stages[0].params)
    assert not any(name.startswith("pos_embed.") for name in plan.stages[1].params)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 8 and len(trainer.stage_records) == 4  # 4 stages of 2 steps
    for name, param in model.named_parameters():
        if name.startswith("transformer_blocks.") and ".norm1.emb." not in name:
            assert not torch.equal(param, before[name]), name


def test_vae_latents_and_cached_bank_moments(tmp_path):
    from datasets_builders.knowledge_bank import cache_bank_latents

    vae = tiny_vae()
    transformer = tiny_dit(in_channels=4, layers=1)
    check_vae_matches(vae, transformer, image_size=16, image_channels=3)
    folder = bank_folder(tmp_path / "bank", count=6, size=16, mode="RGB")
    cache_bank_latents(folder, vae, image_size=16)
    knowledge = KnowledgeBank(folder, image_size=16, channels=3)
    assert knowledge.has_latents
    args = make_config(tmp_path, max_steps=2)
    trainer = ChainOfForgettingTrainer(
        model=transformer,
        args=args,
        train_dataset=target_data(tmp_path, size=16, channels=3),
        vae=vae,
        knowledge_bank=knowledge,
    )
    moments = knowledge.batch([0, 1])["latent_moments"]
    assert moments.shape == (2, 8, 8, 8)
    torch.manual_seed(3)
    latents = trainer.encode({"latent_moments": moments})
    mean, logvar = moments.chunk(2, dim=1)
    torch.manual_seed(3)
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.state.log_history if "loss" in r)


def test_setup_errors_name_what_fits(tmp_path):
    with pytest.raises(DiffusionSetupError, match="3 classes but the transformer's label table has 2"):
        ChainOfForgettingTrainer(
            model=tiny_dit(classes=2), args=make_config(tmp_path), train_dataset=target_data(tmp_path)
        )
    with pytest.raises(DiffusionSetupError, match=r"latents of shape \(4, 8, 8\).*takes \(1, 8, 8\)"):
        check_vae_matches(tiny_vae(), tiny_dit(), image_size=16, image_channels=3)
    with pytest.raises(DiffusionSetupError, match="0 bank samples per batch"):
        ChainOfForgettingTrainer(
            model=tiny_dit(),
            args=make_config(tmp_path, per_device_train_batch_size=4, cof_bank_fraction=0.2),
            train_dataset=target_data(tmp_path),
            knowledge_bank=bank(tmp_path),
        )
    with pytest.raises(ValueError, match="cof_timesteps='linear'"):
        make_config(tmp_path, cof_timesteps="linear")


def test_dit_xl2_256_with_the_sd_vae_fits_together():
    """The reference pairing, checked on configs alone (2.7 GB of weights are not built here):
    DiT-XL/2-256 (1000 classes + null, learned sigma, 32x32x4 latents) with sd-vae-ft-ema (/8)."""
    from types import SimpleNamespace

    from hf_tuning.diffusion import learns_sigma, null_class_of

    dit = SimpleNamespace(
        config=SimpleNamespace(in_channels=4, out_channels=8, sample_size=32, num_embeds_ada_norm=1000)
    )
    vae = SimpleNamespace(config=SimpleNamespace(latent_channels=4, block_out_channels=(128, 256, 512, 512)))
    check_vae_matches(vae, dit, image_size=256, image_channels=3)
    assert null_class_of(dit) == 1000 and learns_sigma(dit)
    with pytest.raises(DiffusionSetupError, match="takes \\(4, 32, 32\\)"):
        check_vae_matches(vae, dit, image_size=512, image_channels=3)


def test_a_checkpoint_is_marked_complete_only_after_its_ema(tmp_path, monkeypatch):
    """The completeness marker (dt_state.json) is written last: a crash while the EMA is being written leaves a
    checkpoint that resuming skips, instead of one that looks complete and is then refused."""
    from hf_tuning.diffusion.ema import ExponentialMovingAverage
    from hf_tuning.trainer import STATE_FILE, find_last_staged_checkpoint

    # save_total_limit=1: the older complete checkpoint may only go once the newer one is complete
    args = make_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer = ChainOfForgettingTrainer(model=tiny_dit(layers=1), args=args, train_dataset=target_data(tmp_path))
    saves = {"count": 0}
    state_dict = ExponentialMovingAverage.state_dict

    def crash_on_the_second_save(self):
        saves["count"] += 1
        if saves["count"] == 2:
            raise RuntimeError("killed while writing the EMA")
        return state_dict(self)

    monkeypatch.setattr(ExponentialMovingAverage, "state_dict", crash_on_the_second_save)
    with pytest.raises(RuntimeError, match="killed while writing the EMA"):
        trainer.train()
    stage = Path(args.output_dir) / "stage-0"
    assert (stage / "checkpoint-2" / STATE_FILE).is_file() and (stage / "checkpoint-4").is_dir()
    assert not (stage / "checkpoint-4" / STATE_FILE).exists()
    assert find_last_staged_checkpoint(args.output_dir) == str(stage / "checkpoint-2")
