"""The co-progression steps of DESIGN.md §1.2 on tiny mock networks and toy tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpkp.config import Config
from cpkp.losses import kd_loss, kp_loss
from cpkp.prototype import f_agg, kp_distance, patch_vectors
from cpkp.training import (
    CoProgressionTrainer,
    StepResult,
    frozen_batchnorm_stats,
    recalibrate_batchnorm,
)


class TinyTeacher(nn.Module):
    """Three maps at strides 4, 8, 16 with BatchNorm, like a cut backbone."""

    name = "tiny"
    channels = (4, 6, 8)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.BatchNorm2d(4), nn.ReLU())
        self.l2 = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.l3 = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.l2(f1)
        return [f1, f2, self.l3(f2)]


class TinyStudent(nn.Module):
    """FD-style mock student that records its first weight at every forward call."""

    kind = "fd"

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyTeacher()
        self.seen: list[torch.Tensor] = []

    def forward(self, image, teacher_feats):
        self.seen.append(self.net.stem[0].weight.detach().clone())
        return self.net(image)


class TinyRDStudent(nn.Module):
    """RD-style mock student: a 1x1 convolution per level on the teacher's maps."""

    kind = "rd"

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(c, c, 1) for c in TinyTeacher.channels)

    def forward(self, image, teacher_feats):
        return [h(f) for h, f in zip(self.heads, teacher_feats)]


def _config(**train) -> Config:
    config = Config()
    config.prototype.channels_per_level = 4
    config.prototype.grid_stride = 8
    for key, value in train.items():
        setattr(config.train, key, value)
    return config.validate()


def _setup(seed=0, variant="fd", **train):
    torch.manual_seed(seed)
    teacher = TinyTeacher()
    student = TinyStudent() if variant == "fd" else TinyRDStudent()
    config = _config(**train)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        agg = f_agg(teacher.eval()(x), config.prototype)
    prototypes = patch_vectors(agg)[::7].clone()
    return teacher, student, config, x, prototypes


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_kd_loss_identical_is_zero_and_orthogonal_is_one_per_level():
    t = [torch.randn(2, 5, 4, 4) for _ in range(3)]
    assert float(kd_loss(t, [x.clone() for x in t])) == pytest.approx(0.0, abs=1e-6)

    e0 = torch.zeros(2, 4, 3, 3)
    e0[:, 0] = 1.0
    e1 = torch.zeros(2, 4, 3, 3)
    e1[:, 1] = 2.0
    assert float(kd_loss([e0] * 3, [e1] * 3)) == pytest.approx(3.0, abs=1e-6)
    assert float(kd_loss([e0], [e1], mode="flattened")) == pytest.approx(1.0, abs=1e-6)


def test_kd_loss_positional_averages_positions():
    t = torch.zeros(1, 2, 1, 2)
    s = torch.zeros(1, 2, 1, 2)
    t[0, 0, 0, :] = 1.0
    s[0, 0, 0, 0] = 1.0  # same direction at position 0
    s[0, 1, 0, 1] = 1.0  # orthogonal at position 1
    assert float(kd_loss([t], [s])) == pytest.approx(0.5, abs=1e-6)


def test_kp_distance_on_toy_vectors_by_hand():
    queries = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    prototypes = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    d = kp_distance(queries, prototypes)
    # nearest: (0,0) -> 0; (3,4) -> (1,1): sqrt(4 + 9); (1,0) -> either at distance 1
    expected = torch.tensor([1e-6, 13.0**0.5, 1.0])
    assert torch.allclose(d, expected, atol=1e-5)


def test_kp_loss_equals_mean_nearest_distance():
    teacher, _, config, x, prototypes = _setup()
    with torch.no_grad():
        feats = teacher.eval()(x)
    q = patch_vectors(f_agg(feats, config.prototype))
    expected = torch.cdist(q.double(), prototypes.double()).min(1).values.mean()
    got = kp_loss(feats, prototypes, config.prototype)
    assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


def test_student_step_leaves_teacher_bit_identical_and_teacher_step_spares_student():
    teacher, student, config, x, prototypes = _setup(co_progression=False)
    before = _params(teacher)
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    trainer.train_step(x)
    assert _same(before, _params(teacher))

    config.train.co_progression = True
    student_before = _params(student)
    grads_before = [p.grad.clone() for p in student.parameters()]
    trainer._teacher_step(x, StepResult(kd=0.0), measure=False)
    assert _same(student_before, _params(student))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, student.parameters()))
    assert not _same(before, _params(teacher))


def test_teacher_step_sees_the_updated_student():
    teacher, student, config, x, prototypes = _setup(lr_student=0.1)
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    trainer.train_step(x)
    first, second = student.seen
    after = student.net.stem[0].weight.detach()
    assert not torch.equal(first, after)
    assert torch.equal(second, after)


def test_recompute_does_not_update_student_batchnorm_twice():
    teacher, student, config, x, prototypes = _setup()
    bn = student.net.stem[1]
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    trainer.train_step(x)
    assert int(bn.num_batches_tracked) == 1
    mean = bn.running_mean.clone()
    with frozen_batchnorm_stats(student):
        student.train()(x, None)
    assert torch.equal(mean, bn.running_mean) and int(bn.num_batches_tracked) == 1


def test_teacher_batchnorm_statistics_stay_frozen():
    teacher, student, config, x, prototypes = _setup(lr_teacher=1e-2)
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    for _ in range(3):
        trainer.train_step(x)
    for k, v in stats.items():
        assert torch.equal(v, teacher.state_dict()[k]), k


def test_co_progression_step_changes_teacher_and_lowers_teacher_loss():
    teacher, student, config, x, prototypes = _setup(lr_teacher=1e-3, alpha=0.9)
    # Move the teacher off the prototypes first so that L_kp has somewhere to go.
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    before = _params(teacher)

    def teacher_loss():
        with torch.no_grad():
            feats = teacher.eval()(x)
            targets = student.eval()(x, feats)
            kd = kd_loss(feats, targets)
            kp = kp_loss(feats, prototypes, config.prototype)
        return 0.9 * kp + 0.1 * kd

    student.eval()
    with frozen_batchnorm_stats(student):
        loss_before = teacher_loss()
        trainer._teacher_step(x, StepResult(kd=0.0), measure=False)
        loss_after = teacher_loss()
    assert not _same(before, _params(teacher))
    assert float(loss_after) < float(loss_before)


def test_co_progression_off_keeps_teacher_bit_identical():
    teacher, student, config, x, prototypes = _setup(co_progression=False, lr_teacher=1.0)
    before = _params(teacher)
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    for _ in range(3):
        trainer.train_step(x)
    assert _same(before, _params(teacher))


def test_alpha_one_makes_teacher_loss_exactly_kp():
    teacher, student, config, x, prototypes = _setup(alpha=1.0)
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    result = trainer.train_step(x)
    assert result.teacher == result.kp


def test_gradient_diagnostics_are_consistent():
    teacher, student, config, x, prototypes = _setup()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    result = trainer.train_step(x, measure_gradients=True)
    assert result.grad_kp_norm > 0 and result.grad_kd_norm > 0
    assert -1.0 <= result.grad_cosine <= 1.0


def test_rd_detaches_bottleneck_input_unless_switched():
    for via, expect_grad in ((False, False), (True, True)):
        teacher, student, config, x, prototypes = _setup(
            variant="rd", teacher_grad_via_bottleneck=via
        )
        trainer = CoProgressionTrainer(teacher, student, prototypes, config)
        feats = teacher(x)
        targets = trainer._student_targets(x, feats)
        assert targets[0].requires_grad is expect_grad


def test_teacher_step_on_kd_alone_without_prototype():
    teacher, student, config, x, _ = _setup(lr_teacher=1e-2)
    before = _params(teacher)
    trainer = CoProgressionTrainer(teacher, student, None, config)
    result = trainer.train_step(x)
    assert result.kp is None and result.teacher == pytest.approx(result.kd_after)
    assert not _same(before, _params(teacher))


def test_batchnorm_recalibration_gives_the_exact_statistics_of_the_final_weights():
    teacher, student, config, x, prototypes = _setup(lr_student=0.05)
    trainer = CoProgressionTrainer(teacher, student, prototypes, config)
    for _ in range(3):
        trainer.train_step(x)
    batches = [x[:2], x[2:]]
    recalibrate_batchnorm(student, teacher, batches)
    bn = student.net.stem[1]
    with torch.no_grad():
        pre = torch.cat([student.net.stem[0](b) for b in batches])
    expected = pre.mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    assert bn.momentum == 0.1 and not student.training
