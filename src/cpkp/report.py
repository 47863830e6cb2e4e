"""Pictures a person looks at: heat-map overlays of test images.

Image arrays in, image arrays out; writing files is left to the caller.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

PANEL_GAP = 4  # pixels of white between panels


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
    region = outline(image, amap >= threshold)
    panels = [(np.clip(image, 0, 1) * 255).astype(np.uint8), truth, heat, region]
    gap = np.full((h, PANEL_GAP, 3), 255, np.uint8)
    row = []
    for i, p in enumerate(panels):
        row += [p] if i == 0 else [gap, p]
    return np.concatenate(row, axis=1)
