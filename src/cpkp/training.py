"""The co-progression training loop (DESIGN.md §1.2, numerics of §1.5).

Per batch, in this order: teacher and student forward; ``L_kd``; student step; recompute the
student's maps with its updated weights (BatchNorm statistics not updated a second time);
``L_kp``; teacher step on ``alpha * L_kp + (1 - alpha) * L_kd``, computing the teacher's gradients
only. ``rd@cpkp`` and ``fd@cpkp`` are this code with ``co_progression`` and ``prototype`` off.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cpkp import distributed
from cpkp.config import Config
from cpkp.errors import TrainingError
from cpkp.losses import kd_loss, kp_loss

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Losses of one batch and, when measured, the two parts of the teacher's gradient."""

    kd: float
    kd_after: float | None = None
    kp: float | None = None
    teacher: float | None = None
    grad_kp_norm: float | None = None
    grad_kd_norm: float | None = None
    grad_cosine: float | None = None


@dataclass
class EpochLog:
    """Mean losses of one epoch and the teacher-gradient diagnostics of its first batch."""

    epoch: int
    kd: float
    kp: float | None
    teacher: float | None
    grad_kp_norm: float | None = None
    grad_kd_norm: float | None = None
    grad_cosine: float | None = None
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged while the module stays in train mode.

    Batch statistics still normalise the forward pass (as in the student step), but the running
    mean/var and the batch counter are restored afterwards, so a recompute does not count twice.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class CoProgressionTrainer:
    """Owns the optimisers and runs the per-batch steps of DESIGN.md §1.2.

    Args:
        teacher: feature extractor (images in [0, 1] -> three maps); trained at ``lr_teacher``
            with its BatchNorm statistics frozen (eval mode).
        student: ``forward(image, teacher_feats) -> three maps``; ``kind`` is "fd" or "rd".
        prototypes: [M, D] prototype vectors, or None when the prototype is switched off.
        config: the run configuration.
        kp_scale: divisor of ``L_kp`` (``kp_normalise``), 1 otherwise.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        prototypes: Tensor | None,
        config: Config,
        kp_scale: float = 1.0,
    ) -> None:
        self.teacher = teacher
        self.student = student
        self.prototypes = prototypes
        self.config = config
        self.kp_scale = kp_scale
        self.teacher_params = [p for p in teacher.parameters() if p.requires_grad]
        self.optim_student = _optimizer(student.parameters(), config, config.train.lr_student)
        self.optim_teacher = _optimizer(self.teacher_params, config, config.train.lr_teacher)
        self._student_step_net: nn.Module = student  # its DDP wrapper inside data_parallel()
        self._average_teacher_grads = False

    @contextlib.contextmanager
    def data_parallel(self, device: torch.device) -> Iterator[None]:
        """Inside the block, train data-parallel over the process group (if one is active).

        The student step runs through ``DistributedDataParallel``, which averages the student's
        gradients across ranks during ``backward``; on GPUs the student's BatchNorm becomes
        SyncBatchNorm for the block (statistics of the global batch), and is plain BatchNorm
        again afterwards, sharing the same parameters and buffers. The teacher's gradients are
        averaged explicitly (see :meth:`_average`). The recompute of step 4 calls the bare
        student: it needs no gradient synchronisation.

        Args:
            device: this rank's device (``cuda:LOCAL_RANK`` or the CPU).
        """
        from torch.nn.parallel import DistributedDataParallel

        if not distributed.active():
            yield
            return
        swapped = to_sync_batchnorm(self.student) if device.type == "cuda" else []
        self._student_step_net = DistributedDataParallel(
            self.student, device_ids=[device.index] if device.type == "cuda" else None
        )
        self._average_teacher_grads = True
        try:
            yield
        finally:
            self._student_step_net = self.student
            self._average_teacher_grads = False
            restore_batchnorm(swapped)

    @property
    def teacher_steps(self) -> bool:
        return self.config.train.co_progression

    def train_step(self, x: Tensor, measure_gradients: bool = False) -> StepResult:
        """One batch: student step, then (co-progression) teacher step. x: [B, 3, H, W]."""
        self.teacher.eval()
        self.student.train()

        with torch.no_grad():
            teacher_feats = self.teacher(x)
        loss = self._kd(teacher_feats, self._student_step_net(x, teacher_feats))
        self.optim_student.zero_grad(set_to_none=True)
        loss.backward()
        self.optim_student.step()
        result = StepResult(kd=float(loss.detach()))

        if self.teacher_steps:
            self._teacher_step(x, result, measure_gradients)
        return result

    def _teacher_step(self, x: Tensor, result: StepResult, measure: bool) -> None:
        cfg = self.config
        alpha = cfg.train.alpha if self.prototypes is not None else 0.0

        # The teacher has not moved since step 1, so recomputing its maps with gradient here
        # gives the same values without holding the step-1 graph (DESIGN.md §1.5).
        teacher_feats = self.teacher(x)
        kd_after = self._kd(teacher_feats, self._student_targets(x, teacher_feats))
        kp = None
        if self.prototypes is not None:
            kp = kp_loss(teacher_feats, self.prototypes, cfg.prototype, self.kp_scale)

        parts = {"kd": kd_after} if kp is None else {"kd": kd_after, "kp": kp}
        grads = self._teacher_gradients(parts, alpha, measure, result)
        for p, g in zip(self.teacher_params, grads):
            p.grad = g
        self.optim_teacher.step()
        self.optim_teacher.zero_grad(set_to_none=True)

        result.kd_after = float(kd_after.detach())
        result.kp = None if kp is None else float(kp.detach())
        total = (1.0 - alpha) * kd_after.detach()
        if kp is not None:
            total = total + alpha * kp.detach()
        result.teacher = float(total)

    def _student_targets(self, x: Tensor, teacher_feats: list[Tensor]) -> list[Tensor]:
        """The updated student's maps for the teacher step, without touching its .grad.

        FD, and RD with the bottleneck input detached, make the student a constant for the
        teacher: no graph is built. With ``teacher_grad_via_bottleneck`` the RD student is run
        with a graph so that ``L_kd`` also reaches the teacher through the bottleneck; the
        teacher's gradients are then taken with ``autograd.grad``, never ``.backward``.
        """
        via_bottleneck = self.student.kind == "rd" and self.config.train.teacher_grad_via_bottleneck
        with frozen_batchnorm_stats(self.student):
            if via_bottleneck:
                return self.student(x, teacher_feats)
            with torch.no_grad():
                return self.student(x, [f.detach() for f in teacher_feats])

    def _teacher_gradients(
        self, parts: dict[str, Tensor], alpha: float, measure: bool, result: StepResult
    ) -> list[Tensor]:
        params = self.teacher_params
        if not measure or "kp" not in parts:
            total = (1.0 - alpha) * parts["kd"]
            if "kp" in parts:
                total = total + alpha * parts["kp"]
            return self._average(_grads(total, params))

        g_kp = _grads(parts["kp"], params, retain_graph=True)
        g_kd = _grads(parts["kd"], params)
        self._average(g_kp + g_kd)  # the diagnostics then describe the global batch
        flat_kp = torch.cat([g.flatten() for g in g_kp])
        flat_kd = torch.cat([g.flatten() for g in g_kd])
        result.grad_kp_norm = float(flat_kp.norm())
        result.grad_kd_norm = float(flat_kd.norm())
        denom = flat_kp.norm() * flat_kd.norm()
        result.grad_cosine = float(flat_kp @ flat_kd / denom) if denom > 0 else None
        return [alpha * a + (1.0 - alpha) * b for a, b in zip(g_kp, g_kd)]

    def _average(self, grads: list[Tensor]) -> list[Tensor]:
        """The teacher's gradients averaged across ranks (in place) inside data_parallel().

        The teacher is not wrapped in DistributedDataParallel: its gradients come from
        ``torch.autograd.grad`` (the teacher's only, never the student's .grad), and DDP's
        reducer fires only on ``.backward()``, so a DDP teacher would average nothing and then
        refuse the next forward for an unfinished reduction. The average of the ranks'
        gradients of their mean losses is the gradient of the global batch's mean loss.
        """
        if self._average_teacher_grads:
            # NOTE: explicit all-reduce, no DDP wrapper: autograd.grad bypasses DDP's reducer.
            distributed.all_reduce_mean_(grads)
        return grads

    def _kd(self, teacher_feats: list[Tensor], student_feats: list[Tensor]) -> Tensor:
        return kd_loss(teacher_feats, student_feats, self.config.train.kd_loss)


@torch.no_grad()
def recalibrate_batchnorm(
    student: nn.Module, teacher: nn.Module, batches: Iterable[Tensor]
) -> None:
    """Set the student's BatchNorm running statistics to their exact values on ``batches``.

    The running averages trail the weights during training (momentum 0.1); after a short or
    fast run they describe an older network, and the student in eval mode then disagrees with
    the teacher everywhere. One pass with a cumulative average over the normal training images
    gives the statistics of the final weights. Only the statistics change.

    Args:
        student: the student, ``student(x, teacher_feats)``.
        teacher: the teacher (eval mode), whose maps feed an RD student.
        batches: images [B, 3, H, W] in [0, 1].
    """
    norms = [m for m in student.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    student.train()
    teacher.eval()
    for x in batches:
        student(x, teacher(x))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    student.eval()


def average_running_stats(module: nn.Module) -> None:
    """Average BatchNorm running statistics across ranks, weighted by the batches each saw.

    After :func:`recalibrate_batchnorm` on each rank's share of the images, every running mean
    and variance is a cumulative average over that rank's batches; weighting by
    ``num_batches_tracked`` gives the average over all ranks' batches, the same on every rank.
    """
    if not distributed.active():
        return
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in norms:
        count = m.num_batches_tracked.to(m.running_mean.dtype)
        stats = torch.cat([m.running_mean * count, m.running_var * count, count.reshape(1)])
        distributed.all_reduce_sum_(stats)
        total = stats[-1].clamp_min(1.0)
        c = m.num_features
        m.running_mean.copy_(stats[:c] / total)
        m.running_var.copy_(stats[c : 2 * c] / total)
        m.num_batches_tracked.copy_(stats[-1].round().long())


def to_sync_batchnorm(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every BatchNorm inside ``module`` for a SyncBatchNorm sharing its tensors.

    timm's converter keeps the activation of its BatchNormAct2d layers (the FD student's
    EfficientNet), which torch's own converter would drop. The new layers use the same
    parameter and running-statistic tensors, so optimisers keep working on them.

    Returns:
        ``(parent, name, original)`` per swapped layer, for :func:`restore_batchnorm`.
    """
    from timm.layers import convert_sync_batchnorm

    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    return swapped


def restore_batchnorm(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back the layers :func:`to_sync_batchnorm` swapped out (same tensors, same mode)."""
    for parent, name, original in swapped:
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)


def check_finite(result: StepResult, epoch: int, batch: int) -> None:
    """Stop on a NaN or infinite loss, naming the epoch and batch."""
    for name in ("kd", "kd_after", "kp", "teacher"):
        value = getattr(result, name)
        if value is not None and not math.isfinite(value):
            raise TrainingError(
                f"the {name} loss became {value} at epoch {epoch + 1}, batch {batch + 1}; "
                "training stopped and the last good checkpoint was kept. Lower the learning "
                "rates or check the training images for corrupt values."
            )


def _grads(loss: Tensor, params: list[Tensor], retain_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _optimizer(params, config: Config, lr: float) -> torch.optim.Optimizer:
    train = config.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    return torch.optim.Adam(params, lr=lr, betas=train.betas, weight_decay=train.weight_decay)
