"""eval/evaluate_dit.py: the settings, the run's sampler settings with overrides, and the value functions
giving the CLI's numbers (a tiny pixel-space DiT run on the CPU, seconds)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from eval import evaluate_dit
from eval.fid import load_feature_extractor, load_image_folder
from hf_tuning.diffusion import SamplingArguments, load_run
from hf_tuning.diffusion.loading import null_class_of
from hf_tuning.io import atomic_write_json
from tests.helpers.tiny_dit import image_folder, tiny_dit

RUN_SAMPLING = SamplingArguments(guidance_scale=1.5, cfg_channels=1, num_inference_steps=3, sample_batch_size=8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run as the recipe leaves it: transformer_ema/ and cof_config.json (3 target classes)."""
    run = tmp_path_factory.mktemp("dit_run")
    transformer = tiny_dit(in_channels=1, classes=5, layers=2, sample_size=8)
    transformer.save_pretrained(run / "transformer_ema")
    config = {
        "classes": ["class_0", "class_1", "class_2"],
        "null_class": null_class_of(transformer),
        "image_size": 8,
        "image_channels": 1,
        "vae_name_or_path": "none",
        "vae_subfolder": None,
        "started_from": "scratch",
        "sampling": asdict(RUN_SAMPLING),
    }
    atomic_write_json(run / "cof_config.json", config)
    return run


@pytest.fixture(scope="module")
def extractor_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6))
    torch.jit.script(network).save(str(folder / "features.pt"))
    (folder / "features.pt.json").write_text(json.dumps({"channels": 1, "input_size": 8}))
    return folder / "features.pt"


def test_settings_and_overrides_from_the_command_line():
    settings, overrides = evaluate_dit.parse_args(["--run_dir", "r", "--num_inference_steps", "7", "--sampler", "ddim"])
    assert settings == evaluate_dit.DitEvalSettings(run_dir="r")
    assert (overrides.num_inference_steps, overrides.sampler, overrides.guidance_scale) == (7, "ddim", None)
    # the run's own settings, with only the given overrides replaced; a mapping works as well
    sampling = evaluate_dit.run_sampling({"sampling": asdict(RUN_SAMPLING)}, overrides)
    assert sampling == SamplingArguments(**{**asdict(RUN_SAMPLING), "num_inference_steps": 7, "sampler": "ddim"})
    assert evaluate_dit.run_sampling({"sampling": asdict(RUN_SAMPLING)}, {"eta": None}) == RUN_SAMPLING
    # every sampler setting of the library is an override, none forgotten
    assert list(asdict(overrides)) == list(asdict(RUN_SAMPLING))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reference_dir", "ref"], "go together"),
        (["--feature_extractor", "x.pt"], "go together"),
        (["--num_samples", "0"], "must be positive"),
    ],
)
def test_settings_validate(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate_dit.parse_args(["--run_dir", "r", *argv])
    assert message in capsys.readouterr().err
    options = dict(zip([a.removeprefix("--") for a in argv[::2]], argv[1::2]))
    options = {k: int(v) if k == "num_samples" else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        evaluate_dit.DitEvalSettings(run_dir="r", **options)


def test_sample_and_score_with_values_matches_the_cli(run_dir, extractor_path, tmp_path):
    reference = image_folder(tmp_path / "ref", classes=3, per_class=6, size=8) / "train"
    output = tmp_path / "fid.json"
    argv = ["--run_dir", str(run_dir), "--reference_dir", str(reference), "--feature_extractor", str(extractor_path)]
    argv += ["--num_samples", "12", "--seed", "3", "--precision_recall", "--device", "cpu", "--output", str(output)]
    argv += ["--grid", str(tmp_path / "grid.png"), "--guidance_scale", "2.0"]
    assert evaluate_dit.main(argv) == 0
    from_cli = json.loads(output.read_text())
    assert from_cli["num_fake"] == 12 and from_cli["num_real"] == 18 and sum(from_cli["class_counts"]) == 12
    assert from_cli["sampling"] == {**asdict(RUN_SAMPLING), "guidance_scale": 2.0}
    assert (tmp_path / "grid.png").is_file()

    # the same evaluation from values: a loaded run, an extractor, the reference as one tensor
    transformer, vae, config = load_run(run_dir)
    samples = evaluate_dit.sample_and_score(
        transformer,
        vae,
        config,
        num_samples=12,
        sampling=evaluate_dit.run_sampling(config, {"guidance_scale": 2.0}),
        seed=3,
        extractor=load_feature_extractor(extractor_path),
        reference=load_image_folder(reference, channels=1),
        with_precision_recall=True,
    )
    assert samples.images.shape == (12, 1, 8, 8)
    assert torch.bincount(samples.labels, minlength=3).tolist() == from_cli["class_counts"]
    assert samples.scores["fid"] == pytest.approx(from_cli["fid"], rel=1e-5)
    for key in ("precision", "recall", "num_real", "num_fake", "feature_dim", "extractor", "k"):
        assert samples.scores[key] == from_cli[key]
    assert asdict(samples.sampling) == from_cli["sampling"]

    # and evaluate_run itself, called with the settings and overrides dataclasses
    settings, overrides = evaluate_dit.parse_args(argv)
    assert evaluate_dit.evaluate_run(settings, overrides)["fid"] == pytest.approx(from_cli["fid"], rel=1e-5)


def test_sample_only_without_a_reference(run_dir, tmp_path):
    transformer, vae, config = load_run(run_dir)
    samples = evaluate_dit.sample_and_score(transformer, vae, config, num_samples=4, sampling=RUN_SAMPLING)
    assert samples.scores is None and samples.images.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="go together"):
        evaluate_dit.sample_and_score(
            transformer, vae, config, num_samples=4, sampling=RUN_SAMPLING, reference=samples.images
        )
