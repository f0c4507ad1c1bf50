"""FID, precision/recall, feature extractors, the digits classifier and the evaluate_fid CLI (all CPU, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from eval import digits_classifier, evaluate_fid
from eval.digits_classifier import (
    DigitsClassifier,
    digits_split,
    load_digits_classifier,
    save_digits_classifier,
    train_digits_classifier,
)
from eval.fid import (
    FeatureExtractor,
    compute_fid,
    extract_features,
    feature_statistics,
    frechet_distance,
    iter_image_folder,
    list_image_files,
    load_feature_extractor,
    load_image_folder,
    precision_recall,
)
from hf_tuning.io import IMAGE_EXTENSIONS, ImageDataError
from hf_tuning.io import list_image_files as library_image_files
from tests.helpers import REPO_ROOT


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, 2 * dim))
    return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


def sqrtm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's general matrix square root, as an independent reference."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


# --------------------------------------------------------------------------- statistics


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for _ in range(3):
        mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
        sigma1, sigma2 = random_covariance(rng, 16), random_covariance(rng, 16)
        expected = sqrtm_frechet(mu1, sigma1, mu2, sigma2)
        assert expected > 1.0
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_identical_and_equal_covariances():
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=16), random_covariance(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    shift = rng.normal(size=16)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), rel=1e-8)
    # A singular covariance (rank-deficient features) must not produce NaN.
    low_rank = np.outer(shift, shift)
    assert np.isfinite(frechet_distance(mu, low_rank, mu, sigma))


def test_frechet_distance_shape_mismatch():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match=r"\(1, 4\)"):
        feature_statistics(features[:1])
    with pytest.raises(ValueError, match=r"\(50,\)"):
        feature_statistics(features[:, 0])


def naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    from scipy.spatial.distance import cdist

    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]

    precision = np.mean((cdist(fake, real) <= radii(real)[None]).any(axis=1))
    recall = np.mean((cdist(real, fake) <= radii(fake)[None]).any(axis=1))
    return float(precision), float(recall)


def test_precision_recall():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy(), k=3) == {"precision": 1.0, "recall": 1.0}
    far = rng.normal(size=(150, 8)) + 50.0
    assert precision_recall(real, far, k=3) == {"precision": 0.0, "recall": 0.0}
    # A narrower fake cloud: high precision, low recall; tiny blocks give the same answer as one block.
    fake = 0.3 * rng.normal(size=(150, 8))
    chunked = precision_recall(real, fake, k=3, max_elements=500)
    assert chunked == precision_recall(real, fake, k=3)
    expected_precision, expected_recall = naive_precision_recall(real, fake, 3)
    assert chunked["precision"] == pytest.approx(expected_precision)
    assert chunked["recall"] == pytest.approx(expected_recall)
    assert chunked["precision"] > 0.9 and chunked["recall"] < 0.5
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real, fake[:3], k=3)


# --------------------------------------------------------------------------- extractors


class TinyFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class TinyInceptionLike(torch.nn.Module):
    """Mimics the StyleGAN/clean-fid TorchScript signature; returns per-channel means and the input size."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        size = torch.full((x.shape[0], 1), float(x.shape[-1]))
        return torch.cat([x.mean(dim=(2, 3)), size], dim=1) if return_features else x.sum(dim=(1, 2, 3))[:, None]


class Flatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class Needs12(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 144)


def save_script(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_torchscript_extractor_generic(tmp_path):
    extractor = load_feature_extractor(save_script(TinyFeatures(), tmp_path / "tiny.pt"))
    assert (extractor.dim, extractor.channels, extractor.input_size) == (6, 3, None)
    grey = torch.full((2, 1, 5, 5), 0.5)
    features = extractor(grey)
    assert features.shape == (2, 6)
    torch.testing.assert_close(features, torch.full((2, 6), 0.5))  # grey repeated to RGB, [0, 1] range kept


def test_torchscript_extractor_inception_preset(tmp_path):
    extractor = load_feature_extractor(save_script(TinyInceptionLike(), tmp_path / "inception-2015-12-05.pt"))
    assert extractor.name.startswith("inception_torchscript")
    assert (extractor.dim, extractor.input_size, extractor.channels) == (4, 299, 3)
    features = extractor(torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(features, torch.tensor([[255.0, 255.0, 255.0, 299.0]] * 2))


def test_torchscript_extractor_sidecar(tmp_path):
    path = save_script(Flatten(), tmp_path / "flat.pt")
    (tmp_path / "flat.pt.json").write_text(json.dumps({"input_size": 12, "channels": 1, "name": "flat"}))
    extractor = load_feature_extractor(path)
    assert (extractor.dim, extractor.channels, extractor.input_size) == (144, 1, 12)
    assert extractor(torch.rand(3, 3, 24, 24)).shape == (3, 144)
    (tmp_path / "flat.pt.json").write_text(json.dumps({"input_size": 7}))
    with pytest.raises(ValueError, match="probe pass on 7x7"):
        load_feature_extractor(save_script(Needs12(), tmp_path / "flat.pt"))
    (tmp_path / "flat.pt.json").write_text(json.dumps({"input_sise": 12}))
    with pytest.raises(ValueError, match="input_sise"):
        load_feature_extractor(path)


def test_inception_v3_state_dict_pth(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(model.state_dict(), tmp_path / "inception.pth")
    extractor = load_feature_extractor(tmp_path / "inception.pth")
    assert (extractor.dim, extractor.input_size, extractor.channels) == (2048, 299, 3)
    assert extractor.name == "inception_v3:inception.pth"
    features = extractor(torch.rand(1, 3, 16, 16))  # one image: a 299 px Inception pass is ~1 s on a busy CPU
    assert features.shape == (1, 2048) and torch.isfinite(features).all()


def test_inception_v3_safetensors_without_aux(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=False, init_weights=False)
    state = {key: value.contiguous() for key, value in model.state_dict().items() if not key.startswith("fc.")}
    save_file(state, str(tmp_path / "inception.safetensors"))
    extractor = load_feature_extractor(tmp_path / "inception.safetensors", kind="inception_v3")
    assert extractor.dim == 2048
    assert not hasattr(extractor.model, "AuxLogits") or extractor.model.AuxLogits is None


def test_unknown_and_missing_extractors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt.*accepted"):
        load_feature_extractor(tmp_path / "nowhere.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="junk.pt.*accepted"):
        load_feature_extractor(tmp_path / "junk.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*unrecognised"):
        load_feature_extractor(tmp_path / "other.pth")
    torch.save({"a": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth"):
        load_feature_extractor(tmp_path / "list.pth")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir.*feature_extractor.json"):
        load_feature_extractor(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="unknown feature extractor kind"):
        load_feature_extractor(tmp_path / "other.pth", kind="vgg")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": TinyFeatures()}, tmp_path / "pickled.pth")  # a whole module: needs unpickling code
    with pytest.raises(ValueError, match="pickled.pth"):
        load_feature_extractor(tmp_path / "pickled.pth")


# --------------------------------------------------------------------------- images


def write_pngs(folder: Path, images: np.ndarray, nested: bool = True) -> Path:
    """uint8 (N, H, W) images as PNGs, half of them one folder deeper (the loader searches recursively)."""
    for i, image in enumerate(images):
        target = folder / (f"sub{i % 2}" if nested else "")
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:04d}.png")
    return folder


def test_load_image_folder(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(5, 6, 7), dtype=np.uint8)
    folder = write_pngs(tmp_path / "imgs", images)
    grey = load_image_folder(folder, channels=1)
    assert grey.shape == (5, 1, 6, 7) and grey.dtype == torch.float32
    order = sorted(range(5), key=lambda i: (i % 2, i))  # sub0/* then sub1/*
    torch.testing.assert_close(grey[:, 0], torch.from_numpy(images[order]).float() / 255)
    assert load_image_folder(folder, channels=3).shape == (5, 3, 6, 7)
    batches = list(iter_image_folder(folder, channels=1, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(batches), grey)


def test_load_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty.*no images"):
        load_image_folder(tmp_path / "empty", channels=1)
    with pytest.raises(ValueError, match="empty.*no images"):
        iter_image_folder(tmp_path / "empty", channels=1)  # reported when called, not at the first batch
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing", channels=1)
    bad = write_pngs(tmp_path / "bad", np.zeros((2, 4, 4), dtype=np.uint8), nested=False)
    (bad / "0005.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="0005.png"):
        load_image_folder(bad, channels=3)
    mixed = write_pngs(tmp_path / "mixed", np.zeros((2, 4, 4), dtype=np.uint8), nested=False)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(mixed / "0009.png")
    with pytest.raises(ValueError, match="0009.png.*differs"):
        load_image_folder(mixed, channels=1)


def test_folder_listing_finds_every_image_format_the_data_readers_do(tmp_path):
    """One notion of "an image file": fid lists what hf_tuning.io lists (webp, bmp, gif, tiff too, any case),
    skipping hidden files and folders and non-images, and decodes every format losslessly written."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    names = ["a.png", "b.webp", "c/d.BMP", "c/e.tif", "f.gif"]
    for name, image in zip(names, pixels):
        path = tmp_path / "imgs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, **({"lossless": True} if name.endswith("webp") else {}))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"")
    (tmp_path / "imgs" / ".cache").mkdir()
    Image.fromarray(pixels[0]).save(tmp_path / "imgs" / ".cache" / "old.png")

    files = list_image_files(tmp_path / "imgs")
    assert [str(f) for f in files] == library_image_files(tmp_path / "imgs")
    assert sorted(f.relative_to(tmp_path / "imgs").as_posix() for f in files) == sorted(names)
    loaded = load_image_folder(tmp_path / "imgs", channels=1)
    by_name = {f.relative_to(tmp_path / "imgs").as_posix(): i for i, f in enumerate(files)}
    for name, image in zip(names, pixels):  # every format decodes to the pixels written
        torch.testing.assert_close(loaded[by_name[name], 0], torch.from_numpy(image).float() / 255)

    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"none: no images found \(looked for .*\.webp.*recursively\)"):
        list_image_files(tmp_path / "none")
    assert all(ext in str(IMAGE_EXTENSIONS) for ext in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))


def test_unreadable_image_is_named_with_the_library_error(tmp_path):
    folder = write_pngs(tmp_path / "imgs", np.zeros((1, 4, 4), dtype=np.uint8), nested=False)
    (folder / "broken.webp").write_bytes(b"RIFF not really")
    with pytest.raises(ImageDataError, match="broken.webp: cannot open image"):
        load_image_folder(folder, channels=3)


def test_extract_features_and_compute_fid_with_a_callable():
    extractor = FeatureExtractor(TinyFeatures(), name="tiny", dim=None, input_size=None, channels=1)
    assert extractor.dim == 2
    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.random((40, 1, 4, 4), dtype=np.float32))
    loader = [(real[:25], torch.zeros(25)), (real[25:], torch.zeros(15))]
    np.testing.assert_array_equal(extract_features(extractor, loader), extract_features(extractor, real, 7))
    same = compute_fid(extractor, real, real, batch_size=16, with_precision_recall=True)
    assert same["fid"] < 1e-8 and same["precision"] == same["recall"] == 1.0
    assert {k: same[k] for k in ("num_real", "num_fake", "feature_dim", "extractor", "k")} == {
        "num_real": 40,
        "num_fake": 40,
        "feature_dim": 2,
        "extractor": "tiny",
        "k": 3,
    }
    assert compute_fid(extractor, real, real * 0.5)["fid"] > 0.01


# --------------------------------------------------------------------------- digits classifier


@pytest.fixture(scope="module")
def digits_extractor_dir(tmp_path_factory) -> tuple[Path, dict]:
    model, metrics = train_digits_classifier(seed=0)
    folder = save_digits_classifier(model, tmp_path_factory.mktemp("digits_cnn"), metrics)
    return folder, metrics


def test_digits_classifier_accuracy_and_folder(digits_extractor_dir):
    folder, metrics = digits_extractor_dir
    assert metrics["test_accuracy"] > 0.95, metrics
    assert min(metrics["test_accuracy_by_scale"].values()) > 0.95, metrics
    assert metrics["num_test"] == 360 and metrics["split"]["test_fraction"] == 0.2
    config = json.loads((folder / "feature_extractor.json").read_text())
    assert config["kind"] == "digits_cnn" and config["image_size"] == 16 and config["feature_dim"] == 128
    assert sorted(p.name for p in folder.iterdir()) == ["feature_extractor.json", "model.safetensors"]
    # The saved weights give the same held-out predictions as the trained model.
    model, _ = load_digits_classifier(folder)
    images, labels, splits = digits_split()
    test = torch.from_numpy(images[splits["test"]])[:, None]
    accuracy = float((model(test).argmax(1) == torch.from_numpy(labels[splits["test"]])).float().mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"])


def test_digits_classifier_input_conventions():
    model = DigitsClassifier().eval()
    grey = torch.rand(2, 1, 8, 8)
    rgb = grey.expand(-1, 3, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.features(rgb), model.features(grey))
        assert model.features(torch.rand(2, 1, 32, 32)).shape == (2, 128)
        assert model(grey).shape == (2, 10)


def test_digits_classifier_and_extractors_prepare_images_alike():
    """One input convention: the digits classifier reads an image exactly as a 1-channel extractor does."""
    from eval.digits_classifier import prepare_digits
    from eval.fid import prepare_images

    rgba = torch.randint(0, 256, (2, 4, 32, 32), dtype=torch.uint8)  # integer, alpha, larger: every branch
    extractor = FeatureExtractor(torch.nn.Flatten(), name="flat", dim=256, input_size=16, channels=1)
    torch.testing.assert_close(prepare_digits(rgba, 16), extractor.preprocess(rgba), rtol=0, atol=0)
    assert prepare_images(rgba, 3, None).shape == (2, 3, 32, 32)  # RGB kept, size kept
    assert prepare_images(torch.rand(1, 1, 4, 4), 3, 8).shape == (1, 3, 8, 8)  # grey repeated, upscaled
    with pytest.raises(ValueError, match="digits classifier: images must have 1, 3 or 4 channels"):
        prepare_digits(torch.rand(1, 2, 8, 8), 16)


def test_digits_classifier_cli(tmp_path, capsys):
    assert digits_classifier.main(["--output_dir", str(tmp_path / "cnn"), "--epochs", "1", "--seed", "3"]) == 0
    assert "held-out test accuracy" in capsys.readouterr().out
    config = json.loads((tmp_path / "cnn" / "feature_extractor.json").read_text())
    assert config["metrics"]["epochs"] == 1 and config["metrics"]["seed"] == 3
    assert load_feature_extractor(tmp_path / "cnn").dim == 128


def test_digits_fid_sanity_ordering(digits_extractor_dir):
    folder, _ = digits_extractor_dir
    extractor = load_feature_extractor(folder)
    assert (extractor.dim, extractor.channels, extractor.input_size) == (128, 1, 16)
    images, labels, splits = digits_split()
    x = torch.from_numpy(images)[:, None]
    high = labels >= 5
    test_high = splits["test"][high[splits["test"]]]
    rest = np.concatenate([splits["train"], splits["val"]])
    rng = np.random.default_rng(0)
    other_high = rng.choice(rest[high[rest]], size=len(test_high), replace=False)
    low = rng.choice(rest[~high[rest]], size=len(test_high), replace=False)
    same = compute_fid(extractor, x[test_high], x[other_high], with_precision_recall=True)
    different = compute_fid(extractor, x[test_high], x[low], with_precision_recall=True)
    print(f"\nFID 5-9 test vs 5-9 train: {same['fid']:.3f}; vs 0-4 train: {different['fid']:.3f}")
    assert different["fid"] > 10 * same["fid"], (same, different)
    assert same["precision"] > different["precision"]


def test_evaluate_fid_cli(digits_extractor_dir, tmp_path, capsys):
    folder, _ = digits_extractor_dir
    images, labels, splits = digits_split()
    pixels = np.rint(images * 255).astype(np.uint8)
    real = write_pngs(tmp_path / "real", pixels[splits["test"][:30]])
    fake = write_pngs(tmp_path / "fake", np.kron(pixels[splits["train"][:20]], np.ones((4, 4), np.uint8)))
    output = tmp_path / "out" / "fid.json"
    argv = ["--feature_extractor", str(folder), "--real", str(real), "--fake", str(fake)]
    assert evaluate_fid.main([*argv, "--precision_recall", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["num_real"] == 30 and result["num_fake"] == 20 and result["feature_dim"] == 128
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["extractor"].startswith("digits_cnn")
    (tmp_path / "none").mkdir()
    assert evaluate_fid.main([*argv[:4], "--fake", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err


def test_evaluate_fid_with_values_matches_the_cli(tmp_path, capsys):
    """The CLI is a thin wrapper: FidEvalSettings + evaluate_fid (or score_folders) give the CLI's numbers."""
    extractor_path = save_script(TinyFeatures(), tmp_path / "tiny.pt")
    rng = np.random.default_rng(8)
    real = write_pngs(tmp_path / "real", rng.integers(0, 256, (12, 5, 5), dtype=np.uint8))
    fake = write_pngs(tmp_path / "fake", rng.integers(0, 128, (9, 5, 5), dtype=np.uint8))
    argv = ["--feature_extractor", str(extractor_path), "--real", str(real), "--fake", str(fake)]
    argv += ["--precision_recall", "--k", "2", "--batch_size", "4", "--device", "cpu"]
    assert evaluate_fid.main(argv) == 0
    from_cli = json.loads(capsys.readouterr().out)

    settings = evaluate_fid.FidEvalSettings(
        feature_extractor=str(extractor_path),
        real=str(real),
        fake=str(fake),
        precision_recall=True,
        k=2,
        batch_size=4,
        device="cpu",
    )
    assert evaluate_fid.parse_args(argv) == settings
    result = evaluate_fid.evaluate_fid(settings)
    assert {k: v for k, v in result.items() if k != "seconds"} == {k: v for k, v in from_cli.items() if k != "seconds"}
    assert result["num_real"] == 12 and result["num_fake"] == 9 and result["k"] == 2
    scored = evaluate_fid.score_folders(
        load_feature_extractor(extractor_path), real, fake, batch_size=5, with_precision_recall=True, k=2
    )
    assert scored["fid"] == pytest.approx(result["fid"]) and scored["precision"] == result["precision"]
    for options, message in [({"k": 0}, "--k must be at least 1"), ({"kind": "vgg"}, "--kind 'vgg' is not one of")]:
        with pytest.raises(ValueError, match=message):
            evaluate_fid.FidEvalSettings(feature_extractor="x", real="r", fake="f", **options)


def test_evaluate_fid_runs_as_a_script(tmp_path):
    """Run by path, outside the repository and without PYTHONPATH: the installed ``eval`` package is found."""
    path = save_script(TinyFeatures(), tmp_path / "tiny.pt")
    folder = write_pngs(tmp_path / "imgs", np.random.default_rng(6).integers(0, 256, (6, 5, 5), dtype=np.uint8))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    command = [sys.executable, str(REPO_ROOT / "eval" / "evaluate_fid.py"), "--feature_extractor", str(path)]
    command += ["--real", str(folder), "--fake", str(folder), "--output", str(tmp_path / "fid.json")]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] < 1e-6
