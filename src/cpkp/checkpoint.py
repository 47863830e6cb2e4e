"""Training checkpoints: everything a killed run needs to continue bit-identically.

``checkpoint.safetensors`` holds the teacher, the student, the prototype and both optimisers'
tensors, and in its JSON header the epoch, the optimisers' hyper-parameters, every random state
(Python, NumPy, torch, the data-order generator) and the epoch logs. No pickle anywhere.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cpkp import runio
from cpkp.errors import CheckpointError

CHECKPOINT_FILE = "checkpoint.safetensors"


def optimizer_to_flat(optimizer: torch.optim.Optimizer, prefix: str):
    """Split an optimiser's state dict into tensors (for safetensors) and JSON values.

    Returns:
        (tensors, plain): ``{prefix.state.<param>.<key>: tensor}`` and a JSON-ready dict with
        the param groups and the non-tensor state values.
    """
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.state.{index}.{key}"] = value
            else:
                plain_state.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain_state}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], plain: dict[str, Any], prefix
) -> None:
    """Inverse of :func:`optimizer_to_flat`, loaded into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            index, key = name[len(head) :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, values in plain["plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = plain["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def random_states(generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random state that training consumes: torch (CPU, CUDA), data order, NumPy, Python."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.data_order": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, plain


def restore_random_states(
    tensors: dict[str, Tensor], plain: dict[str, Any], generator: torch.Generator
) -> None:
    """Inverse of :func:`random_states`."""
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.data_order"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def write_checkpoint(run_dir: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """One atomic file: the tensors and, in its header, the JSON state that goes with them."""
    runio.save_tensors(run_dir / CHECKPOINT_FILE, tensors, metadata=meta)


def read_checkpoint(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The checkpoint of a run folder, or a clear error naming what is missing."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no {CHECKPOINT_FILE} to resume from (a run writes one every "
            "train.checkpoint_every epochs)"
        )
    meta = runio.load_metadata(path)
    if meta.get("format_version") != runio.FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')}; this cpkp reads "
            f"version {runio.FORMAT_VERSION}"
        )
    return runio.load_tensors(path), meta
