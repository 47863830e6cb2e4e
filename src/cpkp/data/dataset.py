"""A torch Dataset over samples or image paths, and an up-front check of every file.

Images come out resized to the model's square input and in [0, 1], not normalised: each
backbone applies its own mean and std (DESIGN.md §1.2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cpkp.data.images import check_image, load_image, load_mask, resize_image, resize_mask
from cpkp.data.records import UNKNOWN_LABEL, Sample
from cpkp.errors import ImageError

logger = logging.getLogger(__name__)

_LISTED = 20  # unreadable files named in one error before "and N more"


def as_sample(item: Sample | str | Path) -> Sample:
    """A sample as is; a bare path as a test sample of unknown label, without masks."""
    if isinstance(item, Sample):
        return item
    return Sample(Path(item), UNKNOWN_LABEL, "unknown")


class ImageDataset(Dataset):
    """Images (and their masks) resized to image_size x image_size.

    Each item is a dict that torch's default collate batches:

    - ``"image"``: [3, S, S] float32 in [0, 1], bilinear with antialiasing, no crop.
    - ``"mask"``: [1, S, S] float32 in {0, 1} (nearest neighbour); zeros without a mask.
    - ``"label"``: int, 0 normal, 1 defect, -1 unknown (a bare path).
    - ``"index"``: int, the position in ``samples``.
    - ``"size"``: [2] int64, the original (H, W).
    - ``"path"``: str, the image file.

    Args:
        samples: :class:`Sample` records or image paths.
        image_size: side S of the square the images are resized to.
    """

    def __init__(self, samples: Sequence[Sample | str | Path], image_size: int) -> None:
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.samples = [as_sample(s) for s in samples]
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | str]:
        index = range(len(self.samples))[index]  # negative indices count from the end
        sample = self.samples[index]
        image = load_image(sample.image)
        height, width = image.shape[:2]

        if sample.masks:
            mask = resize_mask(load_mask(sample.masks, (height, width)), self.image_size)
        else:
            mask = torch.zeros(1, self.image_size, self.image_size)

        return {
            "image": resize_image(image, self.image_size),
            "mask": mask,
            "label": sample.label,
            "index": index,
            "size": torch.tensor([height, width], dtype=torch.long),
            "path": str(sample.image),
        }


def validate_images(samples: Sequence[Sample | str | Path]) -> None:
    """Check every image and mask file once, before long work, and report all bad ones.

    Each file gets :func:`~cpkp.data.images.check_image` (PNG checksums, JPEG decoded at 1/8
    scale, others decoded in full), so a corrupt file is found now rather than mid-training.

    Raises:
        ImageError: listing every unreadable file with its problem.
    """
    start = time.perf_counter()
    paths = _unique_files(as_sample(s) for s in samples)
    problems = []
    for path in paths:
        try:
            check_image(path)
        except ImageError as err:
            problems.append(str(err))

    if problems:
        shown = "\n  ".join(problems[:_LISTED])
        more = f"\n  and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        raise ImageError(
            f"{len(problems)} of {len(paths)} image and mask files cannot be read:\n  {shown}{more}"
        )
    logger.info(
        "checked %d image and mask files in %.1f s", len(paths), time.perf_counter() - start
    )


def _unique_files(samples: Iterable[Sample]) -> list[Path]:
    """Image and mask files of the samples, each once, in order of first appearance."""
    seen: dict[Path, None] = {}
    for sample in samples:
        seen.setdefault(sample.image)
        for mask in sample.masks:
            seen.setdefault(mask)
    return list(seen)
