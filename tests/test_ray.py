"""`cpkp benchmark --executor ray`: the same runs and tables as in-process, on a local Ray."""

from __future__ import annotations

import faulthandler
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cpkp.benchmark import Job, plan_jobs, run_benchmark
from cpkp.cli import main
from cpkp.config import apply_overrides, load_preset
from cpkp.data.demo import make_demo_dataset
from cpkp.errors import ConfigError, DatasetError
from cpkp.ray_executor import RayExecutor

# A Ray that never starts or never schedules fails the suite instead of hanging it. The module
# takes 35-60 s on 2 idle cores; 240 s fired on 2 cores shared with a training run.
HANG_GUARD_S = 900


def _base(**train):
    base = load_preset("cpu_rd_lite0")
    apply_overrides(
        base,
        {
            "data": {"image_size": 64},
            "model": {"backbone": "random:tf_efficientnet_lite0"},
            "train": {"batch_size": 2, "device": "cpu", **train},
        },
    )
    return base


def _plan(root: Path, out: Path):
    """Two runs that train, and one whose student diverges at its first batch."""
    good = plan_jobs("mvtec", root, ["brick"], ["cpkp-rd", "rd@cpkp"], [0], out, _base(), epochs=1)
    bad = _base(lr_student=1e30)
    diverging = plan_jobs("mvtec", root, ["brick"], ["cpkp-fd"], [0], out, bad, epochs=1)
    return good, diverging


def _executor(temp_dir: str) -> RayExecutor:
    return RayExecutor(num_cpus=2, cpus_per_run=1, progress=False, temp_dir=temp_dir)


@pytest.fixture(scope="module")
def ray_env():
    """Ray offline and without side effects outside a temporary session folder."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cpkp[ray]')")
    # Short path: Ray's Unix sockets live under it (at most 107 characters).
    temp_dir = tempfile.mkdtemp(prefix="cpkp-ray-")
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.setenv("RAY_AUTH_MODE", "disabled")  # no token file written into ~/.ray
        try:
            yield temp_dir
        finally:
            if ray.is_initialized():
                ray.shutdown()
            faulthandler.cancel_dump_traceback_later()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory, ray_env):
    """The same jobs in-process (one torch thread, as each Ray task gets) and on Ray."""
    root = tmp_path_factory.mktemp("ray-data")
    make_demo_dataset(
        root, categories=["brick"], n_train=4, n_test_good=2, n_defect=4, size=64, seed=0
    )
    local, ray_out = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_benchmark([job for jobs in _plan(root, local) for job in jobs], local)
    finally:
        torch.set_num_threads(threads)
    good, diverging = _plan(root, ray_out)
    run_benchmark(good + diverging, ray_out, execute=_executor(ray_env))
    return root, local, ray_out, good


def test_ray_runs_give_the_in_process_tables(benchmarks, ray_env):
    import ray

    _, local, ray_out, _ = benchmarks
    assert not ray.is_initialized()  # the executor stopped the instance it started
    assert list(Path(ray_env).glob("session_*/logs"))  # ... which did run
    for name in ("benchmark.csv", "benchmark.md"):
        assert (ray_out / name).read_text() == (local / name).read_text()
    rows = (ray_out / "benchmark.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["cpkp-rd", "rd@cpkp", "cpkp-fd"]
    assert "became nan" in rows[3]  # the diverging run is recorded, the others went on
    assert (ray_out / "runs/brick/cpkp-rd/seed0/metrics.json").exists()
    assert (ray_out / "runs/brick/rd@cpkp/seed0/metrics.json").exists()


def test_a_rerun_on_ray_skips_finished_runs(benchmarks, tmp_path):
    _, _, ray_out, good = benchmarks
    runs = sorted(p for p in (ray_out / "runs").rglob("*") if p.is_file())
    written = {p: p.stat().st_mtime_ns for p in runs}
    rows = (ray_out / "benchmark.csv").read_text().splitlines()
    fresh_session = tmp_path / "ray"

    run_benchmark(good, ray_out, execute=_executor(str(fresh_session)))

    assert {p: p.stat().st_mtime_ns for p in runs} == written  # nothing trained or tested again
    assert not fresh_session.exists()  # finished runs are read here: Ray was not even started
    assert (ray_out / "benchmark.csv").read_text().splitlines() == rows[:3]


def test_a_dataset_mistake_in_a_worker_stops_the_benchmark(benchmarks, ray_env, tmp_path):
    import ray

    _, _, _, good = benchmarks
    missing = replace(good[0], root=str(tmp_path / "nowhere"), run_dir=str(tmp_path / "run"))

    with pytest.raises(DatasetError, match="nowhere"):
        run_benchmark([missing], tmp_path, execute=_executor(ray_env))
    assert not ray.is_initialized()


def test_ray_options_are_refused_without_the_ray_executor(capsys, tmp_path):
    argv = ["benchmark", "--dataset", "mvtec", "--root", str(tmp_path), "--out", str(tmp_path)]
    assert main([*argv, "--address", "auto"]) == 2
    assert "--address is an option of --executor ray" in capsys.readouterr().err
    assert main([*argv, "--executor", "ray", "--cpus-per-run", "0"]) == 2
    assert "--cpus-per-run 0: expected at least 1" in capsys.readouterr().err


def test_the_ray_executor_without_ray_says_what_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    argv = ["benchmark", "--dataset", "mvtec", "--root", str(tmp_path), "--out", str(tmp_path)]
    assert main([*argv, "--executor", "ray"]) == 2
    assert "pip install 'cpkp[ray]'" in capsys.readouterr().err


def test_an_address_where_no_ray_answers_is_refused_at_once(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cpkp[ray]')")
    job = Job("mvtec", str(tmp_path), "brick", "rd@cpkp", 0, None, str(tmp_path / "run"), {})
    execute = RayExecutor(address="127.0.0.1:1", progress=False)  # nothing listens on port 1

    with pytest.raises(ConfigError, match="--address 127.0.0.1:1: cannot reach 127.0.0.1:1"):
        run_benchmark([job], tmp_path, execute=execute)
