"""Anomaly maps, calibration, fusion and smoothing on hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpkp.config import PrototypeConfig
from cpkp.prototype import f_agg, patch_vectors
from cpkp.scoring import (
    Calibration,
    cosine_distance_map,
    fuse,
    gaussian_kernel,
    gaussian_smooth,
    image_scores,
    kd_map,
    kp_map,
    resize_maps,
    robust_scale,
)


def test_cosine_distance_map_values_and_zero_vectors():
    t = torch.zeros(1, 2, 1, 3)
    s = torch.zeros(1, 2, 1, 3)
    t[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    s[0, :, 0, 0] = torch.tensor([2.0, 0.0])  # same direction -> 0
    t[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    s[0, :, 0, 1] = torch.tensor([-1.0, 0.0])  # opposite -> 2
    # position 2: both zero -> 0, not 1
    d = cosine_distance_map(t, s)[0, 0, 0]
    assert torch.allclose(d, torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)


def test_kd_map_sums_upsampled_levels():
    t = [torch.ones(1, 3, 2, 2), torch.ones(1, 3, 1, 1)]
    s = [-torch.ones(1, 3, 2, 2), torch.ones(1, 3, 1, 1)]
    m = kd_map(t, s, (4, 4))
    assert m.shape == (1, 1, 4, 4)
    assert torch.allclose(m, torch.full((1, 1, 4, 4), 2.0), atol=1e-6)


def test_kp_map_matches_cdist_and_respects_exclusion():
    torch.manual_seed(0)
    cfg = PrototypeConfig(channels_per_level=2, grid_stride=8)
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    queries = patch_vectors(f_agg(feats, cfg))
    prototypes = queries[::5].clone()
    m, index = kp_map(feats, prototypes, cfg, (4, 4))
    nearest = torch.cdist(queries, prototypes).min(1)
    expected = nearest.values.view(2, 1, 4, 4)
    assert torch.equal(index.flatten(), nearest.indices)
    # distances near 0 carry the matrix-product form's rounding, amplified by the sqrt
    assert torch.allclose(m, expected, atol=5e-3)

    exclude = torch.zeros(len(prototypes), dtype=torch.bool)
    exclude[0] = True
    m_ex, _ = kp_map(feats, prototypes, cfg, (4, 4), exclude=[exclude, None])
    expected_ex = torch.cdist(queries[:16], prototypes[1:]).min(1).values.view(1, 1, 4, 4)
    assert torch.allclose(m_ex[:1], expected_ex, atol=5e-3)
    assert torch.allclose(m_ex[1:], m[1:])


def test_robust_scale_and_standardized_fusion():
    values = np.arange(1001, dtype=np.float64)
    median, p99 = robust_scale(values)
    assert median == 500.0 and p99 == pytest.approx(990.0)
    cal = Calibration(kd_median=1.0, kd_p99=3.0, kp_median=10.0, kp_p99=30.0)
    a_kd = torch.full((1, 1, 2, 2), 3.0)
    a_kp = torch.full((1, 1, 2, 2), 10.0)
    fused = fuse(a_kd, a_kp, cal, gamma=0.5, fusion="standardized")
    assert torch.allclose(fused, torch.full_like(fused, 0.5))  # 0.5 * 1 + 0.5 * 0
    raw = fuse(a_kd, a_kp, cal, gamma=0.25, fusion="raw")
    assert torch.allclose(raw, torch.full_like(raw, 0.25 * 3 + 0.75 * 10))
    assert torch.equal(fuse(a_kd, None, cal, 0.5, "raw"), a_kd)


def test_robust_scale_of_a_constant_map_does_not_divide_by_zero():
    median, p99 = robust_scale(np.zeros(100))
    assert p99 > median


def test_gaussian_smoothing_preserves_mass_and_constants():
    k = gaussian_kernel(4.0)
    assert float(k.sum()) == pytest.approx(1.0)
    assert k.numel() == 2 * 16 + 1
    const = torch.full((1, 1, 40, 40), 3.0)
    assert torch.allclose(gaussian_smooth(const, 4.0), const, atol=1e-5)
    spike = torch.zeros(1, 1, 41, 41)
    spike[0, 0, 20, 20] = 1.0
    blurred = gaussian_smooth(spike, 2.0)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 20, 20] == blurred.max()


def test_image_score_is_the_maximum_and_maps_return_to_their_own_size():
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, 3, 4] = 5.0
    maps[1, 0, 0, 0] = 2.0
    assert image_scores(maps).tolist() == [5.0, 2.0]
    out = resize_maps(maps, [(16, 24), (8, 8)])
    assert out[0].shape == (1, 16, 24) and out[1].shape == (1, 8, 8)
    assert torch.equal(out[1], maps[1])
