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


def test_yaml_values_are_converted_to_the_field_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  lr_student: 1e-4\n  lr_teacher: 2\n  epochs: '3'\n  amp: 'false'\n"
        "  betas: ['0.5', 1e-3]\n  keep_epoch: null\nmodel:\n  weights: null\n"
    )
    c = load_config(path)
    assert c.train.lr_student == 1e-4 and type(c.train.lr_student) is float
    assert c.train.lr_teacher == 2.0 and type(c.train.lr_teacher) is float
    assert c.train.epochs == 3 and type(c.train.epochs) is int
    assert c.train.amp is False and c.train.betas == (0.5, 1e-3)
    assert c.train.keep_epoch is None and c.model.weights is None


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("train", "epochs", "3.5", "expected an integer"),
        ("train", "epochs", 2.0, "expected an integer"),
        ("train", "amp", 1, "expected true or false"),
        ("train", "amp", "yes please", "expected true or false"),
        ("train", "lr_student", "fast", "expected a number"),
        ("train", "lr_student", True, "expected a number"),
        ("train", "lr_teacher", "nan", "expected a finite number"),
        ("train", "lr_teacher", float("inf"), "expected a finite number"),
        ("train", "betas", [0.5], "expected 2 values"),
        ("train", "betas", "0.5,0.9", "expected a list"),
        ("model", "backbone", 18, "expected a string"),
        ("model", "weights", ["a"], "expected a string"),
    ],
)
def test_values_of_the_wrong_type_name_the_file_and_key(tmp_path, section, key, value, expected):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {section}.{key}=") and expected in message


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "epochs", 0),
        ("train", "batch_size", 0),
        ("train", "checkpoint_every", 0),
        ("train", "keep_epoch", 0),
        ("train", "keep_epoch", 301),
        ("train", "lr_student", 0.0),
        ("train", "lr_teacher", -1e-6),
        ("train", "alpha", 1.5),
        ("train", "device", "gpu"),
        ("train", "device", "cuda:x"),
        ("train", "seed", -5),
        ("train", "seed", 2**32),
        ("scoring", "gamma", -0.1),
        ("scoring", "sigma", -1.0),
        ("scoring", "image_threshold_quantile", 1.01),
        ("scoring", "pixel_threshold_quantile", -0.5),
        ("data", "num_workers", -1),
        ("data", "image_size", 0),
        ("prototype", "channels_per_level", 0),
        ("prototype", "kernel_size", 2),
        ("prototype", "kernel_size", 0),
        ("prototype", "max_prototypes", 0),
        ("prototype", "coreset_ratio", 0.0),
        ("prototype", "coreset_ratio", 1.5),
    ],
)
def test_values_out_of_range_name_the_key(tmp_path, section, key, value):
    path = tmp_path / "range.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=f"{path}: {section}.{key}="):
        load_config(path)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices_as_resolve_device_reads_them(device):
    assert Config.from_dict({"train": {"device": device}}).train.device == device


def test_boundary_values_are_accepted():
    c = Config.from_dict(
        {
            "train": {"alpha": 0, "epochs": 1, "keep_epoch": 1, "checkpoint_every": 1},
            "scoring": {"gamma": 1, "sigma": 0, "image_threshold_quantile": 1},
            "prototype": {"coreset_ratio": 1, "kernel_size": 1},
            "data": {"num_workers": 0, "image_size": 32},
        }
    )
    assert c.train.alpha == 0.0 and type(c.train.alpha) is float
    assert c.scoring.gamma == 1.0 and c.prototype.coreset_ratio == 1.0


def test_set_on_the_command_line_converts_like_yaml():
    from cpkp.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["train", "--set", "train.lr_teacher=1e-5", "--set", "scoring.sigma=2"]
    )
    c = config_from_args(args)
    assert c.train.lr_teacher == 1e-5 and c.scoring.sigma == 2.0
    args = build_parser().parse_args(["train", "--set", "train.epochs=many"])
    with pytest.raises(ConfigError, match="command line: train.epochs='many': expected an integer"):
        config_from_args(args)
