"""Evaluation metrics: AUROC, average precision, F1-max and AUPRO (DESIGN.md §1.4).

Every metric takes raw scores (never clamped or min-max normalised) and returns a float, or
None when it is undefined on the data given (a test set with one class only); the function then
logs one WARNING that says why, and a caller writes "undefined".

Image-level metrics are exact (scikit-learn). Pixel-level metrics count pixels per score bin in
a :class:`PixelHistogram`, filled image by image in chunks, so a full VisA category at 256x256
(about 130 million pixels) never needs a copy of all its pixels:

- **Exact path** (at most ``exact_max_pixels`` pixels, default 2**20): one bin per distinct
  score, so every curve and metric equals the sort-based definition (scikit-learn's, the MVTec
  AD evaluation's) up to float rounding. Peak extra memory about 100 bytes per pixel.
- **Binned path** (larger sets): about ``n_bins`` (default 16,384) bins whose edges are
  quantiles of a fixed-seed random sample of the defect-free scores and, separately, of the
  defect scores, so every bin holds about 2/n_bins of either class; a score value holding many
  pixels gets a bin of its own. Each bin edge is a real threshold, so every curve point is
  exact; only the stretch of the curve inside a bin is drawn straight. Peak extra memory: about
  25 bytes per pixel of one chunk (``chunk_pixels``, default 2**20 pixels, so about 26 MB) plus
  the quantile sample (32 values per bin, 4 MB) and a few arrays of ``n_bins`` values; never a
  copy of the whole set.

Binning error, stated and computed from the counts (:meth:`PixelHistogram.auroc_error_bound`,
:meth:`PixelHistogram.aupro_error_bound`; both 0 on the exact path):

- AUROC: |binned - exact| <= 1/2 * sum over bins holding more than one distinct score of
  (fraction of defect pixels in the bin) * (fraction of defect-free pixels in the bin); for
  continuous scores below 1 / n_bins (measured: 1.7e-5 at the default on 131M pixels).
- AUPRO: the (FPR, PRO) curve is monotone between two bin edges, so the area of each bin's
  stretch is off by at most half its width times its height (the full rectangle for the stretch
  that crosses the FPR limit); the sum over bins holding more than one distinct score, divided
  by the limit, bounds the error.
- Average precision and F1-max have no such bound. The binned F1-max is the exact F1 at the
  threshold it returns (a lower bound of the exact F1-max); at 1,024 bins or more both are
  within 1e-3 of the exact values in the tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from cpkp.errors import ConfigError, CpkpError

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
Maps = ArrayLike | Sequence[ArrayLike]

FPR_LIMIT = 0.3  # MVTec AD evaluation: AUPRO integrated up to FPR 0.3
N_BINS = 16_384  # score bins of the binned path
EXACT_MAX_PIXELS = 2**20  # up to this many pixels, one bin per distinct score
CHUNK_PIXELS = 2**20  # pixels counted at a time on either path
SAMPLES_PER_BIN = 32  # quantile sample size per bin and class
SEED = 0  # the quantile sample is drawn with a fixed seed: same data, same result
LISTED_NAMES = 5  # images named in an error or warning message before "and N more"
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_OVERALL = "\x00overall"  # group key of all images, which no defect type can take


@dataclass(frozen=True)
class PixelHistogram:
    """Pixel counts per score bin: enough for every pixel-level metric and curve.

    Bin ``b`` holds the scores ``s`` with ``thresholds[b] <= s < thresholds[b + 1]`` (the last
    bin has no upper edge). A pixel is called defective at threshold ``t`` when ``s >= t``, so
    the bin edges are the thresholds at which the curves are drawn.

    Attributes:
        thresholds: [B] lower edge of each bin, increasing.
        positives: [B] defect pixels per bin (int64).
        negatives: [B] defect-free pixels per bin (int64).
        region_mass: [B] sum, over the defect pixels of the bin, of 1 / (pixel count of their
            8-connected defect region); summed from the top bin down and divided by
            ``n_regions`` it is the mean covered fraction of the regions (PRO).
        n_regions: number of 8-connected defect regions over all images.
        single_valued: [B] True where a bin holds one distinct score, so no binning error.
        exact: True on the exact path (every bin single-valued).
    """

    thresholds: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    region_mass: np.ndarray
    n_regions: int
    single_valued: np.ndarray
    exact: bool

    @property
    def n_positive(self) -> int:
        return int(self.positives.sum())

    @property
    def n_negative(self) -> int:
        return int(self.negatives.sum())

    def undefined_reason(self) -> str | None:
        """Why pixel metrics are undefined on these pixels, or None when they are defined."""
        if self.n_positive == 0:
            return "no defect pixels (every ground-truth mask is empty)"
        if self.n_negative == 0:
            return "no defect-free pixels"
        return None

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """ROC points from the highest threshold down.

        Returns:
            fpr: [B + 1] from 0 to 1, non-decreasing.
            tpr: [B + 1] from 0 to 1, non-decreasing.
        """
        return _cumulative_rate(self.negatives), _cumulative_rate(self.positives)

    def auroc(self) -> float:
        """Area under the ROC curve; ties inside a bin count one half, as for equal scores."""
        fpr, tpr = self.roc_curve()
        return _trapezoid(fpr, tpr)

    def auroc_error_bound(self) -> float:
        """Bound on |this AUROC - the exact AUROC| (module docstring)."""
        fpr, tpr = self.roc_curve()
        return 0.5 * _bin_rectangles(fpr, tpr, self.single_valued[::-1])

    def average_precision(self) -> float:
        """Sum over thresholds of (recall step) x (precision), scikit-learn's definition."""
        true_pos = np.cumsum(self.positives[::-1])
        predicted = true_pos + np.cumsum(self.negatives[::-1])
        precision = np.divide(true_pos, predicted, out=np.ones(len(predicted)), where=predicted > 0)
        recall_step = self.positives[::-1] / self.n_positive
        return float(np.sum(recall_step * precision))

    def f1_max(self) -> tuple[float, float]:
        """Best F1 over all thresholds and the threshold that gives it (defect: score >= it)."""
        true_pos = np.cumsum(self.positives[::-1])
        false_pos = np.cumsum(self.negatives[::-1])
        false_neg = self.n_positive - true_pos
        f1 = 2 * true_pos / (2 * true_pos + false_pos + false_neg)
        best = int(np.argmax(f1))
        return float(f1[best]), float(self.thresholds[::-1][best])

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-region overlap curve from the highest threshold down.

        Returns:
            fpr: [B + 1] false-positive rate over all defect-free pixels, from 0 to 1.
            pro: [B + 1] mean covered fraction of the defect regions, from 0 to 1.
        """
        covered = np.cumsum(self.region_mass[::-1]) / self.n_regions
        pro = np.concatenate([[0.0], np.minimum(covered, 1.0)])
        return _cumulative_rate(self.negatives), pro

    def aupro(self, fpr_limit: float = FPR_LIMIT) -> float:
        """Area under the PRO curve up to ``fpr_limit``, divided by it, so in [0, 1]."""
        fpr, pro = self.pro_curve()
        return _area_up_to(fpr, pro, fpr_limit) / fpr_limit

    def aupro_error_bound(self, fpr_limit: float = FPR_LIMIT) -> float:
        """Bound on |this AUPRO - the exact AUPRO| (module docstring)."""
        fpr, pro = self.pro_curve()
        binned = ~self.single_valued[::-1]
        start, end = fpr[:-1], fpr[1:]
        height = np.diff(pro)
        inside = binned & (end <= fpr_limit)
        crossing = binned & (start < fpr_limit) & (end > fpr_limit)
        half_rectangles = 0.5 * np.sum((end - start)[inside] * height[inside])
        cut_rectangles = np.sum((fpr_limit - start[crossing]) * height[crossing])
        return float(half_rectangles + cut_rectangles) / fpr_limit


def image_auroc(
    scores: ArrayLike, labels: ArrayLike, names: Sequence[str] | None = None
) -> float | None:
    """Image-level AUROC.

    Args:
        scores: [N] anomaly score per image.
        labels: [N] 1 for a defective image, 0 for a good one.
        names: [N] image names for error messages.

    Returns:
        The AUROC, or None (with a warning) when the images are all of one class.
    """
    scores, labels = _image_inputs(scores, labels, names)
    if _warn_if_one_class("image AUROC", labels):
        return None
    return float(roc_auc_score(labels, scores))


def image_ap(
    scores: ArrayLike, labels: ArrayLike, names: Sequence[str] | None = None
) -> float | None:
    """Image-level average precision; arguments and None as in :func:`image_auroc`."""
    scores, labels = _image_inputs(scores, labels, names)
    if _warn_if_one_class("image AP", labels):
        return None
    return float(average_precision_score(labels, scores))


def f1_max(
    scores: ArrayLike, labels: ArrayLike, names: Sequence[str] | None = None
) -> tuple[float, float] | None:
    """Best F1 over every threshold of scikit-learn's precision-recall curve.

    Args:
        scores: [N] anomaly score per image.
        labels: [N] 1 for a defective image, 0 for a good one.
        names: [N] image names for error messages.

    Returns:
        (F1-max, threshold): an image is called defective when its score >= threshold. None
        (with a warning) when the images are all of one class.
    """
    scores, labels = _image_inputs(scores, labels, names)
    if _warn_if_one_class("image F1-max", labels):
        return None
    return _f1_max_exact(scores, labels)


def image_f1_max(
    scores: ArrayLike, labels: ArrayLike, names: Sequence[str] | None = None
) -> float | None:
    """Image-level F1-max without its threshold; see :func:`f1_max`."""
    best = f1_max(scores, labels, names)
    return None if best is None else best[0]


def pixel_histogram(
    maps: Maps,
    masks: Maps,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    names: Sequence[str] | None = None,
    n_bins: int = N_BINS,
    exact_max_pixels: int = EXACT_MAX_PIXELS,
    chunk_pixels: int = CHUNK_PIXELS,
) -> PixelHistogram:
    """Count the pixels of some images per score bin (exact or binned path, module docstring).

    Args:
        maps: [N, H, W] anomaly maps (numpy or torch, any float type), or a sequence of N maps
            [H_i, W_i] of their own sizes; a singleton channel ([N, 1, H, W]) is accepted.
        masks: ground truth in the same layout as ``maps``; nonzero means defect.
        indices: the images to count (default all), for example one defect type and the good
            images.
        names: [N] image names for error messages.
        n_bins: about how many bins the binned path uses.
        exact_max_pixels: largest pixel count computed exactly.
        chunk_pixels: pixels counted at a time; bounds the memory of the binned path.

    Raises:
        CpkpError: a map holds NaN or inf, or a map and its mask differ in shape.
    """
    if n_bins < 2:
        raise ConfigError(f"n_bins={n_bins}: expected at least 2 score bins")
    indices = _check_indices(indices, len(maps), len(masks))
    sizes, defect_counts = _pixel_counts(maps, masks, indices, names)
    _check_finite_maps(maps, indices, names)

    exact = int(sizes.sum()) <= exact_max_pixels
    # NOTE: above exact_max_pixels the curves are binned (error bounded and reported), where the
    # MVTec AD script sorts every pixel; the memory of a full sort is what this avoids.
    if exact:
        edges, single_valued = _exact_edges(maps, indices)
    else:
        edges, single_valued = _binned_edges(maps, masks, indices, sizes, defect_counts, n_bins)
    histogram = _count(maps, masks, indices, sizes, edges, single_valued, exact, chunk_pixels)
    logger.debug(
        "pixel histogram of %d images, %d pixels: %s path, %d bins",
        len(indices),
        int(sizes.sum()),
        "exact" if exact else "binned",
        len(edges),
    )
    return histogram


def pixel_auroc(maps: Maps, masks: Maps, **options: Any) -> float | None:
    """Pixel-level AUROC; arguments as in :func:`pixel_histogram`, None when undefined."""
    histogram = _defined_histogram("pixel AUROC", maps, masks, options)
    return None if histogram is None else histogram.auroc()


def pixel_ap(maps: Maps, masks: Maps, **options: Any) -> float | None:
    """Pixel-level average precision; arguments as in :func:`pixel_histogram`."""
    histogram = _defined_histogram("pixel AP", maps, masks, options)
    return None if histogram is None else histogram.average_precision()


def pixel_f1_max(maps: Maps, masks: Maps, **options: Any) -> float | None:
    """Pixel-level F1-max; the threshold is :meth:`PixelHistogram.f1_max`'s second value."""
    histogram = _defined_histogram("pixel F1-max", maps, masks, options)
    return None if histogram is None else histogram.f1_max()[0]


def aupro(maps: Maps, masks: Maps, fpr_limit: float = FPR_LIMIT, **options: Any) -> float | None:
    """Area under the per-region-overlap curve up to ``fpr_limit``, as MVTec AD evaluates it.

    Defect regions are the 8-connected components of each mask; the FPR counts false-positive
    pixels over all defect-free pixels of all images; PRO is the mean covered fraction over
    all regions of all images; the curve is integrated from FPR 0 to ``fpr_limit`` with linear
    interpolation at the limit and divided by it.

    Args:
        maps: [N, H, W] anomaly maps; see :func:`pixel_histogram` for the other layouts.
        masks: [N, H, W] ground truth, nonzero means defect.
        fpr_limit: upper end of the FPR range, in (0, 1].
        **options: ``indices``, ``names``, ``n_bins``, ``exact_max_pixels``, ``chunk_pixels``.

    Returns:
        AUPRO in [0, 1], or None (with a warning) when there are no defect or no defect-free
        pixels.
    """
    _check_fpr_limit(fpr_limit)
    histogram = _defined_histogram("AUPRO", maps, masks, options)
    return None if histogram is None else histogram.aupro(fpr_limit)


def roc_curve_points(
    scores: Maps, labels: Maps, **options: Any
) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC curve for plotting, at image level ([N] scores) or pixel level ([N, H, W] maps).

    Returns:
        (fpr, tpr), each [P] from (0, 0) to (1, 1), or None (with a warning) when undefined.
    """
    histogram = _defined_histogram("ROC curve", _as_maps(scores), _as_maps(labels), options)
    return None if histogram is None else histogram.roc_curve()


def pro_curve_points(
    maps: Maps, masks: Maps, **options: Any
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-region-overlap curve for plotting over the full FPR range.

    Returns:
        (fpr, pro), each [P] from (0, 0) to (1, 1), or None (with a warning) when undefined.
    """
    histogram = _defined_histogram("PRO curve", maps, masks, options)
    return None if histogram is None else histogram.pro_curve()


def compute_metrics(
    image_scores: ArrayLike,
    labels: ArrayLike,
    maps: Maps | None = None,
    masks: Maps | None = None,
    defect_types: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    *,
    fpr_limit: float = FPR_LIMIT,
    n_bins: int = N_BINS,
    exact_max_pixels: int = EXACT_MAX_PIXELS,
) -> dict[str, Any]:
    """Every metric of DESIGN.md §1.4, over all images and per defect type.

    Each defect type is evaluated on its own images together with all good images. A metric
    that is undefined on a group is None, and one warning per cause names the groups.

    Args:
        image_scores: [N] anomaly score per image.
        labels: [N] 1 for a defective image, 0 for a good one.
        maps: [N, H, W] anomaly maps (see :func:`pixel_histogram`), or None for image metrics
            only.
        masks: ground-truth masks in the layout of ``maps``; given exactly when ``maps`` is.
        defect_types: [N] defect type per image (ignored for good images), or None.
        names: [N] image names for messages.
        fpr_limit: AUPRO's FPR limit.
        n_bins: bins of the binned pixel path.
        exact_max_pixels: largest pixel count per group computed exactly.

    Returns:
        ``{"overall": metrics, "per_defect_type": {type: metrics}, "empty_mask_images":
        [index, ...], "pixel_error_bounds": {"overall" | type: {"pixel_auroc", "aupro"}}}``,
        where metrics holds ``n_images``, ``n_defective``, ``image_auroc``, ``image_ap``,
        ``image_f1_max``, ``image_f1_threshold`` and, with maps, ``pixel_auroc``,
        ``pixel_ap``, ``pixel_f1_max``, ``pixel_f1_threshold``, ``aupro``.

    Raises:
        CpkpError: a score or map value is NaN or inf (the images are named), the inputs
            differ in length, or a map and its mask differ in shape.
    """
    scores, labels = _image_inputs(image_scores, labels, names)
    if (maps is None) != (masks is None):
        raise CpkpError("compute_metrics: give both maps and masks, or neither")
    if defect_types is not None and len(defect_types) != len(labels):
        raise CpkpError(
            f"compute_metrics: {len(defect_types)} defect types for {len(labels)} images"
        )
    _check_fpr_limit(fpr_limit)

    empty = [] if maps is None else _empty_mask_images(maps, masks, labels, names)
    pixel_options = {"names": names, "n_bins": n_bins, "exact_max_pixels": exact_max_pixels}
    undefined: dict[str, list[str]] = {}
    results: dict[str, dict[str, Any]] = {}
    bounds: dict[str, dict[str, float]] = {}
    for group, indices in _groups(labels, defect_types).items():
        results[group] = _image_metrics(scores[indices], labels[indices], group, undefined)
        if maps is not None:
            pixel, bounds[group] = _pixel_metrics(
                maps, masks, indices, fpr_limit, pixel_options, group, undefined
            )
            results[group].update(pixel)
    _warn_undefined(undefined)

    overall = results.pop(_OVERALL)
    return {
        "overall": overall,
        "per_defect_type": results,
        "empty_mask_images": empty,
        "pixel_error_bounds": bounds,
    }


# --- image level -----------------------------------------------------------------------------


def _image_inputs(
    scores: ArrayLike, labels: ArrayLike, names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 [N] and labels as int [N] of 0/1, checked."""
    scores = _to_numpy(scores).astype(np.float64).ravel()
    labels = _to_numpy(labels).ravel()
    if len(scores) != len(labels):
        raise CpkpError(f"{len(scores)} image scores for {len(labels)} labels")
    if names is not None and len(names) != len(scores):
        raise CpkpError(f"{len(names)} image names for {len(scores)} images")
    if not np.isin(labels, (0, 1)).all():
        found = ", ".join(str(v) for v in np.unique(labels)[:10])
        raise CpkpError(f"labels must be 0 (good) or 1 (defective); found {found}")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad) > 0:
        raise CpkpError(
            f"image score is NaN or inf for {len(bad)} image(s): {_list_names(bad, names)}; "
            "the model produced non-finite output"
        )
    return scores, labels.astype(np.int64)


def _one_class_reason(labels: np.ndarray) -> str | None:
    if not (labels == 0).any():
        return "no good images (label 0) among them"
    if not (labels == 1).any():
        return "no defective images (label 1) among them"
    return None


def _warn_if_one_class(metric: str, labels: np.ndarray) -> bool:
    reason = _one_class_reason(labels)
    if reason is not None:
        logger.warning("%s is undefined: %s", metric, reason)
    return reason is not None


def _f1_max_exact(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """F1-max over scikit-learn's precision-recall curve; the last point has no threshold."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros(len(denominator)), where=denominator > 0
    )
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _image_metrics(
    scores: np.ndarray, labels: np.ndarray, group: str, undefined: dict[str, list[str]]
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "n_images": len(labels),
        "n_defective": int(labels.sum()),
        "image_auroc": None,
        "image_ap": None,
        "image_f1_max": None,
        "image_f1_threshold": None,
    }
    reason = _one_class_reason(labels)
    if reason is not None:
        undefined.setdefault(f"image metrics: {reason}", []).append(group)
        return metrics

    f1, threshold = _f1_max_exact(scores, labels)
    metrics["image_auroc"] = float(roc_auc_score(labels, scores))
    metrics["image_ap"] = float(average_precision_score(labels, scores))
    metrics["image_f1_max"] = f1
    metrics["image_f1_threshold"] = threshold
    return metrics


# --- pixel level -----------------------------------------------------------------------------


def _pixel_metrics(
    maps: Maps,
    masks: Maps,
    indices: np.ndarray,
    fpr_limit: float,
    options: dict[str, Any],
    group: str,
    undefined: dict[str, list[str]],
) -> tuple[dict[str, Any], dict[str, float]]:
    metrics: dict[str, Any] = {
        "pixel_auroc": None,
        "pixel_ap": None,
        "pixel_f1_max": None,
        "pixel_f1_threshold": None,
        "aupro": None,
    }
    histogram = pixel_histogram(maps, masks, indices=indices, **options)
    reason = histogram.undefined_reason()
    if reason is not None:
        undefined.setdefault(f"pixel metrics: {reason}", []).append(group)
        return metrics, {}

    f1, threshold = histogram.f1_max()
    metrics["pixel_auroc"] = histogram.auroc()
    metrics["pixel_ap"] = histogram.average_precision()
    metrics["pixel_f1_max"] = f1
    metrics["pixel_f1_threshold"] = threshold
    metrics["aupro"] = histogram.aupro(fpr_limit)
    bounds = {
        "pixel_auroc": histogram.auroc_error_bound(),
        "aupro": histogram.aupro_error_bound(fpr_limit),
    }
    return metrics, bounds


def _defined_histogram(
    metric: str, maps: Maps, masks: Maps, options: dict[str, Any]
) -> PixelHistogram | None:
    histogram = pixel_histogram(maps, masks, **options)
    reason = histogram.undefined_reason()
    if reason is not None:
        logger.warning("%s is undefined: %s", metric, reason)
        return None
    return histogram


def _pixel_counts(
    maps: Maps, masks: Maps, indices: np.ndarray, names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and defect pixels per counted image: [len(indices)] each."""
    sizes = np.zeros(len(indices), dtype=np.int64)
    defects = np.zeros(len(indices), dtype=np.int64)
    for k, i in enumerate(indices):
        shape, mask = _image(maps, i).shape, _mask(masks, i)
        if shape != mask.shape:
            raise CpkpError(
                f"{_list_names([i], names)}: anomaly map of shape {shape} but ground-truth "
                f"mask of shape {mask.shape}; evaluate both at one size"
            )
        sizes[k], defects[k] = mask.size, np.count_nonzero(mask)
    return sizes, defects


def _check_finite_maps(maps: Maps, indices: np.ndarray, names: Sequence[str] | None) -> None:
    bad = [i for i in indices if not np.isfinite(_image(maps, i)).all()]
    if bad:
        raise CpkpError(
            f"anomaly map holds NaN or inf values for {len(bad)} image(s): "
            f"{_list_names(bad, names)}; the model produced non-finite output"
        )


def _exact_edges(maps: Maps, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One bin per distinct score of the counted images."""
    values = np.concatenate([_image(maps, i).ravel() for i in indices], dtype=np.float64)
    edges = np.unique(values)
    return edges, np.ones(len(edges), dtype=bool)


def _binned_edges(
    maps: Maps,
    masks: Maps,
    indices: np.ndarray,
    sizes: np.ndarray,
    defect_counts: np.ndarray,
    n_bins: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges at quantiles of a sample of each class, and which bins hold one score."""
    per_class = max(1, n_bins // 2)
    negative_rate = SAMPLES_PER_BIN * per_class / max(1, int((sizes - defect_counts).sum()))
    positive_rate = SAMPLES_PER_BIN * per_class / max(1, int(defect_counts.sum()))
    rng = np.random.default_rng(SEED)
    low, high = math.inf, -math.inf
    negatives, positives = [], []
    for i in indices:
        values, defect = _image(maps, i).ravel(), _mask(masks, i).ravel()
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        negatives.append(_sample(values[~defect], negative_rate, rng))
        positives.append(_sample(values[defect], positive_rate, rng))

    edges = np.unique(
        np.concatenate(
            [
                [low],
                _quantile_edges(np.concatenate(negatives), per_class),
                _quantile_edges(np.concatenate(positives), per_class),
            ]
        )
    )
    single_valued = np.append(edges[1:] == np.nextafter(edges[:-1], math.inf), edges[-1] >= high)
    return edges, single_valued


def _sample(values: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    if len(values) == 0:
        return values.astype(np.float64)
    count = min(len(values), math.ceil(rate * len(values)))
    return values[rng.integers(0, len(values), count)].astype(np.float64)


def _quantile_edges(sample: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantiles of a sample; a value repeated across quantiles also gets the edge just above
    it, so its (possibly huge) mass of tied pixels sits alone in an exact bin."""
    if len(sample) == 0:
        return sample
    quantiles = np.quantile(sample, np.linspace(0.0, 1.0, n_bins + 1))
    tied = quantiles[1:][quantiles[1:] == quantiles[:-1]]
    return np.concatenate([quantiles, np.nextafter(np.unique(tied), math.inf)])


def _count(
    maps: Maps,
    masks: Maps,
    indices: np.ndarray,
    sizes: np.ndarray,
    edges: np.ndarray,
    single_valued: np.ndarray,
    exact: bool,
    chunk_pixels: int,
) -> PixelHistogram:
    """Fill the histogram chunk by chunk; each pixel falls in the bin of the last edge <= it."""
    n = len(edges)
    positives = np.zeros(n, dtype=np.int64)
    totals = np.zeros(n, dtype=np.int64)
    region_mass = np.zeros(n, dtype=np.float64)
    n_regions = 0
    for chunk in _chunks(indices, sizes, chunk_pixels):
        values = np.concatenate([_image(maps, i).ravel() for i in chunk], dtype=np.float64)
        defect = np.concatenate([_mask(masks, i).ravel() for i in chunk])
        regions = [_region_weights(_mask(masks, i)) for i in chunk]
        bins = np.searchsorted(edges, values, side="right") - 1
        del values

        totals += np.bincount(bins, minlength=n)
        defect_bins = bins[defect]
        positives += np.bincount(defect_bins, minlength=n)
        weights = np.concatenate([w for w, _ in regions])
        region_mass += np.bincount(defect_bins, weights=weights, minlength=n)
        n_regions += sum(count for _, count in regions)

    return PixelHistogram(
        thresholds=edges,
        positives=positives,
        negatives=totals - positives,
        region_mass=region_mass,
        n_regions=n_regions,
        single_valued=single_valued,
        exact=exact,
    )


def _chunks(indices: np.ndarray, sizes: np.ndarray, chunk_pixels: int) -> Iterator[list[int]]:
    """Runs of consecutive images with at most ``chunk_pixels`` pixels (one image at least)."""
    chunk: list[int] = []
    filled = 0
    for i, size in zip(indices, sizes):
        if chunk and filled + size > chunk_pixels:
            yield chunk
            chunk, filled = [], 0
        chunk.append(int(i))
        filled += int(size)
    if chunk:
        yield chunk


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """1 / (size of its 8-connected region) for each defect pixel in C order, and the count."""
    regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(0, dtype=np.float64), 0
    areas = np.bincount(regions.ravel())
    return 1.0 / areas[regions[mask]], count


def _empty_mask_images(
    maps: Maps, masks: Maps, labels: np.ndarray, names: Sequence[str] | None
) -> list[int]:
    """Defective images whose mask is empty, after checking one map and mask per image."""
    if len(maps) != len(labels) or len(masks) != len(labels):
        raise CpkpError(
            f"{len(maps)} anomaly maps and {len(masks)} ground-truth masks for "
            f"{len(labels)} image scores; give one of each per image"
        )
    empty = [i for i in np.flatnonzero(labels == 1) if not _mask(masks, i).any()]
    if empty:
        logger.warning(
            "%d defective image(s) have an empty ground-truth mask: %s; they count for the "
            "image metrics and add no defect pixels",
            len(empty),
            _list_names(empty, names),
        )
    return [int(i) for i in empty]


# --- curves and shared helpers ---------------------------------------------------------------


def _cumulative_rate(counts: np.ndarray) -> np.ndarray:
    """[B + 1] fraction of the counts in the bins at or above each threshold, from the top."""
    return np.concatenate([[0.0], np.cumsum(counts[::-1]) / counts.sum()])


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def _bin_rectangles(x: np.ndarray, y: np.ndarray, binned_from_top: np.ndarray) -> float:
    """Sum of width x height of the curve segments of bins holding more than one score."""
    keep = ~binned_from_top
    return float(np.sum(np.diff(x)[keep] * np.diff(y)[keep]))


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under a curve with non-decreasing x from x[0] = 0 up to ``limit``,
    interpolating linearly at the limit."""
    inside = int(np.searchsorted(x, limit, side="right"))
    area = _trapezoid(x[:inside], y[:inside])
    if inside < len(x):
        x0, y0, x1, y1 = x[inside - 1], y[inside - 1], x[inside], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2
    return float(area)


def _groups(labels: np.ndarray, defect_types: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Image indices of all images, and of each defect type with all good images."""
    groups = {_OVERALL: np.arange(len(labels))}
    if defect_types is None:
        return groups
    types = np.asarray([str(t) for t in defect_types])
    good = labels == 0
    for name in sorted(set(types[labels == 1])):
        groups[name] = np.flatnonzero(good | ((labels == 1) & (types == name)))
    return groups


def _warn_undefined(undefined: dict[str, list[str]]) -> None:
    for reason, groups in undefined.items():
        shown = ", ".join("all images" if g == _OVERALL else f"'{g}'" for g in groups)
        logger.warning("undefined (None) for %s: %s", shown, reason)


def _check_indices(indices: Any, n_maps: int, n_masks: int) -> np.ndarray:
    if n_maps != n_masks:
        raise CpkpError(f"{n_maps} anomaly maps for {n_masks} ground-truth masks")
    if indices is None:
        return np.arange(n_maps)
    indices = np.asarray(indices, dtype=np.int64).ravel()
    if len(indices) and (indices.min() < 0 or indices.max() >= n_maps):
        raise CpkpError(
            f"image indices must lie in [0, {n_maps}); got {indices.min()} to {indices.max()}"
        )
    return indices


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"fpr_limit={fpr_limit}: expected a value in (0, 1] (MVTec AD: 0.3)")


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _image(maps: Maps, i: int) -> np.ndarray:
    """Map ``i`` as [H, W], without a copy when it already is a CPU array."""
    item = _to_numpy(maps[i])
    if item.ndim == 3 and item.shape[0] == 1:
        item = item[0]
    if item.ndim != 2:
        raise CpkpError(f"image {i}: expected a map or mask of shape [H, W], got {item.shape}")
    return item


def _mask(masks: Maps, i: int) -> np.ndarray:
    mask = _image(masks, i)
    return mask if mask.dtype == np.bool_ else mask != 0


def _as_maps(x: Maps) -> Maps:
    """[N] image scores or labels as N maps of one pixel; maps unchanged."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.reshape(-1, 1, 1) if x.ndim == 1 else x
    if len(x) > 0 and np.ndim(x[0]) == 0:
        return np.asarray(x).reshape(-1, 1, 1)
    return x


def _list_names(indices: Sequence[int] | np.ndarray, names: Sequence[str] | None) -> str:
    shown = [str(names[i]) if names is not None else f"image {i}" for i in indices]
    more = len(shown) - LISTED_NAMES
    text = ", ".join(shown[:LISTED_NAMES])
    return f"{text} and {more} more" if more > 0 else text
