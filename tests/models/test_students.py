"""Tests of the FD and RD students (cpkp.models)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from cpkp.backbones import backbone_channels, create_backbone
from cpkp.config import Config, DataConfig
from cpkp.errors import ConfigError
from cpkp.models import (
    Bottleneck,
    FDStudent,
    RDStudent,
    Student,
    count_parameters,
    create_student,
)

WRN_CHANNELS = (256, 512, 1024)
LITE0_CHANNELS = (24, 40, 112)
BACKBONES = ("wide_resnet50_2", "resnet18", "tf_efficientnet_lite0")

# Parameters of RD4AD's student for WideResNet-50-2 (hq-deng/RD4AD, resnet.py and de_resnet.py),
# derived by hand from the official definitions: every convolution is bias-free (in*out*k*k),
# every BatchNorm has 2*C parameters.
# BN_layer(AttnBottleneck, 3, width_per_group=128):
#   conv1 3x3 256->512 + bn, conv2 3x3 512->1024 + bn, conv3 3x3 512->1024 + bn  = 10,623,488
#   block 1: 1x1 3072->1024, 3x3 1024->1024 s2, 1x1 1024->2048, 1x1 s2 3072->2048 shortcut,
#            4 bn                                                                 = 20,982,784
#   blocks 2, 3: 1x1 2048->1024, 3x3 1024->1024, 1x1 1024->2048, 3 bn             = 2 x 13,639,680
#   total used by its forward                                                     = 58,885,120
#   (its conv4 1x1 4096->2048 + bn4, 8,392,704 parameters, is never called in forward and is
#   left out here; with it the official module holds 92,195,328.)
# de_wide_resnet50_2, stages [3, 4, 6] deep to shallow, width = 2 x planes, stride-2 stages open
# with 2x2 transposed convolutions in the block and on the shortcut:
#   2048->1024 (width 512), 1024->512 (width 256), 512->256 (width 128)           = 24,917,504
OFFICIAL_WRN_OCBE_PARAMETERS = 58_885_120
OFFICIAL_WRN_DECODER_PARAMETERS = 24_917_504
OFFICIAL_WRN_RD_PARAMETERS = 83_802_624


def _grids(size: int) -> list[int]:
    return [size // 4, size // 8, size // 16]


def _random_feats(channels: tuple[int, ...], size: int, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, c, g, g, generator=generator)
        for c, g in zip(channels, _grids(size), strict=True)
    ]


@pytest.fixture(scope="module")
def students() -> Callable[[str, str], Student]:
    """Builds each (variant, backbone) student once per module; the big ones take seconds."""
    cache: dict[tuple[str, str], Student] = {}

    def build(variant: str, name: str) -> Student:
        if (variant, name) not in cache:
            torch.manual_seed(1)
            cache[variant, name] = create_student(
                variant, "random:" + name, backbone_channels(name)
            )
        return cache[variant, name]

    return build


@pytest.fixture(scope="module")
def wrn_rd(students) -> RDStudent:
    return students("rd", "wide_resnet50_2")


# ---------------------------------------------------------------- building blocks


def test_bottleneck_with_silent_branch_is_relu_of_input() -> None:
    block = Bottleneck(8, 4, 8).eval()
    nn.init.zeros_(block.bn3.weight)

    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1))

    assert block.shortcut is None
    torch.testing.assert_close(block(x), torch.relu(x))


def test_up_block_shortcut_is_a_transposed_2x2_upsampling() -> None:
    block = Bottleneck(1, 2, 1, resample="up").eval()
    projection, norm = block.shortcut
    nn.init.ones_(projection.weight)
    nn.init.zeros_(block.bn3.weight)
    norm.reset_running_stats()

    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    expected = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])

    out = block(x)
    torch.testing.assert_close(out[0, 0], expected / (1 + norm.eps) ** 0.5)


def test_down_block_halves_the_grid_and_shortcut_takes_even_positions() -> None:
    block = Bottleneck(1, 2, 1, resample="down").eval()
    projection, norm = block.shortcut
    nn.init.ones_(projection.weight)
    nn.init.zeros_(block.bn3.weight)

    x = torch.arange(16.0).reshape(1, 1, 4, 4)

    out = block(x)
    assert isinstance(block.conv2, nn.Conv2d) and block.conv2.stride == (2, 2)
    torch.testing.assert_close(out[0, 0], x[0, 0, ::2, ::2] / (1 + norm.eps) ** 0.5)


# ---------------------------------------------------------------- RD structure


def test_wrn_rd_parameter_count_equals_the_official_definition(wrn_rd: RDStudent) -> None:
    assert count_parameters(wrn_rd.bottleneck) == OFFICIAL_WRN_OCBE_PARAMETERS
    assert count_parameters(wrn_rd.decoder) == OFFICIAL_WRN_DECODER_PARAMETERS
    assert count_parameters(wrn_rd) == OFFICIAL_WRN_RD_PARAMETERS


def test_wrn_rd_layers_follow_rd4ad(wrn_rd: RDStudent) -> None:
    fuse, decoder = wrn_rd.bottleneck.fuse, wrn_rd.decoder
    stages = [(decoder.stage3, 512, 1024), (decoder.stage2, 256, 512), (decoder.stage1, 128, 256)]

    assert [len(fuse)] + [len(stage) for stage, _, _ in stages] == [3, 3, 4, 6]
    assert fuse[0].conv1.weight.shape == (1024, 3072, 1, 1)
    assert fuse[0].conv2.stride == (2, 2)
    assert fuse[2].conv3.weight.shape == (2048, 1024, 1, 1)
    for stage, width, out in stages:
        assert isinstance(stage[0].conv2, nn.ConvTranspose2d)
        assert stage[0].conv2.kernel_size == (2, 2) and stage[0].conv2.stride == (2, 2)
        assert isinstance(stage[0].shortcut[0], nn.ConvTranspose2d)
        assert stage[1].conv2.kernel_size == (3, 3) and stage[1].shortcut is None
        assert stage[-1].conv1.weight.shape == (width, out, 1, 1)
        assert stage[-1].conv3.weight.shape == (out, width, 1, 1)


def test_wrn_ocbe_gives_2048x8x8_at_256() -> None:
    with torch.device("meta"):
        student = RDStudent(WRN_CHANNELS)
        feats = [torch.empty(1, c, g, g) for c, g in zip(WRN_CHANNELS, _grids(256), strict=True)]

    embedding = student.bottleneck(feats)
    restored = student(torch.empty(1, 3, 256, 256, device="meta"), feats)

    assert embedding.shape == (1, 2048, 8, 8)
    assert [f.shape for f in restored] == [f.shape for f in feats]


@pytest.mark.parametrize(
    ("channels", "widths"),
    [((64, 128, 256), (32, 64, 128, 256)), (LITE0_CHANNELS, (12, 20, 56, 112))],
)
def test_rd_for_other_backbones_scales_like_wrn(channels, widths) -> None:
    student = RDStudent(channels)
    decoder, fuse = student.decoder, student.bottleneck.fuse

    inner = [decoder.stage1[0].bn1, decoder.stage2[0].bn1, decoder.stage3[0].bn1, fuse[0].bn1]
    assert tuple(bn.num_features for bn in inner) == widths
    assert fuse[-1].bn3.num_features == 2 * channels[2]
    assert [len(decoder.stage3), len(decoder.stage2), len(decoder.stage1)] == [3, 4, 6]
    ends = [
        stage[-1].bn3.num_features for stage in (decoder.stage1, decoder.stage2, decoder.stage3)
    ]
    assert ends == list(channels)


# ---------------------------------------------------------------- RD behaviour


def test_rd_ignores_the_image_and_reads_the_teacher() -> None:
    torch.manual_seed(0)
    student = RDStudent(LITE0_CHANNELS).eval()
    feats = _random_feats(LITE0_CHANNELS, 64)
    images = torch.rand(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        first = student(images[0], feats)
        second = student(images[1], feats)
        moved = student(images[0], [feats[0] + 1.0, feats[1], feats[2]])

    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(first[0], moved[0])
    assert all((f >= 0).all() for f in first)  # every stage ends in the block's ReLU


def test_rd_is_deterministic_under_a_seed() -> None:
    feats = _random_feats(LITE0_CHANNELS, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        student = RDStudent(LITE0_CHANNELS).eval()
        with torch.no_grad():
            outs.append(student(None, feats))

    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rd_refuses_a_grid_from_a_size_not_multiple_of_32() -> None:
    student = RDStudent(LITE0_CHANNELS)
    feats = [torch.randn(2, c, g, g) for c, g in zip(LITE0_CHANNELS, (63, 32, 16), strict=True)]

    with pytest.raises(ConfigError, match="multiple of 32"):
        student(None, feats)


def test_config_refuses_image_size_not_multiple_of_32() -> None:
    with pytest.raises(ConfigError) as caught:
        Config(data=DataConfig(image_size=250)).validate()

    assert "data.image_size=250" in str(caught.value)
    assert "multiple of 32" in str(caught.value)
    assert Config(data=DataConfig(image_size=224)).validate().data.image_size == 224


# ---------------------------------------------------------------- every pairing


def _teacher(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("random:" + name).eval()


@pytest.fixture(scope="module")
def teachers() -> dict[str, nn.Module]:
    return {name: _teacher(name) for name in BACKBONES}


def _check_pairing(teacher: nn.Module, student: Student, size: int, device: str) -> None:
    image = torch.rand(2, 3, size, size).to(device)
    with torch.no_grad():
        teacher_feats = list(teacher(image))
        student_feats = student(image, teacher_feats)

    assert [f.shape[1] for f in teacher_feats] == list(student.channels)
    assert [f.shape[-1] for f in teacher_feats] == _grids(size)
    assert [f.shape for f in student_feats] == [f.shape for f in teacher_feats]


@pytest.mark.parametrize("variant", ["fd", "rd"])
@pytest.mark.parametrize("name", BACKBONES)
def test_pairing_shapes_at_64(teachers, students, name: str, variant: str) -> None:
    teacher = teachers[name]
    student = students(variant, name).eval()

    assert student.kind == variant
    _check_pairing(teacher, student, 64, "cpu")


@pytest.mark.parametrize("variant", ["fd", "rd"])
@pytest.mark.parametrize("name", BACKBONES)
def test_pairing_shapes_at_256(teachers, name: str, variant: str) -> None:
    # Meta tensors carry shapes only: building and running at 256x256 costs no arithmetic.
    with torch.device("meta"):
        teacher = create_backbone("random:" + name).eval()
        student = create_student(variant, "random:" + name, backbone_channels(name)).eval()

    _check_pairing(teacher, student, 256, "meta")


# ---------------------------------------------------------------- FD


@pytest.mark.parametrize("name", BACKBONES)
def test_fd_has_the_teacher_architecture(teachers, students, name: str) -> None:
    student = students("fd", name)
    teacher_shapes = {k: v.shape for k, v in teachers[name].named_parameters()}
    student_shapes = {k: v.shape for k, v in student.network.named_parameters()}

    assert isinstance(student, FDStudent)
    assert student_shapes == teacher_shapes
    assert not student.network.pretrained
    first_teacher, first_student = next(teachers[name].parameters()), next(student.parameters())
    assert not torch.equal(first_teacher, first_student)  # its own random draw, not a copy
    assert all(p.requires_grad for p in student.parameters())


def test_fd_ignores_the_teacher_maps() -> None:
    torch.manual_seed(0)
    student = create_student("fd", "resnet18", backbone_channels("resnet18")).eval()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))

    with torch.no_grad():
        direct = list(student.network(image))
        via_student = student(image, _random_feats(backbone_channels("resnet18"), 64, 1))

    for a, b in zip(direct, via_student, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fd_refuses_channels_that_are_not_the_teachers() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        create_student("fd", "resnet18", WRN_CHANNELS)


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ConfigError, match="model.variant='xd'"):
        create_student("xd", "resnet18", backbone_channels("resnet18"))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("variant", "name"),
    [("rd", name) for name in BACKBONES] + [("fd", "resnet18"), ("fd", "tf_efficientnet_lite0")],
)
def test_gradient_reaches_every_student_parameter(students, name: str, variant: str) -> None:
    student = students(variant, name).train()
    student.zero_grad(set_to_none=True)
    feats = _random_feats(backbone_channels(name), 32)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    loss = sum(f.square().mean() for f in student(image, [f.detach() for f in feats]))
    loss.backward()

    missing = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_rd_outputs_are_signed_only_for_teachers_with_signed_maps():
    torch.manual_seed(0)
    lite = create_student("rd", "tf_efficientnet_lite0", (24, 40, 112)).eval()
    feats = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip((24, 40, 112), (4, 8, 16))]
    assert all(bool((o < 0).any()) for o in lite(None, feats))

    resnet = create_student("rd", "random:resnet18", (64, 128, 256)).eval()
    feats = [torch.rand(2, c, 64 // s, 64 // s) for c, s in zip((64, 128, 256), (4, 8, 16))]
    assert all(bool((o >= 0).all()) for o in resnet(None, feats))
