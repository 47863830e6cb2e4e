"""Metrics against independent references: scikit-learn, pairwise counts, and plain
implementations of the MVTec AD AUPRO definition written here."""

from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pytest
import torch
from skimage.measure import label as skimage_label
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cpkp import metrics
from cpkp.errors import CpkpError

# --- independent references ------------------------------------------------------------------


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(defective score > good score) + 1/2 P(equal), over all pairs."""
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def brute_f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over every distinct score taken as threshold (defective when score >= it)."""
    best = (0.0, 0.0)
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & (labels == 1))
        f1 = 2 * tp / (predicted.sum() + labels.sum())
        if f1 > best[0]:
            best = (float(f1), float(t))
    return best


def clipped_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under a piecewise linear curve from 0 to ``limit``, segment by segment, / limit."""
    area = 0.0
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            x1, y1 = limit, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3, connectivity=2):
    """The definition, literally: at every distinct score, the FPR over all defect-free
    pixels and the mean covered fraction of every connected defect region."""
    regions = []
    for m, mask in zip(maps, masks):
        labelled = skimage_label(mask, connectivity=connectivity)
        regions += [m[labelled == k] for k in range(1, labelled.max() + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    return clipped_area(np.array(fpr), np.array(pro), limit)


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """[N, H, W] 1 / (size of the pixel's 8-connected region) on defect pixels, and the count."""
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for weight, mask in zip(weights, masks):
        labelled = skimage_label(mask, connectivity=2)
        weight[mask] = 1.0 / np.bincount(labelled.ravel())[labelled[mask]]
        n_regions += labelled.max()
    return weights, n_regions


def mann_whitney_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """For each defect pixel, the defect-free pixels below it plus half those equal to it."""
    normal = np.sort(maps[~masks])
    defect = maps[masks]
    below = np.searchsorted(normal, defect, side="left").sum(dtype=np.float64)
    at_or_below = np.searchsorted(normal, defect, side="right").sum(dtype=np.float64)
    return (below + at_or_below) / 2 / (len(defect) * len(normal))


def stepwise_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """The area as a sum over distinct defect-free scores v, from the top: the FPR steps at v,
    while PRO goes from its value above v to its value at v (feasible on millions of pixels)."""
    weights, n_regions = region_weights(masks)
    order = np.argsort(maps[masks])
    defect = maps[masks][order]
    pro_from = np.append(np.cumsum(weights[masks][order][::-1])[::-1], 0.0) / n_regions

    values, counts = np.unique(maps[~masks], return_counts=True)
    values, counts = values[::-1], counts[::-1]
    fpr_after = np.cumsum(counts) / counts.sum()
    fpr_before = fpr_after - counts / counts.sum()
    keep = fpr_before < limit
    values, fpr_before, fpr_after = values[keep], fpr_before[keep], fpr_after[keep]
    pro_above = pro_from[np.searchsorted(defect, values, side="right")]
    pro_at = pro_from[np.searchsorted(defect, values, side="left")]

    end = np.minimum(fpr_after, limit)
    pro_end = pro_above + (pro_at - pro_above) * (end - fpr_before) / (fpr_after - fpr_before)
    area = np.sum((end - fpr_before) * (pro_above + pro_end) / 2)
    return float(area / limit)


def random_blobs(rng: np.random.Generator, n: int, size: int, per_image: int) -> np.ndarray:
    """[n, size, size] masks with up to ``per_image`` random rectangles (some touching)."""
    masks = np.zeros((n, size, size), dtype=bool)
    for mask in masks:
        for _ in range(rng.integers(1, per_image + 1)):
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, max(2, size // 4), 2)
            mask[y : y + h, x : x + w] = True
    return masks


@pytest.fixture
def pixel_data():
    """Maps with ties and several regions per image, good images included."""
    rng = np.random.default_rng(1)
    masks = random_blobs(rng, 8, 24, per_image=3)
    masks[:3] = False
    maps = rng.random(masks.shape) + 0.6 * masks
    return np.round(maps, 2), masks  # rounding makes ties


# --- image level -----------------------------------------------------------------------------


def test_image_metrics_match_sklearn_and_the_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # many ties

    auroc = metrics.image_auroc(scores, labels)
    assert auroc == roc_auc_score(labels, scores)
    assert auroc == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    assert metrics.image_ap(torch.tensor(scores), torch.tensor(labels)) == (
        average_precision_score(labels, scores)
    )

    f1, threshold = metrics.f1_max(scores, labels)
    assert (f1, threshold) == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)
    assert metrics.image_f1_max(scores, labels) == f1


def test_image_roc_curve_points_equal_sklearns_curve():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.normal(size=50) + labels, 1)

    fpr, tpr = metrics.roc_curve_points(scores, labels)

    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)


def test_one_class_image_set_is_undefined_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cpkp.metrics"):
        assert metrics.image_auroc([0.1, 0.5, 0.2], [0, 0, 0]) is None

    assert len(caplog.records) == 1
    assert "no defective images" in caplog.records[0].getMessage()


def test_nan_score_raises_naming_the_image():
    with pytest.raises(CpkpError, match="b.png") as err:
        metrics.compute_metrics([0.1, np.nan, 0.3], [0, 1, 1], names=["a.png", "b.png", "c.png"])
    assert "a.png" not in str(err.value)


def test_labels_other_than_zero_and_one_are_refused():
    with pytest.raises(CpkpError, match="labels must be 0"):
        metrics.image_auroc([0.1, 0.2], [0, 2])


# --- pixel level: exact path -----------------------------------------------------------------


def test_exact_pixel_path_equals_sklearn(pixel_data):
    maps, masks = pixel_data
    histogram = metrics.pixel_histogram(maps, masks)
    labels, scores = masks.ravel(), maps.ravel()

    assert histogram.exact
    assert histogram.auroc_error_bound() == 0.0
    assert mann_whitney_auroc(maps, masks) == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )
    assert metrics.pixel_ap(maps, masks) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert histogram.f1_max() == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)


def test_maps_of_different_sizes_and_torch_inputs():
    rng = np.random.default_rng(3)
    maps = [rng.random((10, 12)), rng.random((7, 5)), rng.random((9, 9))]
    masks = [m > 0.7 for m in maps]

    auroc = metrics.pixel_auroc([torch.from_numpy(m) for m in maps], masks)

    flat_maps = np.concatenate([m.ravel() for m in maps])
    flat_masks = np.concatenate([m.ravel() for m in masks])
    assert auroc == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)


def test_pixel_metrics_without_defect_pixels_are_undefined(caplog):
    maps = np.random.default_rng(0).random((2, 8, 8))
    with caplog.at_level(logging.WARNING, logger="cpkp.metrics"):
        assert metrics.pixel_auroc(maps, np.zeros((2, 8, 8), dtype=bool)) is None
        assert metrics.aupro(maps, np.ones((2, 8, 8), dtype=bool)) is None

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "no defect pixels" in messages[0]
    assert "no defect-free pixels" in messages[1]


def test_nan_in_a_map_raises_naming_the_image(pixel_data):
    maps, masks = pixel_data
    maps = maps.copy()
    maps[5, 3, 4] = np.inf
    names = [f"img{i}.png" for i in range(len(maps))]

    with pytest.raises(CpkpError, match=r"1 image\(s\): img5.png"):
        metrics.pixel_auroc(maps, masks, names=names)


def test_map_and_mask_of_different_shapes_raise():
    with pytest.raises(CpkpError, match="shape"):
        metrics.pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5), dtype=bool)])


# --- pixel level: binned path ----------------------------------------------------------------


def test_binned_path_stays_within_its_stated_bounds():
    rng = np.random.default_rng(4)
    masks = random_blobs(rng, 20, 32, per_image=3)
    maps = rng.random(masks.shape) + 0.5 * masks  # continuous scores: no ties
    exact_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    exact_ap = average_precision_score(masks.ravel(), maps.ravel())
    exact_aupro = stepwise_aupro(maps, masks)

    coarse = metrics.pixel_histogram(maps, masks, n_bins=64, exact_max_pixels=0)
    fine = metrics.pixel_histogram(maps, masks, exact_max_pixels=0)

    assert not coarse.exact and len(coarse.thresholds) < 80
    for binned in (coarse, fine):
        assert abs(binned.auroc() - exact_auroc) <= binned.auroc_error_bound()
        assert abs(binned.aupro() - exact_aupro) <= binned.aupro_error_bound()
    assert coarse.auroc_error_bound() > abs(coarse.auroc() - exact_auroc) > 0
    assert coarse.aupro_error_bound() > abs(coarse.aupro() - exact_aupro) > 0
    assert fine.auroc_error_bound() < 1e-4
    assert fine.aupro_error_bound() < 2e-3
    assert fine.average_precision() == pytest.approx(exact_ap, abs=1e-3)


def test_binned_f1_is_the_exact_f1_at_its_threshold():
    rng = np.random.default_rng(5)
    masks = random_blobs(rng, 10, 32, per_image=2)
    maps = rng.random(masks.shape) + 0.5 * masks
    exact_f1 = brute_f1_max(maps.ravel(), masks.ravel())[0]

    f1, threshold = metrics.pixel_histogram(maps, masks, n_bins=256, exact_max_pixels=0).f1_max()
    finer = metrics.pixel_f1_max(maps, masks, n_bins=1024, exact_max_pixels=0)

    predicted = maps >= threshold
    at_threshold = 2 * np.sum(predicted & masks) / (predicted.sum() + masks.sum())
    assert f1 == pytest.approx(at_threshold, abs=1e-12)
    assert f1 <= exact_f1 + 1e-12
    assert finer == pytest.approx(exact_f1, abs=1e-3)


def test_tied_scores_get_an_exact_bin_of_their_own():
    rng = np.random.default_rng(6)
    masks = random_blobs(rng, 6, 32, per_image=2)
    maps = np.where(rng.random(masks.shape) < 0.8, 0.0, rng.random(masks.shape)) + masks

    binned = metrics.pixel_histogram(maps, masks, n_bins=32, exact_max_pixels=0)

    zero_bin = np.flatnonzero(binned.thresholds == 0.0)[0]
    assert binned.single_valued[zero_bin]
    assert binned.negatives[zero_bin] == np.sum(maps == 0.0)
    exact_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(binned.auroc() - exact_auroc) <= binned.auroc_error_bound()


def test_binned_path_on_a_large_set_is_close_to_exact_and_memory_bounded():
    """200 x 256 x 256 = 13.1M pixels: the binned path against exact references (checked
    against sklearn and the literal AUPRO definition on small data), with the extra memory
    measured: a float64 copy of the maps alone would be 105 MB; the stated bound is ~30 MB."""
    rng = np.random.default_rng(7)
    masks = random_blobs(rng, 200, 256, per_image=3)
    masks[100:] = False
    maps = rng.standard_normal(masks.shape, dtype=np.float32)
    maps[masks] += 2.0

    tracemalloc.start()
    histogram = metrics.pixel_histogram(maps, masks)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert not histogram.exact
    assert peak < 48 * 2**20
    auroc = histogram.auroc()
    assert abs(auroc - mann_whitney_auroc(maps, masks)) <= histogram.auroc_error_bound()
    assert histogram.auroc_error_bound() < 1e-4
    assert abs(histogram.aupro() - stepwise_aupro(maps, masks)) <= histogram.aupro_error_bound()
    assert histogram.aupro_error_bound() < 1e-3


# --- AUPRO -----------------------------------------------------------------------------------


def test_aupro_of_a_perfect_and_an_inverse_map():
    rng = np.random.default_rng(8)
    masks = random_blobs(rng, 4, 20, per_image=3)

    assert metrics.aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(1.0 - masks, masks) == 0.0
    continuous_inverse = rng.random(masks.shape) - 2.0 * masks
    assert metrics.aupro(continuous_inverse, masks) < 1e-3


def test_aupro_by_hand():
    """One 4x4 image, one region of two pixels (0.9, 0.5), normal pixels 0.7, 0.3 and zeros.
    Curve: (0, .5) -> (1/14, .5) -> (1/14, 1) -> ...: area to 0.3 is 0.5/14 + (0.3 - 1/14)."""
    maps = np.zeros((1, 4, 4))
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps[0, 0, :2] = 0.9, 0.5
    maps[0, 3, 3], maps[0, 2, 2] = 0.7, 0.3

    expected = (0.5 / 14 + (0.3 - 1 / 14)) / 0.3
    assert metrics.aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert brute_aupro(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_aupro_regions_are_eight_connected():
    """A 1-pixel and a 3-pixel blob touching at a corner are one region of 4 pixels."""
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = True
    masks[0, 2, 2:5] = True
    maps = np.zeros((1, 6, 6))
    maps[0, 1, 1] = 1.0  # only the single pixel is found

    # 8-connected: one region a quarter covered, at FPR 0; PRO 1 only at FPR 1.
    eight = (0.25 + (0.25 + 0.75 * 0.3)) / 2  # mean height of the line from 0 to 0.3
    assert metrics.aupro(maps, masks) == pytest.approx(eight, abs=1e-12)
    assert brute_aupro(maps, masks) == pytest.approx(eight, abs=1e-12)
    assert brute_aupro(maps, masks, connectivity=1) > eight + 0.2


def test_aupro_when_the_fpr_jumps_past_the_limit():
    """All but 10% of the normal pixels tie at 0, so the FPR jumps from 0.1 to 1: the value at
    0.3 is interpolated on that segment and the result still lies in [0, 1]."""
    rng = np.random.default_rng(9)
    masks = random_blobs(rng, 4, 16, per_image=2)
    maps = rng.random(masks.shape)
    normal = np.flatnonzero(~masks.ravel())
    maps.ravel()[normal[10 * len(normal) // 100 :]] = 0.0

    fpr, _ = metrics.pro_curve_points(maps, masks)
    assert not np.any((fpr > 0.11) & (fpr < 1.0))
    value = metrics.aupro(maps, masks)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


def test_aupro_on_random_maps_with_several_regions(pixel_data):
    maps, masks = pixel_data
    expected = brute_aupro(maps, masks)

    assert metrics.aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert stepwise_aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    binned = metrics.pixel_histogram(maps, masks, n_bins=16, exact_max_pixels=0)
    assert abs(binned.aupro() - expected) <= binned.aupro_error_bound()
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(
        brute_aupro(maps, masks, limit=1.0), abs=1e-12
    )


def test_pro_curve_points_run_from_origin_to_one(pixel_data):
    fpr, pro = metrics.pro_curve_points(*pixel_data)

    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


# --- compute_metrics -------------------------------------------------------------------------


def test_compute_metrics_overall_and_per_defect_type(pixel_data, caplog):
    maps, masks = pixel_data
    masks = masks.copy()
    masks[7] = False  # a defective image without defect pixels
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    types = ["good"] * 3 + ["crack", "scratch", "crack", "scratch", "crack"]
    scores = maps.reshape(8, -1).max(axis=1)

    with caplog.at_level(logging.WARNING, logger="cpkp.metrics"):
        result = metrics.compute_metrics(scores, labels, maps, masks, types)

    assert result["empty_mask_images"] == [7]
    assert any("1 defective image(s)" in r.getMessage() for r in caplog.records)
    overall = result["overall"]
    assert overall["image_auroc"] == roc_auc_score(labels, scores)
    assert overall["pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12
    )
    assert overall["aupro"] == pytest.approx(brute_aupro(maps, masks), abs=1e-12)

    assert sorted(result["per_defect_type"]) == ["crack", "scratch"]
    crack = np.array([0, 1, 2, 3, 5, 7])
    per_type = result["per_defect_type"]["crack"]
    assert per_type["n_images"] == 6 and per_type["n_defective"] == 3
    assert per_type["image_ap"] == average_precision_score(labels[crack], scores[crack])
    assert per_type["pixel_ap"] == pytest.approx(
        average_precision_score(masks[crack].ravel(), maps[crack].ravel()), abs=1e-12
    )
    assert per_type["aupro"] == pytest.approx(brute_aupro(maps[crack], masks[crack]), abs=1e-12)
    assert result["pixel_error_bounds"]["crack"] == {"pixel_auroc": 0.0, "aupro": 0.0}


def test_compute_metrics_on_good_images_only_warns_once(caplog):
    rng = np.random.default_rng(10)
    maps = rng.random((3, 8, 8))
    masks = np.zeros((3, 8, 8), dtype=bool)

    with caplog.at_level(logging.WARNING, logger="cpkp.metrics"):
        result = metrics.compute_metrics(maps.max(axis=(1, 2)), [0, 0, 0], maps, masks)

    assert all(result["overall"][k] is None for k in ("image_auroc", "image_ap", "aupro"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # one for the image metrics, one for the pixel metrics
    assert "no defective images" in messages[0] and "no defect pixels" in messages[1]


def test_compute_metrics_names_images_with_non_finite_maps(pixel_data):
    maps, masks = pixel_data
    maps = maps.copy()
    maps[2, 0, 0] = np.nan
    maps[6, 1, 1] = np.nan
    names = [f"{i:03d}.png" for i in range(8)]

    with pytest.raises(CpkpError, match=r"2 image\(s\): 002.png, 006.png"):
        metrics.compute_metrics(np.zeros(8), [0] * 4 + [1] * 4, maps, masks, names=names)
