"""Benchmark of the knowledge prototype: coreset selection and nearest-prototype search.

For each bank size (576-dim float16 vectors, coreset ratio 1%) this measures, each size in a
fresh subprocess so peak memory (``getrusage`` max RSS) does not carry over:

- ``greedy_coreset`` (the fast default): build time, peak RSS, covering radius in full
  dimension (largest distance from a bank vector to its nearest prototype, chunked);
- nearest-prototype search: queries per second for 4096 queries against the M prototypes;
- the reference ``greedy_coreset_exact`` (full dimension, one distance column per step) under a
  time budget: when it would not finish, it runs as many steps as the budget allows and its
  time is extrapolated linearly (every step costs the same full pass), and said so.

The bank is synthetic but structured: a Gaussian mixture of 256 components with Zipf-like
weights, each a random mean plus a rank-8 spread plus small isotropic noise, the way patch
features form a few common and many rare patterns of low intrinsic dimension. Isotropic noise
would make every pair of points equally far apart, which no feature bank is.

    .venv/bin/python benchmarks/prototype.py                       # 50k, 200k, 1M
    .venv/bin/python benchmarks/prototype.py --sizes 50000,200000  # quick run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

import torch

from cpkp.prototype import greedy_coreset, greedy_coreset_exact, nearest_prototype

COMPONENTS = 256
RANK = 8
SPREAD = 4.0  # standard deviation along each of the RANK directions of a component
NOISE = 0.1  # isotropic standard deviation per dimension


def mixture_bank(n: int, dim: int, seed: int, sample_seed: int) -> torch.Tensor:
    """``[n, dim]`` float16 draws from the mixture fixed by ``seed``, in random order."""
    params = torch.Generator().manual_seed(seed)
    means = torch.randn(COMPONENTS, dim, generator=params)
    bases = torch.randn(COMPONENTS, RANK, dim, generator=params)
    bases = SPREAD * bases / bases.norm(dim=2, keepdim=True)
    weights = 1.0 / torch.arange(1, COMPONENTS + 1, dtype=torch.float64) ** 0.8

    draws = torch.Generator().manual_seed(sample_seed)
    label = torch.multinomial(weights, n, replacement=True, generator=draws)
    label = label.sort().values  # generate component by component...
    where = torch.randperm(n, generator=draws)  # ...into random rows
    bank = torch.empty(n, dim, dtype=torch.float16)
    counts = torch.bincount(label, minlength=COMPONENTS).tolist()
    start = 0
    for component, count in enumerate(counts):
        for first in range(0, count, 65_536):
            rows = min(65_536, count - first)
            x = torch.randn(rows, RANK, generator=draws) @ bases[component]
            x += means[component]
            x += NOISE * torch.randn(rows, dim, generator=draws)
            bank[where[start + first : start + first + rows]] = x.half()
        start += count
    return bank


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def covering_radius(bank: torch.Tensor, chosen: torch.Tensor) -> float:
    """Largest full-dimension distance from a bank vector to its nearest chosen vector."""
    prototypes = bank[chosen]
    radius = 0.0
    for start in range(0, len(bank), 65_536):
        distances, _ = nearest_prototype(bank[start : start + 65_536], prototypes)
        radius = max(radius, float(distances.max()))
    return radius


def run_fast(args: argparse.Namespace) -> dict:
    bank = mixture_bank(args.size, args.dim, args.seed, args.seed + 1)
    m = math.ceil(round(args.ratio * args.size, 6))
    rss_data = peak_rss_mib()

    started = time.perf_counter()
    chosen = greedy_coreset(
        bank, m, projection_dim=args.projection_dim, seed=args.seed, progress=False
    )
    build = time.perf_counter() - started
    rss_build = peak_rss_mib()

    started = time.perf_counter()
    radius = covering_radius(bank, chosen)
    radius_seconds = time.perf_counter() - started

    queries = mixture_bank(args.queries, args.dim, args.seed, args.seed + 2)
    prototypes = bank[chosen]
    nearest_prototype(queries, prototypes)  # warm-up
    times = []
    for _ in range(5):
        started = time.perf_counter()
        nearest_prototype(queries, prototypes)
        times.append(time.perf_counter() - started)
    return {
        "m": m,
        "build_s": build,
        "rss_data_mib": rss_data,
        "rss_build_mib": rss_build,
        "radius": radius,
        "radius_s": radius_seconds,
        "qps": args.queries / statistics.median(times),
        "rss_end_mib": peak_rss_mib(),
    }


def run_reference(args: argparse.Namespace) -> dict:
    bank = mixture_bank(args.size, args.dim, args.seed, args.seed + 1)
    m = math.ceil(round(args.ratio * args.size, 6))
    probe = min(m, 20)
    started = time.perf_counter()
    greedy_coreset_exact(bank, probe)
    per_step = (time.perf_counter() - started) / probe

    steps = m if per_step * m <= args.budget else max(probe, int(args.budget / per_step))
    started = time.perf_counter()
    chosen = greedy_coreset_exact(bank, steps)
    seconds = time.perf_counter() - started
    result = {"steps": steps, "m": m, "finished": steps == m, "rss_mib": peak_rss_mib()}
    result["time_s"] = seconds * m / steps
    result["radius"] = covering_radius(bank, chosen) if steps == m else None
    return result


def worker(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  %(message)s")
    result = run_fast(args) if args.worker == "fast" else run_reference(args)
    print(json.dumps(result))


def in_subprocess(kind: str, size: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--size", str(size)]
    for name in ("dim", "ratio", "queries", "budget", "seed", "projection_dim"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table_row(size: int, fast: dict, ref: dict | None) -> str:
    """One markdown row; reference columns read n/a where it was skipped or did not finish."""
    ref_time = ref_radius = speed_up = ratio = "n/a"
    if ref is not None:
        ref_time = f"{ref['time_s']:.1f}"
        if not ref["finished"]:
            ref_time += f" (extrapolated from {ref['steps']} steps)"
        speed_up = f"{ref['time_s'] / fast['build_s']:.0f}x"
        if ref["radius"] is not None:
            ref_radius = f"{ref['radius']:.3f}"
            ratio = f"{fast['radius'] / ref['radius']:.3f}"
    return (
        f"| {size:,} | {fast['m']:,} | {fast['build_s']:.1f} | "
        f"{fast['rss_data_mib']:.0f} / {fast['rss_build_mib']:.0f} | {fast['radius']:.3f} | "
        f"{ref_time} | {ref_radius} | {speed_up} | {ratio} | {fast['qps']:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50000,200000,1000000")
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--budget", type=float, default=300.0, help="reference seconds per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=("fast", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(
        f"# {date.today()}, {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}",
        flush=True,
    )
    print(
        f"# bank: Gaussian mixture, {COMPONENTS} components, rank {RANK}, dim {args.dim}, "
        f"float16; ratio {args.ratio}; projection {args.projection_dim} dims; "
        f"reference budget {args.budget:.0f} s per size",
        flush=True,
    )
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        fast = in_subprocess("fast", size, args)
        reference = None if args.no_reference else in_subprocess("reference", size, args)
        rows.append({"size": size, "fast": fast, "reference": reference})

    print()
    print(
        "| bank | M | build (s) | peak RSS: data / build (MiB) | covering radius | "
        "reference (s) | reference radius | speed-up | radius ratio | search (queries/s) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(table_row(row["size"], row["fast"], row["reference"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
