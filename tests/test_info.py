"""`cpkp info`: parameter counts and FLOPs of every backbone and student."""

from __future__ import annotations

import torch
from torch import nn

from cpkp.info import count_parameters, forward_gflops, model_rows


def test_flop_count_of_a_known_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.rand(1, 3, 16, 16)
    # 8 x 16 x 16 outputs, 3 x 3 x 3 multiply-adds each, 2 FLOPs per multiply-add
    assert forward_gflops(conv, x) * 1e9 == 2 * 8 * 16 * 16 * 27
    assert count_parameters(conv) == 8 * 27


def test_rows_cover_every_backbone_and_pin_the_wrn50_rd_student():
    rows = model_rows(image_size=64)
    pairs = {(r["backbone"], r["network"]) for r in rows}
    for backbone in ("tf_efficientnet_lite0", "wide_resnet50_2", "resnet18"):
        assert {(backbone, "teacher"), (backbone, "fd"), (backbone, "rd")} <= pairs
    wrn_rd = next(r for r in rows if r["backbone"] == "wide_resnet50_2" and r["network"] == "rd")
    assert round(wrn_rd["params_m"] * 1e6) == 83_802_624
    assert all(r["gflops"] > 0 for r in rows)
