"""Data-parallel training under torchrun (gloo, 2 CPU processes) against one process.

The torchrun runs go through ``tests/ddp_entry.py``, which is ``cpkp train`` with test hooks:
a GroupNorm RD student (no batch statistics, so 2 x batch b and 1 x batch 2b compute the same
thing), a record of each rank's file writes, a digest of each rank's detector, and an injected
failure. Networks are random (``random:tf_efficientnet_lite0``) at 32 px.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpkp import runio
from cpkp.api import Detector, seed_everything
from cpkp.backbones import create_backbone
from cpkp.distributed import ShardSampler
from cpkp.prototype import build_bank, merge_banks
from cpkp.training import restore_batchnorm, to_sync_batchnorm

ENTRY = Path(__file__).with_name("ddp_entry.py")
BACKBONE = "random:tf_efficientnet_lite0"
N_IMAGES = 8
BATCH = 2  # per process; the single process takes 2 x BATCH
SETTINGS = {"image_size": 32, "epochs": 2, "lr_student": 1e-4, "lr_teacher": 1e-4}
ARGS = [
    "--backbone",
    BACKBONE,
    "--image-size",
    str(SETTINGS["image_size"]),
    "--epochs",
    str(SETTINGS["epochs"]),
    "--lr-student",
    str(SETTINGS["lr_student"]),
    "--lr-teacher",  # 100x the paper's: the teacher moves 40x the tolerance in 4 steps
    str(SETTINGS["lr_teacher"]),
]
TOLERANCE = 1e-5


def _images(folder: Path, n: int = N_IMAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png"
        )
    return folder


def _torchrun(
    tmp: Path, out: Path, env: dict[str, str], batch: int = BATCH, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 tests/ddp_entry.py train ...`` on the test images."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ENTRY),
        "train",
        "--dataset",
        "folder",
        "--normal",
        str(_images(tmp / "good")),
        "--out",
        str(out),
        "--batch-size",
        str(batch),
        *ARGS,
    ]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "CPKP_DIST_TIMEOUT": "60", **env}
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=timeout)


def _entry_module():
    spec = importlib.util.spec_from_file_location("ddp_entry", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def groupnorm_run(tmp_path_factory):
    """One 2-process run with the GroupNorm student: (run folder, process, tmp folder)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "run"
    env = {
        "CPKP_TEST_GROUPNORM": "1",
        "CPKP_TEST_WATCH": str(out),
        "CPKP_TEST_AUDIT": str(tmp / "audit-{rank}.json"),
        "CPKP_TEST_DIGEST": str(tmp / "digest-{rank}.txt"),
    }
    process = _torchrun(tmp, out, env)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return out, process, tmp


# ------------------------------------------------------------------------------ torchrun runs


@pytest.fixture
def one_thread():
    """One intra-op thread, as each torchrun process has (OMP_NUM_THREADS=1).

    With two threads the sums of a convolution's gradient are split differently; Adam turns
    such 1e-7 differences in near-zero gradients into steps of the learning rate's size.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_match_one_process_with_twice_the_batch(
    groupnorm_run, monkeypatch, one_thread
):
    out, _, _ = groupnorm_run
    monkeypatch.setattr("cpkp.api.create_student", _entry_module().groupnorm_student)
    meta = json.loads((out / runio.META_FILE).read_text())
    single = Detector.from_preset(
        "cpu_rd_lite0",
        model={"backbone": BACKBONE},
        data={"image_size": SETTINGS["image_size"]},
        train={
            "epochs": SETTINGS["epochs"],
            "batch_size": 2 * BATCH,
            "lr_student": SETTINGS["lr_student"],
            "lr_teacher": SETTINGS["lr_teacher"],
        },
    )
    logs = single.fit(meta["train_images"], progress=False)
    two = Detector.load(out)

    one_tensors, two_tensors = single._network_tensors(), two._network_tensors()
    assert one_tensors.keys() == two_tensors.keys()
    worst = {
        name: float((one_tensors[name].double() - two_tensors[name].double()).abs().max())
        for name in one_tensors
        if one_tensors[name].numel()
    }
    assert max(worst.values()) <= TOLERANCE, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert torch.equal(single.prototype.provenance, two.prototype.provenance)

    # Not vacuous: the teacher moved from the monitor's weights far beyond the tolerance.
    seed_everything(0)
    start = create_backbone(BACKBONE, quiet=True).state_dict()
    moved = max(
        float((single.teacher.state_dict()[k] - v).abs().max())
        for k, v in start.items()
        if v.is_floating_point()
    )
    assert moved > 30 * TOLERANCE

    for key, value in single.calibration.to_dict().items():
        assert two.calibration.to_dict()[key] == pytest.approx(value, rel=1e-4), key
    with open(out / runio.TRAIN_LOG) as fh:
        rows = list(csv.DictReader(fh))
    for log, row in zip(logs, rows, strict=True):
        assert float(row["kd"]) == pytest.approx(log.kd, rel=1e-4)
        assert float(row["kp"]) == pytest.approx(log.kp, rel=1e-4)
        assert float(row["grad_cosine"]) == pytest.approx(log.grad_cosine, abs=1e-4)


def test_only_rank_0_writes_and_every_rank_ends_with_the_same_detector(groupnorm_run):
    out, process, tmp = groupnorm_run
    rank0 = json.loads((tmp / "audit-0.json").read_text())
    rank1 = json.loads((tmp / "audit-1.json").read_text())
    assert rank1 == []
    written = {Path(event[-1]).name for event in rank0 if event[0] == "os.rename"}
    for name in (runio.CONFIG_FILE, runio.WEIGHTS_FILE, runio.META_FILE, runio.CHECKPOINT_FILE):
        assert name in written  # the record sees rank 0's writes, so rank 1's is not blind
        assert (out / name).is_file()
    assert process.stdout.count("trained in") == 1
    assert "rank 1 of 2" not in (out / runio.LOG_FILE).read_text()

    digests = [(tmp / f"digest-{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]


def test_batchnorm_student_ends_identical_on_every_rank(tmp_path):
    """Per-rank BatchNorm statistics (no SyncBatchNorm on CPUs) are averaged at the end."""
    env = {"CPKP_TEST_DIGEST": str(tmp_path / "digest-{rank}.txt")}
    process = _torchrun(tmp_path, tmp_path / "run", env)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    digests = [(tmp_path / f"digest-{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]
    Detector.load(tmp_path / "run").predict(str(tmp_path / "good"))


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    started = time.perf_counter()
    process = _torchrun(tmp_path, tmp_path / "run", {"CPKP_TEST_FAIL_RANK": "1"})
    assert process.returncode != 0
    assert "rank 1 failed: simulated out of memory in the test" in process.stderr
    assert not (tmp_path / "run" / runio.WEIGHTS_FILE).exists()
    assert time.perf_counter() - started < 60  # torchrun stopped rank 0; nobody hung


# ------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize("n", [8, 10, 11])
def test_shards_of_an_epoch_form_the_single_process_batches(n):
    """Global batch k of 2 ranks with batch b is batch k of one process with batch 2b.

    With 11 images the shards are padded to 6 each: the last global batch also holds the one
    repeated image.
    """
    dataset = list(range(n))
    single = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, generator=single)
    shared = [torch.Generator().manual_seed(3) for _ in range(2)]
    shard_loaders = [
        torch.utils.data.DataLoader(
            dataset,
            batch_size=2,
            sampler=ShardSampler(dataset, True, shared[r], num_replicas=2, rank=r),
            generator=shared[r],
        )
        for r in (0, 1)
    ]
    for _ in range(3):  # epochs: the generators must stay in step
        expected = [sorted(batch.tolist()) for batch in loader]
        shards = [[batch.tolist() for batch in shard] for shard in shard_loaders]
        got = [sorted(a + b) for a, b in zip(*shards, strict=True)]
        padding = sum(len(batch) for shard in shards for batch in shard) - n
        assert len(got) == len(expected)
        assert got[:-1] == expected[:-1]
        assert len(got[-1]) == len(expected[-1]) + padding
        assert set(got[-1]) >= set(expected[-1])
    assert torch.equal(single.get_state(), shared[0].get_state())
    assert torch.equal(shared[0].get_state(), shared[1].get_state())


def test_unpadded_shards_cover_every_image_once():
    dataset = list(range(11))
    shards = [
        list(ShardSampler(dataset, False, pad=False, num_replicas=3, rank=r)) for r in (0, 1, 2)
    ]
    assert sorted(sum(shards, [])) == dataset
    assert [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.parametrize("max_bank", [10_000, 50])
def test_merged_banks_equal_the_single_pass_bank(max_bank):
    from cpkp.config import PrototypeConfig

    cfg = PrototypeConfig(max_bank=max_bank, chunk_size=7)
    torch.manual_seed(0)
    aggs = [torch.randn(1, 6, 3, 4) for _ in range(9)]  # one image each, grid 3 x 4
    whole = build_bank(((a, torch.tensor([i])) for i, a in enumerate(aggs)), cfg, seed=5)
    parts = [
        build_bank(((aggs[i], torch.tensor([i])) for i in range(r, 9, 2)), PrototypeConfig(), 0)
        for r in (0, 1)
    ]
    merged = merge_banks([p[0] for p in parts], [p[1] for p in parts], (3, 4), cfg, seed=5)
    assert torch.equal(merged[0], whole[0])
    assert torch.equal(merged[1], whole[1])


def test_sync_batchnorm_swap_keeps_tensors_and_restores_the_layers():
    network = create_backbone(BACKBONE, quiet=True)  # timm BatchNormAct2d layers
    before = {name: type(m) for name, m in network.named_modules()}
    weights = {name: p for name, p in network.named_parameters()}
    x = torch.rand(1, 3, 32, 32)
    network.eval()
    with torch.no_grad():
        reference = [f.clone() for f in network(x)]

    swapped = to_sync_batchnorm(network)
    assert swapped and all(
        isinstance(m, torch.nn.SyncBatchNorm)
        for m in network.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    )
    assert all(p is weights[name] for name, p in network.named_parameters())
    with torch.no_grad():  # eval mode: SyncBatchNorm needs no process group; act kept
        for a, b in zip(network(x), reference):
            torch.testing.assert_close(a, b)

    restore_batchnorm(swapped)
    assert {name: type(m) for name, m in network.named_modules()} == before
    assert all(p is weights[name] for name, p in network.named_parameters())
