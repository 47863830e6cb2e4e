"""Tests for cpkp.backbones: shapes, the real Lite0 ImageNet weights, weight lookup and errors."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import cpkp.backbones as backbones
from cpkp.backbones import (
    RANDOM_SOURCE,
    FeatureExtractor,
    backbone_channels,
    create_backbone,
    create_lite0_classifier,
    list_backbones,
    map_by_position,
)
from cpkp.errors import ConfigError, WeightsError

SRC = Path(__file__).resolve().parents[1] / "src"
CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian
ESPRESSO = 967
RESNET18_FILE = "resnet18-f37072fd.pth"
WRN50_FILE = "wide_resnet50_2-95faca4d.pth"


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return create_backbone("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_classifier() -> torch.nn.Module:
    return create_lite0_classifier()


@pytest.fixture(scope="module")
def random_backbones() -> dict[str, FeatureExtractor]:
    torch.manual_seed(0)
    names = ["random:tf_efficientnet_lite0", "random:resnet18", "random:wide_resnet50_2"]
    return {name: create_backbone(name) for name in names}


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache; returns its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def resnet18_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full torchvision resnet18 state dict with random weights, saved to a file."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "my_resnet18.pth"
    torch.save(state, path)
    return path, state


def photo(name: str, size: int) -> torch.Tensor:
    """A scikit-image sample photo as [1, 3, size, size] in [0, 1]."""
    image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)


def top5(logits: torch.Tensor) -> set[int]:
    return set(logits[0].topk(5).indices.tolist())


# -- registry and shapes --------------------------------------------------------------------------


def test_registry_names_and_channels_table():
    assert list_backbones() == ["tf_efficientnet_lite0", "wide_resnet50_2", "resnet18"]
    assert backbone_channels("tf_efficientnet_lite0") == (24, 40, 112)
    assert backbone_channels("random:wide_resnet50_2") == (256, 512, 1024)
    assert backbone_channels("resnet18") == (64, 128, 256)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="resnet34.*tf_efficientnet_lite0.*random:"):
        backbone_channels("resnet34")
    with pytest.raises(ConfigError, match="random:vgg16"):
        create_backbone("random:vgg16")


@pytest.mark.parametrize("size", [256, 64])
@pytest.mark.parametrize(
    "name",
    [
        "tf_efficientnet_lite0",
        "random:tf_efficientnet_lite0",
        "random:resnet18",
        "random:wide_resnet50_2",
    ],
)
def test_three_maps_at_strides_4_8_16(name, size, lite0, random_backbones):
    extractor = lite0 if name == "tf_efficientnet_lite0" else random_backbones[name]
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))

    with torch.no_grad():
        feats = extractor(x)

    assert extractor.channels == backbone_channels(name)
    assert extractor.strides == (4, 8, 16)
    expected = [(1, c, size // s, size // s) for c, s in zip(extractor.channels, (4, 8, 16))]
    assert [tuple(f.shape) for f in feats] == expected
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "random:resnet18"])
def test_sizes_round_up_when_not_a_multiple_of_16(name, lite0, random_backbones):
    extractor = lite0 if name == "tf_efficientnet_lite0" else random_backbones[name]
    with torch.no_grad():
        feats = extractor(torch.rand(1, 3, 100, 72, generator=torch.Generator().manual_seed(0)))

    assert [tuple(f.shape[2:]) for f in feats] == [(25, 18), (13, 9), (7, 5)]


def test_nothing_past_stride_16_is_kept(lite0, random_backbones):
    lite_names = [name for name, _ in lite0.named_parameters()]
    assert any(name.startswith("body.blocks.4.") for name in lite_names)
    assert not any(
        part in name
        for name in lite_names
        for part in ("blocks.5", "blocks.6", "conv_head", "classifier")
    )

    resnet_names = [name for name, _ in random_backbones["random:resnet18"].named_parameters()]
    assert any(name.startswith("body.layer3.") for name in resnet_names)
    assert not any("layer4" in name or ".fc." in name for name in resnet_names)


# -- the maps equal independent feature extractors ------------------------------------------------


def test_resnet_maps_equal_torchvision_layer_outputs(random_backbones):
    extractor = random_backbones["random:resnet18"]
    reference = torchvision.models.resnet18()
    reference.load_state_dict(extractor.body.state_dict(), strict=False)
    nodes = create_feature_extractor(reference.eval(), ["layer1", "layer2", "layer3"])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        ours = extractor(x)
        theirs = nodes(
            (x - torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1))
            / torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
        )

    for mine, name in zip(ours, ["layer1", "layer2", "layer3"]):
        torch.testing.assert_close(mine, theirs[name], rtol=1e-5, atol=1e-5)


def test_lite0_maps_equal_timm_features_only(lite0):
    reference = timm.create_model(
        "tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3)
    )
    result = reference.load_state_dict(lite0.body.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(key.startswith(("blocks.5.", "blocks.6.")) for key in result.missing_keys)
    x = photo("coffee", 64)

    # Our extractor runs channels-last; run the reference in the same layout so that both use
    # the same kernels and only a mapping error could make them differ.
    reference = reference.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        ours = lite0(x)
        theirs = reference(((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last))

    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-5)


def test_normalisation_is_a_buffer_applied_in_forward(lite0):
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)
    assert "mean_rgb" in dict(lite0.named_buffers())
    assert not any("mean_rgb" in name or "std_rgb" in name for name, _ in lite0.named_parameters())
    assert not any(key.endswith(("mean_rgb", "std_rgb")) for key in lite0.state_dict())
    x = photo("chelsea", 64)

    with torch.no_grad():
        via_forward = lite0(x)
        via_body = lite0.body((x * 2 - 1).contiguous(memory_format=torch.channels_last))

    for a, b in zip(via_forward, via_body):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# -- the real Lite0 ImageNet weights --------------------------------------------------------------


def test_lite0_weights_come_from_the_package(lite0):
    assert lite0.pretrained
    assert backbones.LITE0_PACKAGE in lite0.weights_source
    assert lite0.weights_source.endswith("efficientnet-lite0-57934424.pth")
    assert len(create_lite0_classifier().state_dict()) == backbones.LITE0_TENSORS


def test_lite0_classifies_chelsea_as_a_cat(lite0_classifier):
    with torch.no_grad():
        logits = lite0_classifier(photo("chelsea", 224) * 2 - 1)
    assert top5(logits) & CAT_CLASSES
    assert logits[0].argmax().item() in CAT_CLASSES


def test_lite0_classifies_coffee_as_espresso(lite0_classifier):
    with torch.no_grad():
        logits = lite0_classifier(photo("coffee", 224) * 2 - 1)
    assert ESPRESSO in top5(logits)


def test_lite0_stem_statistics_confirm_half_half_normalisation():
    """The stem BatchNorm's running mean is what ImageNet's pixel mean gives under (x - 0.5)/0.5.

    Under ImageNet normalisation the stem's input would average zero and so would its running
    mean; the stored running means instead follow W · (pixel_mean - 0.5) / 0.5 closely.
    """
    state = torch.load(backbones._lite0_package_file(), map_location="cpu", weights_only=True)
    kernel_sums = state["_conv_stem.weight"].sum(dim=(2, 3))  # [32, 3]
    pixel_mean = torch.tensor(backbones.IMAGENET_MEAN)
    lite_mean, lite_std = torch.tensor(backbones.LITE_MEAN), torch.tensor(backbones.LITE_STD)
    predicted = kernel_sums @ ((pixel_mean - lite_mean) / lite_std)

    running_mean = state["_bn0.running_mean"]
    correlation = np.corrcoef(predicted.numpy(), running_mean.numpy())[0, 1]
    assert correlation > 0.95
    assert running_mean.abs().mean() > 0.1  # far from the zero ImageNet statistics would give


def test_lite0_mapping_matches_the_companion_package_model(lite0, lite0_classifier):
    """Logits and the three maps equal those of the package authors' own model code.

    Catches swapped same-shaped BatchNorm tensors, wrong "SAME" padding or BatchNorm epsilon.
    """
    lite_pytorch = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch (dev extra) not installed"
    )
    reference = lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(
        torch.load(backbones._lite0_package_file(), map_location="cpu", weights_only=True)
    )
    reference.eval()
    x = photo("chelsea", 224)

    with torch.no_grad():
        torch.testing.assert_close(
            lite0_classifier(x * 2 - 1), reference(x * 2 - 1), rtol=0, atol=1e-4
        )
        ours = lite0(x)
        theirs = _companion_maps(reference, x * 2 - 1, taps=(2, 4, 10))

    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, rtol=0, atol=1e-4)


def _companion_maps(model, x, taps):
    """Outputs of the package model's flat block list after blocks ``taps`` (strides 4, 8, 16)."""
    x = model._swish(model._bn0(model._conv_stem(x)))
    maps = []
    for index, block in enumerate(model._blocks[: taps[-1] + 1]):
        x = block(x)
        if index in taps:
            maps.append(x)
    return maps


# -- lite0 weight-file errors ---------------------------------------------------------------------


def test_map_by_position_names_a_mismatched_tensor():
    state = torch.load(backbones._lite0_package_file(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    state["_blocks.1._bn0.weight"] = torch.zeros(5)

    with pytest.raises(WeightsError, match=r"_blocks\.1\._bn0\.weight.*\(5,\).*blocks\.1\.0\.bn1"):
        map_by_position(state, target, "file.pth")


def test_map_by_position_refuses_a_count_mismatch():
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    source = dict(list(target.items())[:-1])

    with pytest.raises(WeightsError, match="file.pth: holds 295 tensors.*296"):
        map_by_position(source, target, "file.pth")


def test_lite0_refuses_a_resnet_file(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(WeightsError, match=str(path)):
        create_backbone("tf_efficientnet_lite0", weights=path)


# -- torchvision weights: file, hub cache, download, errors ---------------------------------------


def test_missing_torchvision_weights_say_how_to_get_them(empty_torch_home):
    with pytest.raises(WeightsError) as caught:
        create_backbone("wide_resnet50_2")

    message = str(caught.value)
    assert WRN50_FILE in message
    assert f"https://download.pytorch.org/models/{WRN50_FILE}" in message
    assert str(empty_torch_home / WRN50_FILE) in message
    assert "--weights FILE" in message
    assert "--download-weights" in message


def test_weights_file_round_trip(resnet18_file, empty_torch_home):
    path, saved = resnet18_file
    extractor = create_backbone("resnet18", weights=path)

    assert extractor.pretrained
    assert extractor.weights_source == str(path)
    loaded = extractor.body.state_dict()
    assert set(loaded) == {key for key in saved if not key.startswith(("layer4.", "fc."))}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_hub_cache_file_is_used(resnet18_file, empty_torch_home, monkeypatch):
    path, saved = resnet18_file
    cached = empty_torch_home / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    monkeypatch.setattr(backbones, "_check_hash", lambda path: None)  # random weights, no hash

    extractor = create_backbone("resnet18")

    assert extractor.weights_source == str(cached)
    assert torch.equal(extractor.body.conv1.weight, saved["conv1.weight"])


def test_hub_cache_file_with_a_wrong_hash_is_refused(resnet18_file, empty_torch_home):
    path, _ = resnet18_file
    cached = empty_torch_home / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())

    with pytest.raises(WeightsError, match=f"{RESNET18_FILE}.*f37072fd.*corrupt"):
        create_backbone("resnet18")


def test_download_only_when_asked(resnet18_file, empty_torch_home, monkeypatch):
    path, saved = resnet18_file
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(path.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(WeightsError):
        create_backbone("resnet18")
    assert calls == []

    extractor = create_backbone("resnet18", download=True)

    cached = empty_torch_home / RESNET18_FILE
    assert calls == [
        (f"https://download.pytorch.org/models/{RESNET18_FILE}", str(cached), "f37072fd")
    ]
    assert extractor.weights_source == str(cached)
    assert torch.equal(extractor.body.layer3[1].bn2.running_var, saved["layer3.1.bn2.running_var"])


def test_resnet_refuses_a_wrong_architecture_file(empty_torch_home):
    lite0_file = backbones._lite0_package_file()
    with pytest.raises(WeightsError, match=f"{lite0_file}.*keys do not match"):
        create_backbone("resnet18", weights=lite0_file)


def test_unreadable_weight_files_are_refused(tmp_path, empty_torch_home):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth: no such file"):
        create_backbone("resnet18", weights=missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="garbage.pth: not a readable PyTorch weight file"):
        create_backbone("resnet18", weights=garbage)

    pickled = tmp_path / "pickled_module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module, refused by weights_only
    with pytest.raises(WeightsError, match="pickled_module.pth"):
        create_backbone("resnet18", weights=pickled)


# -- random backbones -----------------------------------------------------------------------------


def test_random_backbone_is_loud_and_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="cpkp.backbones"):
        torch.manual_seed(5)
        first = create_backbone("random:resnet18")
        torch.manual_seed(5)
        second = create_backbone("random:resnet18")
        third = create_backbone("random:resnet18")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("RANDOM" in r.getMessage() for r in warnings)
    assert not first.pretrained
    assert first.weights_source == RANDOM_SOURCE
    assert first.name == "random:resnet18"
    assert torch.equal(first.body.conv1.weight, second.body.conv1.weight)
    assert not torch.equal(second.body.conv1.weight, third.body.conv1.weight)


def test_random_backbone_quiet_logs_no_warning(caplog):
    with caplog.at_level(logging.DEBUG, logger="cpkp.backbones"):
        create_backbone("random:tf_efficientnet_lite0", quiet=True)

    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_random_backbone_refuses_a_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="random:resnet18"):
        create_backbone("random:resnet18", weights=tmp_path / "w.pth")


# -- safe loading ---------------------------------------------------------------------------------

LOADERS = {"torch.load", "torch.hub.load_state_dict_from_url", "load_state_dict_from_url"}


def _is_loader(func: ast.expr) -> bool:
    """torch.load, torch hub's loader, or a torchvision weights enum's get_state_dict."""
    name = ast.unparse(func)
    return name in LOADERS or name.endswith(".get_state_dict")


def test_every_torch_load_in_src_uses_weights_only():
    found = 0
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and _is_loader(node.func):
                found += 1
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, (
                    f"{path}:{node.lineno}: {ast.unparse(node.func)} without weights_only=True"
                )
    assert found >= 1  # the scan saw backbones' own torch.load
