"""How an image of any size becomes model inputs, and how maps come back to its own size.

Three ways, chosen by ``data.resize`` and ``data.tile`` and described alike by a
:class:`Layout`:

- ``squash`` (the paper's): the whole frame resized to S x S; the aspect ratio may change.
- ``aspect``: the long side resized to S, the aspect ratio kept, the short side padded.
- tiles (``data.tile`` T > 0): the image scaled by S / T, so that a T x T tile becomes S x S,
  and cut into S x S windows that overlap by ``data.tile_overlap`` (scaled alike) and cover
  every pixel, the last window of a row or column aligned to the edge.

Each image is first resized to its *canvas*, the image at the model's scale (S x S when
squashed, long side S for ``aspect``, the image times S / T for tiles), and the canvas is cut
into *views*: S x S model inputs, each a window of the canvas, padded where the canvas is
smaller than S. A view's map goes back the reverse way: its valid (unpadded) part is cut out
and blended into a canvas map, which is resized to the image's own size. Image scores are
taken on the canvas map, so padding never adds to a score.

Pure tensor code: no files, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkp.config import RESIZE_MODES, DataConfig


@dataclass(frozen=True)
class View:
    """One model input: a window of the canvas and where it sits in the S x S input.

    Attributes:
        top, left: the window's first row and column on the canvas.
        height, width: the window's size, at most S each.
        pad_top, pad_left: rows and columns of padding above and left of it in the input.
    """

    top: int
    left: int
    height: int
    width: int
    pad_top: int = 0
    pad_left: int = 0

    def valid(self) -> tuple[slice, slice]:
        """Rows and columns of the input that hold the window (the rest is padding)."""
        return (
            slice(self.pad_top, self.pad_top + self.height),
            slice(self.pad_left, self.pad_left + self.width),
        )

    def window(self) -> tuple[slice, slice]:
        """Rows and columns of the canvas the view shows."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class Layout:
    """Where one image's views come from and where their maps go back.

    Attributes:
        image: the image's own (H, W).
        canvas: (h, w) of the image at the model's scale.
        size: S, the side of every view.
        views: the views, row by row.
        ramp: canvas pixels over which a view's blending weight rises from its edge.
    """

    image: tuple[int, int]
    canvas: tuple[int, int]
    size: int
    views: tuple[View, ...]
    ramp: int = 0


@dataclass(frozen=True)
class Geometry:
    """How images become S x S model inputs (see the module docstring).

    Args:
        size: S, the model input side.
        resize: ``squash`` or ``aspect``; tiles always keep the aspect ratio.
        tile: tile side T in image pixels; 0 turns tiling off.
        overlap: pixels that neighbouring tiles share, in image pixels (below T).
    """

    size: int
    resize: str = "squash"
    tile: int = 0
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or self.tile < 0 or self.overlap < 0:
            raise ValueError(f"invalid geometry {self}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.overlap and self.overlap >= max(self.tile, 1):
            raise ValueError(f"overlap {self.overlap} must be smaller than the tile {self.tile}")

    @classmethod
    def from_config(cls, data: DataConfig) -> Geometry:
        """The geometry of a :class:`~cpkp.config.DataConfig`."""
        return cls(data.image_size, data.resize, data.tile, data.tile_overlap)

    @property
    def mode(self) -> str:
        """``squash``, ``aspect`` or ``tile``."""
        return "tile" if self.tile else self.resize

    @property
    def single_view(self) -> bool:
        """Whether every image gives exactly one view (no tiling)."""
        return self.tile == 0

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.tile:
            return (
                f"tiles of {self.tile} px overlapping by {self.overlap} px, each to {self.size} px"
            )
        if self.resize == "aspect":
            return f"long side to {self.size} px, aspect ratio kept, padded to square"
        return f"whole image resized to {self.size}x{self.size} px"

    def to_dict(self) -> dict[str, int | str]:
        return {
            "size": self.size,
            "resize": self.resize,
            "tile": self.tile,
            "overlap": self.overlap,
        }

    def layout(self, height: int, width: int) -> Layout:
        """The canvas and the views of an image of ``height`` x ``width`` pixels."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        s = self.size
        if self.tile:
            scale = s / self.tile
            canvas = (_scaled(height, scale), _scaled(width, scale))
            ramp = round(self.overlap * scale)
            views = tuple(
                _view(top, left, canvas, s)
                for top in tile_starts(canvas[0], s, ramp)
                for left in tile_starts(canvas[1], s, ramp)
            )
            return Layout((height, width), canvas, s, views, ramp)
        if self.resize == "aspect":
            scale = s / max(height, width)
            canvas = (min(s, _scaled(height, scale)), min(s, _scaled(width, scale)))
            return Layout((height, width), canvas, s, (_view(0, 0, canvas, s),))
        return Layout((height, width), (s, s), s, (View(0, 0, s, s),))


def _scaled(length: int, scale: float) -> int:
    return max(1, round(length * scale))


def _view(top: int, left: int, canvas: tuple[int, int], size: int) -> View:
    """A window of at most ``size`` x ``size`` at (top, left), centred in the input."""
    height, width = min(size, canvas[0] - top), min(size, canvas[1] - left)
    return View(top, left, height, width, (size - height) // 2, (size - width) // 2)


def tile_starts(length: int, window: int, overlap: int) -> list[int]:
    """First pixels of windows of ``window`` pixels covering ``length`` pixels.

    Neighbours share at least ``overlap`` pixels; the last window ends at the edge (it may
    share more). A length up to one window gives a single window at 0.
    """
    if length <= window:
        return [0]
    step = max(1, window - overlap)
    count = math.ceil((length - window) / step) + 1
    return [i * step for i in range(count - 1)] + [length - window]


# ---------------------------------------------------------------------------------------------
# Images to views


def resize_to(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with antialiasing, clamped to [0, 1]; the same size passes unchanged.

    Args:
        image: [C, H, W] float in [0, 1].
        size: output (h, w).

    Returns:
        [C, h, w] float32.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = F.interpolate(
        image[None].float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True
    )
    return x[0].clamp_(0.0, 1.0)


def cut_views(
    canvas: Tensor, layout: Layout, which: Sequence[int] | None = None, pad: str = "replicate"
) -> Tensor:
    """The views of a canvas as S x S inputs.

    Args:
        canvas: [C, h, w], the image resized to ``layout.canvas``.
        layout: the image's layout.
        which: indices of the views to cut (default: all).
        pad: ``replicate`` for images, ``zeros`` for masks.

    Returns:
        [V, C, S, S].
    """
    if tuple(canvas.shape[-2:]) != tuple(layout.canvas):
        raise ValueError(f"canvas is {tuple(canvas.shape[-2:])}, the layout says {layout.canvas}")
    s = layout.size
    out = []
    for index in range(len(layout.views)) if which is None else which:
        view = layout.views[index]
        window = canvas[:, view.window()[0], view.window()[1]]
        right, bottom = s - view.width - view.pad_left, s - view.height - view.pad_top
        if view.pad_left or view.pad_top or right or bottom:
            # NOTE: padding repeats the edge pixels outwards. Zeros or a mean colour would draw
            # a step around every padded image, an artificial edge the detector may flag;
            # reflection would copy content (and needs a pad smaller than the content). The
            # repeated edge has no step, and every padded training image shows it alike.
            mode = "replicate" if pad == "replicate" else "constant"
            window = F.pad(window[None], (view.pad_left, right, view.pad_top, bottom), mode=mode)[0]
        out.append(window)
    return torch.stack(out)


def to_views(image: Tensor, layout: Layout) -> Tensor:
    """Every view of an image: [C, H, W] in [0, 1] -> [V, C, S, S]."""
    return cut_views(resize_to(image, layout.canvas), layout)


def mask_views(mask: Tensor, layout: Layout, which: Sequence[int] | None = None) -> Tensor:
    """A mask cut like its image, nearest neighbour, zero in the padding.

    Args:
        mask: [H, W] bool or {0, 1} at the image's own size.

    Returns:
        [V, 1, S, S] float32 in {0, 1}.
    """
    canvas = resize_nearest(mask != 0, layout.canvas).float()[None]
    return cut_views(canvas, layout, which, pad="zeros")


def valid_views(layout: Layout, roi: Tensor | None = None) -> Tensor:
    """Which input pixels of each view are image (not padding) and inside the ROI.

    Args:
        roi: [h, w] bool on the canvas, or None.

    Returns:
        [V, 1, S, S] bool.
    """
    canvas = torch.ones(layout.canvas) if roi is None else roi.float()
    return cut_views(canvas[None], layout, pad="zeros") > 0.5


# ---------------------------------------------------------------------------------------------
# Maps back


def blend_window(height: int, width: int, ramp: int) -> Tensor:
    """Blending weights of one view's valid part: [height, width] float32 in (0, 1].

    The weight rises linearly over ``ramp`` pixels from each edge, so where views overlap the
    centre of one outweighs the border of the other, and tile borders leave no seam. Every
    weight is positive: a pixel that one view alone covers keeps that view's value.
    """
    return _ramp(height, ramp)[:, None] * _ramp(width, ramp)[None, :]


def _ramp(n: int, ramp: int) -> Tensor:
    i = torch.arange(n, dtype=torch.float32)
    return torch.minimum(i + 1, n - i).div(ramp + 1).clamp(max=1.0)


def stitch(maps: Tensor, layout: Layout) -> Tensor:
    """View maps back onto the canvas, overlaps blended by :func:`blend_window`.

    Args:
        maps: [V, C, S, S], one map per view, in the order of ``layout.views``.

    Returns:
        [C, h, w] on the canvas. A single view's valid part comes back exactly.
    """
    if maps.shape[0] != len(layout.views):
        raise ValueError(f"{maps.shape[0]} maps for {len(layout.views)} views")
    if len(layout.views) == 1:
        rows, cols = layout.views[0].valid()
        return maps[0, :, rows, cols]

    total = maps.new_zeros(maps.shape[1], *layout.canvas)
    weight = maps.new_zeros(1, *layout.canvas)
    for m, view in zip(maps, layout.views):
        w = blend_window(view.height, view.width, layout.ramp).to(maps)
        rows, cols = view.window()
        total[:, rows, cols] += m[:, view.valid()[0], view.valid()[1]] * w
        weight[:, rows, cols] += w
    return total / weight


def to_image_size(canvas_map: Tensor, size: tuple[int, int]) -> Tensor:
    """A canvas map [C, h, w] resized bilinearly to the image's own (H, W)."""
    if tuple(canvas_map.shape[-2:]) == tuple(size):
        return canvas_map
    return F.interpolate(
        canvas_map[None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False
    )[0]


def resize_nearest(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest neighbour on pixel centres (as Pillow's NEAREST): [h, w] -> [H, W]."""
    h, w = mask.shape[-2:]
    rows = ((torch.arange(size[0], dtype=torch.float64) + 0.5) * h / size[0]).long()
    cols = ((torch.arange(size[1], dtype=torch.float64) + 0.5) * w / size[1]).long()
    return mask[..., rows.clamp_(max=h - 1)[:, None], cols.clamp_(max=w - 1)[None, :]]


def region_max(maps: Tensor, roi: Tensor | None = None) -> Tensor:
    """The maximum of each channel over the ROI (over everything without one).

    Args:
        maps: [C, h, w].
        roi: [h, w] bool, or None. An ROI with no pixel at this size counts as absent.

    Returns:
        [C].
    """
    if roi is None or not bool(roi.any()):
        return maps.flatten(1).amax(1)
    return maps[:, roi].amax(1)
