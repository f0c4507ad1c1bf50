"""Knowledge-bank builder: balanced labels, resumable byte-identical builds, settings locked once images exist,
cached VAE moments, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from datasets_builders.knowledge_bank import (
    KnowledgeBankArguments,
    KnowledgeBankError,
    bank_labels,
    build_knowledge_bank,
    cache_bank_latents,
    main,
)
from hf_tuning.diffusion.knowledge_bank import (
    BANK_CONFIG,
    BANK_LATENTS,
    BANK_METADATA,
    KnowledgeBank,
    read_bank_metadata,
)
from hf_tuning.diffusion.transforms import build_diffusion_transform
from tests.helpers import tiny_dit as tiny_models

NUM_CLASSES = 5  # the tiny DiTs' label table: classes 0..4, null 5


def tiny_dit(in_channels: int = 1, out_channels: int = 2, seed: int = 0) -> DiTTransformer2DModel:
    return tiny_models.tiny_dit(in_channels, NUM_CLASSES, layers=1, out_channels=out_channels, seed=seed).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    return tiny_models.tiny_vae(seed).eval()


@pytest.fixture(scope="module")
def pixel_dit() -> DiTTransformer2DModel:
    return tiny_dit()


def bank_args(output_dir: Path, **overrides) -> KnowledgeBankArguments:  # noqa: ANN003
    settings = dict(
        output_dir=str(output_dir),
        num_images=10,
        guidance_scale=1.5,
        cfg_channels=1,
        num_inference_steps=3,
        batch_size=4,
        seed=0,
    )
    settings.update(overrides)
    return KnowledgeBankArguments(**settings)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every PNG and the metadata, byte for byte."""
    files = {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.glob("images/*.png"))}
    files[BANK_METADATA] = (root / BANK_METADATA).read_bytes()
    return files


@pytest.fixture(scope="module")
def reference_bank(tmp_path_factory: pytest.TempPathFactory, pixel_dit: DiTTransformer2DModel) -> dict[str, bytes]:
    """An uninterrupted build of 10 images (batches 4 + 4 + 2)."""
    root = tmp_path_factory.mktemp("reference") / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny")
    return snapshot(root)


# ---------------------------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize("num_classes", [1, 3, 5])
def test_bank_labels_cover_every_class_once_per_run(num_classes: int) -> None:
    labels = bank_labels(0, 4 * num_classes + 2, num_classes, seed=7)
    for run in range(4):
        assert sorted(labels[run * num_classes : (run + 1) * num_classes]) == list(range(num_classes))
    assert bank_labels(3, len(labels), num_classes, seed=7) == labels[3:]
    assert bank_labels(0, 20, 5, seed=0) != bank_labels(0, 20, 5, seed=1)


# ---------------------------------------------------------------------------------------------------------------
# building


def test_build_writes_images_metadata_and_settings(tmp_path: Path, pixel_dit: DiTTransformer2DModel) -> None:
    root = build_knowledge_bank(pixel_dit, bank_args(tmp_path / "bank"), model_name="tiny")
    assert root == tmp_path / "bank"
    rows = read_bank_metadata(root)
    assert [row["index"] for row in rows] == list(range(10))
    assert [row["file_name"] for row in rows] == [f"images/{i:06d}.png" for i in range(10)]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    labels = [row["label"] for row in rows]
    assert labels == bank_labels(0, 10, NUM_CLASSES, seed=0)
    assert sorted(labels[:5]) == sorted(labels[5:]) == list(range(NUM_CLASSES))  # balanced
    with Image.open(root / rows[0]["file_name"]) as image:
        assert image.size == (8, 8) and image.mode == "L"
    images = [KnowledgeBank(root, image_size=8, channels=1, random_flip=False)[i]["pixel_values"] for i in range(10)]
    assert len({tuple(p.flatten().tolist()) for p in images}) == 10  # different noise for every image
    config = json.loads((root / BANK_CONFIG).read_text())
    assert config["num_images"] == 10 and config["null_class"] == NUM_CLASSES
    assert config["source_classes"] == NUM_CLASSES and config["guidance_scale"] == 1.5
    assert config["model"] == "tiny" and config["seed"] == 0
    assert not any(p.name.endswith(".tmp") for p in root.rglob("*"))  # no atomic-write leftovers


def test_build_is_deterministic(tmp_path: Path, pixel_dit: DiTTransformer2DModel, reference_bank: dict) -> None:
    build_knowledge_bank(pixel_dit, bank_args(tmp_path / "again"), model_name="tiny")
    assert snapshot(tmp_path / "again") == reference_bank


def test_interrupted_build_resumes_to_the_same_bank(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel, reference_bank: dict
) -> None:
    root = tmp_path / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny", stop_after=4)
    assert len(read_bank_metadata(root)) == 4
    assert len(list((root / "images").iterdir())) == 4
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny")
    assert snapshot(root) == reference_bank


def test_build_resumes_after_a_torn_metadata_line(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel, reference_bank: dict
) -> None:
    root = tmp_path / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny", stop_after=4)
    with open(root / BANK_METADATA, "a", encoding="utf-8") as handle:
        handle.write('{"file_name": "images/000004.png", "lab')
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny")
    assert snapshot(root) == reference_bank


def test_build_resumes_in_the_middle_of_a_batch(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel, reference_bank: dict
) -> None:
    """A crash while batch 1 was being written: its PNGs 4..7 exist, lines 4 and 5 are complete, 6 is torn."""
    root = tmp_path / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny", stop_after=8)
    lines = (root / BANK_METADATA).read_text().splitlines(keepends=True)
    (root / BANK_METADATA).write_text("".join(lines[:6]) + lines[6][:20])
    (root / "images" / "000006.png").write_bytes(b"stale")  # rewritten by the resumed build
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny")
    assert snapshot(root) == reference_bank


@pytest.mark.parametrize(("setting", "value"), [("guidance_scale", 4.0), ("seed", 1), ("num_inference_steps", 2)])
def test_resuming_with_other_settings_is_an_error(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel, setting: str, value: object
) -> None:
    root = tmp_path / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root, num_images=4), model_name="tiny")
    before = snapshot(root)
    with pytest.raises(KnowledgeBankError, match=rf"{setting}: .* there, .* asked"):
        build_knowledge_bank(pixel_dit, bank_args(root, **{setting: value}), model_name="tiny")
    with pytest.raises(KnowledgeBankError, match="model: 'tiny' there, 'other' asked"):
        build_knowledge_bank(pixel_dit, bank_args(root), model_name="other")
    assert snapshot(root) == before


def test_resuming_with_a_vae_in_a_pixel_bank_is_an_error(tmp_path: Path, pixel_dit: DiTTransformer2DModel) -> None:
    root = tmp_path / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root, num_images=2, num_inference_steps=1), model_name="tiny")
    with pytest.raises(KnowledgeBankError, match="vae"):
        build_knowledge_bank(
            pixel_dit, bank_args(root, num_images=4, num_inference_steps=1), vae=tiny_vae(), model_name="tiny"
        )


def test_a_failed_first_attempt_does_not_lock_the_settings(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel, reference_bank: dict
) -> None:
    """A first attempt that died before listing an image (its settings and PNGs are on disk) is redone."""
    root = tmp_path / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root, seed=1, num_images=4, num_inference_steps=1), model_name="x")
    (root / BANK_METADATA).unlink()
    build_knowledge_bank(pixel_dit, bank_args(root, num_images=4), model_name="tiny")
    assert snapshot(root) == {
        name: data for name, data in reference_bank.items() if name == BANK_METADATA or int(name[7:13]) < 4
    } | {BANK_METADATA: b"".join(reference_bank[BANK_METADATA].splitlines(keepends=True)[:4])}
    assert json.loads((root / BANK_CONFIG).read_text())["seed"] == 0


def test_extending_the_bank_keeps_the_first_images(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel, reference_bank: dict
) -> None:
    root = tmp_path / "bank"
    build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny")
    build_knowledge_bank(pixel_dit, bank_args(root, num_images=13), model_name="tiny")
    extended = snapshot(root)
    rows = read_bank_metadata(root)
    assert [row["index"] for row in rows] == list(range(13))
    assert [row["label"] for row in rows] == bank_labels(0, 13, NUM_CLASSES, seed=0)
    for name, data in reference_bank.items():
        if name != BANK_METADATA:
            assert extended[name] == data, name
    assert extended[BANK_METADATA].startswith(reference_bank[BANK_METADATA])
    assert json.loads((root / BANK_CONFIG).read_text())["num_images"] == 13
    # image i does not depend on how many images were asked for: extending equals building 13 at once
    build_knowledge_bank(pixel_dit, bank_args(tmp_path / "at_once", num_images=13), model_name="tiny")
    assert snapshot(tmp_path / "at_once") == extended
    # asking for fewer images than there are keeps them all
    build_knowledge_bank(pixel_dit, bank_args(root, num_images=5), model_name="tiny")
    assert snapshot(root) == extended


def test_a_folder_that_is_not_a_bank_is_refused(tmp_path: Path, pixel_dit: DiTTransformer2DModel) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.png").write_bytes(b"")
    with pytest.raises(KnowledgeBankError, match=rf"photos: exists without {BANK_CONFIG}"):
        build_knowledge_bank(pixel_dit, bank_args(root), model_name="tiny")
    assert sorted(p.name for p in root.iterdir()) == ["holiday.png"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    build_knowledge_bank(pixel_dit, bank_args(tmp_path / "empty", num_images=1, num_inference_steps=1))
    assert len(read_bank_metadata(tmp_path / "empty")) == 1


@pytest.mark.parametrize("source_classes", [NUM_CLASSES + 1, 0, -1])
def test_source_classes_must_fit_the_label_table(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel, source_classes: int
) -> None:
    with pytest.raises(KnowledgeBankError, match=rf"source_classes={source_classes} does not fit"):
        build_knowledge_bank(pixel_dit, bank_args(tmp_path / "bank", source_classes=source_classes))
    assert not (tmp_path / "bank").exists()


def test_source_classes_restrict_the_labels(tmp_path: Path, pixel_dit: DiTTransformer2DModel) -> None:
    root = build_knowledge_bank(
        pixel_dit, bank_args(tmp_path / "bank", num_images=6, num_inference_steps=1, source_classes=2)
    )
    labels = [row["label"] for row in read_bank_metadata(root)]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_cache_latents_without_a_vae_is_refused_before_sampling(
    tmp_path: Path, pixel_dit: DiTTransformer2DModel
) -> None:
    with pytest.raises(KnowledgeBankError, match="cache_latents needs a VAE"):
        build_knowledge_bank(pixel_dit, bank_args(tmp_path / "bank", cache_latents=True))
    assert not (tmp_path / "bank" / BANK_METADATA).exists()


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeBankError, match="output_dir"):
        KnowledgeBankArguments()
    with pytest.raises(KnowledgeBankError, match="positive"):
        bank_args(tmp_path, num_images=0)
    with pytest.raises(KnowledgeBankError, match="sampler"):
        bank_args(tmp_path, sampler="euler")
    with pytest.raises(KnowledgeBankError, match="cfg_channels"):
        bank_args(tmp_path, cfg_channels=0)


# ---------------------------------------------------------------------------------------------------------------
# latent caching


def test_latent_bank_caches_the_vae_moments(tmp_path: Path) -> None:
    dit = tiny_dit(in_channels=4, out_channels=8, seed=2)
    vae = tiny_vae(seed=3)
    root = build_knowledge_bank(
        dit,
        bank_args(
            tmp_path / "bank", num_images=3, batch_size=2, num_inference_steps=2, cfg_channels=3, cache_latents=True
        ),
        vae=vae,
        model_name="tiny-latent",
    )
    rows = read_bank_metadata(root)
    assert len(rows) == 3
    with Image.open(root / rows[0]["file_name"]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    latents = load_file(str(root / BANK_LATENTS))
    assert set(latents) == {"moments", "moments_flipped"}
    assert latents["moments"].shape == latents["moments_flipped"].shape == (3, 8, 8, 8)

    transform = build_diffusion_transform(16, 3, random_flip=False)
    with torch.no_grad():
        for index, row in enumerate(rows):
            with Image.open(root / row["file_name"]) as image:
                pixels = transform(image.convert("RGB")).unsqueeze(0)
            expected = vae.encode(pixels).latent_dist.parameters
            mirrored = vae.encode(torch.flip(pixels, dims=[-1])).latent_dist.parameters
            torch.testing.assert_close(latents["moments"][index], expected[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(latents["moments_flipped"][index], mirrored[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(latents["moments"], latents["moments_flipped"])

    bank = KnowledgeBank(root, image_size=16, channels=3, random_flip=False)
    assert bank.has_latents
    assert torch.equal(bank.batch([2, 0])["latent_moments"], latents["moments"][[2, 0]])
    assert KnowledgeBank(root, image_size=16, use_cached_latents=False)[0]["pixel_values"].shape == (3, 16, 16)
    assert json.loads((root / BANK_CONFIG).read_text())["vae"] == "AutoencoderKL"


def test_cache_bank_latents_follows_the_bank(tmp_path: Path) -> None:
    """Latents of a hand-made bank, in metadata order and batched; a stale file is replaced."""
    root = tmp_path / "bank"
    (root / "images").mkdir(parents=True)
    rows = []
    for index, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (32, 24), colour).save(root / "images" / f"{index}.png")
        rows.append(json.dumps({"file_name": f"images/{index}.png", "index": index}) + "\n")
    (root / BANK_METADATA).write_text("".join(reversed(rows)))  # metadata order, not file order
    vae = tiny_vae(seed=4)
    (root / BANK_LATENTS).write_bytes(b"stale")
    path = cache_bank_latents(root, vae, image_size=16, batch_size=2)
    assert path == root / BANK_LATENTS
    latents = load_file(str(path))
    assert latents["moments"].shape == (3, 8, 8, 8)
    transform = build_diffusion_transform(16, 3, random_flip=False)
    with torch.no_grad():
        expected = vae.encode(transform(Image.new("RGB", (32, 24), (0, 255, 0))).unsqueeze(0)).latent_dist.parameters
    torch.testing.assert_close(latents["moments"][0], expected[0], rtol=1e-4, atol=1e-5)
    assert len(KnowledgeBank(root, image_size=16)) == 3


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_builds_a_bank_from_a_saved_dit(tmp_path: Path, pixel_dit: DiTTransformer2DModel) -> None:
    pixel_dit.save_pretrained(tmp_path / "model" / "transformer")
    argv = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--subfolder",
        "transformer",
        "--vae_name_or_path",
        "none",
        "--output_dir",
        str(tmp_path / "bank"),
        "--num_images",
        "4",
        "--num_inference_steps",
        "2",
        "--batch_size",
        "4",
        "--cfg_channels",
        "1",
    ]
    root = main(argv)
    assert root == tmp_path / "bank"
    rows = read_bank_metadata(root)
    assert len(rows) == 4
    config = json.loads((root / BANK_CONFIG).read_text())
    assert config["num_inference_steps"] == 2 and config["null_class"] == NUM_CLASSES
    assert str(tmp_path / "model") in config["model"] and "transformer" in config["model"]
    # the same images as building from the model in memory
    build_knowledge_bank(
        pixel_dit,
        bank_args(tmp_path / "direct", num_images=4, num_inference_steps=2),
        model_name=config["model"],
    )
    assert snapshot(tmp_path / "direct") == snapshot(root)
    # rerunning the finished build changes nothing
    main(argv)
    assert len(read_bank_metadata(root)) == 4
    with pytest.raises(KnowledgeBankError, match="subfolder|model"):
        (tmp_path / "model" / "transformer").rename(tmp_path / "model" / "transformer_ema")
        main(argv[:3] + ["transformer_ema"] + argv[4:])


def test_cli_requires_a_model(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeBankError, match="model_name_or_path is required"):
        main(["--model_config", '{"sample_size": 8}', "--output_dir", str(tmp_path / "bank")])
