"""``cpkp train`` under torchrun with the hooks tests/test_distributed.py needs.

Run as ``torchrun --nproc-per-node 2 tests/ddp_entry.py train ...``. Environment variables:

- ``CPKP_TEST_GROUPNORM=1``: the RD student normalises with GroupNorm, which has no batch
  statistics, so 2 processes with batch b and 1 process with batch 2b compute the same thing.
- ``CPKP_TEST_WATCH=DIR`` and ``CPKP_TEST_AUDIT=FILE``: every rank records each file it
  creates, writes, renames or removes under DIR (Python's audit hooks) into FILE, in which
  ``{rank}`` is replaced by the rank.
- ``CPKP_TEST_DIGEST=FILE``: every rank writes a SHA-256 of its trained detector (weights,
  BatchNorm statistics, prototype, calibration) into FILE (``{rank}`` as above).
- ``CPKP_TEST_FAIL_RANK=N``: rank N raises at its second training step.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

from torch import nn

RANK = int(os.environ.get("RANK", "0"))
CHANGES = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(4 if channels % 4 == 0 else 1, channels)


def groupnorm_student(variant: str, teacher_name: str, channels: tuple[int, int, int]):
    """``cpkp.models.create_student`` for ``rd`` with GroupNorm in place of BatchNorm."""
    from cpkp.backbones import backbone_signed_maps
    from cpkp.models import RDStudent

    assert variant == "rd"
    signed = backbone_signed_maps(teacher_name)
    return RDStudent(channels, norm_layer=group_norm, signed_maps=signed)


def use_groupnorm_student() -> None:
    import cpkp.api

    cpkp.api.create_student = groupnorm_student


def audit_writes(watch: Path, record: Path) -> None:
    """Record writes under ``watch`` into ``record`` when the process ends."""
    events: list[list[str]] = []
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(path) -> bool:
        try:
            return Path(os.fsdecode(path)).absolute().is_relative_to(watch)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & writes
            )
            if writing and under(args[0]):
                events.append([event, os.fsdecode(args[0])])
        elif event in CHANGES:
            paths = [os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if any(under(path) for path in paths):
                events.append([event, *paths])

    sys.addaudithook(hook)
    atexit.register(lambda: record.write_text(json.dumps(events)))


def digest_detector(record: Path) -> None:
    """Write a digest of the detector that ``Detector.fit`` trained when the process ends."""
    import cpkp.api

    fit = cpkp.api.Detector.fit
    trained = []

    def remembering_fit(self, *args, **kwargs):
        trained.append(self)
        return fit(self, *args, **kwargs)

    def write() -> None:
        if not trained:
            return
        detector = trained[0]
        digest = hashlib.sha256()
        for name, tensor in sorted(detector._network_tensors().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(json.dumps(detector.calibration.to_dict(), sort_keys=True).encode())
        record.write_text(digest.hexdigest())

    cpkp.api.Detector.fit = remembering_fit
    atexit.register(write)


def fail_on_rank(rank: int) -> None:
    from cpkp.training import CoProgressionTrainer

    step = CoProgressionTrainer.train_step
    calls = []

    def failing_step(self, x, measure_gradients=False):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory in the test")
        return step(self, x, measure_gradients)

    if rank == RANK:
        CoProgressionTrainer.train_step = failing_step


if __name__ == "__main__":
    if os.environ.get("CPKP_TEST_GROUPNORM") == "1":
        use_groupnorm_student()
    if os.environ.get("CPKP_TEST_WATCH"):
        audit = Path(os.environ["CPKP_TEST_AUDIT"].format(rank=RANK))
        audit_writes(Path(os.environ["CPKP_TEST_WATCH"]), audit)
    if os.environ.get("CPKP_TEST_DIGEST"):
        digest_detector(Path(os.environ["CPKP_TEST_DIGEST"].format(rank=RANK)))
    if os.environ.get("CPKP_TEST_FAIL_RANK"):
        fail_on_rank(int(os.environ["CPKP_TEST_FAIL_RANK"]))

    from cpkp.cli import main

    sys.exit(main(sys.argv[1:]))
