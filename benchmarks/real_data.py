"""CPKP(RD), CPKP(FD), rd@cpkp and fd@cpkp on the real inspection datasets of ../shared/data.

Trains and tests every (dataset, variant, seed) with the CPU preset, skipping runs whose
metrics.json already exists (so an interrupted benchmark resumes), and prints image AUROC, pixel
AUROC and AUPRO as mean ± std over seeds per dataset and variant.

    .venv/bin/python benchmarks/real_data.py --data ../shared/data --out runs/real --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from cpkp.api import Detector
from cpkp.data.readers import read_mvtec
from cpkp.evaluate import run_test

DATASETS = {"magnetic_tile": ("magnetic_tile", "magnetic_tile"), "mpdd": ("mpdd", "metal_plate")}
SWITCHES_OFF = {"train": {"co_progression": False}, "prototype": {"enabled": False}}
VARIANTS = {
    "cpkp-rd": {},
    "cpkp-fd": {"model": {"variant": "fd"}},
    "rd@cpkp": SWITCHES_OFF,
    "fd@cpkp": {"model": {"variant": "fd"}, **SWITCHES_OFF},
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_one(data: Path, dataset: str, variant: str, seed: int, out: Path, epochs: int | None):
    """Train and test one combination unless its metrics already exist; return them."""
    folder, category = DATASETS[dataset]
    run = out / dataset / variant / f"seed{seed}"
    if (run / "metrics.json").exists():
        return json.loads((run / "metrics.json").read_text())
    overrides = json.loads(json.dumps(VARIANTS[variant]))
    overrides.setdefault("train", {})["seed"] = seed
    if epochs is not None:
        overrides["train"]["epochs"] = epochs
    splits = read_mvtec(data / folder, category)
    start = time.perf_counter()
    detector = Detector.from_preset("cpu_rd_lite0", **overrides)
    detector.fit(splits.train, run_dir=run, progress=False)
    metrics = run_test(detector, splits.test, out_dir=run, overlays=False, progress=False).metrics
    logging.info("%s %s seed %d: %.0f s", dataset, variant, seed, time.perf_counter() - start)
    return metrics


def summary_table(results: dict) -> str:
    """Markdown: one row per dataset and variant, mean ± std over seeds of each metric."""
    lines = ["| dataset | variant | seeds | " + " | ".join(METRICS) + " |", "|---" * 6 + "|"]
    for (dataset, variant), runs in results.items():
        cells = []
        for name in METRICS:
            values = [r["fused"]["overall"][name] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        lines.append(f"| {dataset} | {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/real"))
    parser.add_argument("--datasets", default="mpdd,magnetic_tile")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("cpkp").setLevel(logging.WARNING)

    results: dict = {}
    for dataset in args.datasets.split(","):
        for variant in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                metrics = run_one(args.data, dataset, variant, seed, args.out, args.epochs)
                results.setdefault((dataset, variant), []).append(metrics)
                table = summary_table(results)
                (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
