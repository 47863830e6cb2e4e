"""Parameters and GFLOPs of every backbone and student (``cpkp info``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cpkp.backbones import create_backbone, list_backbones
from cpkp.models import create_student


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def forward_gflops(run, *inputs) -> float:
    """GFLOPs of one forward call (multiply-add = 2 FLOPs), counted by torch's FlopCounter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run(*inputs)
    return counter.get_total_flops() / 1e9


def model_rows(image_size: int = 256) -> list[dict[str, object]]:
    """One row per backbone (as teacher) and per student, at batch 1 and ``image_size``."""
    rows = []
    x = torch.rand(1, 3, image_size, image_size)
    for name in list_backbones():
        teacher = create_backbone(f"random:{name}", quiet=True).eval()
        feats = teacher(x)
        rows.append(_row(name, "teacher", teacher, forward_gflops(teacher, x)))
        for variant in ("fd", "rd"):
            student = create_student(variant, name, teacher.channels).eval()
            rows.append(_row(name, variant, student, forward_gflops(student, x, feats)))
    return rows


def _row(backbone: str, part: str, module: nn.Module, gflops: float) -> dict[str, object]:
    return {
        "backbone": backbone,
        "network": part,
        "params_m": count_parameters(module) / 1e6,
        "gflops": gflops,
    }


def model_table(image_size: int = 256) -> str:
    """Markdown table of :func:`model_rows`."""
    lines = [
        f"| backbone | network | parameters (M) | GFLOPs at {image_size}x{image_size} |",
        "|---|---|---|---|",
    ]
    for r in model_rows(image_size):
        lines.append(
            f"| {r['backbone']} | {r['network']} | {r['params_m']:.2f} | {r['gflops']:.2f} |"
        )
    return "\n".join(lines)
