"""Data-parallel training of one run across processes started by ``torchrun`` (PyTorch DDP).

``torchrun --nproc-per-node N -m cpkp train ...`` starts N processes and hands each one
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; a multi-node run sets the
same variables (``torchrun --nnodes K --node-rank i --rdzv-backend c10d --rdzv-endpoint
HOST:PORT``). This module reads them, joins the process group (NCCL with one GPU per
``LOCAL_RANK``, gloo on the CPU) and offers the few collectives training needs: averaging
gradients, gathering variable-sized tensors to rank 0, broadcasting rank 0's results.

Large CPU-side tensors (the patch bank, calibration maps) travel through a separate gloo group,
so they never have to fit in GPU memory. Every collective has a timeout
(``CPKP_DIST_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`), so a rank whose peer died
without torchrun noticing stops instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, RandomSampler

from cpkp.errors import ConfigError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "CPKP_DIST_TIMEOUT"
# Long enough for rank 0's coreset selection on a large bank, while the others wait for it.
DEFAULT_TIMEOUT_S = 3600

_cpu_group: Any = None  # gloo group for CPU tensors (the default group when it is gloo)


# ---------------------------------------------------------------------------------------------
# Launch and process group


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher setting the same variables)
    as one of several."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: 0 without a process group."""
    if active():
        return dist.get_rank()
    return _env_int("RANK", 0) if launched() else 0


def world_size() -> int:
    """Number of processes training together: 1 without a process group."""
    return dist.get_world_size() if active() else 1


_rank = rank  # for ShardSampler, whose argument of that name hides the function


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and logs progress."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this process: under torchrun, CUDA device ``LOCAL_RANK`` for ``cuda``.

    An explicit index (``cuda:1``) is kept as given.

    Raises:
        ConfigError: ``LOCAL_RANK`` names a GPU this machine does not have.
    """
    if device.type != "cuda" or device.index is not None or not launched():
        return device
    local = _env_int("LOCAL_RANK", 0)
    count = torch.cuda.device_count()
    if local >= count:
        raise ConfigError(
            f"torchrun gave this process LOCAL_RANK={local}, but the machine has {count} CUDA "
            f"device(s): start at most {count} processes per node (--nproc-per-node)"
        )
    return torch.device("cuda", local)


def init_from_env(device: torch.device) -> bool:
    """Join the process group of a torchrun launch; do nothing when not launched.

    Idempotent. NCCL when ``device`` is a GPU (made the current device), gloo otherwise.

    Args:
        device: this process's training device, from :func:`local_device`.

    Returns:
        Whether a process group of several processes is active.

    Raises:
        ConfigError: ``CPKP_DIST_TIMEOUT`` is not a positive number of seconds.
    """
    global _cpu_group
    if not launched() or active():
        return active()
    timeout = datetime.timedelta(seconds=_timeout_seconds())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout)
        _cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        _cpu_group = dist.group.WORLD
    logger.info(
        "data-parallel training: rank %d of %d (%s, %s backend, collectives time out after %d s)",
        dist.get_rank(),
        dist.get_world_size(),
        device,
        dist.get_backend(),
        timeout.total_seconds(),
    )
    return True


def cleanup() -> None:
    """Leave the process group (after a last barrier when every rank got here)."""
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


@contextlib.contextmanager
def failure_guard() -> Iterator[None]:
    """Log ``rank N failed: <message>`` for any exception leaving the block, then re-raise it.

    The process then exits non-zero and torchrun stops the other ranks; without a launch the
    exception passes unchanged.
    """
    try:
        yield
    except BaseException as err:
        if launched():
            message = str(err).strip() or type(err).__name__
            if _lost_peer(err):
                logger.error(
                    "rank %d stopped: it lost contact with another rank, which probably failed "
                    "first (see that rank's 'failed' line): %s",
                    rank(),
                    message,
                )
            else:
                logger.error("rank %d failed: %s", rank(), message)
        raise


def _lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that broke because another rank went away."""
    if isinstance(err, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from err


def _timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return seconds


# ---------------------------------------------------------------------------------------------
# Collectives (each a no-op, or the identity, without an active group)


def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        dist.barrier(group=_cpu_group)


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` across ranks in place, in one flattened collective.

    All tensors must share one device and dtype (gradients of one network do).
    """
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum_(tensor: Tensor) -> None:
    """Sum ``tensor`` across ranks in place."""
    if active():
        dist.all_reduce(tensor)


def gather_rows(tensor: Tensor) -> list[Tensor] | None:
    """Gather CPU tensors whose first dimension differs between ranks to rank 0.

    Args:
        tensor: ``[n_r, ...]`` on the CPU; every rank the same trailing shape and dtype.

    Returns:
        On rank 0, the ``world_size`` tensors in rank order; None on the other ranks. Without
        a group, ``[tensor]``.
    """
    if not active():
        return [tensor]
    tensor = tensor.detach().cpu().contiguous()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(tensor)]), group=_cpu_group)
    longest = max(int(c) for c in counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    main = dist.get_rank() == 0
    received = [torch.empty_like(padded) for _ in counts] if main else None
    dist.gather(padded, received, dst=0, group=_cpu_group)
    if not main:
        return None
    return [part[: int(c)] for part, c in zip(received, counts)]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable, small) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    return box[0]


def broadcast_tensors(tensors: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Rank 0's named CPU tensors on every rank (the other ranks pass None).

    Shapes and dtypes travel first, so the receivers need not know them.
    """
    if not active():
        return tensors
    specs = broadcast_object(
        None if tensors is None else {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    )
    out = {}
    for name, (shape, dtype) in specs.items():
        if dist.get_rank() == 0:
            t = tensors[name].detach().cpu().contiguous()
        else:
            t = torch.empty(shape, dtype=dtype)
        dist.broadcast(t, src=0, group=_cpu_group)
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------
# Sharding the data


class ShardSampler(DistributedSampler):
    """This rank's share of each epoch's order: positions ``rank, rank + N, rank + 2N, ...``.

    Shuffled, each epoch's order is the one the single-process path's
    ``DataLoader(shuffle=True)`` draws: a ``RandomSampler`` on the run's generator (seeded from
    ``train.seed``, saved in checkpoints), instead of DistributedSampler's ``seed + epoch``.
    Every rank holds the same generator state, so all draw the same order and ``set_epoch``
    is not needed. With a per-rank batch of ``b``, global batch ``k`` (the union over ranks)
    is then exactly batch ``k`` of one process with batch ``N x b``, and a resumed run
    continues the same sequence.

    Args:
        dataset: the training images.
        shuffle: draw a new order each epoch (training); off: the dataset's order.
        generator: the run's generator (required with ``shuffle``).
        pad: repeat the first positions so that every rank gets ``ceil(n / N)`` images, as
            :class:`DistributedSampler` does; training needs it (every rank must take the same
            number of steps). Off, each image is seen exactly once over all ranks (prototype
            bank, calibration) and ranks may differ by one image.
        num_replicas: number of ranks (default: the process group's).
        rank: this rank (default: the process group's).
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool,
        generator: torch.Generator | None = None,
        pad: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=world_size() if num_replicas is None else num_replicas,
            rank=_rank() if rank is None else rank,
            shuffle=shuffle,
        )
        if shuffle and generator is None:
            raise ValueError("ShardSampler(shuffle=True) needs the run's generator")
        self.generator = generator
        self.pad = pad
        n = len(dataset)
        if not pad:
            self.num_samples = len(range(self.rank, n, self.num_replicas))
            self.total_size = n

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            # The single-process path's sampler, drawn in full: the same random numbers from
            # the same generator, so the same order and the same generator state afterwards.
            order = list(RandomSampler(self.dataset, generator=self.generator))
        else:
            order = list(range(n))
        if self.pad and self.total_size > n:
            order += (order * math.ceil(self.total_size / n))[: self.total_size - n]
        return iter(order[self.rank : self.total_size : self.num_replicas])
