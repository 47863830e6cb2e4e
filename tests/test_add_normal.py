"""`cpkp add-normal`: approved normal images join the prototype; the networks stay as they are.

One run is trained on 6 demo images (random Lite0 networks, 64 px, one epoch); each test works
on its own copy of the run folder. The 3 test/good images of the demo are the images added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from cpkp import runio
from cpkp.api import Detector
from cpkp.backbones import create_backbone
from cpkp.cli import main
from cpkp.config import load_preset
from cpkp.data.dataset import ImageDataset
from cpkp.data.demo import make_demo_dataset
from cpkp.errors import ConfigError, ImageError, WeightsError
from cpkp.prototype import Prototype, coreset_size, f_agg, reselect_prototype

# NOTE: coreset_ratio 0.25 instead of the paper's 1%: with 6 images of 8x8 patches, 1% keeps
# 4 prototypes and the new images would get one or none of their own.
TINY = {
    "model": {"backbone": "random:tf_efficientnet_lite0"},
    "data": {"image_size": 64},
    "train": {"epochs": 1, "batch_size": 4, "seed": 0},
    "prototype": {"coreset_ratio": 0.25},
}
N_TRAIN = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: fastest for these tiny networks, and no spinning on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """(6 training images, the 3 normal images to add)."""
    root = tmp_path_factory.mktemp("add-normal-data")
    make_demo_dataset(
        root, categories=["brick"], n_train=N_TRAIN, n_test_good=3, n_defect=2, size=64, seed=0
    )
    train = sorted((root / "brick" / "train" / "good").glob("*.png"))
    new = sorted((root / "brick" / "test" / "good").glob("*.png"))
    assert len(train) == N_TRAIN and len(new) == 3
    return train, new


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo) -> Path:
    train, _ = demo
    run = tmp_path_factory.mktemp("add-normal-run") / "run"
    Detector.from_preset("cpu_rd_lite0", **TINY).fit(train, run_dir=run, progress=False)
    return run


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture(scope="module")
def added(trained, demo, tmp_path_factory):
    """A run copy after ``Detector.add_normal`` and ``save``, with what it was before."""
    _, new = demo
    run = tmp_path_factory.mktemp("added") / "run"
    shutil.copytree(trained, run)
    (run / runio.METRICS_FILE).write_text("{}")
    (run / runio.OVERLAYS_DIR).mkdir()
    (run / runio.OVERLAYS_DIR / "good_000.png").write_bytes(b"old overlay")
    (run / runio.EXPORT_DIR).mkdir()
    for name in (*runio.EXPORT_FILES, "notes.txt"):
        (run / runio.EXPORT_DIR / name).write_bytes(b"exported from the model before")
    before = _snapshot(run)

    detector = Detector.load(run)
    old_prototype = detector.prototype
    old_scores = _scores(detector, new)
    summary = detector.add_normal(new)
    detector.save(run)
    return {
        "run": run,
        "detector": detector,
        "summary": summary,
        "before": before,
        "old_prototype": old_prototype,
        "old_scores": old_scores,
    }


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _scores(detector: Detector, images: list[Path]) -> list[float]:
    return [p.score for p in detector.predict(images)]


def _meta(run: Path) -> dict:
    return json.loads((run / runio.META_FILE).read_text())


# ----------------------------------------------------------------------------- the Python API


def test_prototype_grows_by_the_coreset_rule_of_fit(added, demo):
    summary, detector = added["summary"], added["detector"]
    m0, m1 = summary["prototypes_before"], summary["prototypes_after"]
    h, w = detector.prototype.grid
    cfg = load_preset("cpu_rd_lite0").prototype
    cfg.coreset_ratio = TINY["prototype"]["coreset_ratio"]

    assert m0 == len(added["old_prototype"].vectors) == coreset_size(N_TRAIN * h * w, cfg)
    assert m1 == len(detector.prototype.vectors) == coreset_size((N_TRAIN + 3) * h * w, cfg)
    assert (m0, m1) == (96, 144)  # 0.25 x 6 and 0.25 x 9 images x 64 patches
    assert summary["bank_size"] == (N_TRAIN + 3) * h * w
    assert summary["added"] == [str(p.absolute()) for p in demo[1]]
    assert summary["skipped"] == []


def test_teacher_and_student_weights_are_bit_identical(added):
    old = load_safetensors(added["before"][runio.WEIGHTS_FILE])
    new = runio.load_tensors(added["run"] / runio.WEIGHTS_FILE)
    networks = sorted(k for k in old if k.startswith(("teacher.", "student.")))
    assert len(networks) > 100
    assert networks == sorted(k for k in new if k.startswith(("teacher.", "student.")))
    for key in networks:
        assert old[key].dtype == new[key].dtype and torch.equal(old[key], new[key]), key
    assert not torch.equal(old["prototype.vectors"], new["prototype.vectors"])


def test_the_added_images_own_scores_drop_and_a_reload_scores_the_same(added, demo):
    _, new = demo
    after = _scores(added["detector"], new)
    for image, old_score, new_score in zip(new, added["old_scores"], after):
        assert new_score < old_score, image.name

    reloaded = Detector.load(added["run"])
    assert _scores(reloaded, new) == after
    assert reloaded.calibration == added["detector"].calibration


def test_old_prototypes_keep_their_provenance_and_new_ones_continue_the_list(added, demo):
    detector, old = added["detector"], added["old_prototype"]
    train, new = demo
    provenance = detector.prototype.provenance
    from_old = provenance[:, 0] < N_TRAIN
    assert 0 < int(from_old.sum()) <= len(old.vectors)
    assert set(provenance[~from_old, 0].tolist()) <= {N_TRAIN, N_TRAIN + 1, N_TRAIN + 2}

    # Each kept old prototype is the same vector with the same (image, y, x) as before.
    rows = {tuple(r): v for r, v in zip(old.provenance.tolist(), old.vectors)}
    for r, v in zip(provenance[from_old].tolist(), detector.prototype.vectors[from_old]):
        assert torch.equal(rows[tuple(r)], v)

    # Each new one is the monitor's patch vector of that image at that grid position: the
    # monitor is the seeded random backbone fit started from, not the trained teacher.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY["train"]["seed"])
        monitor = create_backbone(TINY["model"]["backbone"], quiet=True).eval()
    images = ImageDataset(new, 64)
    for (image, y, x), vector in zip(
        provenance[~from_old].tolist(), detector.prototype.vectors[~from_old]
    ):
        with torch.inference_mode():
            agg = f_agg(monitor(images[image - N_TRAIN]["image"][None]), detector.config.prototype)
        torch.testing.assert_close(vector.float(), agg[0, :, y, x].half().float())

    meta = _meta(added["run"])
    assert meta["train_images"] == [str(p.absolute()) for p in [*train, *new]]
    assert meta["prototype_size"] == len(provenance)
    assert meta["prototype_bank_size"] == (N_TRAIN + 3) * 64
    assert meta["epochs_done"] == 1


def test_history_records_the_addition(added, demo):
    history = _meta(added["run"])["history"]
    assert [entry["event"] for entry in history] == ["fit", "add-normal"]
    entry = history[-1]
    assert entry["images"] == [str(p.absolute()) for p in demo[1]]
    assert entry["prototypes_before"] == added["summary"]["prototypes_before"]
    assert entry["prototypes_after"] == added["summary"]["prototypes_after"]
    assert entry["time"] >= history[0]["time"]


def test_calibration_is_recomputed_over_old_and_new_images(added, demo):
    train, new = demo
    detector = Detector.load(added["run"])
    stored = detector.calibration
    assert added["summary"]["calibration"] == stored.to_dict()
    assert added["summary"]["calibration_before"] != stored.to_dict()
    assert detector.calibrate([*train, *new]) == stored
    assert detector.calibrate(train) != stored


def test_stale_test_outputs_and_export_go_and_the_training_files_stay(added):
    run, before = added["run"], added["before"]
    after = _snapshot(run)
    assert runio.METRICS_FILE not in after
    assert not (run / runio.OVERLAYS_DIR).exists()
    exported = sorted(p.name for p in (run / runio.EXPORT_DIR).iterdir())
    assert exported == ["notes.txt"]  # the stale model.onnx and model.json are gone
    for name in (runio.CHECKPOINT_FILE, runio.TRAIN_LOG, runio.CONFIG_FILE):
        assert after[name] == before[name], name
    assert after[runio.META_FILE] != before[runio.META_FILE]


def test_images_already_in_the_run_are_skipped_and_additions_accumulate(run_copy, demo):
    train, new = demo
    detector = Detector.load(run_copy)
    summary = detector.add_normal([train[0], new[0], new[0]])
    assert summary["skipped"] == [str(train[0].absolute()), str(new[0].absolute())]
    assert summary["added"] == [str(new[0].absolute())]
    assert (summary["prototypes_after"], summary["bank_size"]) == (112, 7 * 64)
    detector.save(run_copy)

    nothing = Detector.load(run_copy).add_normal([train[1], new[0]])
    assert nothing["added"] == [] and nothing["prototypes_after"] == 112

    detector = Detector.load(run_copy)
    summary = detector.add_normal(new[1:])
    assert (summary["prototypes_before"], summary["prototypes_after"]) == (112, 144)
    detector.save(run_copy)
    meta = _meta(run_copy)
    assert meta["prototype_bank_size"] == 9 * 64 and len(meta["train_images"]) == 9
    assert [e["event"] for e in meta["history"]] == ["fit", "add-normal", "add-normal"]


def test_a_bad_image_changes_nothing(run_copy, demo, tmp_path):
    _, new = demo
    bad = tmp_path / "broken.png"
    bad.write_bytes(new[0].read_bytes()[:200])
    detector = Detector.load(run_copy)
    prototype, calibration = detector.prototype, detector.calibration
    with pytest.raises(ImageError, match="broken.png"):
        detector.add_normal([new[1], bad])
    assert detector.prototype is prototype and detector.calibration == calibration
    assert len(detector.train_images) == N_TRAIN and len(detector.history) == 1


def test_a_training_image_gone_missing_is_named(run_copy, demo):
    meta = _meta(run_copy)
    meta["train_images"][2] = str(run_copy / "moved.png")
    runio.write_json(run_copy / runio.META_FILE, meta)
    with pytest.raises(ImageError, match=r"(?s)train_images.*moved\.png: file not found"):
        Detector.load(run_copy).add_normal(demo[1])


def test_a_monitor_with_other_weights_is_refused(run_copy, demo):
    """The run was built from the random monitor; Lite0's ImageNet weights do not match it."""
    config = (run_copy / runio.CONFIG_FILE).read_text()
    (run_copy / runio.CONFIG_FILE).write_text(
        config.replace("random:tf_efficientnet_lite0", "tf_efficientnet_lite0")
    )
    with pytest.raises(WeightsError, match="does not reproduce the run's prototypes"):
        Detector.load(run_copy).add_normal(demo[1])

    (run_copy / runio.CONFIG_FILE).write_text(
        config.replace("random:tf_efficientnet_lite0", "tf_efficientnet_lite0").replace(
            "weights: null", f"weights: {run_copy / 'gone.pth'}"
        )
    )
    with pytest.raises(WeightsError, match="teaching monitor.*gone.pth"):
        Detector.load(run_copy).add_normal(demo[1])


# ---------------------------------------------------------------------------- the command line


def test_cli_adds_a_folder_and_a_second_call_changes_nothing(run_copy, demo, capsys):
    _, new = demo
    m0 = _meta(run_copy)["prototype_size"]
    assert main(["-q", "add-normal", "--run", str(run_copy), str(new[0].parent)]) == 0
    out = capsys.readouterr().out
    meta = _meta(run_copy)
    assert f"prototypes: {m0} -> {meta['prototype_size']}" in out and meta["prototype_size"] > m0
    assert f"{meta['calibration']['image_threshold']:.4g}" in out
    assert meta["history"][-1]["images"] == [str(p.absolute()) for p in new]
    assert "add-normal" in (run_copy / runio.LOG_FILE).read_text()

    before = _snapshot(run_copy)
    assert main(["-q", "add-normal", "--run", str(run_copy), str(new[0].parent)]) == 0
    assert "no new image" in capsys.readouterr().out
    assert _snapshot(run_copy) == before


def test_resume_drops_the_additions_from_the_history_with_a_warning(run_copy, demo, caplog):
    _, new = demo
    assert main(["-q", "add-normal", "--run", str(run_copy), str(new[0].parent)]) == 0
    with caplog.at_level("WARNING"):
        assert main(["-q", "train", "--resume", str(run_copy), "--epochs", "2"]) == 0
    assert f"drops the {len(new)} image(s) that add-normal added" in caplog.text
    meta = _meta(run_copy)
    events = [e["event"] for e in meta["history"]]
    assert "add-normal" not in events and events[-2:] == ["additions-dropped", "resume"]
    assert meta["history"][-2]["images"] == [str(p.absolute()) for p in new]
    assert len(meta["train_images"]) == N_TRAIN

    # Added again afterwards, they count as new.
    assert main(["-q", "add-normal", "--run", str(run_copy), str(new[0].parent)]) == 0
    assert _meta(run_copy)["history"][-1]["event"] == "add-normal"


def test_cli_bad_image_exits_2_and_leaves_the_run_folder_byte_identical(
    run_copy, demo, tmp_path, capsys
):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    before = _snapshot(run_copy)
    assert main(["-q", "add-normal", "--run", str(run_copy), str(demo[1][0]), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpkp: error:") and "notes.png" in err
    assert _snapshot(run_copy) == before

    assert main(["-q", "add-normal", "--run", str(tmp_path / "nowhere"), str(bad)]) == 2
    assert "run folder not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------- reselection


def test_reselection_is_greedy_k_center_over_old_and_new_with_provenance():
    """Points on a line: the central point, then the farthest ones (hand-computed)."""
    old = Prototype(
        torch.tensor([[0.0, 0.0], [10.0, 0.0]]).half(), torch.tensor([[0, 1, 1], [1, 2, 2]]), (4, 4)
    )
    vectors = torch.tensor([[0.5, 0.0], [50.0, 0.0], [10.5, 0.0]]).half()
    provenance = torch.tensor([[2, 0, 0], [2, 0, 1], [3, 3, 3]])
    cfg = load_preset("cpu_rd_lite0").prototype
    # mean 14.2: 10.5 is the nearest; then 50 (39.5 away); then 0 (10.5 from 10.5, the
    # farthest of 0, 0.5 and 10).
    result = reselect_prototype(old, vectors, provenance, 3, cfg, progress=False)
    assert result.vectors.tolist() == [[10.5, 0.0], [50.0, 0.0], [0.0, 0.0]]
    assert result.provenance.tolist() == [[3, 3, 3], [2, 0, 1], [0, 1, 1]]
    assert result.grid == (4, 4) and result.vectors.dtype == torch.float16

    with pytest.raises(ValueError, match="new patch vectors must be"):
        reselect_prototype(old, vectors[:, :1], provenance, 3, cfg, progress=False)


def test_a_run_without_prototype_is_refused(demo, tmp_path):
    train, new = demo
    tiny = {**TINY, "prototype": {"enabled": False}}
    detector = Detector.from_preset("cpu_rd_lite0", **tiny)
    detector.fit(train[:2], progress=False)
    with pytest.raises(ConfigError, match="prototype.enabled is false"):
        detector.add_normal(new)
