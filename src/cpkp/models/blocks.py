"""Building blocks shared by the students: the student interface and residual bottlenecks.

The reverse-distillation student (:mod:`cpkp.models.rd`) is made of ResNet bottleneck blocks that
either keep the grid, halve it (a strided 3x3 convolution, as in the encoder) or double it (a 2x2
stride-2 transposed convolution, as in RD4AD's decoder). Layer types are passed in
(``norm_layer=``, ``act_layer=``) so a caller can swap BatchNorm for SyncBatchNorm or GroupNorm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

logger = logging.getLogger(__name__)

LayerFactory = Callable[..., nn.Module]
Resample = Literal["none", "down", "up"]


class Student(nn.Module):
    """A student network: three feature maps with exactly the teacher's channels and grids.

    Subclasses set ``kind`` ("fd" or "rd") and ``channels`` (the teacher's three channel counts).
    Each student uses one of the two inputs of :meth:`forward` and ignores the other, so the
    training loop calls every student the same way.
    """

    kind: str = ""
    channels: tuple[int, int, int]

    def forward(self, image: Tensor, teacher_feats: list[Tensor]) -> list[Tensor]:
        """Student maps for a batch.

        Args:
            image: [B, 3, H, W] in [0, 1] (used by FD).
            teacher_feats: the teacher's maps [B, C_l, H / s_l, W / s_l] for strides
                s_l = 4, 8, 16 (used by RD).

        Returns:
            Three maps shaped like ``teacher_feats``, shallow to deep.
        """
        raise NotImplementedError


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a norm layer follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 without bias; stride 2 halves the grid."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def deconv2x2(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """2x2 transposed convolution with stride 2 and no bias: doubles the grid exactly."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)


class ConvNormAct(nn.Sequential):
    """3x3 convolution, norm, activation: ``[B, C_in, H, W] -> [B, C_out, H / s, W / s]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels, stride)
        self.bn = norm_layer(out_channels)
        self.act = act_layer(inplace=True)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce to ``width``, 3x3 (or 2x2 up), 1x1 expand, residual add.

    ``resample`` says what the block does to the grid: ``"none"`` keeps it, ``"down"`` halves it
    with a stride-2 3x3 convolution (torchvision's ResNet v1.5 placement), ``"up"`` doubles it
    with a 2x2 stride-2 transposed convolution in place of the 3x3 (RD4AD's decoder). When the
    grid or the channel count changes, the shortcut is projected the same way (1x1 stride-2
    convolution down, 2x2 transposed convolution up, 1x1 convolution otherwise) and normalised.

    Shapes: ``[B, C_in, H, W] -> [B, C_out, H', W']`` with ``H' = H``, ``ceil(H / 2)`` or ``2H``.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        resample: Resample = "none",
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        final_act: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer(inplace=True)

        self.conv2 = _middle_conv(width, resample)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer(inplace=True)

        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = norm_layer(out_channels)

        self.shortcut = _shortcut(in_channels, out_channels, resample, norm_layer)
        self.act3 = act_layer(inplace=True) if final_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: [B, C_in, H, W] -> [B, C_out, H', W']."""
        shortcut = x if self.shortcut is None else self.shortcut(x)

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.act2(x)

        x = self.conv3(x)
        x = self.bn3(x)

        x = x + shortcut
        return self.act3(x)


def _middle_conv(width: int, resample: Resample) -> nn.Module:
    if resample == "up":
        return deconv2x2(width, width)
    if resample == "down":
        return conv3x3(width, width, stride=2)
    if resample == "none":
        return conv3x3(width, width)
    raise ValueError(f"resample={resample!r}: expected 'none', 'down' or 'up'")


def _shortcut(
    in_channels: int, out_channels: int, resample: Resample, norm_layer: LayerFactory
) -> nn.Sequential | None:
    if resample == "none" and in_channels == out_channels:
        return None
    if resample == "up":
        projection: nn.Module = deconv2x2(in_channels, out_channels)
    else:
        projection = conv1x1(in_channels, out_channels, stride=2 if resample == "down" else 1)
    return nn.Sequential(projection, norm_layer(out_channels))


def make_stage(
    in_channels: int,
    width: int,
    out_channels: int,
    depth: int,
    resample: Resample,
    norm_layer: LayerFactory = nn.BatchNorm2d,
    act_layer: LayerFactory = nn.ReLU,
    final_act: bool = True,
) -> nn.Sequential:
    """``depth`` bottlenecks; the first one resamples the grid and changes the channel count.

    ``final_act=False`` leaves the last block's output linear (for teachers with signed maps).
    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H', W']`` (see :class:`Bottleneck`).
    """
    if depth < 1:
        raise ValueError(f"depth={depth}: a stage needs at least one block")
    blocks = []
    for i in range(depth):
        blocks.append(
            Bottleneck(
                in_channels if i == 0 else out_channels,
                width,
                out_channels,
                resample if i == 0 else "none",
                norm_layer,
                act_layer,
                final_act=final_act or i < depth - 1,
            )
        )
    return nn.Sequential(*blocks)


def init_resnet_weights(module: nn.Module) -> None:
    """ResNet initialisation: He-normal (fan-out) convolutions, unit-scale zero-shift norms.

    Transposed convolutions keep PyTorch's default initialisation, as in RD4AD's decoder.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (buffers such as BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())
