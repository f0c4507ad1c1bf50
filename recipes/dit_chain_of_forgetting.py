"""Transfer a class-conditional DiT to new images by chain of forgetting (Diff-Tuning), or train one.

    accelerate launch recipes/dit_chain_of_forgetting.py --config recipes/configs/dit_xl2_256_chain_of_forgetting.yaml \\
        --data_dir /data/cub/images --bank_dir /data/dit_bank
    python recipes/dit_chain_of_forgetting.py --config recipes/configs/dit_digits_pretrain.yaml      # CPU, minutes
    python recipes/dit_chain_of_forgetting.py --config recipes/configs/dit_digits_chain_of_forgetting.yaml

The same script pretrains (``model_config`` instead of ``model_name_or_path``, uniform timesteps,
no bank: plain DiT training), fine-tunes (uniform, no bank) and transfers by chain of forgetting
(power-law timesteps and a knowledge bank from ``python -m datasets_builders.knowledge_bank``).
The steps:

1. read the target image folder (and the bank) before any weights load;
2. load the DiT and its VAE and check that latents, label table and classes fit together;
3. train (staged over the DiT blocks with ``dt_variant``), resumable with ``--resume_from_checkpoint``;
4. save the EMA weights as ``transformer_ema/`` (what sampling uses), ``cof_config.json``, and a grid
   of EMA samples of the target classes. ``eval/evaluate_dit.py`` samples and scores the run.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import TrlParser

from datasets_builders.diffusion import DiffusionDataArguments, load_target_dataset
from hf_tuning.diffusion import (
    EMA_SUBFOLDER,
    ChainOfForgettingConfig,
    ChainOfForgettingTrainer,
    DiTModelArguments,
    KnowledgeBank,
    SamplingArguments,
    check_vae_matches,
    load_dit,
    load_vae,
    sample_run,
    save_image_grid,
    write_run_config,
)
from hf_tuning.io import atomic_write_json
from hf_tuning.recipe_runner import check_setting_names, run_recipe, training_started

logger = logging.getLogger("dit_chain_of_forgetting")
# read when no --config is given
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "dit_xl2_256_chain_of_forgetting.yaml"


@dataclass
class GridArguments:
    """The sample grid written at the end of training."""

    grid_samples: int = field(default=32, metadata={"help": "Images in samples.png (0: none)."})
    grid_seed: int = field(default=0, metadata={"help": "Seed of the grid's labels and noise."})


def parse_args(argv: list[str] | None = None):
    parser = TrlParser(
        (DiTModelArguments, DiffusionDataArguments, SamplingArguments, GridArguments, ChainOfForgettingConfig)
    )
    check_setting_names(parser, sys.argv[1:] if argv is None else argv)
    return parser.parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, sampling, grid, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)

    # 1. Data first: a missing folder or an empty bank fails before the weights load.
    train_dataset = load_target_dataset(data_args)
    bank = None
    if data_args.bank_dir:
        bank = KnowledgeBank(
            data_args.bank_dir,
            image_size=data_args.image_size,
            channels=data_args.image_channels,
            random_flip=data_args.random_flip,
            use_cached_latents=data_args.use_cached_latents,
        )
    logger.info(
        "data: %d target images in %d classes; bank: %s",
        len(train_dataset),
        train_dataset.num_classes,
        f"{len(bank)} images{' (cached latents)' if bank.has_latents else ''}" if bank else "none",
    )

    # 2. Model and VAE (a fresh model is seeded, so pretraining is reproducible).
    set_seed(training_args.seed)
    transformer = load_dit(model_args)
    vae = load_vae(model_args)
    check_vae_matches(vae, transformer, data_args.image_size, data_args.image_channels)
    if sampling.cfg_channels > transformer.config.in_channels:
        raise ValueError(
            f"cfg_channels={sampling.cfg_channels} but the model has {transformer.config.in_channels} latent channels; "
            "DiT guides 3 of its 4, a pixel-space grey model guides its 1"
        )

    # 3. Train.
    trainer = ChainOfForgettingTrainer(
        model=transformer,
        args=training_args,
        train_dataset=train_dataset,
        vae=vae,
        knowledge_bank=bank,
    )
    resume = training_args.resume_from_checkpoint
    resume = True if str(resume).lower() in ("true", "last") else resume
    training_started()  # from here on an error is a bug report: keep its traceback
    train_result = trainer.train(resume_from_checkpoint=resume)

    # 4. Save the EMA weights, the run's settings and a sample grid.
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    results: dict[str, Any] = {
        **{f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()},
        "world_size": training_args.world_size,
        "target_images": len(train_dataset),
        "bank_images": len(bank) if bank else 0,
        "bank_per_batch": trainer.bank_batch,
        "cof_timesteps": training_args.cof_timesteps,
        "dt_variant": training_args.dt_variant,
    }
    if trainer.is_world_process_zero():
        write_run_config(
            output_dir,
            model_args=model_args,
            data_args=data_args,
            sampling=sampling,
            classes=train_dataset.classes,
            null_class=trainer.null_class,
        )
        if grid.grid_samples > 0:
            ema_model = type(transformer).from_pretrained(str(output_dir / EMA_SUBFOLDER)).to(training_args.device)
            images, labels = sample_run(
                ema_model,
                vae,
                num_samples=grid.grid_samples,
                num_classes=train_dataset.num_classes,
                null_class=trainer.null_class,
                sampling=sampling,
                seed=grid.grid_seed,
                device=training_args.device,
            )
            save_image_grid(images, output_dir / "samples.png")
            results["grid_labels"] = labels.tolist()
        atomic_write_json(output_dir / "all_results.json", {**results, "sampling": asdict(sampling)})
    trainer.accelerator.wait_for_everyone()
    return {"output_dir": str(output_dir), "train": train_result.metrics, "trainer": trainer, "results": results}


if __name__ == "__main__":
    sys.exit(run_recipe(main, default_config=DEFAULT_CONFIG))
