"""Reverse-distillation (RD4AD style) student: one-class bottleneck embedding and decoder.

The student never sees the image. The teacher's three maps are squeezed by the one-class
bottleneck embedding (OCBE) into one compact embedding at stride 32, and a decoder that mirrors
the backbone rebuilds the three maps from it, deep to shallow. On normal images the decoder
learns to restore the teacher's features; on a defect the compact embedding cannot carry the
unusual pattern, so the restored features differ from the teacher's there.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from cpkp.errors import ConfigError
from cpkp.models.blocks import (
    ConvNormAct,
    LayerFactory,
    Student,
    count_parameters,
    init_resnet_weights,
    make_stage,
)

logger = logging.getLogger(__name__)

DECODER_DEPTHS = (3, 4, 6)  # RD4AD: de_wide_resnet50_2 stages, deep to shallow
BOTTLENECK_DEPTH = 3  # RD4AD: BN_layer(AttnBottleneck, 3)


def bottleneck_width(out_channels: int) -> int:
    """Inner width of a bottleneck block: half its output channels.

    This is WideResNet-50-2's rule (expansion 4, width per group 2 x 64), which RD4AD keeps in
    its bottleneck and decoder: 2048 -> 1024, 1024 -> 512, 512 -> 256, 256 -> 128.
    """
    return max(out_channels // 2, 1)


class OneClassBottleneck(nn.Module):
    """OCBE: fuse the teacher's three levels and compress them to one stride-32 embedding.

    Level 1 reaches level 3's grid by two strided 3x3 convolutions (``c1 -> c2 -> c3``), level 2
    by one (``c2 -> c3``), each with norm and activation. The three maps are concatenated
    (``3 c3`` channels) and a stride-2 stage of ``depth`` bottlenecks gives the embedding with
    ``2 c3`` channels; its inner width follows :func:`bottleneck_width`. For WideResNet-50-2
    (256, 512, 1024) at 256x256 the embedding is [B, 2048, 8, 8], as in RD4AD.

    Args:
        channels: the teacher's channels (c1, c2, c3) at strides 4, 8, 16.
        depth: number of bottleneck blocks in the stride-2 stage.
        norm_layer: norm layer factory, called with a channel count.
        act_layer: activation factory, called with ``inplace=True``.
    """

    def __init__(
        self,
        channels: tuple[int, int, int],
        depth: int = BOTTLENECK_DEPTH,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.embed_channels = 2 * c3
        # NOTE: RD4AD's BN_layer also defines conv4/bn4 (1x1 4096->2048), never called; left out.

        self.level1 = nn.Sequential(
            ConvNormAct(c1, c2, stride=2, norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(c2, c3, stride=2, norm_layer=norm_layer, act_layer=act_layer),
        )
        self.level2 = ConvNormAct(c2, c3, stride=2, norm_layer=norm_layer, act_layer=act_layer)
        self.fuse = make_stage(
            3 * c3,
            bottleneck_width(2 * c3),
            2 * c3,
            depth,
            resample="down",
            norm_layer=norm_layer,
            act_layer=act_layer,
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        """``feats``: [B, c_l, H / s_l, W / s_l] for s_l = 4, 8, 16 -> [B, 2 c3, H/32, W/32]."""
        level1 = self.level1(feats[0])
        level2 = self.level2(feats[1])

        x = torch.cat([level1, level2, feats[2]], dim=1)
        return self.fuse(x)


class ReverseDecoder(nn.Module):
    """Decoder mirroring the backbone: from the embedding back to the teacher's three maps.

    Three stages of bottlenecks, deep to shallow, each opened by a 2x2 stride-2 transposed
    convolution (in the block's middle and on its shortcut) and ending with exactly the
    teacher's channels at that level: ``2 c3 -> c3`` (stride 16), ``c3 -> c2`` (stride 8),
    ``c2 -> c1`` (stride 4). Inner widths follow :func:`bottleneck_width`.

    Args:
        channels: the teacher's channels (c1, c2, c3) at strides 4, 8, 16.
        depths: blocks per stage, deep to shallow (RD4AD: 3, 4, 6).
        norm_layer: norm layer factory, called with a channel count.
        act_layer: activation factory, called with ``inplace=True``.
        signed_maps: the teacher's maps take negative values, so each stage's output stays
            linear instead of ending with the activation (RD4AD's ReLU suits ResNets only).
    """

    def __init__(
        self,
        channels: tuple[int, int, int],
        depths: tuple[int, int, int] = DECODER_DEPTHS,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        signed_maps: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        # NOTE: for signed teacher maps (EfficientNet) the stage outputs drop RD4AD's last ReLU.
        layers = dict(
            resample="up", norm_layer=norm_layer, act_layer=act_layer, final_act=not signed_maps
        )

        self.stage3 = make_stage(2 * c3, bottleneck_width(c3), c3, depths[0], **layers)
        self.stage2 = make_stage(c3, bottleneck_width(c2), c2, depths[1], **layers)
        self.stage1 = make_stage(c2, bottleneck_width(c1), c1, depths[2], **layers)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """``embedding``: [B, 2 c3, h, w] -> [[B, c1, 8h, 8w], [B, c2, 4h, 4w], [B, c3, 2h, 2w]]."""
        level3 = self.stage3(embedding)
        level2 = self.stage2(level3)
        level1 = self.stage1(level2)

        return [level1, level2, level3]


class RDStudent(Student):
    """Reverse-distillation student: OCBE followed by the mirrored decoder.

    Built from the teacher's channels alone, so it pairs with any backbone whose three levels
    sit at strides 4, 8, 16. For WideResNet-50-2 it has RD4AD's exact structure and size
    (83,802,624 parameters). Any other teacher gets the same structure scaled to its channels:
    every bottleneck's inner width is half its output channels (:func:`bottleneck_width`).

    Args:
        channels: the teacher's channels (c1, c2, c3) at strides 4, 8, 16.
        decoder_depths: decoder blocks per stage, deep to shallow.
        bottleneck_depth: bottleneck blocks in the OCBE's stride-2 stage.
        norm_layer: norm layer factory (BatchNorm2d; SyncBatchNorm for DDP).
        act_layer: activation factory, called with ``inplace=True``.
        signed_maps: the teacher's maps take negative values (see :class:`ReverseDecoder`).
    """

    kind = "rd"

    def __init__(
        self,
        channels: tuple[int, int, int],
        decoder_depths: tuple[int, int, int] = DECODER_DEPTHS,
        bottleneck_depth: int = BOTTLENECK_DEPTH,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        signed_maps: bool = False,
    ) -> None:
        super().__init__()
        # NOTE: RD4AD builds ResNet-18 from BasicBlocks [2, 2, 2]; we use the WRN50-2 layout.
        self.channels = _checked_channels(channels)
        self.bottleneck = OneClassBottleneck(self.channels, bottleneck_depth, norm_layer, act_layer)
        self.decoder = ReverseDecoder(
            self.channels, decoder_depths, norm_layer, act_layer, signed_maps
        )
        init_resnet_weights(self)
        logger.debug(
            "RD student for channels %s: %d parameters", self.channels, count_parameters(self)
        )

    def forward(self, image: Tensor, teacher_feats: list[Tensor]) -> list[Tensor]:
        """Restore the teacher's maps from its own features; ``image`` is not used.

        Args:
            image: [B, 3, H, W] (ignored).
            teacher_feats: [B, c_l, H / s_l, W / s_l] for s_l = 4, 8, 16.

        Returns:
            Three maps shaped like ``teacher_feats``, shallow to deep.
        """
        embedding = self.bottleneck(teacher_feats)
        student_feats = self.decoder(embedding)

        _check_grids(student_feats, teacher_feats)
        return student_feats


def _checked_channels(channels: tuple[int, int, int]) -> tuple[int, int, int]:
    channels = tuple(int(c) for c in channels)
    if len(channels) != 3 or min(channels) < 1:
        raise ValueError(f"teacher channels {channels}: expected three positive counts")
    return channels  # type: ignore[return-value]


def _check_grids(student_feats: list[Tensor], teacher_feats: list[Tensor]) -> None:
    for level, (s, t) in enumerate(zip(student_feats, teacher_feats), start=1):
        if s.shape[-2:] != t.shape[-2:]:
            raise ConfigError(
                f"level {level}: the RD student rebuilt a {tuple(s.shape[-2:])} grid for the "
                f"teacher's {tuple(t.shape[-2:])}; data.image_size must be a multiple of 32"
            )
