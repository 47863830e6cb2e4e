"""``cpkp demo``: the demo dataset, CPKP(RD) and ``rd@cpkp`` trained and tested per category.

The table shows, per category, image AUROC, pixel AUROC and AUPRO of CPKP(RD), and image AUROC of
``A_kd`` alone, ``A_kp`` alone, the fused score and ``rd@cpkp``, so the gain of each part is
visible.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cpkp import runio
from cpkp.api import Detector
from cpkp.config import Config, apply_overrides, load_preset
from cpkp.data.demo import DEMO_CATEGORIES, make_demo_dataset
from cpkp.data.readers import read_mvtec
from cpkp.evaluate import run_test

logger = logging.getLogger(__name__)

PRESET = "cpu_rd_lite0"
BASELINE = {"train": {"co_progression": False}, "prototype": {"enabled": False}}


def run_demo(
    out: Path,
    categories: list[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> str:
    """Build the data under ``out/data``, train and test every category; return the table."""
    categories = list(categories or DEMO_CATEGORIES)
    for overrides in ({}, BASELINE):  # every option checked before the data is written
        _config(overrides, epochs, seed)
    make_demo_dataset(out / "data", seed=seed, categories=categories)
    rows = []
    for category in categories:
        start = time.perf_counter()
        splits = read_mvtec(out / "data", category)
        cpkp_metrics = _train_and_test(
            out / "runs" / category / "cpkp-rd", splits, {}, epochs, seed, progress
        )
        base_metrics = _train_and_test(
            out / "runs" / category / "rd@cpkp", splits, BASELINE, epochs, seed, progress
        )
        rows.append(_row(category, cpkp_metrics, base_metrics, time.perf_counter() - start))
    table = format_demo_table(rows)
    runio.write_text(out / "results.md", table + "\n")
    runio.write_json(out / "results.json", rows)
    return table


def _train_and_test(
    run_dir: Path, splits, overrides: dict, epochs: int | None, seed: int, progress: bool
) -> dict[str, Any]:
    detector = Detector(_config(overrides, epochs, seed))
    detector.fit(splits.train, run_dir=run_dir, progress=progress)
    return run_test(
        detector, splits.test, out_dir=run_dir, overlays=True, progress=progress
    ).metrics


def _config(overrides: dict, epochs: int | None, seed: int) -> Config:
    """The demo preset with the variant's switches, epochs and seed; ConfigError when invalid."""
    config = load_preset(PRESET)
    apply_overrides(config, overrides)
    config.train.seed = seed
    if epochs is not None:
        config.train.epochs = epochs
    return config.validate()


def _row(category: str, cpkp_m: dict, base_m: dict, seconds: float) -> dict[str, Any]:
    fused = cpkp_m["fused"]["overall"]
    return {
        "category": category,
        "image_auroc": fused.get("image_auroc"),
        "pixel_auroc": fused.get("pixel_auroc"),
        "aupro": fused.get("aupro"),
        "kd_image_auroc": cpkp_m["kd"]["overall"].get("image_auroc"),
        "kp_image_auroc": cpkp_m["kp"]["overall"].get("image_auroc"),
        "rd_image_auroc": base_m["fused"]["overall"].get("image_auroc"),
        "seconds": round(seconds, 1),
    }


COLUMNS = [
    ("category", "category"),
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("kd_image_auroc", "img A_kd"),
    ("kp_image_auroc", "img A_kp"),
    ("image_auroc", "img fused"),
    ("rd_image_auroc", "img rd@cpkp"),
    ("seconds", "time (s)"),
]


def format_demo_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per category plus the mean."""
    header = "| " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows + [_mean_row(rows)]:
        cells = [_fmt(row.get(key)) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"category": "mean"}
    for key, _ in COLUMNS[1:]:
        values = [r[key] for r in rows if r.get(key) is not None]
        mean[key] = sum(values) / len(values) if values else None
    return mean


def _fmt(value: Any) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, float):
        return f"{value:.3f}" if value <= 1.0 else f"{value:.0f}"
    return str(value)
