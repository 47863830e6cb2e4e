"""Bad input gets a clear error or a stated handling, and never damages a run folder.

Each test builds one bad input of issue 7 in a temporary folder and checks the exact outcome:
the error type (or exit code and ``cpkp: error:`` line), that the message names the file or
option, and that nothing was written or lost. docs/bad-inputs.md is the table of these cases.
Networks are random (``random:tf_efficientnet_lite0``) at 32 px, one epoch.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cpkp import runio
from cpkp.api import Detector
from cpkp.cli import build_parser, main
from cpkp.data.dataset import ImageDataset
from cpkp.data.demo import Photo, load_photo
from cpkp.data.images import load_image, load_mask
from cpkp.data.readers import read_mvtec
from cpkp.data.records import Sample
from cpkp.errors import ConfigError, DatasetError, ImageError, ScoringError
from cpkp.evaluate import run_test

TINY = {
    "model": {"backbone": "random:tf_efficientnet_lite0"},
    "data": {"image_size": 32},
    "train": {"epochs": 1, "batch_size": 4},
}
TINY_ARGS = [
    "--backbone",
    "random:tf_efficientnet_lite0",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--batch-size",
    "4",
]


# ---------------------------------------------------------------------------------- helpers


def _png(path: Path, size: tuple[int, int] = (40, 40), seed: int = 0) -> Path:
    """A random RGB PNG of size (H, W)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (40, 40), value: int = 255) -> Path:
    """A mask with a square defect of ``value`` in the middle, 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = value
    Image.fromarray(mask).save(path)
    return path


def _mvtec(root: Path, n_train: int = 4, n_good: int = 2, n_bad: int = 2) -> Path:
    """A tiny MVTec AD layout under root/cat; returns root."""
    cat = root / "cat"
    for i in range(n_train):
        _png(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(n_good):
        _png(cat / "test" / "good" / f"{i:03d}.png", seed=100 + i)
    for i in range(n_bad):
        _png(cat / "test" / "bad" / f"{i:03d}.png", seed=200 + i)
        _mask(cat / "ground_truth" / "bad" / f"{i:03d}_mask.png")
    return root


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-q",
        "train",
        "--dataset",
        "mvtec",
        "--root",
        str(data),
        "--category",
        "cat",
        *TINY_ARGS,
        "--out",
        str(out),
        *extra,
    ]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2, one ``cpkp: error:`` message and no "ok"; return it.

    The message is one line, or a first line and an indented list of files.
    """
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.count("cpkp: error: ") == 1 and "Traceback" not in captured.err
    message = captured.err[captured.err.index("cpkp: error: ") :].rstrip("\n")
    assert all(line.startswith("  ") for line in message.splitlines()[1:]), message
    assert "\tok" not in captured.out and "ANOMALOUS" not in captured.out
    return message


def _bad_files(folder: Path) -> dict[str, Path]:
    """A 0-byte PNG, a truncated PNG and a text file named .png."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    truncated = folder / "truncated.png"
    data = _png(folder / "whole.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (folder / "whole.png").unlink()
    text = folder / "notes.png"
    text.write_text("this is not an image\n")
    return {"empty": empty, "truncated": truncated, "text": text}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: fastest for these tiny networks, and no spinning on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained through the CLI with relative paths: (base, data root, run folder)."""
    base = tmp_path_factory.mktemp("bad-inputs")
    _mvtec(base / "data")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(_train_argv(Path("data"), Path("run"))) == 0
    finally:
        os.chdir(cwd)
    return base, base / "data", base / "run"


@pytest.fixture()
def run_copy(trained, tmp_path):
    """A private copy of the trained run folder."""
    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# ------------------------------------------------------- run folders (items 1, 2, 7, 10, 11)


def test_train_refuses_a_folder_holding_a_run(trained, run_copy, capsys):
    _, data, _ = trained
    before = _snapshot(run_copy)
    line = _fails(_train_argv(data, run_copy, "--epochs", "2"), capsys)
    assert str(run_copy) in line and "--force" in line and "--resume" in line
    assert _snapshot(run_copy) == before


def test_force_replaces_only_the_files_cpkp_owns(trained, run_copy, capsys):
    _, data, _ = trained
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / runio.METRICS_FILE).write_text("{}")
    (run_copy / runio.OVERLAYS_DIR).mkdir()
    (run_copy / runio.OVERLAYS_DIR / "old.png").write_bytes(b"png")
    (run_copy / runio.OVERLAYS_DIR / "keep.txt").write_text("mine too")
    old_log = (run_copy / runio.LOG_FILE).read_text()

    assert main(_train_argv(data, run_copy, "--force", "--seed", "5")) == 0
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert (run_copy / runio.OVERLAYS_DIR / "keep.txt").read_text() == "mine too"
    assert not (run_copy / runio.OVERLAYS_DIR / "old.png").exists()
    assert not (run_copy / runio.METRICS_FILE).exists()
    assert "seed: 5" in (run_copy / runio.CONFIG_FILE).read_text()
    assert old_log not in (run_copy / runio.LOG_FILE).read_text()
    assert (run_copy / runio.CHECKPOINT_FILE).is_file()  # the new run's own checkpoint


def test_failed_train_leaves_the_run_folder_as_it_was(trained, run_copy, tmp_path, capsys):
    _, data, _ = trained
    bad_data = tmp_path / "bad-data"
    shutil.copytree(data, bad_data)
    bad = bad_data / "cat" / "train" / "good" / "002.png"
    bad.write_bytes(b"")
    before = _snapshot(run_copy)

    line = _fails(_train_argv(bad_data, run_copy, "--force"), capsys)
    assert str(bad) in line and "empty file" in line
    assert _snapshot(run_copy) == before

    fresh = tmp_path / "fresh"
    _fails(_train_argv(bad_data, fresh), capsys)
    assert not fresh.exists()


def test_bad_test_image_with_train_test_stops_before_training(trained, tmp_path, capsys):
    _, data, _ = trained
    bad_data = tmp_path / "bad-data"
    shutil.copytree(data, bad_data)
    bad = bad_data / "cat" / "test" / "bad" / "001.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    line = _fails(_train_argv(bad_data, out, "--test"), capsys)
    assert str(bad) in line and "cannot decode" in line
    assert not out.exists()


def test_save_removes_a_previous_runs_outputs_but_keeps_its_own_checkpoint(
    trained, run_copy, tmp_path
):
    _, _, run = trained
    assert (run / runio.CHECKPOINT_FILE).is_file()  # fit's own save kept its checkpoint

    (run_copy / runio.SCORES_FILE).write_text("old")
    (run_copy / runio.OVERLAYS_DIR).mkdir()
    (run_copy / runio.OVERLAYS_DIR / "good_000.png").write_bytes(b"old")
    (run_copy / "notes.txt").write_text("mine")
    images = sorted((trained[1] / "cat" / "train" / "good").glob("*.png"))
    detector = Detector.from_preset("cpu_rd_lite0", **TINY)
    detector.fit(images[:2], progress=False)
    detector.save(run_copy)

    names = {p.name for p in run_copy.iterdir()}
    assert names == {runio.CONFIG_FILE, runio.WEIGHTS_FILE, runio.META_FILE, "notes.txt"}
    assert runio.read_json(run_copy / runio.META_FILE)["train_images"] == [
        str(p.absolute()) for p in images[:2]
    ]


def test_paths_in_the_run_folder_are_absolute(trained, run_copy, tmp_path, monkeypatch, capsys):
    _, data, _ = trained
    source = runio.read_json(run_copy / runio.SOURCE_FILE)
    assert source["root"] == str(data.absolute()) and source["category"] == "cat"
    meta = runio.read_json(run_copy / runio.META_FILE)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in meta["train_images"])

    monkeypatch.chdir(tmp_path)  # the run was trained from `base` with relative paths
    assert main(["-q", "test", "--run", str(run_copy), "--no-overlays"]) == 0
    assert "image_auroc" in capsys.readouterr().out


def test_missing_or_unfinished_run_gives_one_line(trained, run_copy, tmp_path, monkeypatch, capsys):
    _, data, _ = trained
    image = str(next((data / "cat" / "test" / "good").glob("*.png")))
    missing = tmp_path / "nonexistent"
    line = _fails(["-q", "test", "--run", str(missing)], capsys)
    assert line == f"cpkp: error: {missing}: run folder not found"
    line = _fails(["-q", "predict", "--run", str(missing), image], capsys)
    assert line == f"cpkp: error: {missing}: run folder not found"
    assert not missing.exists()

    line = _fails(["-q", "train", "--resume", str(missing)], capsys)
    assert line == f"cpkp: error: {missing}: run folder not found"
    assert not missing.exists()

    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    monkeypatch.chdir(not_a_run)  # the default --out, predictions/, would lie inside it
    line = _fails(["-q", "predict", "--run", str(not_a_run), image], capsys)
    assert line == f"cpkp: error: {not_a_run}: not a cpkp run folder (no {runio.META_FILE})"

    (run_copy / runio.META_FILE).unlink()
    line = _fails(["-q", "predict", "--run", str(run_copy), image], capsys)
    assert "did not finish" in line and f"--resume {run_copy}" in line

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    line = _fails(_train_argv(data, a_file), capsys)
    assert f"--out {a_file}: is a file" in line and a_file.read_text() == "mine"


def test_resume_refuses_options_it_would_ignore(run_copy, capsys):
    before = _snapshot(run_copy)
    line = _fails(
        ["-q", "train", "--resume", str(run_copy), "--lr-student", "0.1", "--no-amp"], capsys
    )
    assert "--lr-student" in line and "--amp" in line and "--epochs" in line
    line = _fails(["-q", "train", "--resume", str(run_copy), "--epochs", "0"], capsys)
    assert "--epochs 0" in line and "epoch 1" in line
    assert _snapshot(run_copy) == before


def test_resume_with_more_epochs_trains_on(run_copy):
    assert main(["-q", "train", "--resume", str(run_copy), "--epochs", "2"]) == 0
    assert "epochs: 2" in (run_copy / runio.CONFIG_FILE).read_text()
    log = (run_copy / runio.TRAIN_LOG).read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2"]
    meta = runio.read_json(run_copy / runio.META_FILE)
    assert meta["epochs_done"] == 2
    assert [(e["event"], e["epochs"]) for e in meta["history"]] == [("fit", 1), ("resume", 2)]
    assert meta["history"][1]["from_epoch"] == 1
    assert runio.load_metadata(run_copy / runio.CHECKPOINT_FILE)["epoch"] == 2


def test_checkpoint_names_agree():
    from cpkp.checkpoint import CHECKPOINT_FILE

    assert CHECKPOINT_FILE == runio.CHECKPOINT_FILE


# ------------------------------------------------------------ scores (items 4, 5)


def test_a_score_equal_to_the_threshold_is_normal(trained, tmp_path):
    _, data, run = trained
    detector = Detector.load(run)
    splits = read_mvtec(data, "cat")
    first = detector.predict([splits.test[0].image])[0]
    detector.calibration.image_threshold = first.score
    detector.calibration.pixel_threshold = float(first.map.max())
    again = detector.predict([splits.test[0].image])[0]
    assert again.score == first.score and not again.is_anomalous
    assert not again.mask.any()

    scores = run_test(detector, splits.test, progress=False).scores["fused"]
    detector.calibration.image_threshold = float(scores[1])
    run_test(detector, splits.test, out_dir=tmp_path, overlays=False, progress=False)
    rows = list(csv.DictReader((tmp_path / runio.SCORES_FILE).open()))
    assert [r["path"] for r in rows] == [str(s.image) for s in splits.test]
    assert [int(r["prediction"]) for r in rows] == (scores > scores[1]).astype(int).tolist()
    assert rows[1]["prediction"] == "0"


def test_nan_scores_raise_and_write_nothing(trained, run_copy, tmp_path, capsys):
    _, data, _ = trained
    meta = json.loads((run_copy / runio.META_FILE).read_text())
    meta["calibration"]["kd_p99"] = float("nan")
    (run_copy / runio.META_FILE).write_text(json.dumps(meta))
    images = sorted(str(p) for p in (data / "cat" / "test").rglob("*.png"))

    with pytest.raises(ScoringError, match="non-finite") as info:
        Detector.load(run_copy).predict(images)
    assert all(path in str(info.value) for path in images)

    out = tmp_path / "predictions"
    line = _fails(["-q", "predict", "--run", str(run_copy), "--out", str(out), *images], capsys)
    assert images[0] in line and "non-finite" in line
    assert not out.exists() or not any(out.iterdir())

    before = _snapshot(run_copy)
    line = _fails(["-q", "test", "--run", str(run_copy)], capsys)
    assert "NaN" in line and images[0] in line
    assert _snapshot(run_copy) == before


# ------------------------------------------------------------------- files on disk (item 6)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_umask_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        runio.write_text(tmp_path / "a.txt", "x")
        runio.write_json(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


# ---------------------------------------------------------------------- masks (item 8)


def test_mask_of_another_size_is_resized_with_one_warning(tmp_path, caplog):
    image = _png(tmp_path / "img.png", size=(40, 40))
    mask = _mask(tmp_path / "mask.png", size=(20, 20))  # defect at rows/cols 5..9
    with caplog.at_level(logging.WARNING):
        resized = load_mask([mask], (40, 40))
        item = ImageDataset([Sample(image, 1, "bad", (mask,))], 40)[0]
    assert resized.sum() == 100 and resized[10:20, 10:20].all()
    np.testing.assert_array_equal(item["mask"][0].numpy(), resized.astype(np.float32))
    warned = [r for r in caplog.records if str(mask) in r.message]
    assert len(warned) == 1 and "mask is 20x20 (width x height), its image is 40x40" in (
        warned[0].message
    )


def test_mask_size_warning_reads_width_by_height(tmp_path, caplog):
    mask = tmp_path / "wide_mask.png"
    Image.fromarray(np.full((10, 30), 255, np.uint8)).save(mask)  # 30 wide, 10 high
    with caplog.at_level(logging.WARNING):
        resized = load_mask([mask], (20, 60))  # its image: 60 wide, 20 high
    assert resized.shape == (20, 60) and resized.all()
    assert "mask is 30x10 (width x height), its image is 60x20" in caplog.text


@pytest.mark.parametrize("values", [(0, 128), (0, 64, 255)])
def test_mask_with_other_values_counts_nonzero_and_warns_once(tmp_path, caplog, values):
    path = tmp_path / f"soft{len(values)}.png"
    mask = np.zeros((8, 8), np.uint8)
    for i, v in enumerate(values[1:]):
        mask[i, :] = v
    Image.fromarray(mask).save(path)
    with caplog.at_level(logging.WARNING):
        first = load_mask([path])
        second = load_mask([path])
    np.testing.assert_array_equal(first, mask > 0)
    np.testing.assert_array_equal(second, first)
    warned = [r for r in caplog.records if str(path) in r.message]
    assert len(warned) == 1 and "non-zero pixel counts as defect" in warned[0].message


@pytest.mark.parametrize("dtype,on", [(np.uint8, 1), (np.uint8, 255), (np.uint16, 1)])
def test_binary_masks_give_no_warning(tmp_path, caplog, dtype, on):
    path = tmp_path / f"mask_{np.dtype(dtype).name}_{on}.png"
    mask = np.zeros((8, 8), dtype)
    mask[2:4, 2:4] = on
    Image.fromarray(mask).save(path)
    with caplog.at_level(logging.WARNING):
        loaded = load_mask([path])
    assert loaded.sum() == 4 and not caplog.records


def test_missing_and_extra_masks_are_refused_by_name(tmp_path, capsys):
    data = _mvtec(tmp_path / "missing")
    lost = data / "cat" / "ground_truth" / "bad" / "001_mask.png"
    lost.unlink()
    line = _fails(_train_argv(data, tmp_path / "out1"), capsys)
    assert "no mask" in line and str(data / "cat" / "test" / "bad" / "001.png") in line

    data = _mvtec(tmp_path / "extra")
    extra = _mask(data / "cat" / "ground_truth" / "bad" / "007_mask.png")
    line = _fails(_train_argv(data, tmp_path / "out2"), capsys)
    assert "without an image" in line and str(extra) in line
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------ help (item 9)


def test_no_option_says_default_none(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        text = command.format_help()
        assert "(default: None)" not in text and "(default: [])" not in text, name
        for action in command._actions:
            if action.option_strings and action.default in (None, []) and action.help:
                said = "default" in action.help or "required" in action.help
                assert said or action.required, (name, action.option_strings)


# ------------------------------------------------------------------- Python API (item 12)


def test_fit_and_predict_accept_a_folder_path(tmp_path):
    folder = tmp_path / "good"
    images = [_png(folder / f"{i}.png", seed=i) for i in range(3)]
    detector = Detector.from_preset("cpu_rd_lite0", **TINY)
    detector.fit(str(folder), progress=False)
    assert detector.train_images == [str(p.absolute()) for p in images]
    assert [p.path for p in detector.predict(folder)] == [str(p) for p in images]

    with pytest.raises(DatasetError, match="a file") as info:
        detector.fit(str(images[0]), progress=False)
    assert str(images[0]) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        Detector.from_preset("cpu_rd_lite0", **TINY).fit(tmp_path / "empty", progress=False)


# ---------------------------------------------------------------------- images (item 13)


@pytest.mark.parametrize(
    "kind,problem", [("empty", "empty file"), ("truncated", "decode"), ("text", "decode")]
)
def test_bad_training_image_is_named_before_any_work(tmp_path, capsys, kind, problem):
    data = _mvtec(tmp_path / "data")
    bad = _bad_files(tmp_path / "bad")[kind]
    shutil.move(bad, data / "cat" / "train" / "good" / bad.name)
    line = _fails(_train_argv(data, tmp_path / "out"), capsys)
    assert str(data / "cat" / "train" / "good" / bad.name) in line and problem in line
    assert not (tmp_path / "out").exists()


def test_bad_test_image_is_named_and_nothing_is_written(trained, run_copy, tmp_path, capsys):
    _, data, _ = trained
    bad_data = tmp_path / "bad-data"
    shutil.copytree(data, bad_data)
    bad = bad_data / "cat" / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    before = _snapshot(run_copy)
    line = _fails(["-q", "test", "--run", str(run_copy), "--root", str(bad_data)], capsys)
    assert str(bad) in line
    assert _snapshot(run_copy) == before


def test_predict_skips_unreadable_files_lists_them_and_exits_1(trained, tmp_path, capsys):
    _, data, run = trained
    good = sorted(str(p) for p in (data / "cat" / "test" / "good").glob("*.png"))
    bad = _bad_files(tmp_path / "bad")
    out = tmp_path / "out"
    code = main(
        ["-q", "predict", "--run", str(run), "--out", str(out), *good, str(tmp_path / "bad")]
    )
    captured = capsys.readouterr()
    assert code == 1
    for path in bad.values():
        assert f"cpkp: skipped {path}:" in captured.err
    summary = captured.err.strip().splitlines()[-1]
    assert summary.startswith("cpkp: skipped 3 unreadable file(s): ")
    assert all(str(p) in summary for p in bad.values())

    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows if r["prediction"] != "unreadable"] == good
    assert sorted(r["path"] for r in rows if r["prediction"] == "unreadable") == sorted(
        str(p) for p in bad.values()
    )
    assert sorted(p.name for p in out.glob("*_heatmap.png")) == [
        "000_heatmap.png",
        "001_heatmap.png",
    ]


def test_predict_again_into_the_same_out_replaces_the_earlier_prediction(
    trained, run_copy, tmp_path, capsys
):
    _, data, run = trained
    good = sorted(str(p) for p in (data / "cat" / "test" / "good").glob("*.png"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not predict's: never touched
    (out / "x_heatmap.png").write_bytes(b"mine too")  # predict's naming, in no CSV
    argv = ["-q", "predict", "--run", str(run), "--out", str(out), "--workers", "0"]
    assert main([*argv, *good]) == 0
    assert {"000_heatmap.png", "001_heatmap.png", "001_mask.png"} <= {p.name for p in out.iterdir()}

    assert main([*argv, good[0]]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "000_heatmap.png",
        "000_mask.png",
        "notes.txt",
        "predictions.csv",
        "x_heatmap.png",
    ]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [good[0]]

    # A prediction that fails before its first result leaves the earlier one whole: no
    # input readable, or a damaged model.
    before = _snapshot(out)
    unreadable = _bad_files(tmp_path / "bad")
    capsys.readouterr()
    line = _fails([*argv, *map(str, unreadable.values())], capsys)
    assert (
        line == f"cpkp: error: none of the 3 input image(s) could be read; nothing written to {out}"
    )
    assert _snapshot(out) == before

    meta = json.loads((run_copy / runio.META_FILE).read_text())
    meta["calibration"]["kd_p99"] = float("nan")
    (run_copy / runio.META_FILE).write_text(json.dumps(meta))
    before = _snapshot(out)
    capsys.readouterr()  # the two runs above
    line = _fails(["-q", "predict", "--run", str(run_copy), "--out", str(out), *good], capsys)
    assert "non-finite" in line
    assert _snapshot(out) == before


def test_predict_skips_a_file_only_the_full_decode_rejects(trained, tmp_path, capsys, monkeypatch):
    """The quick check passes it; loading it for scoring fails: skipped, the rest scored."""
    from cpkp.data import dataset, images

    _, data, run = trained
    paths = sorted(str(p) for p in (data / "cat" / "test" / "good").glob("*.png"))
    assert len(paths) >= 2
    broken = paths[1]  # in the first batch, after an image of the same batch
    real_load = images.load_image

    def load(path, *args, **kwargs):
        if str(path) == broken:
            raise ImageError(f"{path}: float values outside [0, 1] (simulated)")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "load_image", load)
    monkeypatch.setattr(images, "load_image", load)
    out = tmp_path / "out"
    argv = ["-q", "predict", "--run", str(run), "--out", str(out), "--workers", "0"]
    code = main([*argv, "--batch-size", "2", *paths])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert f"cpkp: skipped {broken}: float values outside [0, 1] (simulated)" in captured.err
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows if r["prediction"] == "unreadable"] == [broken]
    assert [r["path"] for r in rows if r["prediction"] != "unreadable"] == [
        p for p in paths if p != broken
    ]


def test_predict_compile_compiles_each_network_once_and_scores_alike(
    trained, tmp_path, capsys, monkeypatch
):
    _, data, run = trained
    images = sorted(str(p) for p in (data / "cat" / "test" / "good").glob("*.png"))[:3]
    argv = ["-q", "predict", "--run", str(run), "--workers", "0", "--batch-size", "1", *images]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0

    compiled, calls = [], []

    def fake_compile(module):  # the real one needs seconds of compilation per network
        compiled.append(module)
        return lambda *args: calls.append(module) or module(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert main([*argv, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert [type(m).__name__ for m in compiled] == ["FeatureExtractor", "RDStudent"]
    assert len(calls) == 2 * len(images)  # every batch went through the compiled pair
    plain, fast = (
        [r["score"] for r in csv.DictReader((tmp_path / f / "predictions.csv").open())]
        for f in ("plain", "compiled")
    )
    assert fast == plain

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not used")
    capsys.readouterr()
    line = _fails(["-q", "predict", "--model", str(model), "--compile", images[0]], capsys)
    assert line == "cpkp: error: --compile applies to --run; an ONNX model runs as exported"


def test_other_pixel_modes_are_read_as_rgb(tmp_path):
    cmyk = tmp_path / "cmyk.tif"
    Image.new("CMYK", (4, 3), (0, 255, 0, 0)).save(cmyk)  # full magenta ink
    np.testing.assert_allclose(load_image(cmyk)[0, 0], [1.0, 0.0, 1.0], atol=1 / 255)

    la = tmp_path / "la.png"
    Image.fromarray(
        np.dstack([np.full((3, 4), 51, np.uint8), np.zeros((3, 4), np.uint8)]), "LA"
    ).save(la)
    np.testing.assert_allclose(load_image(la), 0.2, atol=1e-6)

    big_endian = tmp_path / "grey16be.tif"
    tifffile.imwrite(big_endian, np.full((3, 4), 13107, ">u2"))
    np.testing.assert_allclose(load_image(big_endian), 0.2, atol=1e-6)

    separated = tmp_path / "cmyk16.tif"
    tifffile.imwrite(separated, np.zeros((3, 4, 4), np.uint16), photometric="separated")
    with pytest.raises(ImageError, match="SEPARATED") as info:
        load_image(separated)
    assert str(separated) in str(info.value)


def test_small_and_extreme_aspect_images_are_scored_at_their_own_size(trained, tmp_path):
    _, _, run = trained
    small = _png(tmp_path / "small.png", size=(8, 8))
    long = _png(tmp_path / "long.png", size=(8, 4000))
    detector = Detector.load(run)
    small_pred, long_pred = detector.predict([small, long])
    assert small_pred.map.shape == (8, 8) and long_pred.map.shape == (8, 4000)
    assert np.isfinite(small_pred.map).all() and np.isfinite(long_pred.map).all()

    folder = tmp_path / "tiny-train"
    for i in range(3):
        _png(folder / f"{i}.png", size=(8, 8), seed=i)
    Detector.from_preset("cpu_rd_lite0", **TINY).fit(folder, progress=False)


def test_empty_folder_is_named(tmp_path, capsys):
    empty = tmp_path / "normal"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    line = _fails(
        [
            "-q",
            "train",
            "--dataset",
            "folder",
            "--normal",
            str(empty),
            *TINY_ARGS,
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert str(empty) in line and "no images" in line


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_two_to_five_training_images_train_at_32px(tmp_path, n):
    images = [_png(tmp_path / f"{i}.png", seed=i) for i in range(n)]
    detector = Detector.from_preset("cpu_rd_lite0", **TINY)
    logs = detector.fit(images, progress=False)
    assert len(logs) == 1 and np.isfinite(logs[0].kd)
    assert len(detector.prototype.vectors) >= 1
    scores = [p.score for p in detector.predict(images)]
    assert np.isfinite(scores).all()


def test_one_training_image(tmp_path):
    image = _png(tmp_path / "only.png")
    with pytest.raises(DatasetError, match="1 training image at data.image_size=32"):
        Detector.from_preset("cpu_rd_lite0", **TINY).fit([image], progress=False)
    with pytest.raises(ConfigError, match="train.batch_size=1"):
        config = {**TINY, "train": {"epochs": 1, "batch_size": 1}}
        Detector.from_preset("cpu_rd_lite0", **config).fit([image, image], progress=False)

    for config in (
        {**TINY, "data": {"image_size": 64}},  # RD: the bottleneck grid is 2x2
        {**TINY, "model": {"backbone": "random:tf_efficientnet_lite0", "variant": "fd"}},
    ):
        detector = Detector.from_preset("cpu_rd_lite0", **config)
        detector.fit([image], progress=False)
        assert np.isfinite(detector.predict([image])[0].score)


def test_test_split_without_defects_writes_scores_and_undefined_metrics(trained, tmp_path, caplog):
    _, data, run = trained
    good = [s for s in read_mvtec(data, "cat").test if s.label == 0]
    with caplog.at_level(logging.WARNING):
        outputs = run_test(
            Detector.load(run), good, out_dir=tmp_path, overlays=False, progress=False
        )
    assert outputs.metrics["fused"]["overall"]["image_auroc"] is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no defective images" in w for w in warnings)
    assert len(warnings) == len(set(warnings)), "one warning per cause, not one per part"
    rows = list(csv.DictReader((tmp_path / runio.SCORES_FILE).open()))
    assert [float(r["score"]) for r in rows] == pytest.approx(
        outputs.scores["fused"].tolist(), rel=1e-5
    )


def test_demo_data_names_a_bundled_photo_it_cannot_read(tmp_path, monkeypatch):
    package = tmp_path / "photos_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DatasetError, match="photos_pkg/broken.png: the bundled photo cannot"):
        load_photo(Photo("photos_pkg", "broken.png", "L"))
    with pytest.raises(DatasetError, match="photos_pkg/gone.png: photo not found"):
        load_photo(Photo("photos_pkg", "gone.png", "L"))


# ------------------------------------------------ found by the second fresh-user trial


@pytest.mark.parametrize(
    "extra",
    [
        ("--backbone", "resnet999"),
        ("--backbone", "resnet18", "--weights", "/no/such/weights.pth"),
        ("--device", "cuda:9"),
        ("--set", "prototype.channels_per_level=200"),
    ],
)
def test_force_with_a_setting_that_cannot_start_keeps_the_old_run(trained, run_copy, capsys, extra):
    _, data, _ = trained
    before = _snapshot(run_copy)
    _fails(_train_argv(data, run_copy, "--force", *extra), capsys)
    assert _snapshot(run_copy) == before


def test_a_run_without_checkpoint_points_to_force(trained, tmp_path, capsys):
    _, data, _ = trained
    out = tmp_path / "half"
    out.mkdir()
    (out / runio.CONFIG_FILE).write_text("{}")
    line = _fails(_train_argv(data, out), capsys)
    assert "no checkpoint to resume from" in line and "--force" in line


def test_disk_errors_are_one_line(trained, tmp_path, capsys):
    _, data, run = trained
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    image = next((data / "cat" / "test" / "good").iterdir())
    line = _fails(["-q", "predict", "--run", str(run), str(image), "--out", str(target)], capsys)
    assert (
        line
        == f"cpkp: error: --out {target}: is a file, not a folder; choose a folder for the results"
    )
    assert target.read_text() == "not a folder"


def test_train_refuses_an_output_folder_among_its_images_and_creates_nothing_on_bad_weights(
    trained, tmp_path, capsys
):
    _, data, _ = trained
    good = data / "cat" / "train" / "good"
    before = sorted(p.name for p in good.iterdir())
    for out in (good, good / "run"):
        line = _fails(_train_argv(data, out), capsys)
        assert f"--out {out}: lies in {good.resolve()}, a folder of input images" in line
    assert sorted(p.name for p in good.iterdir()) == before

    out = tmp_path / "new-run"
    line = _fails(_train_argv(data, out, "--backbone", "no_such_net"), capsys)
    assert "no_such_net" in line
    assert not out.exists()  # not even the log file


def test_predict_refuses_an_output_folder_among_the_inputs(trained, tmp_path, capsys):
    _, data, run = trained
    folder = tmp_path / "images"
    shutil.copytree(data / "cat" / "test" / "good", folder)
    before = sorted(p.name for p in folder.iterdir())
    image = str(next(folder.iterdir()))
    for given in (str(folder), image):
        line = _fails(["-q", "predict", "--run", str(run), given, "--out", str(folder)], capsys)
        assert f"--out {folder}: is {folder.resolve()}, a folder of input images" in line
    line = _fails(["-q", "predict", "--run", str(run), image, "--out", str(run)], capsys)
    assert line == f"cpkp: error: --out {run}: lies in the run folder {run}; choose another folder"
    assert sorted(p.name for p in folder.iterdir()) == before

    # The run's dataset: `cpkp test` would read maps there as test images or a defect type.
    category = data / "cat"
    for out in (category / "test" / "good", category / "test" / "maps"):
        line = _fails(["-q", "predict", "--run", str(run), image, "--out", str(out)], capsys)
        assert f"--out {out}: lies in {category.resolve()}, the dataset of the run" in line
    assert not (category / "test" / "maps").exists()

    # A subfolder of an input folder is fine: folders are listed without recursion.
    maps = folder / "maps"
    argv = ["-q", "predict", "--run", str(run), "--workers", "0", str(folder)]
    assert main([*argv, "--out", str(maps)]) == 0
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    rows = list(csv.DictReader((tmp_path / "again" / "predictions.csv").open()))
    assert sorted(Path(r["path"]).name for r in rows) == before


def test_a_test_without_overlays_removes_the_previous_tests_overlays(trained, run_copy, capsys):
    assert main(["-q", "test", "--run", str(run_copy), "--no-report"]) == 0
    assert list((run_copy / runio.OVERLAYS_DIR).glob("*.png"))
    assert main(["-q", "test", "--run", str(run_copy), "--no-overlays", "--no-report"]) == 0
    assert not (run_copy / runio.OVERLAYS_DIR).exists()
    assert (run_copy / runio.METRICS_FILE).is_file()


def test_benchmark_checks_categories_and_takes_an_alpha_list(tmp_path, monkeypatch, capsys):
    from cpkp import benchmark

    root = _mvtec(tmp_path / "data")
    line = _fails(
        [
            "-q",
            "benchmark",
            "--dataset",
            "mvtec",
            "--root",
            str(root),
            "--categories",
            "cat,bottle",
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    assert "bottle not found" in line and "found: cat" in line
    assert not (tmp_path / "b").exists()

    seen = []
    monkeypatch.setattr(benchmark, "run_job", lambda job, progress=False: seen.append(job) or {})
    argv = [
        "-q",
        "benchmark",
        "--dataset",
        "mvtec",
        "--root",
        str(root),
        "--variants",
        "cpkp-rd",
        "--alpha",
        "0.9,0.99",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 0
    assert [job.config["train"]["alpha"] for job in seen] == [0.9, 0.99]


def test_data_options_the_dataset_would_ignore_are_refused(trained, run_copy, tmp_path, capsys):
    _, data, _ = trained
    before = _snapshot(run_copy)
    line = _fails(["-q", "test", "--run", str(run_copy), "--normal", str(tmp_path)], capsys)
    assert "--normal only applies to --dataset folder" in line and "here is mvtec" in line
    assert _snapshot(run_copy) == before
    argv = ["-q", "train", "--dataset", "folder", "--normal", str(data / "cat" / "train" / "good")]
    line = _fails([*argv, "--category", "cat", "--out", str(tmp_path / "new")], capsys)
    assert "--category only applies to --dataset mvtec or visa" in line
    assert not (tmp_path / "new").exists()


def test_a_config_that_is_not_yaml_text_or_is_a_folder_is_named(tmp_path, capsys):
    image = _png(tmp_path / "part.png", size=(8, 8))
    folder = tmp_path / "configs"
    folder.mkdir()
    argv = ["-q", "train", "--dataset", "mvtec", "--root", str(tmp_path), "--category", "c"]
    line = _fails([*argv, "--out", str(tmp_path / "r"), "--config", str(image)], capsys)
    assert line.startswith(f"cpkp: error: {image}: not a YAML text file (not UTF-8")
    line = _fails([*argv, "--out", str(tmp_path / "r"), "--config", str(folder)], capsys)
    assert line == f"cpkp: error: {folder}: is a folder; give the path of a YAML config file"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("size", ["-5", "0", "33", "4096"])
def test_info_refuses_an_image_size_the_networks_cannot_take(size, capsys):
    line = _fails(["info", "--image-size", size], capsys)
    assert line.startswith(f"cpkp: error: --image-size={size}: ")
    assert any(m in line for m in ("must be at least 32", "multiple of 32", "at most 1024"))


@pytest.mark.parametrize("option", [["--epochs", "-1"], ["--seed", "-2"]])
def test_demo_checks_its_options_before_writing_the_data(option, tmp_path, capsys):
    out = tmp_path / "demo-run"
    line = _fails(["-q", "demo", "--out", str(out), *option], capsys)
    assert f"={option[1]}: must" in line
    assert not out.exists()


def test_a_file_in_the_way_of_an_output_folder_is_named(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    line = _fails(["-q", "demo-data", "--out", str(blocker / "sub")], capsys)
    assert line.startswith(f"cpkp: error: {blocker}")
    assert "a file stands where cpkp writes a folder" in line or "not a folder" in line
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize(
    ("key", "edit"), [("image_size", ("32", "64")), ("resize", None), ("roi", None)]
)
def test_a_config_edited_away_from_the_trained_geometry_is_refused(
    key, edit, trained, run_copy, tmp_path, capsys
):
    _, data, _ = trained
    config = run_copy / runio.CONFIG_FILE
    text = config.read_text()
    if key == "image_size":
        assert f"image_size: {edit[0]}" in text
        config.write_text(text.replace(f"image_size: {edit[0]}", f"image_size: {edit[1]}", 1))
        shown = "data.image_size is 64, but the run was trained and calibrated at 32"
    elif key == "resize":
        assert "resize: squash" in text
        config.write_text(text.replace("resize: squash", "resize: aspect", 1))
        shown = "data.resize is 'aspect', but the run was trained and calibrated at 'squash'"
    else:
        assert "roi: null" in text
        config.write_text(text.replace("roi: null", "roi: roi.png", 1))
        shown = "data.roi is 'roi.png', but the run was trained and calibrated at None"
    before = _snapshot(run_copy)
    image = str(next((data / "cat" / "test" / "good").iterdir()))
    out = tmp_path / "predictions"
    line = _fails(["-q", "predict", "--run", str(run_copy), image, "--out", str(out)], capsys)
    assert line.startswith(f"cpkp: error: {config}: {shown}")
    assert _snapshot(run_copy) == before and not out.exists()
