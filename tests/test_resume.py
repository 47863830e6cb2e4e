"""Crash safety: a SIGKILLed training run resumes to bit-identical weights; NaN stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cpkp.training
from cpkp import runio
from cpkp.api import Detector
from cpkp.checkpoint import CHECKPOINT_FILE, read_checkpoint
from cpkp.data.demo import make_demo_dataset
from cpkp.errors import TrainingError

EPOCHS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_demo_dataset(
        root / "data", seed=1, categories=["gravel"], n_train=12, n_test_good=2, n_defect=4, size=64
    )
    return root


def _train_cmd(data_root, out):
    return [
        sys.executable,
        "-m",
        "cpkp",
        "-q",
        "train",
        "--dataset",
        "mvtec",
        "--root",
        str(data_root / "data"),
        "--category",
        "gravel",
        "--backbone",
        "random:tf_efficientnet_lite0",
        "--image-size",
        "64",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "4",
        "--checkpoint-every",
        "1",
        "--lr-teacher",
        "1e-3",
        "--seed",
        "7",
        "--out",
        str(out),
    ]


def test_killed_run_resumes_to_bit_identical_weights(data):
    straight = data / "straight"
    subprocess.run(_train_cmd(data, straight), check=True, capture_output=True, timeout=600)

    killed = data / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        _train_cmd(data, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / CHECKPOINT_FILE).exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _, meta = read_checkpoint(killed)
    assert 1 <= meta["epoch"] < EPOCHS, "the run finished before it could be killed"
    assert not (killed / runio.WEIGHTS_FILE).exists()

    subprocess.run(
        [sys.executable, "-m", "cpkp", "-q", "train", "--resume", str(killed)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    a = runio.load_tensors(straight / runio.WEIGHTS_FILE)
    b = runio.load_tensors(killed / runio.WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    meta_a = runio.read_json(straight / runio.META_FILE)
    meta_b = runio.read_json(killed / runio.META_FILE)
    assert meta_a["calibration"] == meta_b["calibration"]
    log_b = (killed / runio.TRAIN_LOG).read_text().splitlines()
    assert len(log_b) == EPOCHS + 1


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_last_checkpoint(data, monkeypatch):
    calls = {"n": 0}
    real = cpkp.training.kd_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(cpkp.training, "kd_loss", poisoned)
    detector = Detector.from_preset(
        "cpu_rd_lite0",
        model={"backbone": "random:tf_efficientnet_lite0"},
        data={"image_size": 64},
        train={"epochs": 4, "batch_size": 4, "checkpoint_every": 1, "co_progression": False},
    )
    images = sorted((data / "data" / "gravel" / "train" / "good").glob("*.png"))
    run = data / "nan-run"
    with pytest.raises(TrainingError, match=r"epoch 3, batch 1"):
        detector.fit(images, run_dir=run, progress=False)
    _, meta = read_checkpoint(run)
    assert meta["epoch"] == 2
