"""Tests of the knowledge prototype: f_agg, bank, coreset, nearest-prototype search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cpkp import prototype as proto
from cpkp.config import PrototypeConfig
from cpkp.errors import CheckpointError, ConfigError
from cpkp.prototype import (
    Prototype,
    build_bank,
    build_prototype,
    coreset_size,
    f_agg,
    greedy_coreset,
    greedy_coreset_exact,
    kp_distance,
    nearest_prototype,
    patch_vectors,
)


def _cfg(**kwargs) -> PrototypeConfig:
    return PrototypeConfig(**kwargs)


def _channel_ramp(batch: int, channels: int, size: int) -> torch.Tensor:
    """[B, C, size, size] with value c in channel c everywhere."""
    ramp = torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1)
    return ramp.expand(batch, channels, size, size).clone()


def _covering_radius(x: torch.Tensor, chosen: torch.Tensor) -> float:
    """Largest distance from a point of x to its nearest chosen point, in full dimension."""
    return float(torch.cdist(x.double(), x[chosen].double()).min(1).values.max())


def _mixture(n: int, dim: int, seed: int, components: int = 12, rank: int = 6) -> torch.Tensor:
    """Gaussian mixture with low-rank components: structured, unlike isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(components, dim, generator=g)
    bases = torch.randn(components, rank, dim, generator=g)
    label = torch.randint(components, (n,), generator=g)
    spread = torch.einsum("nr,nrd->nd", torch.randn(n, rank, generator=g), bases[label])
    return means[label] + spread + 0.3 * torch.randn(n, dim, generator=g)


# ---------------------------------------------------------------------------------------------
# f_agg and patch_vectors


def test_f_agg_shape_and_dimension():
    feats = [torch.randn(2, c, s, s) for c, s in ((24, 16), (40, 8), (112, 4))]
    agg4 = f_agg(feats, _cfg(channels_per_level=8, grid_stride=4))
    agg8 = f_agg(feats, _cfg(channels_per_level=8, grid_stride=8))
    assert agg4.shape == (2, 3 * 8 * 9, 16, 16)
    assert agg8.shape == (2, 3 * 8 * 9, 8, 8)


def test_f_agg_channel_pooling_hand_checked():
    # Level 1 has 6 channels pooled to 3 (pairs), level 2 has 5 pooled to 3 with adaptive bins
    # [0, 2), [1, 4), [3, 5), level 3 already has 3 channels.
    feats = [_channel_ramp(1, 6, 8), _channel_ramp(1, 5, 4), _channel_ramp(1, 3, 2)]
    agg = f_agg(feats, _cfg(channels_per_level=3, grid_stride=4))
    centre = agg[0, :, 4, 4].view(9, 3, 3)[:, 1, 1]  # (channel, ky, kx) order: the centre tap
    expected = torch.tensor([0.5, 2.5, 4.5, 0.5, 2.0, 3.5, 0.0, 1.0, 2.0])
    torch.testing.assert_close(centre, expected)


def test_f_agg_bilinear_upsampling_and_zero_padding():
    # Level 3 (2x2) holds a ramp 0 -> 1 in x; on the 8x8 grid, bilinear with half-pixel centres
    # gives 0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1.
    feats = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.tensor([[[[0.0, 1.0]] * 2]])]
    agg = f_agg(feats, _cfg(channels_per_level=1, grid_stride=4))
    level3_centre = agg[0, 2 * 9 + 4]  # channel 2 (level 3), centre tap
    expected_row = torch.tensor([0.0, 0.0, 0.125, 0.375, 0.625, 0.875, 1.0, 1.0])
    torch.testing.assert_close(level3_centre, expected_row.expand(8, 8))

    # The top-left patch's upper-left neighbour lies in the zero padding.
    assert float(agg[0, 2 * 9 + 0, 0, 0]) == 0.0
    # Its lower-right neighbour is grid position (1, 1).
    assert float(agg[0, 2 * 9 + 8, 0, 0]) == 0.0
    assert float(agg[0, 2 * 9 + 8, 0, 2]) == pytest.approx(0.375)


def test_f_agg_stride8_grid_area_pools_level1():
    level1 = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    feats = [level1, torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    agg = f_agg(feats, _cfg(channels_per_level=1, grid_stride=8))
    assert agg.shape[-2:] == (4, 4)
    # Grid cell (1, 2) averages level-1 rows 2-3, columns 4-5: (20 + 21 + 28 + 29) / 4.
    assert float(agg[0, 4, 1, 2]) == pytest.approx(24.5)


def test_f_agg_is_differentiable_through_every_level():
    feats = [torch.randn(1, c, s, s, requires_grad=True) for c, s in ((6, 8), (8, 4), (10, 2))]
    f_agg(feats, _cfg(channels_per_level=4, grid_stride=4)).square().sum().backward()
    for f in feats:
        assert f.grad is not None and float(f.grad.abs().sum()) > 0


def test_f_agg_rejects_width_above_a_level():
    feats = [torch.randn(1, 24, 8, 8), torch.randn(1, 40, 4, 4), torch.randn(1, 112, 2, 2)]
    with pytest.raises(ConfigError, match="channels_per_level=32.*24 channels"):
        f_agg(feats, _cfg(channels_per_level=32))


def test_patch_vectors_row_order():
    agg = torch.randn(2, 5, 3, 4)
    rows = patch_vectors(agg)
    assert rows.shape == (24, 5)
    torch.testing.assert_close(rows[1 * 12 + 2 * 4 + 3], agg[1, :, 2, 3])


# ---------------------------------------------------------------------------------------------
# Bank and provenance


def _self_describing_batches(images: list[list[int]], grid: tuple[int, int], dim: int = 5):
    """Batches whose vector at (image i, y, x) holds (i, y, x, i + y, ...)."""
    h, w = grid
    for indices in images:
        index = torch.tensor(indices)
        agg = torch.zeros(len(indices), dim, h, w)
        agg[:, 0] = index.view(-1, 1, 1).float()
        agg[:, 1] = torch.arange(h).view(1, h, 1).float()
        agg[:, 2] = torch.arange(w).view(1, 1, w).float()
        agg[:, 3:] = torch.randn(len(indices), dim - 3, h, w)
        yield agg, index


def test_build_bank_provenance_points_back():
    batches = [[10, 11, 12], [3, 4]]
    bank, prov = build_bank(_self_describing_batches(batches, (3, 4)), _cfg())
    assert bank.dtype == torch.float16 and prov.dtype == torch.int64
    assert bank.shape == (5 * 12, 5) and prov.shape == (60, 3)
    assert torch.equal(bank[:, :3].long(), prov)
    assert prov[:, 0].unique().tolist() == [3, 4, 10, 11, 12]


def test_build_bank_subsamples_to_max_bank_seeded_and_batching_free():
    cfg = _cfg(max_bank=50)
    torch.manual_seed(0)
    data = list(_self_describing_batches([[0, 1], [2, 3, 4], [5], [6, 7]], (4, 4)))
    bank, prov = build_bank(data, cfg, seed=1)
    assert bank.shape == (50, 5) and prov.shape == (50, 3)
    assert torch.equal(bank[:, :3].long(), prov)  # provenance follows the kept rows
    assert len({tuple(p) for p in prov.tolist()}) == 50  # no row kept twice

    again, _ = build_bank(data, cfg, seed=1)
    other, _ = build_bank(data, cfg, seed=2)
    assert torch.equal(bank, again)
    assert not torch.equal(bank, other)

    # The same stream in other batch sizes gives the same sample.
    rebatched = [(torch.cat([a for a, _ in data]), torch.cat([i for _, i in data]))]
    single, _ = build_bank(rebatched, cfg, seed=1)
    assert torch.equal(bank, single)


def test_build_bank_subsample_is_uniform():
    # 100 rows through a reservoir of 20: each row is kept with probability 0.2.
    agg = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)
    counts = torch.zeros(100)
    for seed in range(300):
        bank, _ = build_bank(
            [(agg[:30], torch.arange(30)), (agg[30:], torch.arange(30, 100))],
            _cfg(max_bank=20),
            seed=seed,
        )
        counts[bank[:, 0].long()] += 1
    frequency = counts / 300
    assert float(frequency.mean()) == pytest.approx(0.2)
    assert float((frequency - 0.2).abs().max()) < 0.1  # binomial sd is 0.023
    assert float(frequency[:20].mean()) == pytest.approx(0.2, abs=0.03)  # the first rows too


# ---------------------------------------------------------------------------------------------
# Coreset


def test_coreset_size():
    cfg = _cfg(coreset_ratio=0.01, max_prototypes=50_000)
    assert coreset_size(200_000, cfg) == 2000
    assert coreset_size(1_000_000, cfg) == 10_000
    assert coreset_size(150, cfg) == 2
    assert coreset_size(10, cfg) == 1
    assert coreset_size(10_000_000, cfg) == 50_000
    assert coreset_size(3, _cfg(coreset_ratio=1.0)) == 3


def test_exact_greedy_follows_the_farthest_point_rule():
    x = torch.randn(120, 7, generator=torch.Generator().manual_seed(0))
    chosen = greedy_coreset_exact(x, 15)
    distances = torch.cdist(x.double(), x.double())
    expected = [int((x.double() - x.double().mean(0)).norm(dim=1).argmin())]
    for _ in range(14):
        expected.append(int(distances[:, expected].min(1).values.argmax()))
    assert chosen.tolist() == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_greedy_equals_exact_without_projection(seed):
    x = _mixture(1500, 24, seed)
    assert torch.equal(
        greedy_coreset(x, 120, projection_dim=0, progress=False), greedy_coreset_exact(x, 120)
    )


def test_pool_logic_stays_exact_with_many_small_pools(monkeypatch):
    # A pool of at most 16 points, compacted after every step, is taken again and again (and
    # emptied): every choice must stay greedy.
    monkeypatch.setattr(proto, "MAX_POOL", 16)
    monkeypatch.setattr(proto, "COMPACT_EVERY", 1)
    x = _mixture(1500, 16, seed=3)
    z = x - x.mean(0)
    selection = proto._PooledKCenter(z.clone(), 150, pool_size=16)
    chosen = selection.run(progress=False)
    assert selection.pools > 20
    assert torch.equal(chosen, greedy_coreset_exact(x, 150))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_greedy_covering_radius_close_to_exact_on_random_sets(seed):
    for x in (
        _mixture(2000, 576, seed),
        torch.randn(2000, 576, generator=torch.Generator().manual_seed(seed)),
    ):
        fast = greedy_coreset(x.half(), 40, projection_dim=128, seed=seed, progress=False)
        exact = greedy_coreset_exact(x, 40)
        assert len(set(fast.tolist())) == 40
        assert _covering_radius(x, fast) <= 1.15 * _covering_radius(x, exact)


def test_fast_greedy_is_seeded_and_handles_duplicates():
    x = _mixture(600, 200, seed=4)
    a = greedy_coreset(x, 30, projection_dim=64, seed=5, progress=False)
    assert torch.equal(a, greedy_coreset(x, 30, projection_dim=64, seed=5, progress=False))
    assert not torch.equal(a, greedy_coreset(x, 30, projection_dim=64, seed=6, progress=False))

    repeated = torch.randn(20, 8).repeat(5, 1)  # 20 distinct points, 5 copies each
    chosen = greedy_coreset(repeated, 30, projection_dim=0, progress=False)
    assert len(set(chosen.tolist())) == 30
    assert len({tuple(r) for r in repeated[chosen[:20]].tolist()}) == 20  # all distinct first

    with pytest.raises(ValueError, match="cannot select"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match="cannot select"):
        greedy_coreset_exact(x, 601)


# ---------------------------------------------------------------------------------------------
# Nearest-prototype search


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 prototypes for chunk_size 8, so both loops of the search run many times."""
    monkeypatch.setattr(proto, "BLOCK_ELEMENTS", 64)


def test_nearest_prototype_matches_cdist(small_blocks):
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(50, 12, generator=g) + 3.0, torch.randn(37, 12, generator=g)
    distances, index = nearest_prototype(queries, keys, chunk_size=8)
    reference = torch.cdist(queries.double(), keys.double()).min(1)
    assert distances.dtype == torch.float32 and index.dtype == torch.int64
    assert torch.equal(index, reference.indices)
    torch.testing.assert_close(distances.double(), reference.values, rtol=1e-5, atol=1e-5)


def test_nearest_prototype_ties_go_to_the_lowest_index(small_blocks):
    # Integer coordinates with a dyadic mean: every distance is computed exactly, so ties are
    # real ties, within a block (rows 0 and 2) and across blocks (rows i and i + 16).
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 4, (8, 6), generator=g).float()
    keys[2] = keys[0]
    keys = torch.cat([keys, keys.flip(0), keys])  # 24 rows, mean is a multiple of 1/24
    keys = torch.cat([keys, keys[:8]])  # 32 rows: mean a multiple of 1/32
    queries = torch.randint(0, 4, (40, 6), generator=g).float()
    distances, index = nearest_prototype(queries, keys, chunk_size=8)
    reference = torch.cdist(queries.double(), keys.double()).min(1)
    assert torch.equal(index, reference.indices)
    torch.testing.assert_close(distances.double(), reference.values, rtol=1e-6, atol=0)
    assert int(index.max()) < 8  # every tie resolved to the first copy


def test_nearest_prototype_exclude(small_blocks):
    g = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(30, 5, generator=g), torch.randn(20, 5, generator=g)
    exclude = torch.zeros(20, dtype=torch.bool)
    exclude[nearest_prototype(queries, keys)[1][:10]] = True
    distances, index = nearest_prototype(queries, keys, chunk_size=8, exclude=exclude)
    full = torch.cdist(queries.double(), keys.double())
    full[:, exclude] = math.inf
    assert not bool(exclude[index].any())
    assert torch.equal(index, full.argmin(1))
    torch.testing.assert_close(distances.double(), full.min(1).values, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="every prototype"):
        nearest_prototype(queries, keys, exclude=torch.ones(20, dtype=torch.bool))


def test_nearest_prototype_float16_inputs_and_no_grad():
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(64, 32, generator=g).half()
    keys = torch.randn(48, 32, generator=g).half()
    leaf = queries.float().requires_grad_(True)
    distances, index = nearest_prototype(leaf, keys)
    assert not distances.requires_grad
    reference = torch.cdist(queries.double(), keys.double()).min(1)
    assert torch.equal(index, reference.indices)
    torch.testing.assert_close(distances.double(), reference.values, rtol=1e-5, atol=1e-4)
    assert torch.equal(nearest_prototype(queries, keys)[1], index)


def test_kp_distance_value_and_finite_gradient_at_zero():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(30, 16, generator=g)
    queries = torch.cat([keys[:5].clone(), torch.randn(20, 16, generator=g)])
    queries.requires_grad_(True)
    distance = kp_distance(queries, keys)
    reference = torch.cdist(queries.detach().double(), keys.double()).min(1)
    torch.testing.assert_close(distance.detach().double(), reference.values, rtol=1e-5, atol=1e-5)
    assert float(distance.detach()[:5].max()) < 1e-5

    distance.sum().backward()
    grad = queries.grad
    assert torch.isfinite(grad).all()
    assert float(grad[:5].abs().max()) == 0.0  # on a prototype: zero, not NaN
    # Elsewhere the gradient of ||q - k|| is the unit vector (q - k) / ||q - k||.
    diff = queries.detach()[5:].double() - keys.double()[reference.indices[5:]]
    unit = diff / diff.norm(dim=1, keepdim=True)
    torch.testing.assert_close(grad[5:].double(), unit, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Prototype object and the full build


def test_prototype_round_trip_is_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(5)
    original = Prototype(
        torch.randn(17, 9, generator=g).half(),
        torch.randint(0, 100, (17, 3), generator=g),
        (8, 12),
    )
    save_file(original.to_tensors(), tmp_path / "k.safetensors")
    restored = Prototype.from_tensors(load_file(tmp_path / "k.safetensors"))
    assert restored.grid == (8, 12)
    assert restored.vectors.dtype == torch.float16
    assert torch.equal(restored.vectors.view(torch.int16), original.vectors.view(torch.int16))
    assert torch.equal(restored.provenance, original.provenance)

    tensors = original.to_tensors()
    with pytest.raises(CheckpointError, match="lack grid"):
        Prototype.from_tensors({k: v for k, v in tensors.items() if k != "grid"})
    with pytest.raises(CheckpointError, match="float16"):
        Prototype.from_tensors(tensors | {"vectors": tensors["vectors"].float()})


def _photos(size: int) -> torch.Tensor:
    """Six small real photos from scikit-image, [6, 3, size, size] in [0, 1]."""
    from skimage import data

    images = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.immunohistochemistry(),
        data.colorwheel(),
    ]
    tensors = [
        torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255 for im in images
    ]
    return torch.cat([F.interpolate(t[None], size=(size, size), mode="area") for t in tensors])


@pytest.fixture(scope="module")
def lite0():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3)
    )
    return model.eval()


def test_fast_greedy_covering_radius_on_backbone_features(lite0):
    cfg = _cfg(channels_per_level=24, grid_stride=8)
    with torch.inference_mode():
        agg = f_agg(lite0(_photos(128)), cfg)
    bank = patch_vectors(agg).half()
    assert bank.shape == (6 * 16 * 16, 648)
    x = bank.float()
    for m in (15, 60):
        fast = greedy_coreset(bank, m, projection_dim=128, progress=False)
        exact = greedy_coreset_exact(x, m)
        assert _covering_radius(x, fast) <= 1.15 * _covering_radius(x, exact)


def test_build_prototype_end_to_end(lite0):
    cfg = _cfg(channels_per_level=24, grid_stride=8, coreset_ratio=0.02)
    images = _photos(64)
    loader = [
        {"image": images[:4], "index": torch.arange(4)},
        {"image": images[4:], "index": torch.tensor([4, 5])},
    ]
    lite0.train()
    k = build_prototype(lite0, loader, cfg, "cpu", progress=False)
    assert not lite0.training  # the frozen monitor runs in eval mode

    assert k.grid == (8, 8)
    assert k.vectors.dtype == torch.float16 and k.vectors.shape == (8, 648)  # ceil(0.02*384)
    assert k.provenance.shape == (8, 3) and not k.vectors.is_inference()
    with torch.inference_mode():  # the same batches, so the convolutions round alike
        agg = torch.cat([f_agg(lite0(batch["image"]), cfg) for batch in loader]).half()
    for vector, (image, y, x) in zip(k.vectors, k.provenance.tolist()):
        assert torch.equal(vector, agg[image, :, y, x])
    assert len({tuple(p) for p in k.provenance.tolist()}) == 8  # distinct bank vectors
