"""DiT transfer data: ADM centre crop, the [-1, 1] transform, the target folder, the knowledge bank and its
endless shuffled index stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datasets_builders.diffusion import DiffusionDataArguments, load_target_dataset
from hf_tuning.diffusion.knowledge_bank import (
    BANK_LATENTS,
    BANK_METADATA,
    KnowledgeBank,
    bank_batch_size,
    bank_indices,
    read_bank_metadata,
)
from hf_tuning.diffusion.transforms import build_diffusion_transform, center_crop_arr
from hf_tuning.io import ImageDataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def thirds(width: int, height: int) -> Image.Image:
    """Red, green, blue thirds along the long side; the centre square is green."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    if width >= height:
        third = width // 3
        array[:, :third] = RED
        array[:, third : 2 * third] = GREEN
        array[:, 2 * third :] = BLUE
    else:
        third = height // 3
        array[:third] = RED
        array[third : 2 * third] = GREEN
        array[2 * third :] = BLUE
    return Image.fromarray(array)


def half_and_half(size: int = 16) -> Image.Image:
    """Left half black, right half white: a flip changes it."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:, size // 2 :] = 255
    return Image.fromarray(array)


def write_png(path: Path, value: int | tuple[int, int, int] = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if isinstance(value, tuple) else (value, value, value)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def write_bank(root: Path, values: list[int], size: int = 8) -> list[dict]:
    """A bank folder as the builder writes it: images/NNNNNN.png and one metadata line per image."""
    rows = []
    for index, value in enumerate(values):
        name = f"images/{index:06d}.png"
        write_png(root / name, value, size)
        rows.append({"file_name": name, "label": index % 3, "index": index})
    (root / BANK_METADATA).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# center_crop_arr and the transform


@pytest.mark.parametrize(("width", "height"), [(90, 30), (30, 90)])
def test_center_crop_keeps_the_centre_square(width: int, height: int) -> None:
    out = center_crop_arr(thirds(width, height), 30)
    assert out.size == (30, 30)
    assert (np.asarray(out) == GREEN).all()


@pytest.mark.parametrize(("size", "target"), [((101, 37), 16), ((37, 101), 16), ((17, 17), 16), ((5, 9), 16)])
def test_center_crop_output_size(size: tuple[int, int], target: int) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert center_crop_arr(image, target).size == (target, target)


def test_center_crop_halves_large_images_with_a_box_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, int], object]] = []
    original = Image.Image.resize

    def spy(self: Image.Image, size, resample=None, *args, **kwargs):  # noqa: ANN001
        calls.append((tuple(size), resample))
        return original(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = center_crop_arr(thirds(360, 120), 30)
    # 360x120 -> 180x60 -> 90x30 by box halving, then a bicubic resize to the same size
    assert calls[:2] == [((180, 60), Image.Resampling.BOX), ((90, 30), Image.Resampling.BOX)]
    assert calls[2] == ((90, 30), Image.Resampling.BICUBIC)
    assert len(calls) == 3
    assert out.size == (30, 30)
    assert (np.asarray(out) == GREEN).all()  # the thirds fall on multiples of 4, so halving keeps them pure


@pytest.mark.parametrize("channels", [1, 3])
def test_transform_shape_and_range(channels: int) -> None:
    transform = build_diffusion_transform(12, channels, random_flip=False)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    pixels = transform(noise)
    assert pixels.shape == (channels, 12, 12)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.all(transform(Image.new("RGB", (12, 12), (0, 0, 0))) == -1)
    assert torch.all(transform(Image.new("RGB", (12, 12), (255, 255, 255))) == 1)
    grey = transform(Image.new("L", (12, 12), 51))
    assert torch.allclose(grey, torch.full_like(grey, 51 / 255 * 2 - 1))


def test_transform_flips_about_half_the_time_only_when_asked() -> None:
    image = half_and_half()
    plain = build_diffusion_transform(16, 3, random_flip=False)(image)
    assert plain[:, :, 0].eq(-1).all() and plain[:, :, -1].eq(1).all()
    mirrored = torch.flip(plain, dims=[-1])
    torch.manual_seed(0)
    flipping = build_diffusion_transform(16, 3, random_flip=True)
    flips = 0
    for _ in range(200):
        out = flipping(image)
        if torch.equal(out, mirrored):
            flips += 1
        else:
            assert torch.equal(out, plain)
    assert 70 <= flips <= 130
    never = build_diffusion_transform(16, 3, random_flip=False)
    assert all(torch.equal(never(image), plain) for _ in range(50))


def test_data_arguments_validate() -> None:
    with pytest.raises(ValueError, match="image_channels"):
        DiffusionDataArguments(image_channels=2)
    with pytest.raises(ValueError, match="image_size"):
        DiffusionDataArguments(image_size=0)


def test_build_diffusion_transform_rejects_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="channels"):
        build_diffusion_transform(8, 4)


# ---------------------------------------------------------------------------------------------------------------
# target images


def test_load_target_dataset_labels_follow_sorted_folders(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "zebra" / "a.png", 255, size=10)
    write_png(tmp_path / "train" / "apple" / "b.png", 0, size=20)
    write_png(tmp_path / "train" / "apple" / "c.jpg", 0, size=12)
    data = load_target_dataset(
        DiffusionDataArguments(data_dir=str(tmp_path), image_size=8, image_channels=1, random_flip=False)
    )
    assert data.classes == ["apple", "zebra"]
    assert len(data) == 3
    items = [data[i] for i in range(3)]
    assert [item["labels"] for item in items] == [0, 0, 1]
    assert all(item["pixel_values"].shape == (1, 8, 8) for item in items)
    assert items[0]["pixel_values"].eq(-1).all() and items[2]["pixel_values"].eq(1).all()


def test_load_target_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageDataError, match="data_dir is not set"):
        load_target_dataset(DiffusionDataArguments())
    missing = tmp_path / "nowhere"
    with pytest.raises(ImageDataError, match="nowhere"):
        load_target_dataset(DiffusionDataArguments(data_dir=str(missing)))
    write_png(tmp_path / "data" / "train" / "full" / "a.png")
    (tmp_path / "data" / "train" / "empty").mkdir()
    with pytest.raises(ImageDataError, match="'empty' has no image files"):
        load_target_dataset(DiffusionDataArguments(data_dir=str(tmp_path / "data")))
    with pytest.raises(ImageDataError, match="split folder 'val'"):
        load_target_dataset(DiffusionDataArguments(data_dir=str(tmp_path / "data"), train_split="val"))


# ---------------------------------------------------------------------------------------------------------------
# the knowledge bank


def test_bank_reads_a_bank_folder_in_metadata_order(tmp_path: Path) -> None:
    write_bank(tmp_path, [0, 255, 51])
    # reverse the metadata: the bank follows it, not the file names
    lines = (tmp_path / BANK_METADATA).read_text().splitlines()
    (tmp_path / BANK_METADATA).write_text("\n".join(reversed(lines)) + "\n")
    write_png(tmp_path / "images" / "999999.png", 99)  # not listed: ignored
    bank = KnowledgeBank(tmp_path, image_size=8, channels=1, random_flip=False)
    assert len(bank) == 3
    assert not bank.has_latents
    levels = [bank[i]["pixel_values"] for i in range(3)]
    assert all(p.shape == (1, 8, 8) for p in levels)
    expected = [51, 255, 0]
    for pixels, value in zip(levels, expected, strict=True):
        assert torch.allclose(pixels, torch.full_like(pixels, value / 255 * 2 - 1))
    batch = bank.batch([2, 0])
    assert set(batch) == {"pixel_values"}
    assert batch["pixel_values"].shape == (2, 1, 8, 8)
    assert torch.equal(batch["pixel_values"][0], levels[2])


def test_bank_reads_a_plain_folder_of_images(tmp_path: Path) -> None:
    write_png(tmp_path / "class_b" / "x.png", 255, size=12)
    write_png(tmp_path / "class_a" / "y.jpg", 0, size=12)
    write_png(tmp_path / "z.PNG", 0, size=12)
    write_png(tmp_path / ".hidden" / "h.png", 0)
    write_png(tmp_path / ".dot.png", 0)
    (tmp_path / "notes.txt").write_text("not an image")
    bank = KnowledgeBank(tmp_path, image_size=8, channels=3, random_flip=False)
    assert len(bank) == 3
    assert bank[0]["pixel_values"].shape == (3, 8, 8)
    assert sorted(bank[i]["pixel_values"].mean().item() for i in range(3)) == pytest.approx([-1, -1, 1])


def test_bank_without_images_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "readme.txt").write_text("nothing here")
    with pytest.raises(ImageDataError, match=r"bank.*no images"):
        KnowledgeBank(tmp_path / "bank", image_size=8)
    with pytest.raises(ImageDataError, match="does not exist"):
        KnowledgeBank(tmp_path / "missing", image_size=8)


def test_bank_metadata_pointing_at_a_missing_file(tmp_path: Path) -> None:
    write_bank(tmp_path, [0, 10, 20])
    (tmp_path / "images" / "000001.png").unlink()
    with pytest.raises(ImageDataError, match=r"missing.*000001\.png"):
        KnowledgeBank(tmp_path, image_size=8)


def test_bank_drops_a_torn_last_line(tmp_path: Path) -> None:
    rows = write_bank(tmp_path, [0, 10, 20])
    with open(tmp_path / BANK_METADATA, "a", encoding="utf-8") as handle:
        handle.write('{"file_name": "images/0000')
    assert read_bank_metadata(tmp_path) == rows
    assert len(KnowledgeBank(tmp_path, image_size=8)) == 3


def test_bank_rejects_a_torn_line_in_the_middle(tmp_path: Path) -> None:
    write_bank(tmp_path, [0, 10, 20])
    lines = (tmp_path / BANK_METADATA).read_text().splitlines()
    lines[1] = lines[1][:15]
    (tmp_path / BANK_METADATA).write_text("\n".join(lines) + "\n")
    with pytest.raises(ImageDataError, match=rf"{BANK_METADATA}:2: not a JSON object"):
        read_bank_metadata(tmp_path)
    with pytest.raises(ImageDataError, match=rf"{BANK_METADATA}:2"):
        KnowledgeBank(tmp_path, image_size=8)


def test_bank_rejects_rows_without_a_file_name(tmp_path: Path) -> None:
    write_bank(tmp_path, [0])
    with open(tmp_path / BANK_METADATA, "a", encoding="utf-8") as handle:
        handle.write('{"label": 3}\n\n')
    with pytest.raises(ImageDataError, match=rf"{BANK_METADATA}:2: expected an object with a file_name"):
        read_bank_metadata(tmp_path)


def test_bank_with_metadata_but_no_complete_row_is_an_error(tmp_path: Path) -> None:
    # an interrupted first batch: PNGs written, the metadata line torn; they are not a bank yet
    write_png(tmp_path / "images" / "000000.png")
    (tmp_path / BANK_METADATA).write_text('{"file_na')
    with pytest.raises(ImageDataError, match="no complete"):
        KnowledgeBank(tmp_path, image_size=8)


def _write_latents(root: Path, count: int, extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    moments = torch.arange(count * 8 * 2 * 2, dtype=torch.float32).reshape(count, 8, 2, 2)
    tensors = {"moments": moments, "moments_flipped": moments + 1000, **(extra or {})}
    save_file(tensors, str(root / BANK_LATENTS))
    return tensors


def test_bank_uses_cached_latents(tmp_path: Path) -> None:
    write_bank(tmp_path, [0, 10, 20])
    tensors = _write_latents(tmp_path, 3)
    bank = KnowledgeBank(tmp_path, image_size=8, random_flip=False)
    assert bank.has_latents
    assert set(bank[1]) == {"latent_moments"}
    assert torch.equal(bank[1]["latent_moments"], tensors["moments"][1])
    batch = bank.batch([2, 0])
    assert set(batch) == {"latent_moments"}
    assert torch.equal(batch["latent_moments"], tensors["moments"][[2, 0]])

    torch.manual_seed(0)
    flipping = KnowledgeBank(tmp_path, image_size=8, random_flip=True)
    seen = [flipping[0]["latent_moments"] for _ in range(40)]
    flipped = sum(torch.equal(m, tensors["moments_flipped"][0]) for m in seen)
    plain = sum(torch.equal(m, tensors["moments"][0]) for m in seen)
    assert flipped + plain == 40 and 5 <= flipped <= 35

    ignored = KnowledgeBank(tmp_path, image_size=8, random_flip=False, use_cached_latents=False)
    assert not ignored.has_latents
    assert set(ignored[0]) == {"pixel_values"}


def test_bank_rejects_latents_of_another_count(tmp_path: Path) -> None:
    write_bank(tmp_path, [0, 10, 20])
    _write_latents(tmp_path, 2)
    with pytest.raises(ImageDataError, match=rf"{BANK_LATENTS}.*2 images.*lists 3"):
        KnowledgeBank(tmp_path, image_size=8)
    # ignoring the cache ignores its count too
    assert len(KnowledgeBank(tmp_path, image_size=8, use_cached_latents=False)) == 3


def test_bank_rejects_a_latents_file_without_moments(tmp_path: Path) -> None:
    write_bank(tmp_path, [0, 10])
    save_file({"something": torch.zeros(2, 8, 2, 2)}, str(tmp_path / BANK_LATENTS))
    with pytest.raises(ImageDataError, match="moments"):
        KnowledgeBank(tmp_path, image_size=8)
    save_file(
        {"moments": torch.zeros(2, 8, 2, 2), "moments_flipped": torch.zeros(1, 8, 2, 2)}, str(tmp_path / BANK_LATENTS)
    )
    with pytest.raises(ImageDataError, match="moments_flipped"):
        KnowledgeBank(tmp_path, image_size=8)


# ---------------------------------------------------------------------------------------------------------------
# bank_indices and bank_batch_size


@pytest.mark.parametrize("size", [1, 5, 7])
def test_bank_indices_every_pass_is_a_permutation(size: int) -> None:
    stream = bank_indices(0, 4 * size, size, seed=3)
    assert len(stream) == 4 * size
    passes = [stream[i * size : (i + 1) * size] for i in range(4)]
    for one in passes:
        assert sorted(one) == list(range(size))
    if size > 3:
        assert len({tuple(p) for p in passes}) > 1  # reshuffled every pass


@pytest.mark.parametrize(("position", "first", "second"), [(0, 3, 4), (2, 5, 9), (6, 1, 1), (13, 0, 6), (4, 20, 3)])
def test_bank_indices_positions_continue_the_stream(position: int, first: int, second: int) -> None:
    size, seed = 7, 11
    whole = bank_indices(position, first + second, size, seed)
    assert whole == bank_indices(position, first, size, seed) + bank_indices(position + first, second, size, seed)
    assert whole == bank_indices(0, position + first + second, size, seed)[position:]


def test_bank_indices_depends_on_the_seed_only() -> None:
    assert bank_indices(3, 30, 9, seed=0) == bank_indices(3, 30, 9, seed=0)
    assert bank_indices(0, 30, 9, seed=0) != bank_indices(0, 30, 9, seed=1)
    assert bank_indices(5, 0, 9, seed=0) == []


def test_bank_indices_count_larger_than_the_bank() -> None:
    stream = bank_indices(1, 10, 3, seed=0)
    assert len(stream) == 10
    assert set(stream) == {0, 1, 2}
    with pytest.raises(ValueError, match="empty"):
        bank_indices(0, 1, 0, seed=0)


def test_bank_batch_size() -> None:
    assert bank_batch_size(32, 0.2) == 6  # the reference's 6 of 32
    assert bank_batch_size(10, 0.3) == 3  # 10 * 0.3 = 2.9999999999999996
    assert bank_batch_size(8, 0.0) == 0
    assert bank_batch_size(8, 0.5) == 4
