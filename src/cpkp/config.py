"""Run configuration: dataclasses whose defaults are the paper's values, read from YAML.

Every field carries the paper's value as its default (DESIGN.md §1.2) and a comment with its
source; presets in ``cpkp/configs/*.yaml`` override what differs. Unknown keys are an error, so
a misspelt option never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cpkp.errors import ConfigError

VARIANTS = ("rd", "fd")
FUSIONS = ("standardized", "raw")
RESIZE_MODES = ("squash", "aspect")  # cpkp.geometry
MIN_TILE = 16  # pixels: a smaller tile would be blown up many times to the model size
KD_LOSSES = ("positional", "flattened")
OPTIMIZERS = ("adam", "sgd")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # as cpkp.api.resolve_device reads it


@dataclass
class DataConfig:
    image_size: int = 256  # paper, §4.1: 256x256 input
    num_workers: int = 0  # data-loader worker processes
    resize: str = "squash"  # paper: the whole frame to S x S; "aspect" keeps the aspect ratio
    tile: int = 0  # tile side in image pixels (cpkp.geometry); 0: no tiling
    tile_overlap: int = 0  # pixels neighbouring tiles share
    roi: str | None = None  # region-of-interest mask image; its non-zero pixels are scored


@dataclass
class ModelConfig:
    backbone: str = "wide_resnet50_2"  # paper, §4.1
    variant: str = "rd"  # rd (reverse distillation) or fd (forward distillation)
    weights: str | None = None  # local ImageNet weight file for torchvision backbones
    download_weights: bool = False  # opt-in download of torchvision weights


@dataclass
class PrototypeConfig:
    enabled: bool = True  # switch `prototype`: off means no K, no L_kp, no A_kp
    channels_per_level: int = 64  # DESIGN.md §1.1, WideResNet-50-2 preset
    kernel_size: int = 3  # paper, eq. 3: Unfold(k=3)
    stride: int = 1  # paper, eq. 3
    padding: int = 1  # paper, eq. 3
    grid_stride: int = 4  # paper: the grid of the first level (stride 4)
    coreset_ratio: float = 0.01  # paper, §4.1: 1%
    max_prototypes: int = 50_000  # cap on M whatever the bank size
    max_bank: int = 2_000_000  # a larger bank is subsampled at random first
    projection_dim: int = 128  # random projection used for coreset distances
    chunk_size: int = 16_384  # rows per chunk in selection and search


@dataclass
class TrainConfig:
    epochs: int = 300  # paper, §4.1
    batch_size: int = 8  # paper, §4.1
    lr_student: float = 1e-4  # paper, §4.1
    lr_teacher: float = 1e-6  # paper, §4.1
    alpha: float = 0.999  # paper, Table 4
    co_progression: bool = True  # switch: off means the teacher never steps
    teacher_grad_via_bottleneck: bool = False  # DESIGN.md §1.2: detached in RD by default
    kp_normalise: bool = False  # DESIGN.md §1.5: off in paper presets
    kd_loss: str = "positional"  # paper, eq. 10-11; "flattened" for RD as published
    optimizer: str = "adam"  # paper, §4.1
    betas: tuple[float, float] = (0.9, 0.999)  # Adam defaults
    momentum: float = 0.9  # SGD only (STPM as published)
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU
    amp: bool = False  # mixed precision for the networks on CUDA
    compile: bool = False  # torch.compile the teacher and student for scoring (not training)
    checkpoint_every: int = 10  # epochs between checkpoints
    keep_epoch: int | None = None  # None keeps the last epoch


@dataclass
class ScoringConfig:
    gamma: float = 0.5  # paper, eq. 15
    fusion: str = "standardized"  # DESIGN.md §1.3; paper presets use "raw"
    sigma: float = 4.0  # Gaussian smoothing in pixels at 256x256 (RD practice)
    image_threshold_quantile: float = 0.99  # of normal training image scores
    pixel_threshold_quantile: float = 0.999  # of normal training pixel scores


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def validate(self) -> Config:
        """Check every value that has a fixed set of choices or a range; return self.

        Raises:
            ConfigError: naming the first ``section.key`` whose value is out of its range.
        """
        _choice("model.variant", self.model.variant, VARIANTS)
        _choice("scoring.fusion", self.scoring.fusion, FUSIONS)
        _choice("train.kd_loss", self.train.kd_loss, KD_LOSSES)
        _choice("train.optimizer", self.train.optimizer, OPTIMIZERS)
        _check_data(self.data)
        _check_prototype(self.prototype)
        _check_train(self.train)
        _check_scoring(self.scoring)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, ready for YAML."""
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        """Build from a nested dict; unknown sections or keys raise :class:`ConfigError`."""
        config = cls()
        apply_overrides(config, raw, source)
        try:
            return config.validate()
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err


def apply_overrides(config: Config, raw: dict[str, Any], source: str = "config") -> Config:
    """Set the fields named in ``raw`` ({section: {key: value}}) on ``config`` in place.

    Each value is converted to its field's type, as YAML and the command line hand over
    strings and integers where a float is meant (PyYAML reads ``1e-4`` as a string): floats
    from integers and numeric strings, integers from integer strings, booleans only from
    booleans and the strings ``true``/``false``, tuples element by element.

    Raises:
        ConfigError: an unknown section or key, or a value that does not convert; the message
            names ``source`` (the file) and ``section.key``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    for section_name, values in raw.items():
        section = getattr(config, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            names = ", ".join(f.name for f in dataclasses.fields(config))
            raise ConfigError(f"{source}: unknown section '{section_name}' (known: {names})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section_name}' must be a mapping")
        types = typing.get_type_hints(type(section))
        for key, value in values.items():
            if key not in types:
                raise ConfigError(
                    f"{source}: unknown key '{section_name}.{key}' "
                    f"(known: {', '.join(sorted(types))})"
                )
            name = f"{section_name}.{key}"
            try:
                setattr(section, key, coerce(value, types[key]))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{source}: {name}={value!r}: {err}") from err
    return config


def coerce(value: Any, annotation: Any) -> Any:
    """``value`` converted to the type ``annotation`` names (int, float, bool, str, tuple, X|None).

    Raises:
        ValueError: the value does not convert; the message says what was expected.
    """
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return _coerce_tuple(value, typing.get_args(annotation))
    convert = _CONVERTERS.get(annotation)
    if convert is None:
        raise TypeError(f"no conversion to {annotation}")
    return convert(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("expected true or false")


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError("expected an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    else:
        raise ValueError("expected a number")
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("expected a string")


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce_tuple(value: Any, element_types: tuple[Any, ...]) -> tuple[Any, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of {len(element_types)} values")
    if len(value) != len(element_types):
        raise ValueError(f"expected {len(element_types)} values, got {len(value)}")
    return tuple(coerce(v, t) for v, t in zip(value, element_types))


def load_config(path: str | Path) -> Config:
    """Read a YAML file written by :func:`save_config` or by hand."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the path of a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8: {err.reason})") from err
    return Config.from_dict(raw, source=str(path))


def preset_names() -> list[str]:
    """Names of the presets shipped with cpkp (file stems in ``cpkp/configs``)."""
    folder = resources.files("cpkp") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path) -> Config:
    """A shipped preset by name (``cpu_rd_lite0``) or any YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_config(path)
    if name_or_path not in preset_names():
        raise ConfigError(
            f"unknown preset '{name_or_path}' (shipped: {', '.join(preset_names())}; "
            "or give the path of a YAML file)"
        )
    with resources.as_file(resources.files("cpkp") / "configs" / f"{name_or_path}.yaml") as p:
        return load_config(p)


def check_image_size(size: int, name: str = "data.image_size") -> None:
    """ConfigError unless ``size`` is a model input size the networks take."""
    _check(size >= 32, f"{name}={size}: must be at least 32")
    _check(
        size % 32 == 0,
        f"{name}={size}: the students halve the grid five times, "
        "so the image size must be a multiple of 32 (for example 224, 256 or 320)",
    )


def _check_data(data: DataConfig) -> None:
    check_image_size(data.image_size)
    _check(data.num_workers >= 0, f"data.num_workers={data.num_workers}: must be 0 or more")
    _choice("data.resize", data.resize, RESIZE_MODES)
    _check(
        data.tile == 0 or data.tile >= MIN_TILE,
        f"data.tile={data.tile}: 0 (no tiling) or a tile side of at least {MIN_TILE} pixels",
    )
    if data.tile == 0:
        _check(
            data.tile_overlap == 0,
            f"data.tile_overlap={data.tile_overlap}: applies to tiles only; set data.tile too",
        )
    else:
        _check(
            0 <= data.tile_overlap < data.tile,
            f"data.tile_overlap={data.tile_overlap}: must lie in 0..{data.tile - 1} "
            f"(below data.tile={data.tile})",
        )
    _check(data.roi is None or data.roi.strip() != "", "data.roi: give a mask file or null")


def _check_prototype(proto: PrototypeConfig) -> None:
    _check(proto.grid_stride in (4, 8), f"prototype.grid_stride={proto.grid_stride}: 4 or 8")
    _check(
        0.0 < proto.coreset_ratio <= 1.0,
        f"prototype.coreset_ratio={proto.coreset_ratio}: must lie in (0, 1]",
    )
    _at_least("prototype.channels_per_level", proto.channels_per_level, 1)
    _check(
        proto.kernel_size >= 1 and proto.kernel_size % 2 == 1,
        f"prototype.kernel_size={proto.kernel_size}: must be an odd number of at least 1",
    )
    _at_least("prototype.stride", proto.stride, 1)
    _at_least("prototype.padding", proto.padding, 0)
    _at_least("prototype.max_prototypes", proto.max_prototypes, 1)
    _at_least("prototype.max_bank", proto.max_bank, 1)
    _at_least("prototype.projection_dim", proto.projection_dim, 1)
    _at_least("prototype.chunk_size", proto.chunk_size, 1)


def _check_train(train: TrainConfig) -> None:
    _at_least("train.epochs", train.epochs, 1)
    _at_least("train.batch_size", train.batch_size, 1)
    _at_least("train.checkpoint_every", train.checkpoint_every, 1)
    if train.keep_epoch is not None:
        _check(
            1 <= train.keep_epoch <= train.epochs,
            f"train.keep_epoch={train.keep_epoch}: must lie in 1..train.epochs ({train.epochs})",
        )
    _positive("train.lr_student", train.lr_student)
    _positive("train.lr_teacher", train.lr_teacher)
    _unit("train.alpha", train.alpha)
    for i, beta in enumerate(train.betas):
        _check(0.0 <= beta < 1.0, f"train.betas[{i}]={beta}: must lie in [0, 1)")
    _check(train.momentum >= 0.0, f"train.momentum={train.momentum}: must be 0 or more")
    _check(train.weight_decay >= 0.0, f"train.weight_decay={train.weight_decay}: must be >= 0")
    # numpy's generators take seeds in [0, 2**32); torch would wrap a negative one silently.
    _check(0 <= train.seed < 2**32, f"train.seed={train.seed}: must lie in 0 .. 2**32 - 1")
    _check(
        DEVICE_PATTERN.fullmatch(train.device) is not None,
        f"train.device={train.device!r}: expected auto, cpu, cuda or cuda:N (N = 0, 1, ...)",
    )


def _check_scoring(scoring: ScoringConfig) -> None:
    _unit("scoring.gamma", scoring.gamma)
    _check(scoring.sigma >= 0.0, f"scoring.sigma={scoring.sigma}: must be 0 or more")
    _unit("scoring.image_threshold_quantile", scoring.image_threshold_quantile)
    _unit("scoring.pixel_threshold_quantile", scoring.pixel_threshold_quantile)


def _at_least(name: str, value: int, low: int) -> None:
    _check(value >= low, f"{name}={value}: must be at least {low}")


def _positive(name: str, value: float) -> None:
    _check(value > 0.0, f"{name}={value}: must be greater than 0")


def _unit(name: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, f"{name}={value}: must lie in [0, 1]")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
