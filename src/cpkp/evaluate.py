"""Testing a trained detector on a labelled test split: metrics, scores and overlays on disk.

Writes into the run folder (or ``out_dir``):

    metrics.json    fused score, A_kd alone and A_kp alone; overall and per defect type
    scores.csv      one row per image: path, label, defect type, scores, prediction
    overlays/       input | ground truth | anomaly map | thresholded region
    report.html     the page a person opens: metrics, curves, gallery (cpkp.html_report)
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cpkp import runio
from cpkp.api import Detector
from cpkp.data.dataset import ImageDataset, validate_images
from cpkp.data.images import load_mask, resize_mask
from cpkp.data.records import Sample
from cpkp.errors import DatasetError
from cpkp.html_report import write_run_report
from cpkp.metrics import compute_metrics
from cpkp.report import overlay_panel

logger = logging.getLogger(__name__)

PARTS = ("fused", "kd", "kp")  # the fused map and each part alone


@dataclass
class TestOutputs:
    """Everything a test pass produced, kept in memory for reports."""

    samples: list[Sample]
    scores: dict[str, np.ndarray]  # part -> [N]
    maps: dict[str, np.ndarray]  # part -> [N, S, S] float32 at the model size
    masks: np.ndarray  # [N, S, S] bool
    labels: np.ndarray  # [N] int
    metrics: dict[str, Any] = field(default_factory=dict)
    kp_index: np.ndarray | None = None  # [N, h, w] nearest prototype per grid cell, or None


def run_test(
    detector: Detector,
    samples: Sequence[Sample],
    out_dir: str | Path | None = None,
    overlays: bool = True,
    progress: bool = True,
    report: bool = True,
) -> TestOutputs:
    """Score every test sample, compute the metrics and write the outputs.

    Args:
        detector: a fitted detector.
        samples: labelled test samples (masks where the dataset has them).
        out_dir: where to write ``metrics.json``, ``scores.csv`` and ``overlays/``; nothing is
            written when None.
        overlays: write one overlay PNG per test image.
        progress: show a progress bar.
        report: write ``report.html`` (:func:`cpkp.html_report.write_run_report`).
    """
    samples = list(samples)
    if not samples:
        raise DatasetError("the test split holds no images")
    validate_images(samples)
    dataset = ImageDataset(samples, detector.image_size)  # squashed, for overlays and report
    outputs = _score_all(detector, samples, progress)
    outputs.metrics = _metrics(outputs)
    if out_dir is not None:
        write_outputs(detector, dataset, outputs, Path(out_dir), overlays, report)
    return outputs


def _score_all(detector: Detector, samples: list[Sample], progress: bool) -> TestOutputs:
    """Score every sample as ``predict`` does; maps and masks on the S x S evaluation grid.

    Scores come from each image's own map (tiles stitched, padding cut off, inside the region
    of interest); the maps are then brought to S x S, where the masks are (DESIGN.md §1.4),
    so that every resize mode is evaluated on the same grid.
    """
    side = detector.image_size
    scores = {p: [] for p in PARTS}
    maps = {p: [] for p in PARTS}
    masks, kp_index = [], []
    stream = detector.image_maps(samples, parts=True)
    for item in tqdm(stream, total=len(samples), desc="testing", disable=not progress):
        for name in PARTS:
            if name in item.maps:
                maps[name].append(item.map_at((side, side), name).numpy())
                scores[name].append(item.score(name))
        masks.append(_mask(samples[item.index], item.layout.image, side))
        if item.kp_index is not None:
            kp_index.append(item.kp_index.numpy())
    return TestOutputs(
        samples=samples,
        scores={k: np.asarray(v, dtype=np.float32) for k, v in scores.items() if v},
        maps={k: np.stack(v) for k, v in maps.items() if v},
        masks=np.stack(masks),
        labels=np.array([s.label for s in samples], dtype=int),
        kp_index=np.stack(kp_index) if kp_index else None,
    )


def _mask(sample: Sample, size: tuple[int, int], side: int) -> np.ndarray:
    """The sample's ground truth at side x side: [side, side] bool (all False without one)."""
    if not sample.masks:
        return np.zeros((side, side), dtype=bool)
    return resize_mask(load_mask(sample.masks, size), side)[0].numpy() > 0.5


def _metrics(outputs: TestOutputs) -> dict[str, Any]:
    names = [str(s.image) for s in outputs.samples]
    types = [s.defect_type for s in outputs.samples]
    has_masks = any(len(s.masks) > 0 for s in outputs.samples)
    result = {}
    # The fused score and each part meet the same undefined metric or empty mask: say it once.
    once = _OncePerMessage()
    metrics_logger = logging.getLogger(compute_metrics.__module__)
    metrics_logger.addFilter(once)
    try:
        for part, scores in outputs.scores.items():
            result[part] = compute_metrics(
                scores,
                outputs.labels,
                maps=outputs.maps[part] if has_masks else None,
                masks=outputs.masks if has_masks else None,
                defect_types=types,
                names=names,
            )
    finally:
        metrics_logger.removeFilter(once)
    return result


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def write_outputs(
    detector: Detector,
    dataset: ImageDataset,
    outputs: TestOutputs,
    out_dir: Path,
    overlays: bool,
    report: bool = True,
) -> None:
    """metrics.json, scores.csv and (optionally) overlays/ and report.html under ``out_dir``.

    A previous test's outputs there are removed first, so an overlay or report that is not
    written again cannot be mistaken for this test's.
    """
    stale = runio.remove_run_files(out_dir, runio.TEST_FILES, overlays=True)
    if stale:
        logger.info("%s: removed %d files of the previous test", out_dir, len(stale))
    runio.write_json(out_dir / runio.METRICS_FILE, outputs.metrics)
    runio.write_text(out_dir / runio.SCORES_FILE, _scores_csv(detector, outputs))
    if overlays:
        _write_overlays(detector, dataset, outputs, out_dir / runio.OVERLAYS_DIR)
    if report:
        write_run_report(detector, outputs, out_dir, dataset)
    logger.info("test results written to %s", out_dir)


def _scores_csv(detector: Detector, outputs: TestOutputs) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    parts = [p for p in PARTS if p in outputs.scores]
    writer.writerow(
        ["path", "label", "defect_type", "score", "prediction"]
        + [f"score_{p}" for p in parts if p != "fused"]
    )
    threshold = detector.calibration.image_threshold
    for i, sample in enumerate(outputs.samples):
        score = float(outputs.scores["fused"][i])
        writer.writerow(
            [str(sample.image), sample.label, sample.defect_type, f"{score:.6g}"]
            + [int(score > threshold)]  # a score equal to the threshold is normal
            + [f"{float(outputs.scores[p][i]):.6g}" for p in parts if p != "fused"]
        )
    return buffer.getvalue()


def _write_overlays(
    detector: Detector, dataset: ImageDataset, outputs: TestOutputs, folder: Path
) -> None:
    fused = outputs.maps["fused"]
    low, high = np.percentile(fused, [1.0, 99.9])
    threshold = detector.calibration.pixel_threshold
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(outputs.samples):
        image = dataset[i]["image"].permute(1, 2, 0).numpy()
        panel = overlay_panel(image, outputs.masks[i], fused[i], threshold, low, high)
        name = f"{sample.defect_type}_{Path(sample.image).stem}.png"
        runio.atomic_write(folder / name, lambda tmp, p=panel: Image.fromarray(p).save(tmp, "PNG"))


def metrics_table_rows(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one run's metrics: image/pixel AUROC, AUPRO, F1-max per part."""
    rows = {}
    for part, values in metrics.items():
        overall = values.get("overall", values)
        rows[part] = {
            k: overall.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
        }
    return rows
