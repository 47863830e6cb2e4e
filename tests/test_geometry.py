"""Non-square and large images: squash, aspect-preserving and tiled views, maps back, ROI.

The first half checks cpkp.geometry on hand-made tensors, with a mocked scorer where that makes
the result exact. The second half trains two tiny detectors (random Lite0 networks, 64 px,
one epoch) on 40x100 and 100x40 images: one in ``aspect`` mode, one on 64 px tiles with a
region of interest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cpkp import runio
from cpkp.api import Detector
from cpkp.cli import build_parser, config_from_args, main
from cpkp.config import Config, ConfigError
from cpkp.data.dataset import ImageDataset
from cpkp.data.images import _resize_nearest, load_roi
from cpkp.errors import ImageError
from cpkp.geometry import (
    Geometry,
    blend_window,
    cut_views,
    mask_views,
    resize_nearest,
    resize_to,
    stitch,
    tile_starts,
    to_views,
    valid_views,
)
from cpkp.inference import ImageMaps, stream_image_maps, tensor_views

SIDE = 64
GEOMETRIES = {
    "squash": Geometry(SIDE),
    "aspect": Geometry(SIDE, "aspect"),
    "tile": Geometry(SIDE, tile=48, overlap=12),  # tiles scaled up by 64/48
    "tile-native": Geometry(SIDE, tile=SIDE, overlap=16),  # tiles at the image's own scale
}
SHAPES = [(40, 100), (100, 40), (20, 30), (200, 150)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: fastest for these tiny networks, and no spinning on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _identity_scorer(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """A mocked detector whose anomaly map is the red channel of its input."""
    return {"fused": views[:, :1].clone()}


def _image_with_patch(shape: tuple[int, int], top: int, left: int, side: int = 6) -> torch.Tensor:
    """[3, H, W] grey 0.2 with a bright side x side patch at (top, left)."""
    image = torch.full((3, *shape), 0.2)
    image[:, top : top + side, left : left + side] = 1.0
    return image


# --------------------------------------------------------------------------- pure geometry


@pytest.mark.parametrize("mode", GEOMETRIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_views_cover_every_canvas_pixel_and_have_the_model_size(mode, shape):
    geometry = GEOMETRIES[mode]
    layout = geometry.layout(*shape)
    covered = torch.zeros(layout.canvas)
    for view in layout.views:
        assert view.height <= SIDE and view.width <= SIDE
        covered[view.window()] += 1
    assert bool((covered >= 1).all())

    canvas = torch.rand(3, *layout.canvas, generator=torch.Generator().manual_seed(0))
    views = cut_views(canvas, layout)
    assert views.shape == (len(layout.views), 3, SIDE, SIDE)
    for view, pixels in zip(layout.views, views):
        torch.testing.assert_close(
            pixels[:, view.valid()[0], view.valid()[1]],
            canvas[:, view.window()[0], view.window()[1]],
        )


def test_canvas_sizes_keep_or_change_the_aspect_ratio():
    assert GEOMETRIES["squash"].layout(40, 100).canvas == (SIDE, SIDE)
    assert GEOMETRIES["aspect"].layout(40, 100).canvas == (26, 64)  # 40 * 64 / 100 = 25.6
    assert GEOMETRIES["aspect"].layout(100, 40).canvas == (64, 26)
    assert GEOMETRIES["tile-native"].layout(40, 100).canvas == (40, 100)  # no resizing
    assert GEOMETRIES["tile"].layout(48, 96).canvas == (64, 128)


def test_tile_starts_end_at_the_edge_and_overlap_at_least_as_asked():
    assert tile_starts(100, 64, 16) == [0, 36]
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(30, 64, 16) == [0]  # smaller than a tile: one padded tile
    starts = tile_starts(1000, 64, 16)
    assert starts[0] == 0 and starts[-1] == 1000 - 64
    gaps = np.diff(starts)
    assert (gaps > 0).all() and (gaps <= 64 - 16).all()


def test_aspect_padding_repeats_the_edge_and_stays_out_of_the_valid_part():
    layout = GEOMETRIES["aspect"].layout(40, 100)
    (view,) = layout.views
    assert (view.pad_top, view.height, view.pad_left, view.width) == (19, 26, 0, 64)
    canvas = torch.rand(3, 26, 64, generator=torch.Generator().manual_seed(1))
    (x,) = cut_views(canvas, layout)
    torch.testing.assert_close(x[:, :19], canvas[:, :1].expand(3, 19, 64))  # top rows repeat
    torch.testing.assert_close(x[:, 45:], canvas[:, -1:].expand(3, 19, 64))  # bottom rows

    mask = torch.zeros(40, 100, dtype=torch.bool)
    mask[-3:, :] = True  # a defect along the bottom edge
    cut = mask_views(mask, layout)[0, 0]
    assert cut[:19].sum() == 0 and cut[45:].sum() == 0  # masks are zero in the padding
    assert cut[44].all()


@pytest.mark.parametrize("mode", GEOMETRIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_stitching_constant_maps_gives_the_constant_and_views_give_back_the_canvas(mode, shape):
    layout = GEOMETRIES[mode].layout(*shape)
    constant = torch.full((len(layout.views), 1, SIDE, SIDE), 0.7)
    torch.testing.assert_close(stitch(constant, layout), torch.full((1, *layout.canvas), 0.7))

    canvas = torch.rand(1, *layout.canvas, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(stitch(cut_views(canvas, layout), layout), canvas)


def test_overlaps_are_blended_by_a_positive_window_that_rises_from_the_edges():
    window = blend_window(9, 12, ramp=3)
    assert (window > 0).all() and window.max() == 1.0
    assert window[4, 5] == 1.0 and window[0, 0] == pytest.approx(1 / 16)
    assert window[0, 5] == pytest.approx(1 / 4) and window[1, 5] == pytest.approx(2 / 4)
    torch.testing.assert_close(blend_window(4, 4, ramp=0), torch.ones(4, 4))

    layout = GEOMETRIES["tile-native"].layout(40, 100)  # views at x 0..63 and 36..99
    maps = torch.stack([torch.zeros(1, SIDE, SIDE), torch.ones(1, SIDE, SIDE)])
    row = stitch(maps, layout)[0, 20]
    assert (row[:36] == 0).all() and (row[64:] == 1).all()  # one view alone: its own value
    assert (row[36:64].diff() >= 0).all()  # the overlap goes from one to the other smoothly


@pytest.mark.parametrize("mode", GEOMETRIES)
@pytest.mark.parametrize(("shape", "patch"), [((40, 100), (17, 93)), ((100, 40), (93, 2))])
def test_a_patch_near_an_edge_comes_back_where_it_was(mode, shape, patch):
    image = _image_with_patch(shape, *patch)
    batches = tensor_views(image[None], GEOMETRIES[mode], batch_size=1)  # tiles split batches
    (item,) = stream_image_maps(batches, _identity_scorer, GEOMETRIES[mode])
    amap = item.map_at(shape)
    assert amap.shape == shape
    y, x = divmod(int(amap.argmax()), shape[1])
    assert patch[0] <= y < patch[0] + 6 and patch[1] <= x < patch[1] + 6
    assert item.score() == pytest.approx(float(item.maps["fused"].max()))
    if mode == "tile-native":  # no resizing anywhere: the map is the image
        torch.testing.assert_close(amap, image[0])


@pytest.mark.parametrize("mode", ["aspect", "tile"])
def test_padding_never_reaches_the_score_or_the_map(mode):
    geometry = GEOMETRIES[mode]
    layout = geometry.layout(30, 100)
    padding = ~valid_views(layout)
    assert padding.any()
    maps = torch.where(padding, torch.tensor(1000.0), torch.tensor(0.5))
    item = ImageMaps(0, "x", layout, {"fused": stitch(maps, layout)})
    assert item.score() == pytest.approx(0.5)
    assert torch.allclose(item.map_at((30, 100)), torch.tensor(0.5))


def test_roi_zeroes_the_map_outside_and_scores_only_inside():
    layout = GEOMETRIES["aspect"].layout(40, 100)
    roi = torch.zeros(10, 20, dtype=torch.bool)
    roi[:, 10:] = True  # the right half of the part, at the ROI image's own size
    canvas = torch.full((1, *layout.canvas), 0.3)
    canvas[0, :, :5] = 9.0  # a high value outside the ROI
    item = ImageMaps(0, "x", layout, {"fused": canvas}, roi)
    assert item.score() == pytest.approx(0.3)
    amap = item.map_at((40, 100))
    assert (amap[:, :50] == 0).all() and torch.allclose(amap[:, 50:], torch.tensor(0.3))


def test_nearest_resize_matches_the_mask_reader():
    mask = np.random.default_rng(0).random((7, 13)) > 0.5
    for size in [(3, 5), (20, 9), (7, 13)]:
        expected = _resize_nearest(mask, size)
        assert np.array_equal(resize_nearest(torch.from_numpy(mask), size).numpy(), expected)


def test_views_of_a_tensor_equal_the_views_of_its_file(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    path = tmp_path / "long.png"
    Image.fromarray(pixels).save(path)
    geometry = GEOMETRIES["tile"]
    dataset = ImageDataset([path, path], SIDE, geometry)
    expected = to_views(
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, geometry.layout(40, 100)
    )
    assert len(dataset) == 2 * len(expected) and list(dataset.views_of(1)) == [3, 4, 5]
    assert dataset.owners.tolist() == [0, 0, 0, 1, 1, 1]
    item = dataset[4]
    assert (item["owner"], item["view"], item["views"], item["index"]) == (1, 1, 3, 4)
    torch.testing.assert_close(item["image"], expected[1])
    assert item["size"].tolist() == [40, 100]


def test_resize_to_keeps_the_range_and_passes_the_same_size():
    x = torch.rand(3, 40, 100, generator=torch.Generator().manual_seed(4))
    assert resize_to(x, (40, 100)) is x
    y = resize_to(x, (13, 64))
    assert y.shape == (3, 13, 64) and float(y.min()) >= 0 and float(y.max()) <= 1


# ---------------------------------------------------------------------------------- config


def test_config_fields_validate_and_old_configs_keep_todays_behaviour():
    old = Config.from_dict({"data": {"image_size": 64}})
    assert (old.data.resize, old.data.tile, old.data.tile_overlap, old.data.roi) == (
        "squash",
        0,
        0,
        None,
    )
    assert Geometry.from_config(old.data).mode == "squash"
    tiled = Config.from_dict({"data": {"tile": 256, "tile_overlap": 32, "resize": "aspect"}})
    assert Geometry.from_config(tiled.data).mode == "tile"
    bad = [
        ({"resize": "crop"}, "data.resize"),
        ({"tile": 8}, "data.tile=8"),
        ({"tile_overlap": 16}, "data.tile_overlap=16"),
        ({"tile": 64, "tile_overlap": 64}, "data.tile_overlap=64"),
        ({"roi": " "}, "data.roi"),
    ]
    for data, name in bad:
        with pytest.raises(ConfigError, match=name):
            Config.from_dict({"data": data})


def test_train_flags_and_set_reach_the_config(tmp_path):
    roi = tmp_path / "roi.png"
    args = build_parser().parse_args(
        ["train", "--resize", "aspect", "--tile", "128", "--overlap", "16", "--roi", "roi.png"]
    )
    config = config_from_args(args)
    assert (config.data.resize, config.data.tile, config.data.tile_overlap) == ("aspect", 128, 16)
    assert Path(config.data.roi).is_absolute() and Path(config.data.roi).name == roi.name
    args = build_parser().parse_args(["train", "--set", "data.tile=96", "--set", "data.roi=null"])
    assert config_from_args(args).data.tile == 96


def test_bad_roi_files_are_named(tmp_path):
    text = tmp_path / "roi.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="region-of-interest") as info:
        load_roi(text)
    assert str(text) in str(info.value)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(empty)
    with pytest.raises(ImageError, match="no non-zero pixel") as info:
        load_roi(empty)
    assert str(empty) in str(info.value)


# ------------------------------------------------------------------- tiny trained detectors

TINY = {
    "model": {"backbone": "random:tf_efficientnet_lite0"},
    "train": {"epochs": 1, "batch_size": 4, "seed": 0, "device": "cpu"},
    "prototype": {"coreset_ratio": 0.25},
}


def _texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Grey stripes with noise, [H, W, 3] uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    grey = 0.5 + 0.2 * np.sin(x / 3.0 + y / 5.0) + 0.05 * rng.standard_normal(shape)
    return np.repeat((np.clip(grey, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    """Four training images (40x100 and 100x40) and two test images with an edge defect."""
    root = tmp_path_factory.mktemp("geometry-data")
    train = []
    for i, shape in enumerate([(40, 100), (100, 40), (40, 100), (100, 40)]):
        train.append(root / f"train_{i}.png")
        Image.fromarray(_texture(shape, i)).save(train[-1])
    test = []
    for i, shape in enumerate([(40, 100), (100, 40)]):
        pixels = _texture(shape, 10 + i)
        pixels[-8:-2, -8:-2] = 255  # a bright defect by the bottom-right corner
        test.append(root / f"test_{i}.png")
        Image.fromarray(pixels).save(test[-1])
    roi = np.zeros((50, 50), np.uint8)
    roi[:, 10:] = 255  # skip the left fifth of every part
    Image.fromarray(roi).save(root / "roi.png")
    return {"train": train, "test": test, "roi": [root / "roi.png"]}


@pytest.fixture(scope="module")
def aspect_run(images, tmp_path_factory) -> Path:
    """Aspect mode without a prototype: the calibration has no own-image exclusion."""
    run = tmp_path_factory.mktemp("aspect") / "run"
    detector = Detector.from_preset(
        "cpu_rd_lite0", **TINY, data={"image_size": SIDE, "resize": "aspect"}
    )
    detector.config.prototype.enabled = False
    detector.fit(images["train"], run_dir=run, progress=False)
    return run


@pytest.fixture(scope="module")
def tile_run(images, tmp_path_factory) -> Path:
    """64 px tiles overlapping by 16 px, a prototype, and a region of interest."""
    run = tmp_path_factory.mktemp("tile") / "run"
    roi = tmp_path_factory.mktemp("roi") / "roi.png"
    shutil.copy(images["roi"][0], roi)
    data = {"image_size": SIDE, "tile": SIDE, "tile_overlap": 16, "roi": str(roi)}
    Detector.from_preset("cpu_rd_lite0", **TINY, data=data).fit(
        images["train"], run_dir=run, progress=False
    )
    roi.unlink()  # the run keeps its own copy
    return run


def test_maps_come_back_at_each_images_own_size_and_orientation(aspect_run, tile_run, images):
    for run in (aspect_run, tile_run):
        detector = Detector.load(run)
        predictions = detector.predict(images["test"] + images["train"][:2])
        assert [p.map.shape for p in predictions] == [(40, 100), (100, 40)] * 2
        for p in predictions:
            assert np.isfinite(p.map).all() and p.map.max() <= p.score + 1e-5


def test_thresholds_are_quantiles_of_what_predict_outputs(aspect_run, images):
    detector = Detector.load(aspect_run)
    stored = detector.calibration
    calibration = detector.calibrate(images["train"])
    assert calibration.to_dict() == pytest.approx(stored.to_dict(), rel=1e-6)

    items = list(detector.image_maps(images["train"]))
    scores = np.array([item.score() for item in items], dtype=np.float32)
    pixels = torch.cat([item.maps["fused"].reshape(-1) for item in items]).numpy()
    assert items[0].maps["fused"].shape == (1, 26, 64)  # the canvas: no padding in the stats
    quantiles = detector.config.scoring
    assert calibration.image_threshold == pytest.approx(
        float(np.quantile(scores, quantiles.image_threshold_quantile)), abs=1e-6
    )
    assert calibration.pixel_threshold == pytest.approx(
        float(np.quantile(pixels, quantiles.pixel_threshold_quantile)), abs=1e-6
    )


def test_tiles_are_training_samples_and_calibration_excludes_every_tile_of_the_image(
    tile_run, images
):
    detector = Detector.load(tile_run)
    dataset = ImageDataset(images["train"], SIDE, detector.geometry)
    assert len(dataset) == 8  # two tiles per image
    provenance = detector.prototype.provenance
    assert int(provenance[:, 0].max()) < 8  # provenance names tiles
    meta = runio.read_json(tile_run / runio.META_FILE)
    assert (
        meta["prototype_bank_size"] == 8 * detector.prototype.grid[0] * detector.prototype.grid[1]
    )

    owners = detector._prototype_owners(dataset)
    assert torch.equal(owners, dataset.owners[provenance[:, 0]])
    assert len(set(owners.tolist())) > 1  # several images own prototypes
    for image in range(len(images["train"])):
        views = list(dataset.views_of(image))
        x = torch.stack([dataset[v]["image"] for v in views])
        own = torch.full((len(views),), image)
        _, _, nearest = detector._raw_maps(x, own, owners)
        assert not (owners[nearest.flatten()] == image).any()  # no tile of its own image
        _, _, unrestricted = detector._raw_maps(x)
        assert (owners[unrestricted.flatten()] == image).any()  # which it matches otherwise


def test_the_region_of_interest_is_stored_in_the_run(tile_run, images):
    detector = Detector.load(tile_run)
    expected = load_roi(images["roi"][0])
    assert torch.equal(detector.roi, torch.from_numpy(expected))
    for p in detector.predict(images["test"]):
        outside = resize_nearest(~detector.roi, p.map.shape).numpy()
        assert (p.map[outside] == 0).all() and not p.mask[outside].any()
        assert p.map[~outside].std() > 0


def test_old_run_without_the_new_keys_loads(aspect_run, images, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(aspect_run, run)
    config = yaml.safe_load((run / runio.CONFIG_FILE).read_text())
    for key in ("resize", "tile", "tile_overlap", "roi"):
        del config["data"][key]
    (run / runio.CONFIG_FILE).write_text(yaml.safe_dump(config))
    meta = json.loads((run / runio.META_FILE).read_text())
    del meta["calibrated_with"]  # old runs have no record of their geometry
    (run / runio.META_FILE).write_text(json.dumps(meta))
    detector = Detector.load(run)
    assert detector.geometry.mode == "squash"
    assert detector.predict(images["test"][:1])[0].map.shape == (40, 100)


def test_predict_command_with_workers_logs_its_speed(tile_run, images, tmp_path, caplog):
    out = tmp_path / "out"
    argv = ["-q", "predict", "--run", str(tile_run), "--out", str(out), "--workers", "1"]
    printed = io.StringIO()
    with caplog.at_level(logging.INFO, logger="cpkp"), contextlib.redirect_stdout(printed):
        code = main([*argv, "--batch-size", "3", *map(str, images["test"])])
    assert code == 0
    assert any(r.getMessage().startswith("scored 2 images in ") for r in caplog.records)
    assert "images/s" in caplog.text
    lines = printed.getvalue().splitlines()
    assert [line.split("\t")[0] for line in lines[:2]] == [str(p) for p in images["test"]]
    expected = Detector.load(tile_run).predict(images["test"])
    for line, p in zip(lines, expected):
        assert float(line.split("\t")[1]) == pytest.approx(p.score, abs=1e-4)
    assert sorted(f.name for f in out.glob("*.png")) == [
        "test_0_heatmap.png",
        "test_0_mask.png",
        "test_1_heatmap.png",
        "test_1_mask.png",
    ]
    with Image.open(out / "test_1_mask.png") as mask:
        assert mask.size == (40, 100)


def test_exported_model_cuts_stitches_and_masks_as_the_detector(tile_run, images, tmp_path):
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install .[onnx])")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from cpkp.export import OnnxDetector, export_onnx

    model = export_onnx(tile_run, tmp_path / "export", check=False)
    runner = OnnxDetector(model)
    assert runner.geometry == Detector.load(tile_run).geometry
    got = runner.predict(images["test"], batch_size=3)
    expected = Detector.load(tile_run).predict(images["test"], batch_size=3)
    for g, e in zip(got, expected):
        assert g.map.shape == e.map.shape
        assert abs(g.score - e.score) <= 1e-4 and np.abs(g.map - e.map).max() <= 1e-4
    assert torch.equal(runner.roi, Detector.load(tile_run).roi)


def test_add_normal_extends_a_tiled_run_by_the_new_images_tiles(tile_run, images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tile_run, run)
    new = tmp_path / "new.png"
    Image.fromarray(_texture((40, 100), 20)).save(new)
    detector = Detector.load(run)
    summary = detector.add_normal([new])
    grid = detector.prototype.grid
    assert summary["bank_size"] == 10 * grid[0] * grid[1]  # 8 old tiles and 2 new ones
    dataset = ImageDataset([*images["train"], new], SIDE, detector.geometry)
    owners = detector._prototype_owners(dataset)
    assert (owners == 4).any()  # the new image's tiles gave prototypes
    assert set(detector.prototype.provenance[owners == 4, 0].tolist()) <= {8, 9}
    detector.save(run)
    assert Detector.load(run)._bank_size() == summary["bank_size"]


def test_a_bad_roi_stops_train_before_anything_is_written(images, tmp_path, capsys):
    bad = tmp_path / "roi.png"
    bad.write_bytes(b"\x89PNG\r\n")
    normal = tmp_path / "normal"
    normal.mkdir()
    for path in images["train"]:
        shutil.copy(path, normal)
    out = tmp_path / "run"
    argv = ["-q", "train", "--dataset", "folder", "--normal", str(normal), "--out", str(out)]
    assert main([*argv, "--backbone", "random:tf_efficientnet_lite0", "--roi", str(bad)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("cpkp: error: ") and str(bad) in line and "\n" not in line
    assert not out.exists()
