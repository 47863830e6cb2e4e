"""Anomaly maps, calibration, fusion and smoothing (DESIGN.md §1.3).

Pure tensor code: maps in, maps out. ``A_kd`` is the teacher-student disagreement, ``A_kp`` the
distance of the teacher's aggregated patches to the nearest prototype; both are brought to one
scale with statistics of the normal training images before they are fused.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cpkp.config import PrototypeConfig
from cpkp.prototype import exact_float32, f_agg, nearest_prototype

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
    # One search per image, on a view of its [D, h*w] columns. One search over the whole batch
    # would need the queries copied row by row first: on a CPU that transposing copy cost more
    # (40 ms per 8 images at 256 px) than the larger products saved.
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
    return torch.from_numpy(_gaussian_taps(sigma))


def _gaussian_taps(sigma: float) -> np.ndarray:
    # NumPy, not torch: an exporter's tracer then sees a constant, not operations to record.
    radius = max(1, math.ceil(4.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding. maps: [B, 1, H, W] -> same shape.

    Each 1-D pass is one matrix product with a banded ``[n, n]`` operator that holds the
    kernel and the padding: the same sums as a padded convolution, which on a CPU took 65-85 ms
    for eight 256x256 maps (one thread; a single-channel 33-tap kernel) against 4-5 ms here.
    """
    if sigma <= 0:
        return maps
    h, w = (int(n) for n in maps.shape[-2:])
    mode = "reflect" if max(1, math.ceil(4.0 * sigma)) < min(h, w) else "replicate"
    across = _smoothing_operator(float(sigma), w, mode).to(maps.device)
    down = across if h == w else _smoothing_operator(float(sigma), h, mode).to(maps.device)
    with exact_float32(maps.device):
        x = maps.float() @ across
        return down.T @ x


@functools.lru_cache(maxsize=16)
def _smoothing_operator(sigma: float, n: int, mode: str) -> Tensor:
    """The ``[n, n]`` matrix ``A`` such that ``x @ A`` pads ``x`` by ``mode`` and blurs it.

    Args:
        sigma: the Gaussian's standard deviation in pixels (:func:`gaussian_kernel`).
        n: length of the signal.
        mode: "reflect" (needs r < n) or "replicate", as ``F.pad`` reads them.

    Returns:
        float32 ``[n, n]`` on the CPU, shared by every caller (the cache): never modify it.
    """
    kernel = _gaussian_taps(sigma)
    r = len(kernel) // 2
    source = np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :]  # [n, 2r+1]
    if mode == "reflect":
        source = np.abs(source)
        source = np.where(source > n - 1, 2 * (n - 1) - source, source)
    else:
        source = np.clip(source, 0, n - 1)
    target = np.broadcast_to(np.arange(n)[:, None], source.shape)
    operator = np.zeros((n, n), dtype=np.float32)
    # operator[j, i] sums the taps of output i that read input j (several near a border)
    np.add.at(operator, (source, target), np.broadcast_to(kernel, source.shape))
    return torch.from_numpy(operator)


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
