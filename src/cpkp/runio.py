"""Run folders on disk: atomic writes, safetensors weights, JSON/YAML metadata, no pickle.

A run folder holds everything needed to test or predict later::

    config.yaml          the resolved configuration
    model.safetensors    teacher.*, student.*, prototype.* tensors
    meta.json            format version, calibration, training images, history
    train_log.csv        one row per epoch
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash mid-write leaves the previous file intact and no half-written one behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_meta(run_dir: Path) -> dict[str, Any]:
    """The run's metadata, migrated to the current format version or refused with a reason."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder not found")
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
