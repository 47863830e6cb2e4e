"""Anomaly maps, calibration, fusion and smoothing (DESIGN.md §1.3).

Pure tensor code: maps in, maps out. ``A_kd`` is the teacher-student disagreement, ``A_kp`` the
distance of the teacher's aggregated patches to the nearest prototype; both are brought to one
scale with statistics of the normal training images before they are fused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cpkp.config import PrototypeConfig
from cpkp.prototype import f_agg, nearest_prototype

ZERO_NORM = 1e-6  # feature vectors shorter than this count as "no signal" (distance 0, not 1)


def cosine_distance_map(t: Tensor, s: Tensor) -> Tensor:
    """Per-position ``1 - cos`` over channels.

    Args:
        t: teacher map [B, C, h, w].
        s: student map [B, C, h, w].

    Returns:
        [B, 1, h, w] float32; 0 where either vector is (near) zero, since a zero vector carries
        no direction to disagree with.
    """
    t, s = t.float(), s.float()
    dot = (t * s).sum(1, keepdim=True)
    norms = t.norm(dim=1, keepdim=True) * s.norm(dim=1, keepdim=True)
    valid = norms > ZERO_NORM**2
    cos = dot / norms.clamp_min(ZERO_NORM**2)
    return torch.where(valid, 1.0 - cos, torch.zeros_like(cos))


def kd_map(
    teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor], size: tuple[int, int]
) -> Tensor:
    """``A_kd``: the per-level cosine distances upsampled to ``size`` and summed. [B, 1, H, W]."""
    total = None
    for t, s in zip(teacher_feats, student_feats):
        level = _upsample(cosine_distance_map(t, s), size)
        total = level if total is None else total + level
    return total


def kp_map(
    teacher_feats: Sequence[Tensor],
    prototypes: Tensor,
    cfg: PrototypeConfig,
    size: tuple[int, int],
    exclude: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """``A_kp``: nearest-prototype distance of each patch, upsampled to ``size``.

    Args:
        teacher_feats: the teacher's three maps [B, C_l, h_l, w_l].
        prototypes: [M, D] prototype vectors.
        cfg: the prototype configuration the vectors were built with.
        size: output (H, W).
        exclude: per image, an optional [M] bool mask of prototypes to ignore (a training
            image's own prototypes, for calibration).

    Returns:
        The map [B, 1, H, W] float32 and the index of each patch's nearest prototype
        [B, h, w] on the prototype grid (which normal patch it was matched to).
    """
    agg = f_agg([f.float() for f in teacher_feats], cfg)
    b, d, h, w = agg.shape
    queries = agg.permute(0, 2, 3, 1).reshape(b, h * w, d)
    dists, indices = [], []
    for i in range(b):
        mask = None if exclude is None else exclude[i]
        dist, index = nearest_prototype(queries[i], prototypes, cfg.chunk_size, exclude=mask)
        dists.append(dist.view(1, 1, h, w))
        indices.append(index.view(1, h, w))
    return _upsample(torch.cat(dists), size), torch.cat(indices)


@dataclass
class Calibration:
    """Robust scale of each map on normal training images, and the prediction thresholds.

    ``standardized`` fusion maps ``A -> (A - median) / (p99 - median)`` per map. Thresholds
    apply to the fused, smoothed map; metrics never use them.
    """

    kd_median: float = 0.0
    kd_p99: float = 1.0
    kp_median: float = 0.0
    kp_p99: float = 1.0
    image_threshold: float = math.inf
    pixel_threshold: float = math.inf

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, float]) -> Calibration:
        return cls(**{k: float(v) for k, v in raw.items()})


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and 99th percentile of ``values`` (any shape), with p99 > median guaranteed."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    median, p99 = np.percentile(flat, [50.0, 99.0])
    if not p99 > median:
        # NOTE: a constant map (e.g. a perfect student) would divide by zero; fall back to the
        # spread to the maximum, then to 1, so the map keeps its raw units.
        spread = float(flat.max() - median)
        p99 = median + (spread if spread > 0 else 1.0)
    return float(median), float(p99)


def fuse(
    a_kd: Tensor | None,
    a_kp: Tensor | None,
    calibration: Calibration,
    gamma: float,
    fusion: str,
) -> Tensor:
    """``A = gamma * A_kd + (1 - gamma) * A_kp`` after optional standardisation.

    Either map may be None (prototype switched off, or the student not used): the other one is
    returned on its own, standardised the same way.
    """
    if fusion == "standardized":
        if a_kd is not None:
            a_kd = (a_kd - calibration.kd_median) / (calibration.kd_p99 - calibration.kd_median)
        if a_kp is not None:
            a_kp = (a_kp - calibration.kp_median) / (calibration.kp_p99 - calibration.kp_median)
    if a_kp is None:
        return a_kd
    if a_kd is None:
        return a_kp
    return gamma * a_kd + (1.0 - gamma) * a_kp


def gaussian_kernel(sigma: float) -> Tensor:
    """1-D normalised Gaussian [2r+1] with r = ceil(4 sigma)."""
    radius = max(1, math.ceil(4.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding. maps: [B, 1, H, W] -> same shape."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.device)
    r = kernel.numel() // 2
    h, w = maps.shape[-2:]
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.pad(maps, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=mode)
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def image_scores(maps: Tensor) -> Tensor:
    """Image score = max of the smoothed map (DESIGN.md §1.3). [B, 1, H, W] -> [B]."""
    return maps.flatten(1).amax(1)


def resize_maps(maps: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Each map [1, H, W] of the batch brought back to its image's own (H, W), bilinearly."""
    return [_upsample(m[None], (int(h), int(w)))[0] for m, (h, w) in zip(maps, sizes)]


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
