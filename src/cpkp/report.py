"""Pictures a person looks at: heat-map overlays, flagged regions, plots.

Arrays in, image arrays or encoded image bytes out; writing files is left to the caller
(:mod:`cpkp.html_report` puts them in a page).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from scipy import ndimage

PANEL_GAP = 4  # pixels of white between panels
PLOT_DPI = 100


def colorize(amap: np.ndarray, low: float, high: float, cmap: str = "jet") -> np.ndarray:
    """A float map [H, W] as RGB uint8 [H, W, 3], ``low``..``high`` spanning the colour map."""
    span = high - low if high > low else 1.0
    unit = np.clip((amap - low) / span, 0.0, 1.0)
    return (colormaps[cmap](unit)[..., :3] * 255).astype(np.uint8)


def blend(image: np.ndarray, heat: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Mix an RGB float image in [0, 1] with an RGB uint8 heat map; returns uint8."""
    base = (np.clip(image, 0, 1) * 255).astype(np.float32)
    return (base * (1 - weight) + heat.astype(np.float32) * weight).astype(np.uint8)


def outline(image: np.ndarray, region: np.ndarray, color=(255, 0, 0)) -> np.ndarray:
    """Draw the boundary of a boolean region [H, W] on an RGB float image; returns uint8."""
    out = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    if region.any():
        inner = region.copy()
        inner[1:, :] &= region[:-1, :]
        inner[:-1, :] &= region[1:, :]
        inner[:, 1:] &= region[:, :-1]
        inner[:, :-1] &= region[:, 1:]
        out[region & ~inner] = color
    return out


def overlay_panel(
    image: np.ndarray,
    mask: np.ndarray | None,
    amap: np.ndarray,
    threshold: float,
    low: float,
    high: float,
) -> np.ndarray:
    """input | ground truth | anomaly map | thresholded region, side by side.

    Args:
        image: [H, W, 3] float RGB in [0, 1].
        mask: [H, W] bool ground truth, or None (drawn as an empty panel).
        amap: [H, W] anomaly map at the image's size.
        threshold: pixel threshold for the last panel.
        low, high: the map values at the two ends of the colour scale.

    Returns:
        [H, 4W + 3 gaps, 3] uint8.
    """
    h, w = amap.shape
    truth = outline(image, mask if mask is not None else np.zeros((h, w), bool), (0, 255, 0))
    heat = blend(image, colorize(amap, low, high))
    region = outline(image, amap > threshold)  # a value equal to the threshold is normal
    panels = [(np.clip(image, 0, 1) * 255).astype(np.uint8), truth, heat, region]
    gap = np.full((h, PANEL_GAP, 3), 255, np.uint8)
    row = []
    for i, p in enumerate(panels):
        row += [p] if i == 0 else [gap, p]
    return np.concatenate(row, axis=1)


def box(
    image: np.ndarray,
    top: int,
    left: int,
    bottom: int,
    right: int,
    color: tuple[int, int, int] = (255, 220, 0),
) -> np.ndarray:
    """Draw a one-pixel rectangle (rows top..bottom-1, columns left..right-1) on a uint8 image.

    Args:
        image: [H, W, 3] uint8, drawn on in place and returned.
    """
    h, w = image.shape[:2]
    top, left = max(top, 0), max(left, 0)
    bottom, right = min(bottom, h), min(right, w)
    if top >= bottom or left >= right:
        return image
    image[top, left:right] = color
    image[bottom - 1, left:right] = color
    image[top:bottom, left] = color
    image[top:bottom, right - 1] = color
    return image


def shrink(
    image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray, side: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Image, mask and map brought down to ``side`` x ``side`` for a thumbnail (never enlarged).

    Args:
        image: [H, W, 3] float RGB in [0, 1]; mask: [H, W] bool or None; amap: [H, W] float.

    Returns:
        The three at the new size: antialiased image and map, nearest-neighbour mask.
    """
    h, w = amap.shape
    if max(h, w) <= side:
        return image, mask, amap
    size = (side, side)
    pixels = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    image = np.asarray(pixels.resize(size, Image.Resampling.BILINEAR), np.float32) / 255.0
    amap = np.asarray(
        Image.fromarray(amap.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR)
    )
    if mask is not None:
        truth = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(truth.resize(size, Image.Resampling.NEAREST)) > 127
    return image, mask, amap


def encode(image: np.ndarray, kind: str = "PNG", quality: int = 85) -> bytes:
    """A uint8 [H, W, 3] (or [H, W]) image as PNG or JPEG file bytes."""
    buffer = io.BytesIO()
    options = {"quality": quality} if kind == "JPEG" else {"optimize": True}
    Image.fromarray(image).save(buffer, kind, **options)
    return buffer.getvalue()


# --- flagged regions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One connected component of a thresholded anomaly map.

    Attributes:
        labels: [H, W] int, the component labels of the whole map (shared by its regions).
        label: this component's label in ``labels``.
        peak: (y, x) of its highest map value.
        peak_value: that value.
        area: its pixel count.
    """

    labels: np.ndarray
    label: int
    peak: tuple[int, int]
    peak_value: float
    area: int

    @property
    def mask(self) -> np.ndarray:
        """[H, W] bool, the component's pixels."""
        return self.labels == self.label


def flagged_regions(amap: np.ndarray, threshold: float) -> list[Region]:
    """The 8-connected regions of ``amap > threshold``, highest peak first.

    Args:
        amap: [H, W] anomaly map.
        threshold: pixel threshold; a value equal to it is normal, as in :func:`overlay_panel`.
    """
    labels, count = ndimage.label(amap > threshold, structure=np.ones((3, 3), bool))
    if count == 0:
        return []
    ids = np.arange(1, count + 1)
    peaks = ndimage.maximum_position(amap, labels, ids)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    regions = [
        Region(labels, int(k), (int(y), int(x)), float(amap[y, x]), int(area))
        for k, (y, x), area in zip(ids, peaks, areas)
    ]
    return sorted(regions, key=lambda r: -r.peak_value)


def crop(image: np.ndarray, center: tuple[float, float], side: int) -> tuple[np.ndarray, int, int]:
    """A ``side`` x ``side`` window of ``image`` around ``center``, shifted to stay inside.

    Args:
        image: [H, W, ...] array with H, W >= side.
        center: (y, x) in pixels.

    Returns:
        The window and its top-left corner (top, left) in ``image``.
    """
    h, w = image.shape[:2]
    side = min(side, h, w)
    top = int(np.clip(round(center[0] - side / 2), 0, h - side))
    left = int(np.clip(round(center[1] - side / 2), 0, w - side))
    return image[top : top + side, left : left + side], top, left


# --- plots (matplotlib without pyplot: no global state, no display) ----------------------------


def _axes(width: float, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def curve_plot(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    xlabel: str,
    ylabel: str,
    xmax: float = 1.0,
    diagonal: bool = False,
) -> bytes:
    """One line per named curve as PNG bytes (ROC or PRO curves).

    Args:
        curves: legend label -> (x [P], y [P]).
        xmax: right end of the x axis (0.3 for a PRO curve up to FPR 0.3).
        diagonal: draw the chance line y = x.
    """
    figure, ax = _axes(4.6, 3.6)
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, linewidth=1.5)
    if diagonal:
        ax.plot([0, xmax], [0, xmax], color="0.6", linestyle=":", linewidth=1)
    ax.set(xlim=(0, xmax), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def score_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float) -> bytes:
    """Histogram of good vs defect image scores with the image threshold, as PNG bytes.

    Args:
        scores: [N] image scores; labels: [N] 0 good, 1 defect.
        threshold: the calibrated image threshold (drawn when finite).
    """
    figure, ax = _axes(6.0, 3.2)
    edges = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 3)))
    for label, name, color in ((0, "good", "tab:green"), (1, "defect", "tab:red")):
        chosen = scores[labels == label]
        if len(chosen):
            ax.hist(chosen, bins=edges, alpha=0.55, color=color, label=f"{name} ({len(chosen)})")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score (fused)", ylabel="images", title="image scores")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return _png(figure)


def bar_chart(
    groups: Sequence[str],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
) -> bytes:
    """Grouped bars with error bars as PNG bytes; a NaN mean leaves its bar out.

    Args:
        groups: the x-axis groups (categories).
        series: legend label -> (means [G], error half-widths [G]), one value per group.
    """
    figure, ax = _axes(max(5.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.6)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, (means, errors)) in enumerate(series.items()):
        ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            means,
            width,
            yerr=errors,
            label=label,
            capsize=3,
        )
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 6 else 0)
    ax.set(ylim=(0, 1.05), ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _png(figure)
