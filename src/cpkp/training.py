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

    @property
    def teacher_steps(self) -> bool:
        return self.config.train.co_progression

    def train_step(self, x: Tensor, measure_gradients: bool = False) -> StepResult:
        """One batch: student step, then (co-progression) teacher step. x: [B, 3, H, W]."""
        self.teacher.eval()
        self.student.train()

        with torch.no_grad():
            teacher_feats = self.teacher(x)
        loss = self._kd(teacher_feats, self.student(x, teacher_feats))
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
            return _grads(total, params)

        g_kp = _grads(parts["kp"], params, retain_graph=True)
        g_kd = _grads(parts["kd"], params)
        flat_kp = torch.cat([g.flatten() for g in g_kp])
        flat_kd = torch.cat([g.flatten() for g in g_kd])
        result.grad_kp_norm = float(flat_kp.norm())
        result.grad_kd_norm = float(flat_kd.norm())
        denom = flat_kp.norm() * flat_kd.norm()
        result.grad_cosine = float(flat_kp @ flat_kd / denom) if denom > 0 else None
        return [alpha * a + (1.0 - alpha) * b for a, b in zip(g_kp, g_kd)]

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
