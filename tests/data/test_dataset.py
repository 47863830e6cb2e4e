"""ImageDataset items by value, default collate, and the up-front check of every file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cpkp.data.dataset import ImageDataset, validate_images
from cpkp.data.records import Sample
from cpkp.errors import ImageError


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    """A flat grey normal image and a defect image with two mask files (MVTec LOCO style)."""
    normal = _save(tmp_path / "good.png", np.full((8, 12), 51, np.uint8))
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 255
    defect = _save(tmp_path / "defect.png", colour)
    left, right = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    left[:8, :8] = 1
    right[8:, 8:] = 255
    masks = (_save(tmp_path / "m" / "000.png", left), _save(tmp_path / "m" / "001.png", right))
    return [
        Sample(normal, 0, "good", (), "toy", "test"),
        Sample(defect, 1, "dent", masks, "toy", "test"),
    ]


def test_items_hold_resized_image_mask_and_metadata(samples: list[Sample]) -> None:
    dataset = ImageDataset(samples, 8)
    assert len(dataset) == 2

    normal = dataset[0]
    assert normal["image"].shape == (3, 8, 8) and normal["image"].dtype == torch.float32
    torch.testing.assert_close(normal["image"], torch.full((3, 8, 8), 51 / 255))
    torch.testing.assert_close(normal["mask"], torch.zeros(1, 8, 8))
    assert normal["label"] == 0 and normal["index"] == 0
    assert normal["size"].tolist() == [8, 12] and normal["size"].dtype == torch.long
    assert normal["path"] == str(samples[0].image)

    defect = dataset[-1]
    assert defect["index"] == 1 and defect["label"] == 1
    torch.testing.assert_close(defect["image"][0], torch.ones(8, 8))
    torch.testing.assert_close(defect["image"][1:], torch.zeros(2, 8, 8))
    expected = torch.zeros(1, 8, 8)
    expected[0, :4, :4] = expected[0, 4:, 4:] = 1.0  # union of both mask files
    torch.testing.assert_close(defect["mask"], expected)
    with pytest.raises(IndexError):
        dataset[2]


def test_default_collate_batches_items(samples: list[Sample]) -> None:
    batch = next(iter(DataLoader(ImageDataset(samples, 8), batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["mask"].shape == (2, 1, 8, 8)
    assert batch["label"].tolist() == [0, 1]
    assert batch["index"].tolist() == [0, 1]
    assert batch["size"].tolist() == [[8, 12], [16, 16]]
    assert batch["path"] == [str(s.image) for s in samples]
    assert float(batch["mask"][1].sum()) == 32.0


def test_plain_paths_have_unknown_label(samples: list[Sample]) -> None:
    dataset = ImageDataset([str(samples[0].image), samples[1].image], 8)
    assert dataset[0]["label"] == -1 and dataset[1]["label"] == -1
    torch.testing.assert_close(dataset[1]["mask"], torch.zeros(1, 8, 8))
    with pytest.raises(ValueError):
        ImageDataset(samples, 0)


def test_validate_images_passes_good_files(samples: list[Sample]) -> None:
    validate_images(samples + [samples[0].image])


def test_validate_images_lists_every_bad_file_once(samples: list[Sample], tmp_path: Path) -> None:
    good_bytes = samples[0].image.read_bytes()
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(good_bytes[: len(good_bytes) // 2])
    jpeg = _save(tmp_path / "photo.jpg", np.full((64, 64, 3), 90, np.uint8)).read_bytes()
    cut_jpg = tmp_path / "cut.jpg"
    cut_jpg.write_bytes(jpeg[: len(jpeg) // 2])
    empty = tmp_path / "empty.bmp"
    empty.write_bytes(b"")
    text_mask = tmp_path / "mask.png"
    text_mask.write_text("not a mask")

    bad = [
        samples[0],
        Sample(cut_png, 0, "good"),
        cut_jpg,
        Sample(empty, 1, "dent", (text_mask,)),
        Sample(cut_png, 0, "good", split="train"),  # the same file again
    ]
    with pytest.raises(ImageError) as info:
        validate_images(bad)
    message = str(info.value)
    assert message.startswith("4 of 5 image and mask files cannot be read")
    lines = [line.strip() for line in message.splitlines()[1:]]
    for path in (cut_png, cut_jpg, empty, text_mask):
        assert sum(line.startswith(f"{path}:") for line in lines) == 1
    assert str(samples[0].image) not in message
