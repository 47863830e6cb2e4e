"""The two training losses of CPKP (DESIGN.md §1.2).

``kd_loss`` is the distillation loss of eq. 10-11; ``kp_loss`` the knowledge-prototype loss of
eq. 9, differentiable with respect to the teacher's features only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkp.config import PrototypeConfig
from cpkp.prototype import f_agg, kp_distance, patch_vectors


def kd_loss(
    teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor], mode: str = "positional"
) -> Tensor:
    """Distillation loss summed over the three levels.

    Args:
        teacher_feats: three maps [B, C_l, h_l, w_l].
        student_feats: three maps of the same shapes.
        mode: ``positional`` is the paper's ``mean_{h,w}(1 - cos)`` with the cosine over
            channels at each position; ``flattened`` is RD as published, one cosine per whole
            flattened map, averaged over the batch.

    Returns:
        Scalar float32; 0 for identical maps, 1 per level for orthogonal ones.
    """
    total = torch.zeros((), device=teacher_feats[0].device)
    for t, s in zip(teacher_feats, student_feats):
        t, s = t.float(), s.float()
        if mode == "flattened":
            t, s = t.flatten(1), s.flatten(1)
        total = total + (1.0 - F.cosine_similarity(t, s, dim=1, eps=1e-8)).mean()
    return total


def kp_loss(
    teacher_feats: Sequence[Tensor],
    prototypes: Tensor,
    cfg: PrototypeConfig,
    scale: float = 1.0,
) -> Tensor:
    """Mean distance of the teacher's aggregated patches to their nearest prototype.

    Args:
        teacher_feats: the teacher's three maps [B, C_l, h_l, w_l], with gradient.
        prototypes: [M, D] prototype vectors (no gradient).
        cfg: the prototype configuration (pooling width, grid, unfold).
        scale: divides the loss (``kp_normalise``: the bank's mean nearest-neighbour
            distance), 1 in the paper presets.

    Returns:
        Scalar float32.
    """
    queries = patch_vectors(f_agg([f.float() for f in teacher_feats], cfg))
    return kp_distance(queries, prototypes, cfg.chunk_size).mean() / scale
