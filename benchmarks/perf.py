"""Performance of cpkp: what training and inference cost, and where the time goes.

One entry point that prints markdown tables (and appends them to a file with ``--append``):

- training throughput (images/s) of CPKP(RD), CPKP(FD) and the plain students ``rd@cpkp`` and
  ``fd@cpkp`` on the same settings (co-progression and prototype switched off as in
  ``cpkp.benchmark.variant_overrides``), and the cost of co-progression as a ratio;
- inference latency per image at each batch size, split into the backbone (teacher), the
  student (with ``A_kd``), the prototype search (``f_agg``, nearest prototype, ``A_kp``) and
  the post-processing (fusion, smoothing, image score; resize back to the original size);
- peak memory: resident set size and, on CUDA, ``torch.cuda.max_memory_allocated``;
- how inference time grows with the image size and with the prototype (category size, grid);
- the inference cost of CPKP(RD) against ``rd@cpkp`` (same networks, prototype off);
- on request, the effect of bf16 autocast and ``torch.compile`` on inference.

Only speed is measured: the students keep their random initial weights, and the images are
crops of the demo dataset's "brick" photograph (``cpkp.data.demo.normal_image``), or uniform
noise where that photograph cannot be read. Prototypes are built by ``build_prototype`` from
the monitor's features of N such images, as training builds them. Every time is the median of
``--repeats`` runs after ``--warmup`` runs, the device synchronised around each.

    .venv/bin/python benchmarks/perf.py                               # CPU, preset cpu_rd_lite0
    .venv/bin/python benchmarks/perf.py --append docs/benchmarks.md   # ... and append the tables
    python3 benchmarks/perf.py --device cuda --preset paper_rd_wrn50 --modes fp32,bf16,compile
    .venv/bin/python benchmarks/perf.py --quick --backbone random:resnet18 --image-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cpkp.api import Detector
from cpkp.backbones import RANDOM_PREFIX, create_backbone
from cpkp.benchmark import variant_overrides
from cpkp.config import Config, apply_overrides, load_preset
from cpkp.data.demo import normal_image
from cpkp.errors import ConfigError, CpkpError, WeightsError
from cpkp.models import create_student
from cpkp.prototype import Prototype, build_prototype
from cpkp.scoring import fuse, gaussian_smooth, image_scores, kd_map, kp_map, resize_maps
from cpkp.training import CoProgressionTrainer

TRAIN_VARIANTS = ("cpkp-rd", "rd@cpkp", "cpkp-fd", "fd@cpkp")
MODES = ("fp32", "bf16", "compile", "bf16+compile")
SECTIONS = ("train", "inference", "size", "prototype", "modes")
STAGES = ("teacher", "student", "search", "fusion")
STAGE_NAMES = {
    "teacher": "backbone (teacher)",
    "student": "student + A_kd",
    "search": "prototype search (f_agg, nearest prototype, A_kp)",
    "fusion": "fusion, smoothing, image score",
    "resize": "resize back to the original size",
}
RATIO_TARGET = 1.5  # issue 8: CPKP(RD) inference at most 1.5x rd@cpkp's (demo configuration)
QUICK = {"warmup": 1, "repeats": 1, "train_warmup": 1, "train_steps": 1}
QUICK_IMAGES = (4, 8)  # category sizes of --quick (small, large)
CATEGORY = "brick"  # demo photograph the images are cut from

logger = logging.getLogger("perf")


# ---------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    fns: Sequence[Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> list[list[float]]:
    """Wall times of each of ``fns``, run in turns (``a b c a b c ...``) after the warm-up.

    Alternating keeps a comparison fair on a shared machine: a slow stretch slows every
    function of the round, not all runs of one of them.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, runs in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            runs.append(time.perf_counter() - start)
    return times


@dataclass
class Peak:
    """Peak memory of a stretch of code: RSS in MiB, CUDA allocations in MiB (None on CPU)."""

    rss_mib: float = 0.0
    gpu_mib: float | None = None
    rss_reset: bool = False  # False: RSS is the process's peak so far, not this stretch's

    def cells(self) -> list[str]:
        rss = f"{self.rss_mib:,.0f}" + ("" if self.rss_reset else "*")
        return [rss, "-" if self.gpu_mib is None else f"{self.gpu_mib:,.0f}"]


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Measure the peak RSS (Linux VmHWM, reset on entry) and the peak CUDA allocation.

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark of the resident set
    to the current size; where that is not possible the process's lifetime peak
    (``getrusage``) is reported and marked.
    """
    peak = Peak(rss_reset=_reset_rss_peak())
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peak
    finally:
        synchronize(device)
        peak.rss_mib = _rss_peak_mib(peak.rss_reset)
        if device.type == "cuda":
            peak.gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20


def _rss_resettable() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_mib(reset: bool) -> float:
    if reset:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Setting up: configuration, data, networks, prototypes


@dataclass
class Bench:
    """Everything the sections share: options, device, networks, generated data, prototypes."""

    args: argparse.Namespace
    device: torch.device
    base: Config
    monitor: nn.Module
    weights: str
    data_note: str = ""
    students: dict[str, nn.Module] = field(default_factory=dict)
    _images: dict[int, Tensor] = field(default_factory=dict)
    _prototypes: dict[tuple[int, int, int], tuple[Prototype, float]] = field(default_factory=dict)

    def config(
        self, variant: str = "cpkp-rd", size: int | None = None, stride: int | None = None
    ) -> Config:
        """The base configuration as ``variant`` at ``size`` pixels and prototype ``stride``."""
        config = copy.deepcopy(self.base)
        changes: dict[str, dict[str, Any]] = {"data": {}, "prototype": {}}
        if size is not None:
            changes["data"]["image_size"] = size
        if stride is not None:
            changes["prototype"]["grid_stride"] = stride
        apply_overrides(config, changes, source="perf.py")
        apply_overrides(config, variant_overrides(variant), source=f"variant {variant}")
        return config.validate()

    def images(self, n: int, size: int) -> Tensor:
        """``[n, 3, size, size]`` float images in [0, 1] on the CPU (generated once per size)."""
        have = self._images.get(size)
        if have is None or len(have) < n:
            self._images[size] = self._generate(n, size)
        return self._images[size][:n]

    def _generate(self, n: int, size: int) -> Tensor:
        try:
            crops = [
                normal_image(CATEGORY, "train", i, seed=self.args.seed, size=size) for i in range(n)
            ]
            self.data_note = f"crops of the demo photograph '{CATEGORY}' (cpkp.data.demo)"
        except (CpkpError, OSError) as err:
            logger.warning("demo photograph unavailable (%s); using uniform noise images", err)
            self.data_note = "uniform noise images (the demo photograph was unavailable)"
            generator = torch.Generator().manual_seed(self.args.seed)
            return torch.rand(n, 3, size, size, generator=generator)
        batch = torch.from_numpy(np.stack(crops)).float().div_(255.0)
        if batch.dim() == 3:  # grey photograph: [n, S, S]
            return batch[:, None].expand(-1, 3, -1, -1).contiguous()
        return batch.permute(0, 3, 1, 2).contiguous()

    def batch(self, size: int, batch: int) -> Tensor:
        """The first ``batch`` images at ``size`` on the device, channels-last as cpkp uses."""
        x = self.images(batch, size).to(self.device)
        return x.contiguous(memory_format=torch.channels_last)

    def student(self, variant: str) -> nn.Module:
        """A randomly initialised student ("rd" or "fd"), kept for every inference section."""
        if variant not in self.students:
            self.students[variant] = self.new_student(variant)
        return self.students[variant]

    def new_student(self, variant: str) -> nn.Module:
        student = create_student(variant, self.monitor.name, self.monitor.channels)
        return student.to(self.device, memory_format=torch.channels_last)

    def prototype(self, n: int, size: int, stride: int) -> tuple[Prototype, float]:
        """K from ``n`` images at ``size`` on the stride-``stride`` grid, and its build seconds."""
        key = (n, size, stride)
        if key not in self._prototypes:
            cfg = self.config(size=size, stride=stride).prototype
            images = self.images(n, size)
            step = self.base.train.batch_size
            loader = [
                {"image": images[i : i + step], "index": torch.arange(i, min(i + step, n))}
                for i in range(0, n, step)
            ]
            synchronize(self.device)
            start = time.perf_counter()
            with torch.inference_mode():
                proto = build_prototype(
                    self.monitor, loader, cfg, self.device, seed=self.args.seed, progress=False
                )
            synchronize(self.device)
            self._prototypes[key] = (proto, time.perf_counter() - start)
        return self._prototypes[key]

    def detector(
        self, variant: str, size: int, stride: int, n: int, mode: str = "fp32"
    ) -> Detector:
        """A Detector with the shared networks (and K of ``n`` images when ``variant`` has one)."""
        config = self.config(variant, size, stride)
        config.train.amp = "bf16" in mode
        config.train.compile = "compile" in mode  # the library's flag, as `--compile` sets it
        detector = Detector(config)
        detector.teacher = self.monitor
        detector.student = self.student(config.model.variant)
        if config.prototype.enabled:
            detector.prototype = self.prototype(n, size, stride)[0]
        return detector

    def timed(self, fn: Callable[[], Any]) -> float:
        """Median seconds of ``fn`` with the run's warm-up and repeats."""
        return median_seconds(fn, self.device, self.args.warmup, self.args.repeats)


def make_bench(args: argparse.Namespace) -> Bench:
    """Base configuration, device and monitor; falls back to random weights when missing."""
    base = load_preset(args.preset)
    changes: dict[str, dict[str, Any]] = {"train": {"device": args.device}}
    if args.backbone:
        changes["model"] = {"backbone": args.backbone}
    if args.image_size:
        changes["data"] = {"image_size": args.image_size}
    if args.batch:
        changes["train"]["batch_size"] = args.batch
    apply_overrides(base, changes, source="command line")
    base.validate()
    device = Detector(base).device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)
    name = base.model.backbone
    try:
        monitor = create_backbone(name, weights=base.model.weights, quiet=True)
        weights = "random weights" if name.startswith(RANDOM_PREFIX) else "ImageNet weights"
    except WeightsError as err:
        logger.warning("%s; measuring with random weights instead", err)
        monitor = create_backbone(f"{RANDOM_PREFIX}{name}", quiet=True)
        weights = "random weights (the ImageNet weights were not found)"
    monitor = monitor.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    return Bench(args=args, device=device, base=base, monitor=monitor, weights=weights)


# ---------------------------------------------------------------------------------------------
# The inference pipeline, stage by stage


def autocast(detector: Detector) -> contextlib.AbstractContextManager:
    """bf16 autocast where the detector's configuration asks for it on CUDA (``train.amp``)."""
    if detector.config.train.amp and detector.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stage_functions(detector: Detector, x: Tensor, original: int) -> dict[str, Callable]:
    """Detector.score_batch cut into its stages, each a closure over the previous outputs.

    Runs what ``Detector._raw_maps`` and ``score_batch`` run, in the same order, so that the
    stages add up to the end-to-end time (which the tables show beside them).
    """
    size = tuple(x.shape[-2:])
    cfg, scoring = detector.config, detector.config.scoring
    sigma = scoring.sigma * cfg.data.image_size / 256.0
    detector.teacher.eval()
    detector.student.eval()
    out: dict[str, Any] = {}

    def teacher() -> None:
        with autocast(detector):
            out["teacher"] = [f.float() for f in detector.teacher(x)]

    def student() -> None:
        with autocast(detector):
            maps = [f.float() for f in detector.student(x, out["teacher"])]
        out["kd"] = kd_map(out["teacher"], maps, size)

    def search() -> None:
        vectors = detector.prototype.vectors.to(detector.device)
        out["kp"] = kp_map(out["teacher"], vectors, cfg.prototype, size)[0]

    def fusion() -> None:
        kd, kp = out["kd"], out.get("kp")
        fused = fuse(kd, kp, detector.calibration, scoring.gamma, scoring.fusion)
        out["maps"] = gaussian_smooth(fused, sigma)
        out["scores"] = image_scores(out["maps"]).cpu()
        gaussian_smooth(kd, sigma)
        if kp is not None:
            gaussian_smooth(kp, sigma)

    def resize() -> None:
        resize_maps(out["maps"].cpu(), [(original, original)] * len(x))

    stages = {"teacher": teacher, "student": student, "search": search, "fusion": fusion}
    if detector.prototype is None:
        del stages["search"]
    stages["resize"] = resize
    return stages


def time_stages(bench: Bench, detector: Detector, x: Tensor) -> dict[str, float]:
    """Seconds per batch of every stage, and of ``Detector.score_batch`` as ``end_to_end``."""
    times = {}
    with torch.inference_mode():
        for name, fn in stage_functions(detector, x, bench.args.original_size).items():
            fn()  # the later stages read this one's output
            times[name] = bench.timed(fn)
        times["end_to_end"] = bench.timed(lambda: detector.score_batch(x))
    return times


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "|".join(" --- " for _ in self.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)


def train_section(bench: Bench, results: dict[str, Any]) -> Table:
    """Training throughput of the four variants on one fixed batch, warm-up steps untimed."""
    args, size = bench.args, bench.base.data.image_size
    stride, n = bench.base.prototype.grid_stride, args.category_images
    batch = bench.base.train.batch_size
    x = bench.batch(size, batch)
    seconds, peaks = {}, {}
    for variant in TRAIN_VARIANTS:
        config = bench.config(variant, size, stride)
        vectors = None
        if config.prototype.enabled:
            vectors = bench.prototype(n, size, stride)[0].vectors.to(bench.device).float()
        teacher = copy.deepcopy(bench.monitor).requires_grad_(True)
        student = bench.new_student(config.model.variant)
        trainer = CoProgressionTrainer(teacher, student, vectors, config)
        step = _training_step(trainer, Detector(config), x)
        with peak_memory(bench.device) as peaks[variant]:
            seconds[variant] = median_seconds(
                step, bench.device, args.train_warmup, args.train_steps
            )
        results.setdefault("train", {})[variant] = {"seconds_per_step": seconds[variant]}
        del trainer, teacher, student, step

    table = Table(
        f"Training: {batch} images of {size}x{size} per step",
        ["variant", "images/s", "ms per step", "cost vs plain", "peak RSS (MiB)", "peak GPU (MiB)"],
    )
    plain = {"cpkp-rd": "rd@cpkp", "cpkp-fd": "fd@cpkp"}
    for variant in TRAIN_VARIANTS:
        cost = f"{seconds[variant] / seconds[plain[variant]]:.2f}x" if variant in plain else ""
        table.rows.append(
            [
                variant,
                f"{batch / seconds[variant]:.2f}",
                f"{1000 * seconds[variant]:.0f}",
                cost,
                *peaks[variant].cells(),
            ]
        )
    table.notes.append(
        f"Prototype of {n} images on the stride-{stride} grid for the CPKP variants; "
        f"{args.train_warmup} warm-up and {args.train_steps} timed steps per variant (median). "
        "*cost vs plain*: step time of CPKP over that of the same student with co-progression "
        "and prototype off, the price of co-progression (student step + teacher step with L_kp)."
    )
    return table


def _training_step(
    trainer: CoProgressionTrainer, detector: Detector, x: Tensor
) -> Callable[[], None]:
    def step() -> None:
        with autocast(detector):
            trainer.train_step(x)

    return step


def inference_section(bench: Bench, results: dict[str, Any]) -> Table:
    """Where inference time goes, per image, at each batch size."""
    args, size = bench.args, bench.base.data.image_size
    stride, n = bench.base.prototype.grid_stride, args.category_images
    detector = bench.detector("cpkp-rd", size, stride, n)
    measured, peaks = {}, {}
    for batch in args.batch_sizes:
        with peak_memory(bench.device) as peak:
            measured[batch] = time_stages(bench, detector, bench.batch(size, batch))
        peaks[batch] = peak
    results["inference"] = {str(b): t for b, t in measured.items()}

    header = ["stage"]
    for batch in args.batch_sizes:
        header += [f"batch {batch}: ms/image", f"batch {batch}: share"]
    table = Table(f"Inference of CPKP(RD), {size}x{size}, where the time goes", header)
    for stage in (*STAGES, "resize"):
        row = [STAGE_NAMES[stage]]
        for batch in args.batch_sizes:
            t = measured[batch]
            total = sum(t[s] for s in STAGES)
            share = f"{100 * t[stage] / total:.0f}%"
            row += [_ms_per_image(t[stage], batch), f"+{share}" if stage == "resize" else share]
        table.rows.append(row)
    sums, ends, rates, rss, gpu = (
        ["sum of the four stages"],
        ["Detector.score_batch"],
        ["images/s (score_batch)"],
        ["peak RSS (MiB)"],
        ["peak GPU (MiB)"],
    )
    for batch in args.batch_sizes:
        t = measured[batch]
        sums += [_ms_per_image(sum(t[s] for s in STAGES), batch), "100%"]
        ends += [_ms_per_image(t["end_to_end"], batch), ""]
        rates += [f"{batch / t['end_to_end']:.1f}", ""]
        cells = peaks[batch].cells()
        rss += [cells[0], ""]
        gpu += [cells[1], ""]
    table.rows += [sums, ends, rates, rss, gpu]
    proto = detector.prototype
    table.notes.append(
        f"Prototype of {n} images, stride-{stride} grid {proto.grid[0]}x{proto.grid[1]}, "
        f"M = {len(proto.vectors):,} vectors of {proto.vectors.shape[1]} values. Shares are of "
        f"the four stages that `score_batch` runs; the resize back to {args.original_size}x"
        f"{args.original_size} (as `predict` does for MVTec-sized images) comes on top (+)."
    )
    return table


def size_section(bench: Bench, results: dict[str, Any]) -> Table:
    """Inference time per image at each image size, K rebuilt from the same images each time."""
    args, stride, n = bench.args, bench.base.prototype.grid_stride, bench.args.category_images
    batch = bench.base.train.batch_size
    table = Table(
        f"Inference of CPKP(RD) against image size (batch {batch}, prototype of {n} images)",
        [
            "size",
            "grid",
            "M",
            "teacher",
            "student",
            "search",
            "fusion",
            "score_batch (ms/image)",
            "images/s",
            "peak RSS (MiB)",
            "peak GPU (MiB)",
        ],
    )
    for size in args.sizes:
        detector = bench.detector("cpkp-rd", size, stride, n)
        with peak_memory(bench.device) as peak:
            t = time_stages(bench, detector, bench.batch(size, batch))
        results.setdefault("size", {})[str(size)] = t
        grid = detector.prototype.grid
        table.rows.append(
            [f"{size}", f"{grid[0]}x{grid[1]}", f"{len(detector.prototype.vectors):,}"]
            + [_ms_per_image(t[s], batch) for s in STAGES]
            + [
                _ms_per_image(t["end_to_end"], batch),
                f"{batch / t['end_to_end']:.1f}",
                *peak.cells(),
            ]
        )
    table.notes.append(
        "Stage columns in ms per image. The prototype is built at each size from the same "
        f"{n} images, so M grows with the pixel count (coreset ratio "
        f"{bench.base.prototype.coreset_ratio:g}) and the search with its square."
    )
    return table


def prototype_section(bench: Bench, results: dict[str, Any]) -> Table:
    """CPKP(RD) against rd@cpkp for each category size and grid: the ratio of issue 8."""
    args, size = bench.args, bench.base.data.image_size
    batch = bench.base.train.batch_size
    x = bench.batch(size, batch)
    table = Table(
        f"Inference cost of the prototype: CPKP(RD) against rd@cpkp ({size}x{size}, batch {batch})",
        [
            "category images",
            "grid stride",
            "bank",
            "M",
            "build (s)",
            "search (ms/image)",
            "CPKP(RD) (ms/image)",
            "rd@cpkp (ms/image)",
            "ratio",
            "peak RSS (MiB)",
            "peak GPU (MiB)",
        ],
    )
    plain = bench.detector("rd@cpkp", size, bench.base.prototype.grid_stride, 0)
    for n, stride in args.prototypes:
        proto, build = bench.prototype(n, size, stride)
        detector = bench.detector("cpkp-rd", size, stride, n)
        with peak_memory(bench.device) as peak, torch.inference_mode():
            stages = stage_functions(detector, x, size)
            stages["teacher"]()  # the search reads the teacher's maps
            runs = [
                partial(plain.score_batch, x),
                partial(detector.score_batch, x),
                stages["search"],
            ]
            plain_runs, cpkp_runs, search_runs = interleaved_seconds(
                runs, bench.device, args.warmup, args.repeats
            )
        plain_seconds, seconds = statistics.median(plain_runs), statistics.median(cpkp_runs)
        search = statistics.median(search_runs)
        ratio = statistics.median(c / p for c, p in zip(cpkp_runs, plain_runs))
        results.setdefault("prototype", []).append(
            {
                "images": n,
                "stride": stride,
                "m": len(proto.vectors),
                "build_s": build,
                "cpkp_s": seconds,
                "plain_s": plain_seconds,
                "search_s": search,
                "ratio": ratio,
            }
        )
        bank = n * proto.grid[0] * proto.grid[1]
        table.rows.append(
            [
                f"{n}",
                f"{stride}",
                f"{bank:,}",
                f"{len(proto.vectors):,}",
                f"{build:.1f}",
                _ms_per_image(search, batch),
                _ms_per_image(seconds, batch),
                _ms_per_image(plain_seconds, batch),
                f"{ratio:.2f}x",
                *peak.cells(),
            ]
        )
    first = results["prototype"][0]
    verdict = "met" if first["ratio"] <= RATIO_TARGET else "NOT met"
    table.notes.append(
        "Both columns are `Detector.score_batch` on the same batch, same teacher and student; "
        "rd@cpkp has no prototype (no search, no A_kp). The two are timed in turns and *ratio* "
        "is the median of the paired ratios, so a change of load on the machine touches both "
        f"alike. Ratio of the first row: "
        f"{first['ratio']:.2f}x, target at most {RATIO_TARGET}x ({verdict}). The students are "
        "untrained: only speed is measured."
    )
    return table


def modes_section(bench: Bench, results: dict[str, Any]) -> Table:
    """``Detector.score_batch`` of CPKP(RD) under bf16 autocast and ``torch.compile``."""
    args, size = bench.args, bench.base.data.image_size
    stride, n = bench.base.prototype.grid_stride, args.category_images
    batch = bench.base.train.batch_size
    x = bench.batch(size, batch)
    table = Table(
        f"Inference of CPKP(RD) by precision and compilation ({size}x{size}, batch {batch})",
        ["mode", "ms/image", "images/s", "vs fp32", "first call (s)", "peak GPU (MiB)"],
    )
    reference = None
    for mode in args.modes:
        if "bf16" in mode and bench.device.type != "cuda":
            table.rows.append([mode, "n/a: bf16 autocast applies on CUDA only", "", "", "", ""])
            continue
        if "compile" in mode:
            torch._dynamo.reset()  # each compiled mode pays its own compilation
        detector = bench.detector("cpkp-rd", size, stride, n, mode)
        try:
            with peak_memory(bench.device) as peak, torch.inference_mode():
                synchronize(bench.device)
                start = time.perf_counter()
                detector.score_batch(x)  # compiles, for the compiled modes
                synchronize(bench.device)
                first = time.perf_counter() - start
                seconds = bench.timed(lambda d=detector: d.score_batch(x))
        except Exception as err:  # noqa: BLE001 - a mode that fails is a result, not a crash
            message = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            table.rows.append([mode, f"failed: {message}", "", "", "", ""])
            continue
        logger.warning(
            "mode %s: %s ms/image, first call %.1f s", mode, _ms_per_image(seconds, batch), first
        )
        reference = seconds if mode == "fp32" else reference
        gain = "" if reference is None else f"{reference / seconds:.2f}x"
        results.setdefault("modes", {})[mode] = {"seconds": seconds, "first_call_s": first}
        table.rows.append(
            [
                mode,
                _ms_per_image(seconds, batch),
                f"{batch / seconds:.1f}",
                gain,
                f"{first:.1f}",
                peak.cells()[1],
            ]
        )
    table.notes.append(
        "bf16: `train.amp` (autocast of the teacher and student to bfloat16; the prototype "
        "search, maps and scores stay float32). compile: `train.compile` (`--compile`: "
        "`torch.compile` of the teacher and the student, default mode); *first call* includes "
        "the compilation. *vs fp32*: speed-up."
    )
    return table


def _ms_per_image(seconds: float, batch: int) -> str:
    return f"{1000 * seconds / batch:.1f}"


SECTION_FUNCTIONS = {
    "train": train_section,
    "inference": inference_section,
    "size": size_section,
    "prototype": prototype_section,
    "modes": modes_section,
}


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, str]:
    """CPU model, cores, GPU, torch version and threads, for the report's header."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def command_line(argv: Sequence[str]) -> str:
    """The command as run, with paths relative to the working folder where they lie under it."""

    def short(path: str) -> str:
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative

    return shlex.join([short(sys.executable), short(__file__), *argv])


def report(bench: Bench, tables: list[Table], argv: Sequence[str], started: float) -> str:
    info = machine()
    base = bench.base
    lines = [
        f"Command ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.perf_counter() - started:.0f} s):",
        "",
        f"    {command_line(argv)}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['gpu']}; torch {info['torch']} "
        f"with {info['threads']} intra-op threads, Python {info['python']}; measured on "
        f"{bench.device}.",
        f"Model: preset `{bench.args.preset}`, {base.model.backbone} with {bench.weights}, "
        f"{base.data.image_size}x{base.data.image_size}, batch {base.train.batch_size}, "
        f"prototype grid stride {base.prototype.grid_stride}, "
        f"{base.prototype.channels_per_level} channels per level. Students untrained and "
        f"images generated ({bench.data_note}): only speed is measured. Times are medians "
        f"over {bench.args.repeats} timed runs after {bench.args.warmup} warm-up runs.",
    ]
    if not _rss_resettable():
        lines[-1] += " Peak RSS marked * is the process's peak so far (no reset possible here)."
    for table in tables:
        lines += ["", table.markdown()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu_rd_lite0", help="preset name or YAML file")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--backbone", help="override model.backbone (e.g. random:resnet18)")
    parser.add_argument("--image-size", type=int, help="override data.image_size")
    parser.add_argument("--batch", type=int, help="override train.batch_size (training, ratio)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch-sizes", type=_ints, help="latency batches (default 1,<batch>)")
    parser.add_argument("--sizes", type=_ints, default=[128, 256, 384, 512], help="image sizes")
    parser.add_argument("--category-images", type=int, help="images of a category (60)")
    parser.add_argument("--large-category", type=int, help="images of a large category (250)")
    parser.add_argument(
        "--prototypes",
        type=_pairs,
        help="IMAGES:STRIDE pairs (default: the category at the preset's grid stride and at the "
        "other one, and the large category at the preset's)",
    )
    parser.add_argument("--original-size", type=int, default=1024, help="pixels to resize back to")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed training steps")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--modes", type=_modes, default=["fp32"], help=f"of {', '.join(MODES)}")
    parser.add_argument("--sections", type=_sections, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="1 run each, tiny categories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", type=Path, help="append the report to this markdown file")
    parser.add_argument("--json", type=Path, help="write the raw figures to this file")
    args = parser.parse_args(argv)

    if args.quick:
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in argv:
                setattr(args, key, value)
    small, large = QUICK_IMAGES if args.quick else (60, 250)
    args.category_images = args.category_images or small
    args.large_category = args.large_category or large
    for name in ("category_images", "large_category", "original_size", "repeats", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.append is not None and not args.append.parent.is_dir():
        parser.error(f"--append {args.append}: folder {args.append.parent} does not exist")
    return args


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected integers separated by commas"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        images, _, stride = item.partition(":")
        if not (images.strip().isdigit() and stride.strip() in ("4", "8")):
            raise argparse.ArgumentTypeError(f"{item!r}: expected IMAGES:STRIDE, stride 4 or 8")
        pairs.append((int(images), int(stride)))
    return pairs


def _modes(text: str) -> list[str]:
    return _choices(text, MODES)


def _sections(text: str) -> list[str]:
    return _choices(text, SECTIONS)


def _choices(text: str, known: Sequence[str]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected some of {', '.join(known)} separated by commas"
        )
    return values


def resolve_defaults(args: argparse.Namespace, bench: Bench) -> None:
    """Defaults that depend on the preset: latency batches and prototype combinations."""
    batch = bench.base.train.batch_size
    args.batch_sizes = args.batch_sizes or sorted({1, batch})
    if args.prototypes is None:
        stride = bench.base.prototype.grid_stride
        other = 4 if stride == 8 else 8
        args.prototypes = [
            (args.category_images, stride),
            (args.category_images, other),
            (args.large_category, stride),
        ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        bench = make_bench(args)
    except (ConfigError, CpkpError) as err:
        print(f"perf.py: {err}", file=sys.stderr)
        return 2
    resolve_defaults(args, bench)

    results: dict[str, Any] = {"machine": machine(), "command": command_line(argv)}
    tables = []
    for name in args.sections:
        section_start = time.perf_counter()
        tables.append(SECTION_FUNCTIONS[name](bench, results))
        logger.warning("section %s done in %.0f s", name, time.perf_counter() - section_start)

    text = report(bench, tables, argv, started)
    if args.append is not None:
        with args.append.open("a") as f:
            f.write("\n## Performance (benchmarks/perf.py)\n\n" + text)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
