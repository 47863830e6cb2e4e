"""A torch Dataset of model inputs cut from samples or image paths, and a check of every file.

Images come out at the model's square input and in [0, 1], not normalised: each backbone
applies its own mean and std (DESIGN.md §1.2). How an image becomes inputs (squashed, resized
with its aspect ratio kept, or cut into tiles) is :mod:`cpkp.geometry`'s business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cpkp.data.images import check_image, image_shape, image_tensor, load_image, load_mask
from cpkp.data.records import UNKNOWN_LABEL, Sample
from cpkp.errors import ImageError
from cpkp.geometry import Geometry, Layout, cut_views, mask_views, resize_to

logger = logging.getLogger(__name__)

_LISTED = 20  # unreadable files named in one error before "and N more"


def as_sample(item: Sample | str | Path) -> Sample:
    """A sample as is; a bare path as a test sample of unknown label, without masks."""
    if isinstance(item, Sample):
        return item
    return Sample(Path(item), UNKNOWN_LABEL, "unknown")


class ImageDataset(Dataset):
    """The model inputs (views) of images and their masks, one item per view.

    Without tiling every image gives one view, so item ``i`` is image ``i``; with tiles, the
    views of one image are consecutive items, row by row. Each item is a dict that torch's
    default collate batches:

    - ``"image"``: [3, S, S] float32 in [0, 1] (bilinear with antialiasing, no crop).
    - ``"mask"``: [1, S, S] float32 in {0, 1}, cut like the image (nearest neighbour, zero
      padding); zeros without a mask.
    - ``"label"``: int, 0 normal, 1 defect, -1 unknown (a bare path).
    - ``"index"``: int, the item's position (for a training set: the prototype provenance).
    - ``"owner"``: int, the image's position in ``samples``.
    - ``"view"``, ``"views"``: int, this view's number and the image's number of views.
    - ``"size"``: [2] int64, the image's own (H, W).
    - ``"path"``: str, the image file.

    Args:
        samples: :class:`Sample` records or image paths.
        image_size: side S of the model input.
        geometry: how images become views (default: squashed to S x S). With tiles, every
            image's size is read from its header here, to count its views.
    """

    def __init__(
        self,
        samples: Sequence[Sample | str | Path],
        image_size: int,
        geometry: Geometry | None = None,
    ) -> None:
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.samples = [as_sample(s) for s in samples]
        self.image_size = int(image_size)
        self.geometry = geometry or Geometry(self.image_size)
        if self.geometry.size != self.image_size:
            raise ValueError(f"geometry size {self.geometry.size} != image_size {image_size}")
        counts = [1] * len(self.samples)
        if not self.geometry.single_view:
            counts = [len(self._layout(image_shape(s.image)).views) for s in self.samples]
        self.counts = counts
        self.owners = torch.repeat_interleave(
            torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long)
        )
        self.starts = [0, *torch.tensor(counts, dtype=torch.long).cumsum(0).tolist()][:-1]

    def __len__(self) -> int:
        return len(self.owners)

    def views_of(self, image: int) -> range:
        """The item indices of image ``image``'s views."""
        return range(self.starts[image], self.starts[image] + self.counts[image])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | str]:
        index = range(len(self))[index]  # negative indices count from the end
        owner = int(self.owners[index])
        view = index - self.starts[owner]
        sample = self.samples[owner]
        image = load_image(sample.image)
        height, width = image.shape[:2]
        layout = self._layout((height, width))
        if len(layout.views) != self.counts[owner]:
            raise ImageError(
                f"{sample.image}: the image changed size while being read "
                f"({height}x{width} gives {len(layout.views)} tiles, not {self.counts[owner]})"
            )

        size = self.image_size
        if sample.masks:
            mask = torch.from_numpy(load_mask(sample.masks, (height, width)))
            mask = mask_views(mask, layout, [view])[0]
        else:
            mask = torch.zeros(1, size, size)
        canvas = resize_to(image_tensor(image), layout.canvas)
        return {
            "image": cut_views(canvas, layout, [view])[0],
            "mask": mask,
            "label": sample.label,
            "index": index,
            "owner": owner,
            "view": view,
            "views": self.counts[owner],
            "size": torch.tensor([height, width], dtype=torch.long),
            "path": str(sample.image),
        }

    def _layout(self, shape: tuple[int, int]) -> Layout:
        return self.geometry.layout(*shape)


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
