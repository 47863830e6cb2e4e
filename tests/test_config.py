"""Presets hold the paper's values; bad configuration is refused with the rule in the message."""

from __future__ import annotations

import pytest

from cpkp.config import Config, load_config, load_preset, preset_names
from cpkp.errors import ConfigError


@pytest.mark.parametrize("name,variant", [("paper_rd_wrn50", "rd"), ("paper_fd_wrn50", "fd")])
def test_paper_presets_hold_every_paper_value(name, variant):
    c = load_preset(name)
    assert c.model.backbone == "wide_resnet50_2"
    assert c.model.variant == variant
    assert c.data.image_size == 256
    assert c.train.batch_size == 8
    assert c.train.epochs == 300
    assert c.train.optimizer == "adam"
    assert c.train.lr_student == 1e-4
    assert c.train.lr_teacher == 1e-6
    assert c.train.alpha == 0.999
    assert c.train.co_progression is True
    assert c.prototype.enabled is True
    assert c.prototype.coreset_ratio == 0.01
    assert c.prototype.grid_stride == 4
    assert c.prototype.channels_per_level == 64
    assert (c.prototype.kernel_size, c.prototype.stride, c.prototype.padding) == (3, 1, 1)
    assert c.scoring.gamma == 0.5
    assert c.scoring.fusion == "raw"
    assert c.train.kp_normalise is False


def test_original_method_presets():
    rd = load_preset("rd_original_wrn50")
    assert (rd.train.lr_student, rd.train.betas, rd.train.batch_size, rd.train.epochs) == (
        5e-3,
        (0.5, 0.999),
        16,
        200,
    )
    assert rd.train.kd_loss == "flattened"
    assert not rd.train.co_progression and not rd.prototype.enabled
    stpm = load_preset("stpm_original_r18")
    assert stpm.model.backbone == "resnet18" and stpm.model.variant == "fd"
    assert stpm.train.optimizer == "sgd"
    assert (stpm.train.lr_student, stpm.train.momentum, stpm.train.weight_decay) == (
        0.4,
        0.9,
        1e-4,
    )
    assert (stpm.train.batch_size, stpm.train.epochs) == (32, 100)


def test_cpu_preset_is_offline_and_on_the_coarse_grid():
    c = load_preset("cpu_rd_lite0")
    assert c.model.backbone == "tf_efficientnet_lite0"
    assert c.prototype.grid_stride == 8
    assert c.prototype.channels_per_level == 24


def test_every_preset_loads():
    assert {"cpu_rd_lite0", "paper_rd_wrn50", "paper_fd_wrn50"} <= set(preset_names())
    for name in preset_names():
        load_preset(name)


def test_unknown_key_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(path)
    with pytest.raises(ConfigError, match="multiple of 32"):
        Config.from_dict({"data": {"image_size": 250}})
    with pytest.raises(ConfigError, match="model.variant"):
        Config.from_dict({"model": {"variant": "xd"}})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("no_such_preset")


def test_round_trip_through_dict():
    c = load_preset("rd_original_wrn50")
    assert Config.from_dict(c.to_dict()) == c
