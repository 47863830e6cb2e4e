"""`cpkp benchmark`: variants as switches, resumable runs, the paper-style table."""

from __future__ import annotations

import csv
import io

import pytest

from cpkp import benchmark
from cpkp.api import Detector
from cpkp.benchmark import Job, format_table, plan_jobs, results_csv, run_benchmark
from cpkp.config import apply_overrides, load_preset
from cpkp.data.demo import make_demo_dataset
from cpkp.errors import ConfigError


def _job(category: str, variant: str, seed: int, alpha: float | None = None) -> Job:
    return Job("mvtec", "/data", category, variant, seed, alpha, "/runs/x", {})


def _metrics(image: float | None, pixel: float | None) -> dict:
    overall = {"image_auroc": image, "pixel_auroc": pixel, "aupro": 0.5, "image_f1_max": 0.9}
    return {"fused": {"overall": overall}, "kd": {"overall": overall}}


def test_variants_are_the_switches_of_the_method():
    assert benchmark.variant_overrides("cpkp-rd") == {"model": {"variant": "rd"}}
    off = benchmark.variant_overrides("fd@cpkp")
    assert off["model"]["variant"] == "fd"
    assert off["train"]["co_progression"] is False and off["prototype"]["enabled"] is False
    assert benchmark.variant_overrides("cp-only")["prototype"]["enabled"] is False
    assert "prototype" not in benchmark.variant_overrides("cp-only").get("train", {})
    assert benchmark.variant_overrides("kp-only")["train"]["co_progression"] is False
    original = benchmark.variant_overrides("rd")
    assert original["train"]["lr_student"] == pytest.approx(5e-3)
    assert original["train"]["kd_loss"] == "flattened"
    assert benchmark.variant_overrides("fd")["train"]["optimizer"] == "sgd"
    with pytest.raises(ConfigError, match="unknown benchmark variant 'cpkp'"):
        benchmark.variant_overrides("cpkp")


def test_table_gives_mean_and_std_over_seeds_and_marks_the_best():
    results = [
        (_job("a", "cpkp-rd", 0), _metrics(0.9, 0.8)),
        (_job("a", "cpkp-rd", 1), _metrics(0.7, 0.8)),
        (_job("a", "rd@cpkp", 0), _metrics(0.6, 0.95)),
        (_job("b", "cpkp-rd", 0), _metrics(1.0, None)),
        (_job("b", "rd@cpkp", 0), _metrics(0.5, None)),
    ]
    lines = format_table(results).splitlines()
    assert lines[0] == ("| category | cpkp-rd image / pixel AUROC | rd@cpkp image / pixel AUROC |")
    row_a = lines[2]
    assert "**0.800 ± 0.141**" in row_a  # mean and sample std of 0.9 and 0.7, best image
    assert "**0.950 ± 0.000**" in row_a and "/ 0.800 ± 0.000" in row_a
    assert "undefined" in lines[3]
    mean = lines[4]
    # seed 0 is the only seed finished in both categories: (0.9 + 1.0) / 2
    assert mean == "| mean | **0.950 ± 0.000** / undefined | 0.550 ± 0.000 / undefined |"


def test_alpha_sweep_rows_are_their_own_columns():
    results = [
        (_job("a", "cpkp-rd", 0, 0.9), _metrics(0.7, 0.7)),
        (_job("a", "cpkp-rd", 0, 0.999), _metrics(0.8, 0.7)),
    ]
    header = format_table(results).splitlines()[0]
    assert "cpkp-rd a=0.9 image" in header and "cpkp-rd a=0.999 image" in header
    rows = list(csv.DictReader(io.StringIO(results_csv(results))))
    assert [r["alpha"] for r in rows] == ["0.9", "0.999"]
    assert rows[1]["fused_image_auroc"] == "0.800000"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    make_demo_dataset(
        root, categories=["brick"], n_train=4, n_test_good=2, n_defect=4, size=64, seed=0
    )
    return root


def _base():
    base = load_preset("cpu_rd_lite0")
    apply_overrides(
        base,
        {
            "data": {"image_size": 64},
            "model": {"backbone": "random:tf_efficientnet_lite0"},
            "train": {"batch_size": 2},
        },
    )
    return base


def test_benchmark_runs_every_combination_then_resumes_without_training(
    demo_root, tmp_path, monkeypatch
):
    out = tmp_path / "bench"
    jobs = plan_jobs(
        "mvtec", demo_root, ["brick"], ["cpkp-rd", "rd@cpkp"], [0], out, _base(), epochs=1
    )
    table = run_benchmark(jobs, out)
    assert (out / "runs/brick/cpkp-rd/seed0/metrics.json").exists()
    assert (out / "runs/brick/rd@cpkp/seed0/metrics.json").exists()
    assert "| brick |" in table and (out / "benchmark.md").read_text().startswith("| category")
    rows = list(csv.DictReader((out / "benchmark.csv").open()))
    assert [r["variant"] for r in rows] == ["cpkp-rd", "rd@cpkp"]
    assert rows[0]["kp_image_auroc"] != "" and rows[1]["kp_image_auroc"] == ""

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Detector, "fit", no_training)
    assert run_benchmark(jobs, out) == table


def test_a_run_folder_of_another_configuration_is_refused(demo_root, tmp_path):
    out = tmp_path / "bench"
    first = plan_jobs("mvtec", demo_root, ["brick"], ["rd@cpkp"], [0], out, _base(), epochs=1)
    run_benchmark(first, out)
    second = plan_jobs("mvtec", demo_root, ["brick"], ["rd@cpkp"], [0], out, _base(), epochs=2)
    with pytest.raises(ConfigError, match=r"another configuration \(differs in train.epochs\)"):
        run_benchmark(second, out)


def test_a_diverging_run_is_marked_failed_and_the_others_go_on(tmp_path, monkeypatch):
    from cpkp.errors import TrainingError

    jobs = [_job("a", "fd", 0), _job("a", "cpkp-rd", 0)]

    def fake_run(job, progress=False):
        if job.variant == "fd":
            raise TrainingError("loss is NaN at epoch 1, batch 2")
        return _metrics(0.9, 0.8)

    monkeypatch.setattr(benchmark, "run_job", fake_run)
    table = run_benchmark(jobs, tmp_path)
    assert table.splitlines()[2] == "| a | failed | **0.900 ± 0.000** / **0.800 ± 0.000** |"
    rows = list(csv.DictReader((tmp_path / "benchmark.csv").open()))
    assert rows[0]["error"] == "loss is NaN at epoch 1, batch 2" and rows[1]["error"] == ""


def test_part_and_defect_type_tables_show_each_part_alone():
    first = _metrics(0.9, 0.8)
    first["kp"] = {
        "overall": {"image_auroc": 0.5},
        "per_defect_type": {"hole": {"image_auroc": 0.25}},
    }
    first["fused"]["per_defect_type"] = {"hole": {"image_auroc": 1.0}}
    first["kd"]["per_defect_type"] = {"hole": {"image_auroc": 0.75}}
    second = _metrics(0.7, 0.8)
    second["fused"]["per_defect_type"] = {"hole": {"image_auroc": 0.5}}
    results = [(_job("a", "cpkp-rd", 0), first), (_job("a", "cpkp-rd", 1), second)]
    parts = benchmark.format_parts_table(results).splitlines()
    assert parts[0].startswith("| category | variant | img fused | img A_kd | img A_kp |")
    assert parts[2].startswith("| a | cpkp-rd | 0.800 ± 0.141 | 0.800 ± 0.141 | 0.500 ± 0.000 |")
    defects = benchmark.format_defect_table(results).splitlines()
    assert defects[2] == "| a | hole | 0.750 (0.750 / 0.250) |"
