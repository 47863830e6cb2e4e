"""ONNX export: the exportable steps equal the library's; onnxruntime gives PyTorch's results."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cpkp
from cpkp.api import Detector
from cpkp.cli import main
from cpkp.config import PrototypeConfig
from cpkp.data.demo import make_demo_dataset
from cpkp.data.images import load_image
from cpkp.data.readers import list_images
from cpkp.errors import CheckpointError
from cpkp.export import (
    META_FILE,
    ExportedDetector,
    OnnxDetector,
    PatchAggregation,
    average_bins,
    prototype_distances,
    resize_antialiased,
    unfold_patches,
)
from cpkp.prototype import f_agg, nearest_prototype

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install .[onnx])")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install .[onnx])")

PARITY = 1e-4  # issue 9: scores and maps within 1e-4 on the standardized scale


# ---------------------------------------------------------------------------- exportable steps


@pytest.mark.parametrize(
    "shape", [(2, 3, 100, 80), (1, 3, 300, 41), (1, 3, 31, 70), (1, 3, 65, 64), (1, 3, 64, 64)]
)
def test_resize_matches_pytorch_antialiased_bilinear(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True).clamp(0, 1)
    got = resize_antialiased(x, 64)
    assert got.shape == (shape[0], 3, 64, 64)
    assert (got - expected).abs().max() <= 3e-7
    if shape[-2:] == (64, 64):
        assert torch.equal(got, x)  # the model size passes through unchanged


def test_average_bins_are_adaptive_pooling():
    x = torch.rand(2, 40, 7, generator=torch.Generator().manual_seed(1))
    pooled = torch.einsum("oc,bcn->bon", average_bins(40, 24), x)
    expected = F.adaptive_avg_pool1d(x.transpose(1, 2), 24).transpose(1, 2)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
    # by hand: 5 values into 2 bins, [0, 3) and [2, 5) (the middle one is shared)
    third = 1 / 3
    expected = torch.tensor([[third, third, third, 0, 0], [0, 0, third, third, third]])
    assert torch.equal(average_bins(5, 2), expected)


@pytest.mark.parametrize(("k", "s", "p"), [(3, 1, 1), (3, 2, 0), (1, 1, 0)])
def test_unfold_patches_equal_f_unfold(k, s, p):
    x = torch.rand(2, 5, 9, 8, generator=torch.Generator().manual_seed(2))
    got = unfold_patches(x, k, s, p)
    expected = F.unfold(x, k, padding=p, stride=s).view(got.shape)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("grid_stride", [4, 8])
def test_patch_aggregation_equals_f_agg(grid_stride):
    generator = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, c, 64 // s, 64 // s, generator=generator) for c, s in
             ((24, 4), (40, 8), (112, 16))]  # fmt: skip
    cfg = PrototypeConfig(channels_per_level=24, grid_stride=grid_stride)
    got = PatchAggregation(feats, cfg)(feats)
    torch.testing.assert_close(got, f_agg(feats, cfg), rtol=0, atol=2e-6)


def test_prototype_distances_equal_nearest_prototype():
    generator = torch.Generator().manual_seed(4)
    patches = torch.randn(2, 16, 3, 5, generator=generator)
    vectors = torch.randn(40, 16, generator=generator).half().float()
    vectors[7] = patches[1, :, 2, 4]  # a patch lying exactly on a prototype
    shift = vectors.mean(0)
    got = prototype_distances(patches, vectors - shift, (vectors - shift).square().sum(1), shift)

    queries = patches.permute(0, 2, 3, 1).reshape(-1, 16)
    expected, _ = nearest_prototype(queries, vectors)
    torch.testing.assert_close(got.flatten(), expected, rtol=0, atol=1e-5)
    assert got.shape == (2, 1, 3, 5) and got[1, 0, 2, 4] < 1e-2


# ------------------------------------------------------------------------ a tiny trained run


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-data")
    make_demo_dataset(
        root, categories=["brick"], n_train=4, n_test_good=2, n_defect=4, size=64, seed=0
    )
    return root


@pytest.fixture(scope="module")
def test_images(demo_root):
    return sorted(str(p) for p in (demo_root / "brick/test").rglob("*.png"))


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    """One student step at 64 px on the real offline weights.

    The real weights cost no more than a random backbone; the teacher's steps are switched
    off because they would only halve the speed of this module, not change what it tests.
    """
    out = tmp_path_factory.mktemp("export-run")
    detector = Detector.from_preset(
        "cpu_rd_lite0",
        data={"image_size": 64},
        train={"epochs": 1, "batch_size": 4, "co_progression": False, "device": "cpu"},
    )
    detector.fit(list_images(demo_root / "brick/train/good"), run_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def detector(run):
    return Detector.load(run, device="cpu")


@pytest.fixture(scope="module")
def reference(detector, test_images):
    """PyTorch's predictions on the demo test images."""
    return detector.predict(test_images)


@pytest.fixture(scope="module")
def cli_export(run, tmp_path_factory):
    """``cpkp export`` run once for the module: its exit code, printout and model path."""
    out = tmp_path_factory.mktemp("export-out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["-q", "export", "--run", str(run), "--format", "onnx", "--out", str(out)])
    return code, printed.getvalue(), out / "model.onnx"


@pytest.fixture(scope="module")
def exported(cli_export):
    return cli_export[2]


def _assert_same_predictions(got, expected):
    assert [p.path for p in got] == [p.path for p in expected]
    for g, e in zip(got, expected):
        assert abs(g.score - e.score) <= PARITY, g.path
        assert g.map.shape == e.map.shape and g.map.dtype == np.float32
        assert np.abs(g.map - e.map).max() <= PARITY, g.path
        assert g.is_anomalous == e.is_anomalous


def test_exported_module_equals_the_detector_in_pytorch(detector, test_images):
    images = torch.stack([torch.from_numpy(_read(p)) for p in test_images[:3]])
    module = ExportedDetector(detector)
    with torch.no_grad():
        scores, maps = module(images)
    expected = detector.score_batch(images)
    torch.testing.assert_close(scores, expected.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-5)

    # the exporter switches the mode back after tracing: BatchNorm must keep its statistics
    module.train()
    assert not any(m.training for m in module.modules())
    with torch.no_grad():
        assert torch.equal(module(images)[1], maps)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnxruntime_matches_pytorch_on_the_demo_test_images(
    detector, reference, exported, test_images, batch_size
):
    got = OnnxDetector(exported).predict(test_images, batch_size=batch_size)
    _assert_same_predictions(got, reference)
    assert len({p.score for p in got}) == len(got)  # real, distinct scores
    threshold = detector.calibration.pixel_threshold
    for g, e in zip(got, reference):
        # the masks agree except where a pixel lies within the tolerance of the threshold
        unsure = np.abs(e.map - threshold) <= PARITY
        assert np.array_equal(g.mask[~unsure], e.mask[~unsure])


def test_any_image_size_and_uint8_input(detector, exported, test_images, tmp_path):
    runner = OnnxDetector(exported)
    odd = tmp_path / "odd.png"
    Image.open(test_images[0]).resize((90, 41), Image.BILINEAR).save(odd)
    mixed = [test_images[1], str(odd), test_images[2]]  # three runs of the graph
    got = runner.predict(mixed, batch_size=3)
    _assert_same_predictions(got, detector.predict(mixed, batch_size=3))
    assert [p.map.shape for p in got] == [(64, 64), (41, 90), (64, 64)]

    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 100, 80, generator=generator)
    _assert_same_predictions(runner.predict(images), detector.predict(images))

    pixels = torch.randint(0, 256, (1, 3, 41, 90), dtype=torch.uint8, generator=generator)
    got = runner.predict(pixels)
    _assert_same_predictions(got, detector.predict(pixels.float() / 255))
    assert got[0].map.shape == (41, 90)


def test_model_json_describes_the_graph(run, detector, exported):
    meta = json.loads(exported.with_name(META_FILE).read_text())
    assert meta["format"] == "cpkp-onnx" and meta["cpkp_version"] == cpkp.__version__
    assert meta["source_run"] == str(run.resolve())
    assert meta["image_size"] == 64 and meta["opset"] >= 17
    assert meta["normalisation"]["mean"] == [0.5, 0.5, 0.5] == meta["normalisation"]["std"]
    assert meta["thresholds"] == {
        "image": detector.calibration.image_threshold,
        "pixel": detector.calibration.pixel_threshold,
    }
    assert meta["calibration"] == detector.calibration.to_dict()
    assert meta["dynamic_axes"]["image"] == {"0": "batch", "2": "height", "3": "width"}
    assert meta["check"]["max_abs_map_difference"] <= PARITY

    graph = onnx.load(str(exported)).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in
            (*graph.input, *graph.output)]  # fmt: skip
    assert dims == [["batch", 3, "height", "width"], ["batch"], ["batch", 1, 64, 64]]


def test_the_graph_holds_no_training_parts(detector, exported):
    graph = onnx.load(str(exported)).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    networks = sum(p.numel() for m in (detector.teacher, detector.student) for p in m.parameters())
    prototype = detector.prototype.vectors.numel()
    # the teacher and student weights, the prototype and a few small constants; a monitor (a
    # second teacher) or optimiser moments would add at least the teacher's size again
    teacher = sum(p.numel() for p in detector.teacher.parameters())
    assert networks * 0.95 < stored < networks + prototype + teacher // 10
    assert [i.name for i in graph.input] == ["image"]


def test_cli_export_then_predict_with_the_model(cli_export, reference, test_images, tmp_path):
    code, printed, model = cli_export
    assert code == 0 and model.is_file() and model.with_name(META_FILE).is_file()
    assert printed.startswith(f"exported {model} (") and printed.rstrip().endswith(META_FILE)

    out = tmp_path / "predictions"
    assert main(["-q", "predict", "--model", str(model), "--out", str(out), *test_images]) == 0
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == test_images
    for row, expected in zip(rows, reference):
        assert abs(float(row["score"]) - expected.score) <= PARITY
        assert row["prediction"] == str(int(expected.is_anomalous))
    for path in test_images:
        stem = Path(path).stem
        assert (out / f"{stem}_heatmap.png").is_file() and (out / f"{stem}_mask.png").is_file()


def test_cli_predict_wants_exactly_one_of_run_and_model(run, exported, test_images, capsys):
    for extra in ([], ["--run", str(run), "--model", str(exported)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["-q", "predict", *extra, test_images[0]])
        assert exit_info.value.code == 2
    assert "one of the arguments --run --model is required" in capsys.readouterr().err


def test_predict_with_a_model_guards_its_runs_folder_too(exported, run, test_images, capsys):
    out = run / "predictions"
    assert main(["-q", "predict", "--model", str(exported), test_images[0], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: lies in the run folder {run.resolve()}" in err
    assert not out.exists()


def test_a_model_without_its_json_is_refused(exported, test_images, tmp_path, capsys):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(exported.read_bytes())
    with pytest.raises(CheckpointError, match=r"lone\.json: not found"):
        OnnxDetector(lone)
    assert main(["-q", "predict", "--model", str(tmp_path / "none.onnx"), test_images[0]]) == 2
    assert main(["-q", "export", "--run", str(tmp_path / "norun")]) == 2
    assert main(["-q", "predict", "--model", test_images[0], test_images[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"cpkp: error: {tmp_path / 'none.onnx'}: model file not found")
    assert err[1] == f"cpkp: error: {tmp_path / 'norun'}: run folder not found"
    assert err[2:] == [
        f"cpkp: error: --model {test_images[0]}: expected the .onnx file written by `cpkp export`"
    ]


def _read(path: str) -> np.ndarray:
    return np.ascontiguousarray(load_image(path).transpose(2, 0, 1))
