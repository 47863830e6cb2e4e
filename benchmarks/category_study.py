"""Train CPKP(RD) on one category and study its image scores; one JSON line per run.

What docs/benchmarks.md's grass study ran: the demo preset with ``--set`` overrides, then
image AUROC of the fused map, of each part, per defect kind, of the maximum inside a margin,
of the mean of the top-k pixels, and where the good images' maxima lie; ``--sigmas`` and
``--gammas`` rescore the same run with other smoothing and fusion weights (no retraining).

    python benchmarks/category_study.py --data demo-data --category grass --set train.seed=1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from cpkp.api import Detector
from cpkp.config import apply_overrides, load_preset
from cpkp.data.readers import read_mvtec
from cpkp.evaluate import run_test

MARGINS = (8, 16, 32)  # pixels left out at each border
TOP_K = (10, 100, 1000)  # pixels averaged for the top-k image score


def main() -> None:
    args = _parser().parse_args()
    config = load_preset(args.preset)
    apply_overrides(config, _overrides(args.set), source="--set")
    splits = read_mvtec(Path(args.data), args.category)

    start = time.perf_counter()
    detector = Detector(config)
    detector.fit(splits.train, run_dir=args.run, progress=False)
    result = {"category": args.category, "set": args.set, "seconds": 0.0}
    result |= _study(detector, splits.test)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))

    for sigma in args.sigmas:
        for gamma in args.gammas:
            detector.config.scoring.sigma, detector.config.scoring.gamma = sigma, gamma
            outputs = run_test(detector, splits.test, overlays=False, progress=False)
            auroc = roc_auc_score(outputs.labels, outputs.scores["fused"])
            print(json.dumps({"sigma": sigma, "gamma": gamma, "img_fused": round(auroc, 3)}))


def _study(detector: Detector, samples) -> dict:
    outputs = run_test(detector, samples, out_dir=None, overlays=False, progress=False)
    labels = outputs.labels
    kinds = np.array([s.defect_type for s in outputs.samples])
    maps = outputs.maps["fused"]  # [N, S, S]
    side = maps.shape[-1]
    flat = maps.reshape(len(maps), -1)

    result = {f"img_{part}": _auroc(labels, s) for part, s in outputs.scores.items()}
    for m in (m for m in MARGINS if 2 * m < side):
        inner = maps[:, m : side - m, m : side - m].reshape(len(maps), -1).max(1)
        result[f"img_margin{m}"] = _auroc(labels, inner)
    for k in TOP_K:
        result[f"img_top{k}"] = _auroc(labels, np.sort(flat, 1)[:, -k:].mean(1))
    for kind in sorted(set(kinds[labels == 1])):
        chosen = (labels == 0) | (kinds == kind)
        result[f"kind_{kind}"] = _auroc(labels[chosen], outputs.scores["fused"][chosen])

    rows, cols = np.divmod(flat.argmax(1), side)
    edge = np.minimum(np.minimum(rows, cols), np.minimum(side - 1 - rows, side - 1 - cols))
    result["good_max_edge_distance_median"] = float(np.median(edge[labels == 0]))
    return result


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return round(float(roc_auc_score(labels, scores)), 3)


def _overrides(items: list[str]) -> dict:
    """``section.key=value`` strings as {section: {key: value}}, values read as YAML."""
    raw: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="root of an MVTec-layout dataset (demo-data)")
    p.add_argument("--category", required=True, help="category to train and test")
    p.add_argument("--preset", default="cpu_rd_lite0", help="preset or YAML file")
    p.add_argument("--set", action="append", default=[], help="section.key=value override")
    p.add_argument("--run", help="run folder to write (default: none)")
    p.add_argument("--sigmas", type=float, nargs="*", default=[], help="rescore: sigmas (px)")
    p.add_argument("--gammas", type=float, nargs="*", default=[0.5], help="rescore: gammas")
    return p


if __name__ == "__main__":
    main()
