"""Knowledge prototype K: aggregation, patch bank, coreset and nearest-prototype search.

DESIGN.md §1.1 and §1.5. The monitor's three maps are pooled over channels per level, brought
to one grid, concatenated and unfolded into patch vectors (``f_agg``). Every patch vector of
every training image forms the bank, subsampled at random above ``prototype.max_bank``; a
greedy k-center selection on a random projection of the bank keeps ``M`` prototypes at full
dimension, each with its provenance (training image, grid y, grid x).

The selection is the part whose cost grows fastest with data. ``greedy_coreset`` keeps the
greedy rule exact on the projected vectors but computes the point-to-centre distances in a few
large matrix products over the bank, with a small pool of far points kept exact in between
(see :class:`_PooledKCenter`), instead of one memory-bound pass over the bank per prototype.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cpkp.config import PrototypeConfig
from cpkp.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

SEARCH_CHUNK = 4096  # query rows per block of the nearest-prototype search
BLOCK_ELEMENTS = 1 << 24  # distance values per block (64 MiB of float32) in the search
CACHE_ELEMENTS = 1 << 20  # distance values per matrix product (4 MiB) in the search
MAX_POOL = 65_536  # largest candidate pool of the coreset selection
COMPACT_EVERY = 32  # coreset steps between pool compactions
UPDATE_BLOCK = 1 << 20  # distance values per block (4 MiB, cache-sized) in coreset updates
KP_EPS = 1e-12  # DESIGN.md §1.5: sqrt(||x - k||^2 + 1e-12) keeps the gradient finite at 0


# ---------------------------------------------------------------------------------------------
# Aggregation f_agg


def f_agg(
    feats: Sequence[Tensor], cfg: PrototypeConfig, strides: Sequence[int] = (4, 8, 16)
) -> Tensor:
    """Aggregate three feature maps into one map of patch vectors (DESIGN.md §1.1).

    Each level is average-pooled over channels to ``cfg.channels_per_level`` channels, brought
    to the prototype grid (stride ``cfg.grid_stride`` of the input: finer levels by area
    pooling, coarser ones by bilinear upsampling), the levels are concatenated and every
    position is unfolded into its ``k x k`` neighbourhood. Differentiable: the same function
    runs on the teacher during training.

    Args:
        feats: three maps ``[B, C_l, H/s_l, W/s_l]``, finest first.
        cfg: the prototype options (``channels_per_level``, ``grid_stride``, ``kernel_size``,
            ``stride``, ``padding``).
        strides: the stride of each map relative to the input.

    Returns:
        ``[B, D, h, w]`` with ``D = 3 * channels_per_level * kernel_size**2`` and ``(h, w)``
        the prototype grid.

    Raises:
        ConfigError: a level has fewer channels than ``prototype.channels_per_level``.
    """
    if len(feats) != 3 or len(strides) != 3:
        raise ValueError(
            f"f_agg expects three feature maps and three strides, got "
            f"{len(feats)} maps and {len(strides)} strides"
        )
    check_prototype_width([f.shape[1] for f in feats], cfg)
    grid = _grid_size(feats, strides, cfg.grid_stride)
    # NOTE: paper eq. 2 pools all levels at once; each level is pooled to the same width here.
    levels = [_to_grid(_pool_channels(f, cfg.channels_per_level), grid) for f in feats]
    return _unfold(torch.cat(levels, dim=1), cfg.kernel_size, cfg.stride, cfg.padding)


def check_prototype_width(channels: Sequence[int], cfg: PrototypeConfig) -> None:
    """Raise ConfigError when ``prototype.channels_per_level`` exceeds a level's channels.

    Repeating channels would invent information and tilt the level weights, so a width larger
    than a level is a configuration mistake.
    """
    for level, count in enumerate(channels, start=1):
        if count < cfg.channels_per_level:
            raise ConfigError(
                f"prototype.channels_per_level={cfg.channels_per_level} exceeds the {count} "
                f"channels of feature level {level}; set it to at most {min(channels)} (the "
                "narrowest level of the backbone)"
            )


def _grid_size(
    feats: Sequence[Tensor], strides: Sequence[int], grid_stride: int
) -> tuple[int, int]:
    """The prototype grid: the size of the level at ``grid_stride``, else derived from level 1."""
    if grid_stride in strides:
        return tuple(feats[list(strides).index(grid_stride)].shape[-2:])
    scale = strides[0] / grid_stride
    return tuple(max(1, math.ceil(s * scale)) for s in feats[0].shape[-2:])


def _pool_channels(x: Tensor, width: int) -> Tensor:
    """Average-pool ``x: [B, C, H, W]`` over channels to ``[B, width, H, W]``.

    Adaptive bins (``floor(i*C/width)`` to ``ceil((i+1)*C/width)``), so ``C`` need not be a
    multiple of ``width``; neighbouring bins then share a channel.
    """
    channels = x.shape[1]
    if channels == width:
        return x
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (width, *x.shape[-2:])).squeeze(1)


def _to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bring ``x: [B, C, H, W]`` to ``[B, C, *grid]``: area pooling down, bilinear up."""
    size = tuple(x.shape[-2:])
    if size == grid:
        return x
    if size[0] >= grid[0] and size[1] >= grid[1]:
        # NOTE: paper's grid is stride 4; on the stride-8 grid level 1 is area-pooled (averages
        # every finer position instead of sampling some of them).
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


def _unfold(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """Unfold ``x: [B, C, H, W]`` into ``[B, C*k*k, h, w]`` patch vectors (zero padding)."""
    b, _, height, width = x.shape
    h = (height + 2 * padding - kernel_size) // stride + 1
    w = (width + 2 * padding - kernel_size) // stride + 1
    cols = F.unfold(x, kernel_size, padding=padding, stride=stride)
    return cols.view(b, cols.shape[1], h, w)


def patch_vectors(agg: Tensor) -> Tensor:
    """Flatten ``agg: [B, D, h, w]`` into ``[B*h*w, D]``, rows in (image, y, x) order."""
    return agg.permute(0, 2, 3, 1).reshape(-1, agg.shape[1])


# ---------------------------------------------------------------------------------------------
# The prototype and its bank


@dataclass
class Prototype:
    """The knowledge prototype K.

    Attributes:
        vectors: ``[M, D]`` float16 prototype patch vectors.
        provenance: ``[M, 3]`` int64 (training image index, grid y, grid x) of each prototype.
        grid: ``(h, w)`` the prototype grid of the images it was built from.
    """

    vectors: Tensor
    provenance: Tensor
    grid: tuple[int, int]

    def to_tensors(self) -> dict[str, Tensor]:
        """Plain tensors for safetensors (no pickle)."""
        return {
            "vectors": self.vectors.contiguous(),
            "provenance": self.provenance.contiguous(),
            "grid": torch.tensor(self.grid, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Prototype:
        """Rebuild from :meth:`to_tensors` output.

        Raises:
            CheckpointError: a key is missing or a tensor has the wrong dtype or shape.
        """
        missing = {"vectors", "provenance", "grid"} - set(tensors)
        if missing:
            raise CheckpointError(
                f"prototype tensors lack {', '.join(sorted(missing))}; the file was not "
                "written by Prototype.to_tensors"
            )
        vectors, provenance, grid = tensors["vectors"], tensors["provenance"], tensors["grid"]
        if vectors.dtype != torch.float16 or vectors.dim() != 2:
            raise CheckpointError(
                f"prototype 'vectors' must be a float16 [M, D] tensor, "
                f"got {vectors.dtype} {list(vectors.shape)}"
            )
        if provenance.dtype != torch.int64 or provenance.shape != (vectors.shape[0], 3):
            raise CheckpointError(
                f"prototype 'provenance' must be an int64 [{vectors.shape[0]}, 3] tensor, "
                f"got {provenance.dtype} {list(provenance.shape)}"
            )
        if grid.numel() != 2:
            raise CheckpointError(f"prototype 'grid' must hold 2 values, got {grid.numel()}")
        return cls(vectors, provenance, (int(grid[0]), int(grid[1])))


def build_bank(
    batches: Iterable[tuple[Tensor, Tensor]], cfg: PrototypeConfig, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Collect the patch vectors of every image, subsampled at random above ``cfg.max_bank``.

    The subsample is a reservoir (one random draw per vector, in arrival order), so the full
    bank never exists in memory and the result does not depend on how images are batched.

    Args:
        batches: ``(agg [B, D, h, w], image_index [B])`` pairs, ``agg`` from :func:`f_agg`.
        cfg: the prototype options (``max_bank``).
        seed: seed of the subsample.

    Returns:
        ``bank [N, D]`` float16 and ``provenance [N, 3]`` int64 (image index, grid y, grid x),
        both on the CPU, ``N <= cfg.max_bank``.
    """
    reservoir = _Reservoir(cfg.max_bank, seed)
    for agg, image_index in batches:
        reservoir.add(
            patch_vectors(agg.detach()).to("cpu", torch.float16),
            _provenance(image_index, agg.shape[-2:]),
        )
    bank, provenance = reservoir.result()
    if reservoir.seen > cfg.max_bank:
        logger.info(
            "patch bank of %d vectors subsampled at random to prototype.max_bank=%d (seed %d)",
            reservoir.seen,
            cfg.max_bank,
            seed,
        )
    return bank, provenance


def _provenance(image_index: Tensor, grid: Sequence[int]) -> Tensor:
    """``[B*h*w, 3]`` (image, y, x) rows in :func:`patch_vectors` order."""
    h, w = int(grid[0]), int(grid[1])
    image = torch.as_tensor(image_index, dtype=torch.int64).cpu().repeat_interleave(h * w)
    y = torch.arange(h).repeat_interleave(w).repeat(len(image) // (h * w))
    x = torch.arange(w).repeat(len(image) // w)
    return torch.stack([image, y, x], dim=1)


class _Reservoir:
    """Uniform random sample of at most ``capacity`` rows from a stream (Algorithm R)."""

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity < 1:
            raise ConfigError(f"prototype.max_bank={capacity}: expected at least 1")
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.filled = 0
        self.vectors: Tensor | None = None
        self.provenance: Tensor | None = None

    def add(self, vectors: Tensor, provenance: Tensor) -> None:
        """Offer ``vectors [b, D]`` with their ``provenance [b, 3]``."""
        draws = torch.rand(len(vectors), generator=self.generator, dtype=torch.float64)
        room = min(self.capacity - self.filled, len(vectors))
        if room > 0:
            self.parts.append((vectors[:room], provenance[:room]))
            self.filled += room
        if room < len(vectors):
            self._replace(vectors[room:], provenance[room:], draws[room:], self.seen + room)
        self.seen += len(vectors)

    def _replace(self, vectors: Tensor, provenance: Tensor, draws: Tensor, first: int) -> None:
        """Item number ``t >= capacity`` replaces slot ``floor(u * (t+1))`` when that is a slot."""
        self._freeze()
        number = torch.arange(first, first + len(vectors), dtype=torch.float64)
        slot = (draws * (number + 1)).long()
        row = torch.nonzero(slot < self.capacity).squeeze(1)
        slot = slot[row]

        # Several rows of one batch may draw the same slot: the last one wins, as in a loop.
        slot, order = torch.sort(slot, stable=True)
        row = row[order]
        _, counts = torch.unique_consecutive(slot, return_counts=True)
        last = torch.cumsum(counts, 0) - 1
        self.vectors[slot[last]] = vectors[row[last]]
        self.provenance[slot[last]] = provenance[row[last]]

    def _freeze(self) -> None:
        if self.vectors is None:
            self.vectors = torch.cat([v for v, _ in self.parts])
            self.provenance = torch.cat([p for _, p in self.parts])
            self.parts = []

    def result(self) -> tuple[Tensor, Tensor]:
        if not self.parts and self.vectors is None:
            raise ValueError("build_bank received no batches")
        self._freeze()
        return self.vectors, self.provenance


def coreset_size(n: int, cfg: PrototypeConfig) -> int:
    """``M = min(ceil(ratio * n), max_prototypes)``, at least 1 and at most ``n``."""
    if n < 1:
        raise ValueError(f"coreset_size needs a non-empty bank, got n={n}")
    # round() first so that 0.01 * 200_000 = 2000.0000000000002 does not become 2001.
    wanted = math.ceil(round(cfg.coreset_ratio * n, 6))
    return max(1, min(wanted, cfg.max_prototypes, n))


# ---------------------------------------------------------------------------------------------
# Greedy k-center selection


@torch.no_grad()
def greedy_coreset_exact(x: Tensor, m: int) -> Tensor:
    """Reference greedy k-center on the full-dimension vectors, one distance column per step.

    Starts from the point nearest the mean, then repeatedly adds the point farthest from the
    selected set. Costs ``m`` passes over ``x`` in float32; no ``n x n`` matrix.

    Args:
        x: ``[n, D]`` vectors, any float dtype.
        m: number of points to select, ``1 <= m <= n``.

    Returns:
        ``[m]`` int64 indices into ``x``, in selection order.
    """
    _check_count(m, len(x))
    x = x.float()
    sq = x.square().sum(1)
    selected = torch.empty(m, dtype=torch.int64)
    nearest = torch.full((len(x),), math.inf)
    point = _central_point(x, sq)
    for step in range(m):
        selected[step] = point
        torch.minimum(nearest, _squared_distances(x, sq, x[point], sq[point]), out=nearest)
        nearest[point] = -1.0  # never select a point twice, even among duplicates
        point = int(torch.argmax(nearest))
    return selected


@torch.no_grad()
def greedy_coreset(
    x: Tensor,
    m: int,
    projection_dim: int = 128,
    chunk_size: int = 16_384,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Greedy k-center selection on a random projection, with batched distance updates.

    Distances are taken on a seeded Gaussian projection of ``x`` to ``projection_dim``
    dimensions (none when ``x`` has at most that many), made chunk by chunk so the bank is
    never converted to float32 as a whole. The greedy rule is exact on the projected vectors
    (up to float32 rounding and ties); see :class:`_PooledKCenter` for how the ``n x m``
    distances are computed as a few large matrix products instead of ``m`` passes.

    Args:
        x: ``[n, D]`` bank, any float dtype (float16 in cpkp).
        m: number of points to select, ``1 <= m <= n``.
        projection_dim: dimensions of the random projection; 0 keeps full dimension.
        chunk_size: bank rows projected at a time.
        seed: seed of the projection.
        progress: show a tqdm progress bar.
        device: where the projected bank lives and the selection runs (default: ``x``'s).

    Returns:
        ``[m]`` int64 indices into ``x``, in selection order, on the CPU.
    """
    _check_count(m, len(x))
    device = torch.device(device) if device is not None else x.device
    started = time.perf_counter()
    z = _project(x, projection_dim, chunk_size, seed, device)
    seconds = time.perf_counter() - started
    rate = float(len(x)) * x.shape[1] * z.shape[1] / max(seconds, 1e-6)
    selection = _PooledKCenter(z, m)
    logger.info(
        "coreset: %d of %d vectors, distances on a %d-dim projection (%.1f MiB float32, made "
        "in %.1f s); selection: at most %.2e multiply-adds (lazy updates skip many), about "
        "%.0f MiB more memory, at most about %.0f s at the projection's %.1f GMAC/s",
        m,
        len(x),
        z.shape[1],
        z.numel() * 4 / 2**20,
        seconds,
        selection.multiply_adds(),
        selection.memory_bytes() / 2**20,
        selection.multiply_adds() / rate,
        rate / 1e9,
    )
    return selection.run(progress).cpu()


def _check_count(m: int, n: int) -> None:
    if not 1 <= m <= n:
        raise ValueError(f"cannot select {m} points from a bank of {n}: need 1 <= m <= n")


def _squared_distances(x: Tensor, sq: Tensor, c: Tensor, c_sq: Tensor) -> Tensor:
    """``||x_i - c||^2`` for ``x: [n, d]`` with ``sq = ||x_i||^2``, in one matrix-vector pass."""
    return torch.addmv(sq + c_sq, x, c, alpha=-2.0)


def _central_point(x: Tensor, sq: Tensor) -> int:
    """Index of the point nearest the mean of ``x: [n, d]``: a deterministic first centre."""
    # NOTE: PatchCore starts from a random point; a central start needs no seed and is stable.
    return int(torch.argmin(torch.addmv(sq, x, x.mean(0), alpha=-2.0)))


def _project(x: Tensor, dim: int, chunk_size: int, seed: int, device: torch.device) -> Tensor:
    """``x: [n, D]`` -> centred float32 ``[n, dim]`` Gaussian projection (identity if D <= dim).

    The projection has variance ``1/dim`` per entry so distances keep their scale; centring
    makes the matrix-product distances lose less to cancellation.
    """
    n, full_dim = x.shape
    if dim <= 0 or full_dim <= dim:
        z = x.to(device, torch.float32, copy=True)
    else:
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(full_dim, dim, generator=generator) / math.sqrt(dim)
        matrix = matrix.to(device)
        z = torch.empty(n, dim, device=device)
        for start in range(0, n, chunk_size):
            rows = x[start : start + chunk_size].to(device, torch.float32)
            torch.mm(rows, matrix, out=z[start : start + chunk_size])
    z -= z.mean(0)
    return z


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU for a loop of many small operations."""
    # NOTE: measured on 2 shared cores: with 2 threads each small indexing op waits on the
    # other thread (10-15x slower while the cores are busy); these loops are memory-bound.
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _PooledKCenter:
    """Exact greedy k-center on ``z: [n, d]`` float32 with lazy, batched distance updates.

    The plain greedy rule updates all ``n`` nearest-centre distances after every new centre:
    ``m`` memory-bound passes over the bank. Here each point keeps ``bound``, its squared
    distance to the centres it has been compared with so far (the first ``version`` ones), an
    upper bound of its true distance. A *pool* of the ``K`` points with the largest bounds is
    brought up to date, in blocked matrix products against only the centres each has missed,
    and then kept exact while centres are added. Every point outside the pool has a true
    distance of at most ``tau``, the largest bound outside the pool, so while the pool's
    farthest point lies at or beyond ``tau`` it is a farthest point of the whole bank, and
    the choice equals the plain greedy rule. When it does not, a new pool is taken. Points
    that fall well inside the covered region are never compared again; ``K`` doubles
    whenever a pool runs out quickly.
    """

    def __init__(self, z: Tensor, m: int, pool_size: int = 4096) -> None:
        self.z = z
        self.m = m
        self.sq = z.square().sum(1)
        self.pool_size = min(pool_size, len(z))
        self.selected = torch.empty(m, dtype=torch.int64, device=z.device)
        self.bound = torch.empty(len(z), device=z.device)  # squared distances
        self.version = torch.zeros(len(z), dtype=torch.int64, device=z.device)
        self.pools = 0
        self.compared = 0.0  # point-centre distances computed

    def multiply_adds(self) -> float:
        """Multiply-adds if every point met every centre (the lazy updates skip most)."""
        return float(self.z.numel()) * self.m

    def memory_bytes(self) -> int:
        """Working memory besides ``z``: per-point state, the pool, one distance block."""
        return len(self.z) * 16 + 4 * self.z.shape[1] * MAX_POOL + 4 * UPDATE_BLOCK

    def run(self, progress: bool) -> Tensor:
        """Select ``m`` points; returns their indices ``[m]`` into ``z`` in selection order."""
        started = time.perf_counter()
        bar = tqdm(total=self.m, desc="coreset", unit="prototype", disable=not progress)
        first = _central_point(self.z, self.sq)
        self.selected[0] = first
        self.bound = _squared_distances(self.z, self.sq, self.z[first], self.sq[first])
        self.bound[first] = -math.inf  # selected points are never chosen again
        self.version.fill_(1)
        self.compared += len(self.z)
        step = 1
        bar.update(1)
        while step < self.m:
            added = self._pool_steps(step, bar)
            step += added
            if step < self.m and added < self.pool_size // 8:
                self.pool_size = min(2 * self.pool_size, len(self.z), MAX_POOL)
        bar.close()
        logger.info(
            "coreset: %d prototypes selected in %.1f s; %d pools, final pool of %d points; "
            "%.1f%% of the n x M point-centre distances computed",
            self.m,
            time.perf_counter() - started,
            self.pools,
            self.pool_size,
            100 * self.compared / (float(len(self.z)) * self.m),
        )
        return self.selected

    def _update(
        self, points: Tensor, step: int, tau: float = -math.inf
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Compare ``points [k]`` with the centres they missed, dropping those below ``tau``.

        Points are sorted by version so that each block of centres meets only the prefix of
        points that has not seen it yet. A point whose distance falls below ``tau`` cannot be
        the next choice; it leaves with the bound it has (exact for the centres seen so far),
        which saves the rest of its comparisons.

        Returns:
            The remaining points ``[k']`` in that order, their vectors ``[k', d]``, squared
            norms ``[k']`` and exact squared distances to the first ``step`` centres ``[k']``.
        """
        versions, order = torch.sort(self.version.index_select(0, points), stable=True)
        points = points.index_select(0, order)
        vectors = self.z.index_select(0, points)
        vectors_sq = self.sq.index_select(0, points)
        bound = self.bound.index_select(0, points)

        first = int(versions[0])
        block = max(1, min(step - first, 1024))
        for start in range(first, step, block):
            stop = min(start + block, step)
            count = int(torch.searchsorted(versions, stop))  # points with version < stop
            keys = self.z.index_select(0, self.selected[start:stop])
            keys_sq = self.sq.index_select(0, self.selected[start:stop])
            rows = max(256, UPDATE_BLOCK // len(keys))
            for row in range(0, count, rows):
                end = min(row + rows, count)
                distances = torch.addmm(keys_sq, vectors[row:end], keys.T, alpha=-2.0)
                closest = distances.min(1).values + vectors_sq[row:end]
                torch.minimum(bound[row:end], closest, out=bound[row:end])
            self.compared += float(count) * len(keys)
            versions[:count] = stop

            keep = bound >= tau
            if int(keep.sum()) < 0.75 * len(points):
                self._store(points[~keep], bound[~keep], versions[~keep])
                rows_kept = torch.nonzero(keep).squeeze(1)
                points, versions = points[rows_kept], versions[rows_kept]
                vectors = vectors.index_select(0, rows_kept)
                vectors_sq, bound = vectors_sq[rows_kept], bound[rows_kept]

        self._store(points, bound, step)
        return points, vectors, vectors_sq, bound

    def _pool_steps(self, step: int, bar: tqdm) -> int:
        """Take a pool and add centres from it while that is provably the greedy choice.

        Returns the number of centres added (possibly 0, which still makes progress: the
        pool's bounds became exact and lower).
        """
        self.pools += 1
        top = torch.topk(self.bound, min(self.pool_size + 1, len(self.z)), sorted=False)
        pool, tau = top.indices, -math.inf
        if len(pool) > self.pool_size:  # the largest bound outside the pool
            smallest = int(torch.argmin(top.values))
            tau = float(top.values[smallest])
            pool = pool[torch.arange(len(pool), device=pool.device) != smallest]
        pool, points, points_sq, nearest = self._update(pool, step, tau)

        added = 0
        with _single_thread(self.z.device):
            while step + added < self.m and len(nearest) > 0:
                best = int(torch.argmax(nearest))
                if float(nearest[best]) < tau or nearest[best] == -math.inf:
                    break
                self.selected[step + added] = pool[best]
                added += 1
                bar.update(1)
                distance = _squared_distances(points, points_sq, points[best], points_sq[best])
                torch.minimum(nearest, distance, out=nearest)
                nearest[best] = -math.inf
                self.compared += len(pool)
                if added % COMPACT_EVERY == 0:
                    pool, points, points_sq, nearest = self._compact(
                        pool, points, points_sq, nearest, tau, step + added
                    )

        self._store(pool, nearest, step + added)
        return added

    def _compact(
        self,
        pool: Tensor,
        points: Tensor,
        points_sq: Tensor,
        nearest: Tensor,
        tau: float,
        step: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Drop pool points that can no longer be chosen (below ``tau``) once they are many."""
        keep = (nearest >= tau) & (nearest > -math.inf)
        kept = int(keep.sum())
        if kept > 0.75 * len(pool):
            return pool, points, points_sq, nearest
        self._store(pool[~keep], nearest[~keep], step)
        rows = torch.nonzero(keep).squeeze(1)
        return pool[rows], points.index_select(0, rows), points_sq[rows], nearest[rows]

    def _store(self, points: Tensor, bound: Tensor, version: Tensor | int) -> None:
        """Write back distances of ``points``, exact for their first ``version`` centres."""
        self.bound.index_copy_(0, points, bound)
        if isinstance(version, Tensor):
            self.version.index_copy_(0, points, version)
        else:
            self.version.index_fill_(0, points, version)


# ---------------------------------------------------------------------------------------------
# Nearest-prototype search


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """No autocast and no TF32 inside: prototype distances stay float32 (DESIGN.md §1.5)."""
    if device.type != "cuda":
        with torch.autocast(device.type, enabled=False):
            yield
        return
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


@torch.no_grad()
def nearest_prototype(
    queries: Tensor,
    prototypes: Tensor,
    chunk_size: int = SEARCH_CHUNK,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact nearest prototype of every query by blocked matrix products.

    ``||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2`` in float32, clamped at 0, over blocks of
    ``chunk_size`` queries and at most ``BLOCK_ELEMENTS / chunk_size`` prototypes, so memory
    stays bounded. On a CPU each matrix product takes only as many queries as keep its
    distances near ``CACHE_ELEMENTS``, so the minimum reads them from cache. Both sides are
    first shifted by the prototypes' mean (distances do not change; the cancellation error
    does). Ties go to the lowest prototype index.

    Args:
        queries: ``[N, D]`` any float dtype.
        prototypes: ``[M, D]`` any float dtype, on the same device.
        chunk_size: queries per block.
        exclude: optional ``[M]`` bool; True prototypes are never returned (to score a
            training image without its own prototypes).

    Returns:
        ``distances [N]`` float32 (Euclidean, not squared) and ``indices [N]`` int64.
    """
    _check_search(queries, prototypes, exclude)
    device = queries.device
    n, m = len(queries), len(prototypes)
    block = max(1, BLOCK_ELEMENTS // chunk_size)
    rows_per_product = chunk_size
    if device.type == "cpu":
        rows_per_product = min(chunk_size, max(256, CACHE_ELEMENTS // min(m, block)))
    best = torch.full((n,), math.inf, device=device)
    index = torch.zeros(n, dtype=torch.int64, device=device)
    with exact_float32(device):
        shift = prototypes.float().mean(0) if m <= block else _mean_chunked(prototypes, block)
        for p_start in range(0, m, block):
            keys = prototypes[p_start : p_start + block].float() - shift
            keys_sq = keys.square().sum(1)
            if exclude is not None:
                keys_sq[exclude[p_start : p_start + block]] = math.inf
            for q_start in range(0, n, rows_per_product):
                rows = slice(q_start, q_start + rows_per_product)
                q = queries[rows].float() - shift
                # ||q||^2 is the same for every key, so it joins after the minimum.
                values, found = torch.addmm(keys_sq, q, keys.T, alpha=-2.0).min(1)
                values += q.square().sum(1)
                better = values < best[rows]  # strict: earlier blocks win ties
                best[rows] = torch.where(better, values, best[rows])
                index[rows] = torch.where(better, found + p_start, index[rows])
    return best.clamp_(min=0).sqrt_(), index


def _mean_chunked(x: Tensor, block: int) -> Tensor:
    total = torch.zeros(x.shape[1], device=x.device)
    for start in range(0, len(x), block):
        total += x[start : start + block].float().sum(0)
    return total / len(x)


def _check_search(queries: Tensor, prototypes: Tensor, exclude: Tensor | None) -> None:
    if queries.dim() != 2 or prototypes.dim() != 2 or queries.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"nearest_prototype expects queries [N, D] and prototypes [M, D], got "
            f"{list(queries.shape)} and {list(prototypes.shape)}"
        )
    if queries.device != prototypes.device:
        raise ValueError(f"queries on {queries.device} but prototypes on {prototypes.device}")
    if len(prototypes) == 0:
        raise ValueError("nearest_prototype needs at least one prototype")
    if exclude is not None:
        if exclude.dtype != torch.bool or exclude.shape != (len(prototypes),):
            raise ValueError(
                f"exclude must be a bool [{len(prototypes)}] mask, got "
                f"{exclude.dtype} {list(exclude.shape)}"
            )
        if bool(exclude.all()):
            raise ValueError("exclude masks out every prototype: no nearest prototype is left")


def kp_distance(queries: Tensor, prototypes: Tensor, chunk_size: int = SEARCH_CHUNK) -> Tensor:
    """Differentiable distance of each query to its nearest prototype (``L_kp``, eq. 9).

    The index comes from :func:`nearest_prototype` under ``no_grad``; only the chosen distance
    is recomputed with gradient, as ``sqrt(||x - k||^2 + 1e-12)`` in float32, so the gradient
    stays finite when a query lies exactly on a prototype (DESIGN.md §1.5).

    Args:
        queries: ``[N, D]`` patch vectors, usually ``patch_vectors(f_agg(teacher(x)))``.
        prototypes: ``[M, D]`` prototype vectors.
        chunk_size: queries per block of the search.

    Returns:
        ``[N]`` float32 distances, differentiable with respect to ``queries``.
    """
    _, index = nearest_prototype(queries.detach(), prototypes, chunk_size)
    with exact_float32(queries.device):
        diff = queries.float() - prototypes[index].float()
        return torch.sqrt(diff.square().sum(1) + KP_EPS)


# ---------------------------------------------------------------------------------------------
# Building K from a monitor


def build_prototype(
    monitor: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    cfg: PrototypeConfig,
    device: torch.device | str,
    seed: int = 0,
    progress: bool = True,
) -> Prototype:
    """Build K: ``f_agg`` of the monitor's maps on every training image, bank, coreset.

    Args:
        monitor: the teaching monitor; ``monitor(x)`` returns three maps. Put in eval mode,
            since it is frozen and its BatchNorm statistics must not move.
        loader: yields dicts with ``"image" [B, 3, H, W]`` in [0, 1] and ``"index" [B]``.
        cfg: the prototype options.
        device: where the monitor runs (and the selection).
        seed: seed of the bank subsample and of the projection.
        progress: show tqdm progress bars.

    Returns:
        The prototype, on the CPU.
    """
    device = torch.device(device)
    bank, provenance, grid = monitor_bank(monitor, loader, cfg, device, seed, progress)
    return select_prototype(bank, provenance, grid, cfg, device, seed, progress)


def select_prototype(
    bank: Tensor,
    provenance: Tensor,
    grid: tuple[int, int],
    cfg: PrototypeConfig,
    device: torch.device | str,
    seed: int = 0,
    progress: bool = True,
) -> Prototype:
    """K = Coreset(bank, M), each prototype with its provenance.

    Args:
        bank: ``[N, D]`` float16 patch vectors (:func:`monitor_bank`, :func:`merge_banks`).
        provenance: ``[N, 3]`` int64 (image index, grid y, grid x) of each row.
        grid: the prototype grid ``(h, w)``.
        cfg: the prototype options.
        device: where the selection runs.
        seed: seed of the projection.
        progress: show a tqdm progress bar.
    """
    h, w = grid
    m = coreset_size(len(bank), cfg)
    logger.info(
        "prototype: bank of %d patch vectors x %d dims (%.1f MiB float16); M = %d prototypes; "
        "search costs %.2e multiply-adds per image (%d x %d patches)",
        len(bank),
        bank.shape[1],
        bank.numel() * 2 / 2**20,
        m,
        float(h * w) * m * bank.shape[1],
        h,
        w,
    )
    chosen = greedy_coreset(
        bank, m, cfg.projection_dim, cfg.chunk_size, seed=seed, progress=progress, device=device
    )
    return Prototype(bank[chosen].clone(), provenance[chosen].clone(), (h, w))


def merge_banks(
    banks: Sequence[Tensor],
    provenances: Sequence[Tensor],
    grid: tuple[int, int],
    cfg: PrototypeConfig,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """One bank from the banks of disjoint sets of images (one per data-parallel rank).

    The rows are put in (image, y, x) order, the order in which :func:`build_bank` meets them
    in a single pass over the images, and a bank above ``cfg.max_bank`` is subsampled by the
    same reservoir. When no part was subsampled on its own, the result is bit for bit the bank
    of a single pass.

    Args:
        banks: ``[n_r, D]`` float16 patch vectors per part.
        provenances: ``[n_r, 3]`` int64 (image index, grid y, grid x) per part.
        grid: the prototype grid ``(h, w)``.
        cfg: the prototype options (``max_bank``, ``chunk_size``).
        seed: seed of the subsample.

    Returns:
        ``bank [N, D]`` and ``provenance [N, 3]``, ``N <= cfg.max_bank``.
    """
    bank, provenance = torch.cat(list(banks)), torch.cat(list(provenances))
    h, w = grid
    order = torch.argsort((provenance[:, 0] * h + provenance[:, 1]) * w + provenance[:, 2])
    bank, provenance = bank[order], provenance[order]
    if len(bank) <= cfg.max_bank:
        return bank, provenance
    reservoir = _Reservoir(cfg.max_bank, seed)
    for start in range(0, len(bank), cfg.chunk_size):
        stop = start + cfg.chunk_size
        reservoir.add(bank[start:stop], provenance[start:stop])
    logger.info(
        "patch bank of %d vectors subsampled at random to prototype.max_bank=%d (seed %d)",
        len(bank),
        cfg.max_bank,
        seed,
    )
    return reservoir.result()


def monitor_bank(
    monitor: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    cfg: PrototypeConfig,
    device: torch.device | str,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The patch bank of the monitor's ``f_agg`` over every image the loader yields.

    Args:
        monitor: the teaching monitor, put in eval mode here (frozen BatchNorm statistics).
        loader: yields dicts with ``"image" [B, 3, H, W]`` in [0, 1] and ``"index" [B]``, the
            index each image has in the run's training list (it becomes the provenance).
        cfg: the prototype options.
        device: where the monitor runs.
        seed: seed of the subsample above ``cfg.max_bank``.
        progress: show a tqdm progress bar.

    Returns:
        ``bank [N, D]`` float16, ``provenance [N, 3]`` int64 (both on the CPU) and the
        prototype grid ``(h, w)``.
    """
    monitor.eval()
    grids: list[tuple[int, int]] = []
    batches = _aggregated(monitor, loader, cfg, torch.device(device), grids, progress)
    bank, provenance = build_bank(batches, cfg, seed=seed)
    return bank, provenance, grids[0]


def reselect_prototype(
    prototype: Prototype,
    vectors: Tensor,
    provenance: Tensor,
    m: int,
    cfg: PrototypeConfig,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Prototype:
    """K chosen anew over the old prototypes and new patch vectors, by the same coreset rule.

    The greedy k-center selection of :func:`build_prototype` (same projection and seed) runs
    over the union, so an old prototype stays when it still covers a region no new patch
    covers better; each chosen row keeps its provenance.

    Args:
        prototype: the current K, ``[M0, D]``.
        vectors: ``[N, D]`` new patch vectors (float16 in cpkp) on the prototype's grid.
        provenance: ``[N, 3]`` int64 (training image index, grid y, grid x) of ``vectors``.
        m: prototypes to keep, ``1 <= m <= M0 + N``.
        cfg: the prototype options (``projection_dim``, ``chunk_size``).
        seed: seed of the projection (the run's ``train.seed``, as when K was built).
        progress: show a tqdm progress bar.
        device: where the selection runs.

    Returns:
        The new prototype ``[m, D]`` on the CPU, rows in selection order.
    """
    if vectors.dim() != 2 or vectors.shape[1] != prototype.vectors.shape[1]:
        raise ValueError(
            f"new patch vectors must be [N, {prototype.vectors.shape[1]}], "
            f"got {list(vectors.shape)}"
        )
    if provenance.shape != (len(vectors), 3):
        raise ValueError(f"provenance must be [{len(vectors)}, 3], got {list(provenance.shape)}")
    union = torch.cat([prototype.vectors, vectors.to(prototype.vectors.dtype)])
    origin = torch.cat([prototype.provenance, provenance.to(torch.int64)])
    chosen = greedy_coreset(
        union, m, cfg.projection_dim, cfg.chunk_size, seed=seed, progress=progress, device=device
    )
    return Prototype(union[chosen].clone(), origin[chosen].clone(), prototype.grid)


def _aggregated(
    monitor: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    cfg: PrototypeConfig,
    device: torch.device,
    grids: list[tuple[int, int]],
    progress: bool,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(f_agg(monitor(image)) [B, D, h, w] on the CPU, index [B])`` per batch."""
    for batch in tqdm(loader, desc="prototype bank", unit="batch", disable=not progress):
        if "image" not in batch or "index" not in batch:
            raise ValueError(f"loader batches need 'image' and 'index', got {sorted(batch)}")
        with torch.inference_mode():
            agg = f_agg(monitor(batch["image"].to(device)), cfg).float().cpu()
        grids.append(tuple(agg.shape[-2:]))
        yield agg, batch["index"]
