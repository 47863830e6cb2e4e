"""Run folders on disk: atomic writes, safetensors weights, JSON/YAML metadata, no pickle.

A run folder holds everything needed to test or predict later::

    config.yaml              the resolved configuration
    model.safetensors        teacher.*, student.*, prototype.* tensors
    meta.json                format version, calibration, training images, history
    train_log.csv            one row per epoch
    checkpoint.safetensors   the last training checkpoint (``cpkp train --resume``)
    source.json              the dataset the run was trained on (``cpkp test`` reads it)
    train.log                the command line's log of the run
    metrics.json, scores.csv, report.html, overlays/   written by ``cpkp test``

These are the files cpkp owns (:data:`RUN_FILES`); replacing a run removes them and nothing
else, so a user's own files in the folder are never deleted.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from cpkp.errors import CheckpointError

FORMAT_VERSION = 1  # bump when the layout of a run folder changes; add a migration below
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TRAIN_LOG = "train_log.csv"
CHECKPOINT_FILE = "checkpoint.safetensors"  # the same name as cpkp.checkpoint.CHECKPOINT_FILE
SOURCE_FILE = "source.json"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
REPORT_FILE = "report.html"
OVERLAYS_DIR = "overlays"

# Outputs computed from one model: stale as soon as another model is saved in their folder.
TEST_FILES = (METRICS_FILE, SCORES_FILE, REPORT_FILE)
# Files of one training run: stale when a model of another run is saved in their folder.
TRAINING_FILES = (CHECKPOINT_FILE, TRAIN_LOG, SOURCE_FILE, LOG_FILE)
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE, *TRAINING_FILES, *TEST_FILES)
# `cpkp export`'s default folder inside a run and its files: stale once another model is saved.
EXPORT_DIR = "export"
EXPORT_FILES = ("model.onnx", "model.json")
# Any of these makes a folder a run folder (one that `cpkp train --out` refuses to reuse).
RUN_MARKERS = (CONFIG_FILE, WEIGHTS_FILE, META_FILE, CHECKPOINT_FILE)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash mid-write leaves the previous file intact and no half-written one behind. The file
    gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask),
    not the private ``0o600`` of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename in (tmp, str(tmp)) or err.filename2 == str(path):
            # The error names the temporary file; the user knows the file being written.
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    """Atomically write YAML (block style, keys in insertion order)."""
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def save_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Atomically write a safetensors file (tensors made contiguous, on the CPU).

    ``metadata`` (JSON-ready) travels inside the same file, so tensors and the values that
    describe them are replaced together or not at all.
    """
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = None if metadata is None else {"cpkp": json.dumps(metadata)}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=header))


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file, with a clear error when it is missing or damaged."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own types for damaged headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def load_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata stored by :func:`save_tensors` in a safetensors file."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        return json.loads(header["cpkp"])
    except Exception as err:  # damaged header, missing key, bad JSON
        raise CheckpointError(f"{path}: no readable cpkp metadata ({err})") from err


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file, naming it in any error."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def check_run_dir(run_dir: Path) -> None:
    """Refuse, with the reason, a path that is not the folder of a finished run.

    Raises:
        CheckpointError: the folder is missing, is a file, or holds no ``meta.json`` (with a
            hint to resume when a checkpoint shows that training was interrupted).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir}: run folder not found")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: is a file, not a run folder")
    if (run_dir / META_FILE).is_file():
        return
    if (run_dir / CHECKPOINT_FILE).is_file():
        raise CheckpointError(
            f"{run_dir}: training did not finish (a checkpoint but no {META_FILE}); "
            f"continue it with `cpkp train --resume {run_dir}`"
        )
    raise CheckpointError(f"{run_dir}: not a cpkp run folder (no {META_FILE})")


def run_markers(run_dir: Path) -> list[Path]:
    """The files of :data:`RUN_MARKERS` in ``run_dir``: empty unless it holds a run."""
    run_dir = Path(run_dir)
    return [run_dir / name for name in RUN_MARKERS if (run_dir / name).is_file()]


def remove_run_files(run_dir: Path, names: Sequence[str], overlays: bool = False) -> list[Path]:
    """Delete the named cpkp files of a run folder, their temporary leftovers, and overlays.

    Only the given names (and ``.<name>.*.tmp`` files that an interrupted atomic write left)
    are removed; with ``overlays``, the PNG files in ``overlays/`` and then the folder when it
    is empty. Any other file stays.

    Returns:
        The paths removed.
    """
    run_dir = Path(run_dir)
    removed = []
    for name in names:
        candidates = [run_dir / name, *run_dir.glob(f".{name}.*.tmp")]
        for path in candidates:
            if path.is_file():
                path.unlink()
                removed.append(path)
    folder = run_dir / OVERLAYS_DIR
    if overlays and folder.is_dir():
        for path in sorted([*folder.glob("*.png"), *folder.glob(".*.png.*.tmp")]):
            path.unlink()
            removed.append(path)
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def remove_stale_export(run_dir: Path) -> list[Path]:
    """Delete the model that ``cpkp export`` wrote into the run's own export folder.

    It was exported from the model being replaced: left in place, ``predict --model`` would
    go on scoring with the old networks, prototype and thresholds. Other files there stay.

    Returns:
        The paths removed.
    """
    folder = Path(run_dir) / EXPORT_DIR
    if not folder.is_dir():
        return []
    removed = remove_run_files(folder, EXPORT_FILES)
    if not any(folder.iterdir()):
        folder.rmdir()
    return removed


def read_meta(run_dir: Path) -> dict[str, Any]:
    """The run's metadata, migrated to the current format version or refused with a reason."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    meta = read_json(run_dir / META_FILE)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{run_dir / META_FILE}: run folder format version {version}; this cpkp reads "
            f"version {FORMAT_VERSION}. Retrain with this version or use the cpkp that wrote it "
            f"({meta.get('cpkp_version', 'unknown version')})."
        )
    return meta


def split_prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries whose key starts with ``prefix + '.'``, with the prefix removed."""
    head = prefix + "."
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}


def with_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``{prefix.key: tensor}`` for every entry."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}
