"""benchmarks/category_study.py on a tiny demo category: its figures agree with run_test's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cpkp.api import Detector
from cpkp.data.demo import make_demo_dataset
from cpkp.data.readers import read_mvtec
from cpkp.evaluate import run_test

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "category_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("category_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overrides_are_read_as_yaml_per_section(study):
    raw = study._overrides(["train.seed=3", "data.image_size=64", "scoring.fusion=raw"])
    assert raw == {"train": {"seed": 3}, "data": {"image_size": 64}, "scoring": {"fusion": "raw"}}


def test_a_study_run_reports_run_tests_own_aurocs(study, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    make_demo_dataset(data, categories=["brick"], n_train=4, n_test_good=2, n_defect=4, size=64)
    run = tmp_path / "run"
    argv = ["--data", str(data), "--category", "brick", "--run", str(run), "--sigmas", "2"]
    sets = ["model.backbone=random:tf_efficientnet_lite0", "data.image_size=64"]
    sets += ["train.epochs=1", "train.batch_size=2"]
    monkeypatch.setattr(sys, "argv", ["category_study", *argv, *(f"--set={s}" for s in sets)])
    study.main()
    first, rescored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    meta = json.loads((run / "meta.json").read_text())  # a real run folder was written
    assert meta["variant"] == "rd"
    outputs = run_test(Detector.load(run), read_mvtec(data, "brick").test, progress=False)
    for part in ("fused", "kd", "kp"):
        expected = outputs.metrics[part]["overall"]["image_auroc"]
        assert first[f"img_{part}"] == pytest.approx(expected, abs=5e-4)
    assert set(first) >= {"img_margin8", "img_margin16", "img_top10", "kind_scratch"}
    assert "img_margin32" not in first  # no pixel would be left at 64 px
    assert rescored["sigma"] == 2.0 and 0.0 <= rescored["img_fused"] <= 1.0
