"""Students of the teacher: forward (FD) and reverse (RD) distillation.

Every student follows :class:`Student`: ``student(image, teacher_feats)`` returns three maps with
exactly the teacher's channels and grids, shallow to deep. :func:`create_student` builds the one
named by ``model.variant``.
"""

from __future__ import annotations

import logging

from cpkp.errors import ConfigError
from cpkp.models.blocks import Bottleneck, Student, count_parameters
from cpkp.models.fd import FDStudent, create_fd_student
from cpkp.models.rd import OneClassBottleneck, RDStudent, ReverseDecoder

logger = logging.getLogger(__name__)

__all__ = [
    "Bottleneck",
    "FDStudent",
    "OneClassBottleneck",
    "RDStudent",
    "ReverseDecoder",
    "Student",
    "count_parameters",
    "create_student",
]

STUDENT_VARIANTS = ("fd", "rd")


def create_student(
    variant: str, teacher_name: str, teacher_channels: tuple[int, int, int]
) -> Student:
    """The student of ``variant`` for a teacher, randomly initialised.

    Args:
        variant: ``"fd"`` (the teacher's architecture, fed the image) or ``"rd"`` (OCBE and
            decoder, fed the teacher's maps).
        teacher_name: the teacher's backbone name (FD builds the same architecture).
        teacher_channels: the teacher's channels (c1, c2, c3) at strides 4, 8, 16.

    Raises:
        ConfigError: an unknown variant.
    """
    if variant == "fd":
        student: Student = create_fd_student(teacher_name, teacher_channels)
    elif variant == "rd":
        from cpkp.backbones import backbone_signed_maps

        student = RDStudent(teacher_channels, signed_maps=backbone_signed_maps(teacher_name))
    else:
        raise ConfigError(
            f"model.variant={variant!r}: expected one of {', '.join(STUDENT_VARIANTS)}"
        )

    logger.info(
        "%s student for %s: %.1fM parameters",
        variant.upper(),
        teacher_name,
        count_parameters(student) / 1e6,
    )
    return student
