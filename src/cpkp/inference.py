"""From scored views to what a user gets: each image's maps, score and mask at its own size.

Shared by :class:`cpkp.api.Detector` and the exported model's
:class:`cpkp.export.OnnxDetector`: both cut images into views (:mod:`cpkp.geometry`), score the
views with their own networks, and hand the maps to :func:`stream_image_maps`, so the stitching,
region of interest and thresholds are one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cpkp.data.readers import list_images
from cpkp.data.records import Sample
from cpkp.errors import DatasetError, ScoringError
from cpkp.geometry import (
    Geometry,
    Layout,
    region_max,
    resize_nearest,
    stitch,
    to_image_size,
    to_views,
)

ImageSource = Sample | str | Path
ImageInput = Sequence[ImageSource] | str | Path  # a list of images, or one folder of images


@dataclass
class Prediction:
    """What :meth:`Detector.predict` returns for each image."""

    path: str
    score: float
    is_anomalous: bool  # score > image threshold: a score equal to it counts as normal
    map: np.ndarray  # [H, W] float32 at the image's own size
    mask: np.ndarray  # [H, W] bool, map > pixel threshold (inside the region of interest)


@dataclass
class ImageMaps:
    """One image's smoothed maps on its canvas, the image at the model's scale.

    Attributes:
        index: the image's position in the input list.
        path: the image file, or ``tensor[i]``.
        layout: the image's views and canvas (:class:`cpkp.geometry.Layout`).
        maps: part -> [1, h, w] on the canvas: ``"fused"`` always; ``"kd"`` and ``"kp"``
            (smoothed, raw units) when they were asked for.
        roi: the run's region of interest at its own size, [Hr, Wr] bool, or None.
        kp_index: [gh, gw] nearest prototype per grid cell, for squashed images only (the grid
            then covers the model-size map), or None.
    """

    index: int
    path: str
    layout: Layout
    maps: dict[str, Tensor]
    roi: Tensor | None = None
    kp_index: Tensor | None = None

    def roi_at(self, size: tuple[int, int]) -> Tensor | None:
        """The region of interest resized (nearest neighbour) to ``size``, or None."""
        return None if self.roi is None else resize_nearest(self.roi, size)

    def score(self, part: str = "fused") -> float:
        """Image score: the maximum of the canvas map inside the region of interest."""
        return float(region_max(self.maps[part], self.roi_at(self.layout.canvas))[0])

    def map_at(self, size: tuple[int, int], part: str = "fused") -> Tensor:
        """The map resized to ``size`` [H, W], zero outside the region of interest."""
        amap = to_image_size(self.maps[part], size)[0]
        roi = self.roi_at(size)
        return amap if roi is None else amap * roi


def stream_image_maps(
    batches: Iterable[dict[str, Any]],
    score_views: Callable[[Tensor], dict[str, Tensor]],
    geometry: Geometry,
    roi: Tensor | None = None,
) -> Iterator[ImageMaps]:
    """Score batches of views; yield each image's maps as soon as its last view is scored.

    Args:
        batches: dicts with ``"image"`` [B, 3, S, S] views and ``"owner"``, ``"view"``,
            ``"views"``, ``"size"``, ``"path"`` as an :class:`ImageDataset` loader gives them,
            the views of one image consecutive and in order.
        score_views: views -> part -> [B, 1, S, S] smoothed maps on the CPU (``"fused"`` at
            least), and optionally ``"kp_index"`` [B, gh, gw].
        geometry: how the views were cut.
        roi: the region of interest at its own size, [Hr, Wr] bool, or None.
    """
    pending: dict[int, list[dict[str, Tensor]]] = {}
    for batch in batches:
        parts = score_views(batch["image"])
        for j in range(len(batch["image"])):
            owner = int(batch["owner"][j])
            pending.setdefault(owner, []).append({k: v[j] for k, v in parts.items()})
            if int(batch["view"][j]) + 1 < int(batch["views"][j]):
                continue
            views = pending.pop(owner)
            layout = geometry.layout(*(int(v) for v in batch["size"][j]))
            if len(views) != len(layout.views):
                raise RuntimeError(f"{batch['path'][j]}: {len(views)} of {len(layout.views)} views")
            maps = {
                name: stitch(torch.stack([v[name] for v in views]), layout)
                for name in views[0]
                if name != "kp_index"
            }
            kp_index = views[0].get("kp_index")
            yield ImageMaps(owner, str(batch["path"][j]), layout, maps, roi, kp_index)


def tensor_views(images: Tensor, geometry: Geometry, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of the views of images given as one tensor, as an ImageDataset loader gives them.

    Args:
        images: [B, 3, H, W] float in [0, 1].
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {list(images.shape)}")
    height, width = (int(v) for v in images.shape[-2:])
    layout = geometry.layout(height, width)
    items = [
        (view, i, v)
        for i in range(len(images))
        for v, view in enumerate(to_views(images[i].float().cpu(), layout))
    ]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        yield {
            "image": torch.stack([view for view, _, _ in chunk]),
            "owner": torch.tensor([i for _, i, _ in chunk]),
            "view": torch.tensor([v for _, _, v in chunk]),
            "views": torch.full((len(chunk),), len(layout.views)),
            "size": torch.tensor([[height, width]] * len(chunk)),
            "path": [f"tensor[{i}]" for _, i, _ in chunk],
        }


def prediction_from(item: ImageMaps, image_threshold: float, pixel_threshold: float) -> Prediction:
    """An image's :class:`Prediction`: map and mask at its own size, score on its canvas."""
    size = item.layout.image
    amap = item.map_at(size)
    mask = amap > pixel_threshold
    roi = item.roi_at(size)
    if roi is not None:
        mask &= roi
    score = item.score()
    return Prediction(
        path=item.path,
        score=score,
        is_anomalous=score > image_threshold,
        map=amap.numpy().astype(np.float32),
        mask=mask.numpy(),
    )


def single_thread_worker(worker_id: int) -> None:
    """Data-loader workers resize with one thread each: the processes are the parallelism."""
    torch.set_num_threads(1)


def image_list(images: ImageInput) -> list[ImageSource]:
    """A list of images as given, or the images of a folder given as one path.

    A single ``str`` is a path, never a sequence of letters.

    Raises:
        DatasetError: a path that is not a folder, or a folder with no image.
    """
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise DatasetError(
                f"{folder}: expected a folder of images or a list of image paths, got a path "
                f"that is {'a file' if folder.exists() else 'not found'}"
            )
        return list(list_images(folder))
    return list(images)


def require_finite(predictions: list[Prediction]) -> list[Prediction]:
    """The predictions, or ScoringError naming every image with a NaN or infinite value."""
    bad = [p.path for p in predictions if not (np.isfinite(p.score) and np.isfinite(p.map).all())]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ScoringError(
            f"non-finite anomaly scores (NaN or inf) for {len(bad)} image(s): {shown}. The "
            "images were read and are finite, so the model's weights or calibration are not: "
            "retrain the run"
        )
    return predictions
