"""Run configuration: dataclasses whose defaults are the paper's values, read from YAML.

Every field carries the paper's value as its default (DESIGN.md §1.2) and a comment with its
source; presets in ``cpkp/configs/*.yaml`` override what differs. Unknown keys are an error, so
a misspelt option never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cpkp.errors import ConfigError

VARIANTS = ("rd", "fd")
FUSIONS = ("standardized", "raw")
KD_LOSSES = ("positional", "flattened")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class DataConfig:
    image_size: int = 256  # paper, §4.1: 256x256 input
    num_workers: int = 0  # data-loader worker processes


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
        """Check every value that has a fixed set of choices or a range; return self."""
        _choice("model.variant", self.model.variant, VARIANTS)
        _choice("scoring.fusion", self.scoring.fusion, FUSIONS)
        _choice("train.kd_loss", self.train.kd_loss, KD_LOSSES)
        _choice("train.optimizer", self.train.optimizer, OPTIMIZERS)
        _check(0.0 <= self.train.alpha <= 1.0, "train.alpha must lie in [0, 1]")
        _check(0.0 <= self.scoring.gamma <= 1.0, "scoring.gamma must lie in [0, 1]")
        _check(self.prototype.grid_stride in (4, 8), "prototype.grid_stride must be 4 or 8")
        _check(0.0 < self.prototype.coreset_ratio <= 1.0, "prototype.coreset_ratio: (0, 1]")
        _check(self.train.epochs >= 1, "train.epochs must be at least 1")
        _check(self.train.batch_size >= 1, "train.batch_size must be at least 1")
        _check(self.data.image_size >= 32, "data.image_size must be at least 32")
        _check(
            self.data.image_size % 32 == 0,
            f"data.image_size={self.data.image_size}: the students halve the grid five times, "
            "so the image size must be a multiple of 32 (for example 224, 256 or 320)",
        )
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
        return config.validate()


def apply_overrides(config: Config, raw: dict[str, Any], source: str = "config") -> Config:
    """Set the fields named in ``raw`` ({section: {key: value}}) on ``config`` in place."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    for section_name, values in raw.items():
        section = getattr(config, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            names = ", ".join(f.name for f in dataclasses.fields(config))
            raise ConfigError(f"{source}: unknown section '{section_name}' (known: {names})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section_name}' must be a mapping")
        known = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key '{section_name}.{key}' "
                    f"(known: {', '.join(sorted(known))})"
                )
            if key == "betas" and value is not None:
                value = tuple(float(v) for v in value)
            setattr(section, key, value)
    return config


def load_config(path: str | Path) -> Config:
    """Read a YAML file written by :func:`save_config` or by hand."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
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


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
