"""``cpkp benchmark``: every (category, variant, seed[, alpha]) trained and tested into one folder.

Layout of the output folder::

    <out>/runs/<category>/<variant>/seed<k>/    one run folder per combination (cpkp test files)
    <out>/benchmark.md                          the paper-style table (and the alpha sweep)
    <out>/benchmark.csv                         one row per run: every headline metric per part

A combination whose ``metrics.json`` exists is not trained again, a killed one resumes from its
checkpoint, so an interrupted benchmark continues where it stopped. A run folder made with
another configuration is an error, never silently reused.

Variants are the switches of DESIGN.md §1.2 applied to one base configuration (``--config``,
default the CPU preset): ``cpkp-rd``/``cpkp-fd`` (everything on), ``rd@cpkp``/``fd@cpkp`` (the
switches off), ``cp-only`` and ``kp-only`` (the paper's ablation, on CPKP(RD)), and ``rd``/``fd``,
the original methods' own training settings (the ``rd_original_wrn50`` and ``stpm_original_r18``
presets' ``train`` sections) on the base configuration's backbone and image size.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cpkp import runio
from cpkp.config import Config, apply_overrides, load_config, load_preset
from cpkp.errors import ConfigError, ScoringError, TrainingError

logger = logging.getLogger(__name__)

SWITCHES_OFF = {"train": {"co_progression": False}, "prototype": {"enabled": False}}
DEFAULT_VARIANTS = ("cpkp-rd", "cpkp-fd", "rd@cpkp", "fd@cpkp")
ORIGINAL_PRESETS = {"rd": "rd_original_wrn50", "fd": "stpm_original_r18"}
ORIGINAL_TRAIN_KEYS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr_student",
    "betas",
    "momentum",
    "weight_decay",
    "kd_loss",
)
HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
PARTS = ("fused", "kd", "kp")


def variant_overrides(variant: str) -> dict[str, Any]:
    """The config overrides that turn the base configuration into ``variant``.

    Raises:
        ConfigError: an unknown variant name.
    """
    rd, fd = {"model": {"variant": "rd"}}, {"model": {"variant": "fd"}}
    table = {
        "cpkp-rd": rd,
        "cpkp-fd": fd,
        "rd@cpkp": _merged(rd, SWITCHES_OFF),
        "fd@cpkp": _merged(fd, SWITCHES_OFF),
        "cp-only": _merged(rd, {"prototype": {"enabled": False}}),
        "kp-only": _merged(rd, {"train": {"co_progression": False}}),
    }
    if variant in table:
        return copy.deepcopy(table[variant])
    if variant in ORIGINAL_PRESETS:
        original = load_preset(ORIGINAL_PRESETS[variant]).train
        train = {key: getattr(original, key) for key in ORIGINAL_TRAIN_KEYS}
        return _merged({"model": {"variant": variant}, "train": train}, SWITCHES_OFF)
    known = ", ".join([*table, *ORIGINAL_PRESETS])
    raise ConfigError(f"unknown benchmark variant {variant!r}; expected one of {known}")


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for section, values in b.items():
        out.setdefault(section, {}).update(values)
    return out


@dataclass(frozen=True)
class Job:
    """One benchmark run: plain data, so that it can be shipped to another process."""

    dataset: str
    root: str | None
    category: str
    variant: str
    seed: int
    alpha: float | None
    run_dir: str
    config: dict[str, Any]
    folders: dict[str, str] = field(default_factory=dict)  # normal/abnormal/masks (folder)

    @property
    def label(self) -> str:
        """The variant as the tables name it (with its alpha in a sweep)."""
        return self.variant if self.alpha is None else f"{self.variant} a={self.alpha:g}"


def plan_jobs(
    dataset: str,
    root: Path | None,
    categories: Sequence[str],
    variants: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    base: Config,
    alphas: Sequence[float] = (),
    epochs: int | None = None,
    folders: dict[str, str] | None = None,
) -> list[Job]:
    """Every combination, with its resolved configuration and run folder.

    Args:
        dataset: the reader (``mvtec``, ``visa``, ``folder``); ``root`` its folder.
        categories, variants, seeds: what to combine (variants: :func:`variant_overrides`).
        out: the benchmark folder; runs go to ``out/runs/<category>/<variant>/seed<k>``.
        base: the configuration every variant starts from.
        alphas: an alpha sweep: every combination once per value (none: the base's alpha).
        epochs: overrides every variant's epochs.
        folders: ``normal``/``abnormal``/``masks`` folders of a ``folder`` dataset.
    """
    jobs = []
    for category in categories:
        for variant in variants:
            for alpha in alphas or [None]:
                for seed in seeds:
                    job = _job(dataset, root, category, variant, seed, alpha, out, base, epochs)
                    jobs.append(replace(job, folders=dict(folders or {})))
    return jobs


def _job(dataset, root, category, variant, seed, alpha, out, base, epochs) -> Job:
    config = copy.deepcopy(base)
    overrides = variant_overrides(variant)
    train = overrides.setdefault("train", {})
    train["seed"] = seed
    if epochs is not None:
        train["epochs"] = epochs
    if alpha is not None:
        train["alpha"] = alpha
    apply_overrides(config, overrides, source=f"benchmark variant {variant}")
    config.validate()
    folder = variant if alpha is None else f"{variant}_alpha{alpha:g}"
    run_dir = out / "runs" / category / folder / f"seed{seed}"
    return Job(dataset, str(root), category, variant, seed, alpha, str(run_dir), config.to_dict())


def finished_metrics(job: Job) -> dict[str, Any] | None:
    """The metrics of a run finished earlier (its ``metrics.json``), or None.

    Raises:
        ConfigError: the run folder holds a run made with another configuration.
    """
    run_dir = Path(job.run_dir)
    _check_same_config(run_dir, job.config)
    metrics_file = run_dir / runio.METRICS_FILE
    if not metrics_file.exists():
        return None
    logger.info("%s: finished earlier, reusing its metrics", run_dir)
    return runio.read_json(metrics_file)


def run_job(job: Job, progress: bool = False) -> dict[str, Any]:
    """Train and test one combination, or reuse / resume what is already on disk.

    Returns the run's metrics (as in its ``metrics.json``).

    Raises:
        ConfigError: the run folder holds a run made with another configuration.
    """
    from cpkp.api import Detector
    from cpkp.data.readers import read_dataset
    from cpkp.evaluate import run_test

    finished = finished_metrics(job)
    if finished is not None:
        return finished

    run_dir = Path(job.run_dir)
    splits = read_dataset(job.dataset, job.root, job.category, **job.folders)
    start = time.perf_counter()
    if (run_dir / runio.WEIGHTS_FILE).exists():
        detector = Detector.load(run_dir)
    elif (run_dir / runio.CHECKPOINT_FILE).exists():
        detector = Detector.resume(run_dir, progress=progress)
    else:
        detector = Detector(Config.from_dict(job.config, source=str(run_dir)))
        source = {"dataset": job.dataset, "root": job.root, "category": job.category}
        source.update(job.folders)
        detector.fit(splits.train, run_dir=run_dir, progress=progress, source=source)
    outputs = run_test(detector, splits.test, out_dir=run_dir, overlays=False, progress=progress)
    logger.info(
        "%s %s seed %d: %.0f s", job.category, job.label, job.seed, time.perf_counter() - start
    )
    return outputs.metrics


def run_or_record_failure(job: Job, progress: bool = False) -> dict[str, Any]:
    """:func:`run_job`, but a run that diverges or scores NaN gives ``{"error": message}``.

    One diverging combination (an original method's learning rate on another backbone, say)
    must not stop a sweep of hours; the table marks it ``failed`` and the next invocation
    tries it again. Dataset and configuration mistakes still stop the benchmark at once.
    """
    try:
        return run_job(job, progress=progress)
    except (TrainingError, ScoringError) as err:
        logger.error("%s %s seed %d failed: %s", job.category, job.label, job.seed, err)
        return {"error": str(err)}


def _check_same_config(run_dir: Path, config: dict[str, Any]) -> None:
    path = run_dir / runio.CONFIG_FILE
    if not path.exists():
        return
    existing = load_config(path).to_dict()
    if _normalised(existing) != _normalised(config):
        differ = sorted(
            f"{section}.{key}"
            for section in config
            for key in config[section]
            if _normalised(existing.get(section, {}).get(key)) != _normalised(config[section][key])
        )
        raise ConfigError(
            f"{run_dir}: this run folder was made with another configuration (differs in "
            f"{', '.join(differ) or 'its sections'}); give the benchmark another --out folder"
        )


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value))


def run_benchmark(
    jobs: Sequence[Job],
    out: Path,
    execute: Callable[[Sequence[Job]], Iterable[tuple[Job, dict[str, Any]]]] | None = None,
    progress: bool = False,
) -> str:
    """Run every job (in this process unless ``execute`` is given), write the tables.

    ``execute`` takes the jobs and yields ``(job, metrics)`` as runs finish, in any order; the
    tables are rewritten after each, so a benchmark stopped half-way still has its table.
    :class:`cpkp.ray_executor.RayExecutor` is one, running the jobs as Ray tasks.

    Returns:
        The Markdown tables.
    """
    out.mkdir(parents=True, exist_ok=True)
    if execute is None:

        def execute(jobs: Sequence[Job]) -> Iterable[tuple[Job, dict[str, Any]]]:
            for job in jobs:
                yield job, run_or_record_failure(job, progress=progress)

    results: list[tuple[Job, dict[str, Any]]] = []
    tables = ""
    planned = {job.run_dir: position for position, job in enumerate(jobs)}
    finishing = execute(jobs)
    try:
        for job, metrics in finishing:
            results.append((job, metrics))
            # In the planned order, whatever order the runs finished in.
            results.sort(key=lambda result: planned.get(result[0].run_dir, len(planned)))
            tables = write_tables(results, out)
    finally:
        # An executor that holds workers (Ray) releases them now, not when garbage-collected.
        close = getattr(finishing, "close", None)
        if close is not None:
            close()
    return tables


def write_tables(results: Sequence[tuple[Job, dict[str, Any]]], out: Path) -> str:
    """``benchmark.md``, ``benchmark.csv`` and ``benchmark.html`` from the runs finished so far."""
    from cpkp.html_report import write_benchmark_report

    text = "\n\n".join(
        [
            format_table(results),
            "## Each part alone\n\n" + format_parts_table(results),
            "## Per defect type\n\n" + format_defect_table(results),
        ]
    )
    runio.write_text(out / "benchmark.md", text + "\n")
    runio.write_text(out / "benchmark.csv", results_csv(results))
    write_benchmark_report(results, out)
    return text


def results_csv(results: Sequence[tuple[Job, dict[str, Any]]]) -> str:
    """One row per run: its coordinates and every headline metric of every part."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = [f"{part}_{name}" for part in PARTS for name in HEADLINE]
    writer.writerow(["category", "variant", "alpha", "seed", *columns, "error"])
    for job, metrics in results:
        values = [_metric(metrics, part, name) for part in PARTS for name in HEADLINE]
        writer.writerow(
            [job.category, job.variant, "" if job.alpha is None else job.alpha, job.seed]
            + ["" if v is None else f"{v:.6f}" for v in values]
            + [metrics.get("error", "")]
        )
    return buffer.getvalue()


def _metric(metrics: dict[str, Any], part: str, name: str) -> float | None:
    value = metrics.get(part, {}).get("overall", {}).get(name)
    return None if value is None else float(value)


def format_table(results: Sequence[tuple[Job, dict[str, Any]]]) -> str:
    """The paper-style table: a row per category plus the mean, image / pixel AUROC per variant.

    Each cell is the mean ± standard deviation over seeds (``undefined`` when the test set
    cannot give the metric); the best mean image AUROC and the best mean pixel AUROC of each row
    are in bold.
    """
    labels = list(dict.fromkeys(job.label for job, _ in results))
    categories = list(dict.fromkeys(job.category for job, _ in results))
    per_seed: dict[tuple[str, str, str], dict[int, float]] = {}
    for job, metrics in results:
        for key, name in (("image", "image_auroc"), ("pixel", "pixel_auroc")):
            value = _metric(metrics, "fused", name)
            if value is not None:
                per_seed.setdefault((job.category, job.label, key), {})[job.seed] = value
    ran = {(job.category, job.label) for job, metrics in results if "error" not in metrics}
    failed = {(job.category, job.label) for job, metrics in results if "error" in metrics}
    rows = [
        (
            category,
            [
                _cell(per_seed, [category], lab) if (category, lab) in ran else None
                for lab in labels
            ],
        )
        for category in categories
    ]
    if len(categories) > 1:
        rows.append(("mean", [_cell(per_seed, categories, lab) for lab in labels]))

    header = "| category | " + " | ".join(f"{lab} image / pixel AUROC" for lab in labels) + " |"
    lines = [header, "|---" * (len(labels) + 1) + "|"]
    for name, row in rows:
        best = {k: _best(row, k) for k in ("image", "pixel")}
        formatted = [
            "failed" if cell is None and (name, lab) in failed else _format_cell(cell, best)
            for cell, lab in zip(row, labels)
        ]
        lines.append(f"| {name} | " + " | ".join(formatted) + " |")
    seeds = sorted({job.seed for job, _ in results})
    lines.append("")
    lines.append(
        f"Mean ± std over seeds {', '.join(map(str, seeds))}; best per row in bold; the mean row "
        "averages the categories seed by seed (over the seeds finished in every category)."
    )
    return "\n".join(lines)


PART_COLUMNS = (
    ("image_auroc", "fused"),
    ("image_auroc", "kd"),
    ("image_auroc", "kp"),
    ("pixel_auroc", "fused"),
    ("pixel_auroc", "kd"),
    ("pixel_auroc", "kp"),
    ("aupro", "fused"),
)
PART_NAMES = {"fused": "fused", "kd": "A_kd", "kp": "A_kp"}


def format_parts_table(results: Sequence[tuple[Job, dict[str, Any]]]) -> str:
    """Per category and variant: image and pixel AUROC of the fused score, ``A_kd`` and ``A_kp``.

    Mean ± std over seeds; ``-`` where the variant has no such part (no prototype: no ``A_kp``).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job, metrics in results:
        if "error" not in metrics:
            groups.setdefault((job.category, job.label), []).append(metrics)
    header = "| category | variant | " + " | ".join(
        f"{'img' if m == 'image_auroc' else 'pix' if m == 'pixel_auroc' else 'AUPRO'} "
        f"{PART_NAMES[part]}"
        for m, part in PART_COLUMNS
    )
    lines = [header + " |", "|---" * (len(PART_COLUMNS) + 2) + "|"]
    for (category, label), runs in groups.items():
        cells = [_mean_std([_metric(r, part, m) for r in runs]) for m, part in PART_COLUMNS]
        lines.append(f"| {category} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_defect_table(results: Sequence[tuple[Job, dict[str, Any]]]) -> str:
    """Per category and defect type: image AUROC of each variant's fused score, ``A_kd``, ``A_kp``.

    Each cell is ``fused (A_kd / A_kp)``, means over seeds; each defect type is scored against
    all good test images.
    """
    labels = list(dict.fromkeys(job.label for job, _ in results))
    values: dict[tuple[str, str, str, str], list[float]] = {}
    for job, metrics in results:
        for part in PARTS:
            per_type = metrics.get(part, {}).get("per_defect_type", {})
            for defect, group in per_type.items():
                value = group.get("image_auroc")
                if value is not None:
                    key = (job.category, defect, job.label, part)
                    values.setdefault(key, []).append(float(value))
    rows = list(dict.fromkeys((c, d) for c, d, _, _ in values))
    lines = [
        "| category | defect type | "
        + " | ".join(f"{lab} fused (A_kd / A_kp)" for lab in labels)
        + " |",
        "|---" * (len(labels) + 2) + "|",
    ]
    for category, defect in rows:
        cells = []
        for label in labels:
            means = {
                part: _mean_text(values.get((category, defect, label, part), [])) for part in PARTS
            }
            cells.append(f"{means['fused']} ({means['kd']} / {means['kp']})")
        lines.append(f"| {category} | {defect} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{statistics.fmean(present):.3f} ± {std:.3f}"


def _mean_text(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "-"


def _cell(
    per_seed: dict[tuple[str, str, str], dict[int, float]], categories: Sequence[str], label: str
) -> dict[str, list[float]] | None:
    """Per metric, one value per seed: the mean over ``categories`` of that seed's runs."""
    cell: dict[str, list[float]] = {}
    for key in ("image", "pixel"):
        runs = [per_seed.get((category, label, key), {}) for category in categories]
        seeds = sorted(set.intersection(*(set(r) for r in runs)))
        cell[key] = [statistics.fmean(r[seed] for r in runs) for seed in seeds]
    return cell


def _best(row: Sequence[dict[str, list[float]] | None], key: str) -> float | None:
    means = [statistics.fmean(c[key]) for c in row if c and c[key]]
    return max(means) if means else None


def _format_cell(cell: dict[str, list[float]] | None, best: dict[str, Any]) -> str:
    if cell is None:
        return "not run"
    parts = []
    for key in ("image", "pixel"):
        values = cell[key]
        if not values:
            parts.append("undefined")
            continue
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        text = f"{mean:.3f} ± {std:.3f}"
        parts.append(f"**{text}**" if best[key] is not None and mean == best[key] else text)
    return " / ".join(parts)
