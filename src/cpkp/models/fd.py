"""Forward-distillation (STPM style) student: the teacher's architecture, randomly initialised.

The student sees the image, like the teacher, and learns to reproduce the teacher's three maps
on normal images. Having never been pretrained, it fails to follow the teacher on patterns it
has not seen in training, which is where the two disagree.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from cpkp.errors import ConfigError
from cpkp.models.blocks import Student, count_parameters

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"  # cpkp.backbones: this prefix builds the architecture, random weights


class FDStudent(Student):
    """Forward-distillation student wrapping a randomly initialised feature extractor.

    Args:
        network: a feature extractor with the teacher's architecture; its forward takes
            [B, 3, H, W] images in [0, 1] and returns three maps at strides 4, 8, 16.
        channels: the three channel counts the network returns (the teacher's).
    """

    kind = "fd"

    def __init__(self, network: nn.Module, channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.network = network
        self.channels = tuple(int(c) for c in channels)  # type: ignore[assignment]

    def forward(self, image: Tensor, teacher_feats: list[Tensor]) -> list[Tensor]:
        """Features of the image; ``teacher_feats`` is not used.

        Args:
            image: [B, 3, H, W] in [0, 1].
            teacher_feats: the teacher's maps (ignored).

        Returns:
            [B, c_l, H / s_l, W / s_l] for s_l = 4, 8, 16, shallow to deep.
        """
        return list(self.network(image))


def bare_backbone_name(name: str) -> str:
    """The architecture name without ``random:`` (``random:resnet18`` -> ``resnet18``)."""
    return name[len(RANDOM_PREFIX) :] if name.startswith(RANDOM_PREFIX) else name


def create_fd_student(teacher_name: str, teacher_channels: tuple[int, int, int]) -> FDStudent:
    """An FD student for the named teacher: the same architecture with random weights.

    Args:
        teacher_name: the teacher's backbone name, with or without ``random:``.
        teacher_channels: the teacher's channels (c1, c2, c3), checked against the network.

    Raises:
        ConfigError: the architecture's channels differ from ``teacher_channels``.
    """
    from cpkp.backbones import create_backbone  # lazy: keeps cpkp.models free of weight code

    name = RANDOM_PREFIX + bare_backbone_name(teacher_name)
    network = create_backbone(name, quiet=True)  # random on purpose: no warning
    channels = tuple(int(c) for c in network.channels)
    if channels != tuple(int(c) for c in teacher_channels):
        raise ConfigError(
            f"model.backbone={teacher_name!r}: the FD student built as {name!r} returns channels "
            f"{channels}, but the teacher's are {tuple(teacher_channels)}"
        )

    network.requires_grad_(True)
    network.train()
    student = FDStudent(network, channels)  # type: ignore[arg-type]
    logger.debug("FD student %s: %d parameters", name, count_parameters(student))
    return student
