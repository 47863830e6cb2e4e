"""The pages a person opens in a browser: ``report.html`` per test run, ``benchmark.html``.

Each page is one self-contained HTML file: pictures are embedded as base64 data URIs and the
few lines of JavaScript (sorting, an image check) are inline, so the file can be mailed or
opened offline. A run's report holds its header, the metrics table (fused, ``A_kd`` and
``A_kp`` alone; overall and per defect type), image-level ROC and PRO curves, a histogram of
good vs defect image scores with the threshold, and a gallery of test images, worst misses
first. With a knowledge prototype, each flagged region is shown next to the normal training
patch its peak was matched to (the prototype's provenance).
"""

from __future__ import annotations

import base64
import html
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import roc_curve

import cpkp
from cpkp import runio
from cpkp.data.images import load_image, resize_image
from cpkp.errors import CpkpError
from cpkp.metrics import FPR_LIMIT, pro_curve_points
from cpkp.report import (
    Region,
    bar_chart,
    box,
    crop,
    curve_plot,
    encode,
    flagged_regions,
    outline,
    overlay_panel,
    score_histogram,
    shrink,
)

if TYPE_CHECKING:
    from cpkp.api import Detector
    from cpkp.benchmark import Job
    from cpkp.data.dataset import ImageDataset
    from cpkp.evaluate import TestOutputs

logger = logging.getLogger(__name__)

REPORT_FILE = runio.REPORT_FILE
BENCHMARK_REPORT_FILE = "benchmark.html"
GALLERY_LIMIT = 200  # test images shown with pictures; the rest are listed without
THUMB_SIDE = 192  # pixels per gallery panel at most (smaller model sizes stay as they are)
REGIONS_SHOWN = 3  # explained regions per image, highest peaks first
PATCH_CELLS = 3  # a prototype is the 3x3-cell unfold around its grid cell (DESIGN.md §1.1)
MIN_PATCH_SIDE = 32  # pixels at the model size, so a stride-4 patch is still visible
PATCH_DISPLAY = 112  # CSS pixels a patch is drawn at
MIN_PANEL_DISPLAY = 128  # CSS pixels a gallery panel is drawn at, at least
COLOUR_SAMPLE = 4_000_000  # map values the colour scale's percentiles are taken from, at most
PART_NAMES = {"fused": "fused", "kd": "A_kd alone", "kp": "A_kp alone"}
METRIC_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1_max", "image F1-max"),
    ("pixel_f1_max", "pixel F1-max"),
    ("image_ap", "image AP"),
    ("pixel_ap", "pixel AP"),
)

ImageLoader = Callable[[int], np.ndarray]  # test image index -> [S, S, 3] float RGB in [0, 1]


@dataclass
class RunInfo:
    """What the header of a run's report says; thresholds from the run's calibration."""

    run_dir: str
    category: str
    variant: str
    backbone: str
    image_size: int
    image_threshold: float
    pixel_threshold: float
    settings: dict[str, Any] = field(default_factory=dict)
    created: str = field(
        default_factory=lambda: datetime.now().astimezone().isoformat("T", "seconds")
    )
    version: str = cpkp.__version__

    @classmethod
    def from_detector(cls, detector: Detector, run_dir: str | Path, category: str) -> RunInfo:
        """The header of a fitted detector's run."""
        config = detector.config
        return cls(
            run_dir=str(run_dir),
            category=category,
            variant=config.model.variant,
            backbone=config.model.backbone,
            image_size=detector.image_size,
            image_threshold=detector.calibration.image_threshold,
            pixel_threshold=detector.calibration.pixel_threshold,
            settings={
                "co_progression": config.train.co_progression,
                "prototype": config.prototype.enabled,
                "alpha": config.train.alpha,
                "gamma": config.scoring.gamma,
                "fusion": config.scoring.fusion,
                "epochs": config.train.epochs,
                "seed": config.train.seed,
            },
        )


@dataclass
class PrototypeMatches:
    """Which normal training patch each test grid cell was matched to.

    Attributes:
        kp_index: [N, h, w] nearest prototype of every grid cell of every test image.
        provenance: [M, 3] (training image index, grid y, grid x) of every prototype.
        train_images: the training image files, indexed by provenance[:, 0].
    """

    kp_index: np.ndarray
    provenance: np.ndarray
    train_images: list[str]


# --- a run's report ----------------------------------------------------------------------------


def write_run_report(
    detector: Detector, outputs: TestOutputs, out_dir: str | Path, dataset: ImageDataset
) -> Path:
    """Write ``report.html`` for one test pass into ``out_dir``.

    Args:
        detector: the fitted detector that was tested (thresholds, settings, prototype).
        outputs: what :func:`cpkp.evaluate.run_test` computed.
        out_dir: the run (or test output) folder.
        dataset: the test images at the model size, in the order of ``outputs.samples``.

    Returns:
        The report's path.
    """
    out_dir = Path(out_dir)
    category = next((s.category for s in outputs.samples if s.category), "")
    info = RunInfo.from_detector(detector, out_dir, category)
    matches = None
    if detector.prototype is not None and outputs.kp_index is not None:
        matches = PrototypeMatches(
            outputs.kp_index,
            detector.prototype.provenance.cpu().numpy(),
            list(detector.train_images),
        )

    def load(index: int) -> np.ndarray:
        return dataset[index]["image"].permute(1, 2, 0).numpy()

    page = run_report_html(outputs, info, load, matches)
    path = out_dir / REPORT_FILE
    runio.write_text(path, page)
    logger.info("report written to %s (%.1f MB)", path, len(page.encode()) / 1e6)
    return path


def run_report_html(
    outputs: TestOutputs,
    info: RunInfo,
    test_image: ImageLoader,
    matches: PrototypeMatches | None = None,
    gallery_limit: int = GALLERY_LIMIT,
    thumb_side: int = THUMB_SIDE,
) -> str:
    """The whole report page of one test pass.

    Args:
        outputs: scores and maps per part, masks [N, S, S], labels [N], metrics, samples.
        info: the header and the thresholds.
        test_image: test image index -> [S, S, 3] float RGB at the model size; called only for
            the images in the gallery.
        matches: nearest prototypes and their provenance, for the region explanations.
        gallery_limit: images shown with pictures (worst misses first).
        thumb_side: largest side of one gallery panel in pixels.
    """
    sections = [
        _run_header(outputs, info),
        _metrics_section(outputs.metrics),
        _curves_section(outputs),
        _histogram_section(outputs, info),
        _gallery_section(outputs, info, test_image, matches, gallery_limit, thumb_side),
    ]
    return _page(f"cpkp report: {info.category or info.run_dir}", "\n".join(sections))


def _run_header(outputs: TestOutputs, info: RunInfo) -> str:
    n_defect = int((outputs.labels == 1).sum())
    rows = [
        ("run folder", info.run_dir),
        ("category", info.category or "(none)"),
        ("variant", info.variant),
        ("backbone", info.backbone),
        ("settings", ", ".join(f"{k} {_plain(v)}" for k, v in info.settings.items())),
        ("image size", f"{info.image_size} x {info.image_size} (maps and metrics at this size)"),
        (
            "test images",
            f"{len(outputs.labels)}: {len(outputs.labels) - n_defect} good, {n_defect} defect",
        ),
        (
            "thresholds",
            f"image {info.image_threshold:.6g}, pixel {info.pixel_threshold:.6g} "
            "(calibrated on the training images; the metrics never use them)",
        ),
        ("written", f"{info.created} by cpkp {info.version}"),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<h1>cpkp test report</h1>\n<table class="header">{body}</table>'


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- metrics -------------------------------------------------------------------------------


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{_e(name)}</th>" for _, name in METRIC_COLUMNS)
    rows = []
    for part, values in metrics.items():
        groups = {"overall": values.get("overall", {}), **values.get("per_defect_type", {})}
        for group, numbers in groups.items():
            cells = "".join(_metric_cell(numbers.get(key)) for key, _ in METRIC_COLUMNS)
            count = f"{numbers.get('n_images', '')} ({numbers.get('n_defective', '')} defect)"
            rows.append(
                f'<tr data-part="{_e(part)}" data-group="{_e(group)}">'
                f"<td>{_e(PART_NAMES.get(part, part))}</td><td>{_e(group)}</td>"
                f"<td>{_e(count)}</td>{cells}</tr>"
            )
    notes = _metric_notes(metrics)
    return (
        "<h2>Metrics</h2>\n"
        "<p>Each defect type is evaluated on its own images together with all good images. "
        "<em>undefined</em>: the group lacks good or defect images (or pixels).</p>\n"
        '<table id="metrics" class="metrics"><thead><tr><th>map</th><th>images</th>'
        f"<th>count</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>\n{notes}"
    )


def _metric_cell(value: Any) -> str:
    if value is None:
        return '<td class="undefined">undefined</td>'
    return f'<td data-value="{float(value)!r}">{float(value):.4f}</td>'


def _metric_notes(metrics: Mapping[str, Any]) -> str:
    fused = metrics.get("fused", {})
    notes = []
    empty = fused.get("empty_mask_images", [])
    if empty:
        notes.append(f"{len(empty)} defect image(s) have an all-zero ground-truth mask.")
    bounds = fused.get("pixel_error_bounds", {}).get("overall", {})
    worst = max(bounds.values(), default=0.0)
    if worst > 0:
        notes.append(f"Pixel metrics are binned; their error is at most {worst:.2g}.")
    return "".join(f'<p class="note">{_e(n)}</p>' for n in notes)


# --- curves and histogram ------------------------------------------------------------------


def _curves_section(outputs: TestOutputs) -> str:
    figures = []
    labels = outputs.labels
    if (labels == 0).any() and (labels == 1).any():
        curves = {}
        for part, scores in outputs.scores.items():
            fpr, tpr, _ = roc_curve(labels, scores)
            curves[PART_NAMES.get(part, part)] = (fpr, tpr)
        png = curve_plot(
            curves, "ROC, image level", "false-positive rate", "true-positive rate", diagonal=True
        )
        figures.append(_img(png, "ROC curves at image level", "plot roc"))
    else:
        figures.append(
            '<p class="note">No ROC curve: the test set lacks good or defect images.</p>'
        )
    pro = _pro_curves(outputs)
    if pro:
        png = curve_plot(
            pro,
            f"PRO up to FPR {FPR_LIMIT:g}",
            "false-positive rate (pixels)",
            "per-region overlap",
            xmax=FPR_LIMIT,
        )
        figures.append(_img(png, "per-region-overlap curves", "plot pro"))
    else:
        figures.append(
            '<p class="note">No PRO curve: no ground-truth defect pixels, or no '
            "defect-free pixels.</p>"
        )
    return '<h2>Curves</h2>\n<div class="plots">' + "".join(figures) + "</div>"


def _pro_curves(outputs: TestOutputs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PRO curves per part up to the FPR limit (metrics' binned histogram: a plot, not a metric)."""
    masks = outputs.masks
    if not masks.any() or masks.all():
        return {}
    curves = {}
    for part, maps in outputs.maps.items():
        points = pro_curve_points(maps, masks)
        if points is None:
            continue
        fpr, pro = points
        keep = fpr <= FPR_LIMIT
        curves[PART_NAMES.get(part, part)] = (fpr[keep], pro[keep])
    return curves


def _histogram_section(outputs: TestOutputs, info: RunInfo) -> str:
    png = score_histogram(outputs.scores["fused"], outputs.labels, info.image_threshold)
    return (
        "<h2>Image scores</h2>\n"
        + _img(png, "histogram of good and defect image scores", "plot histogram")
        + '<p class="note">Dashed line: the image threshold; an image scoring above it is '
        "predicted defective.</p>"
    )


# --- gallery -------------------------------------------------------------------------------


def gallery_order(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Test image indices, worst misses first.

    An image's miss is the share of the other class on the wrong side of it: for a defect
    image, the good images scoring above it (ties count half, as in AUROC); for a good image,
    the defect images scoring below it. Ties in the miss go by rank within the class: the
    lowest-scored defect image and the highest-scored good image first, alternating.

    Args:
        scores: [N] image scores; labels: [N] 0 good, 1 defect.

    Returns:
        [N] int indices.
    """
    scores = np.asarray(scores, np.float64)
    good, defect = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
    miss = np.zeros(len(scores))
    within = np.zeros(len(scores))
    for label, others, sign in ((1, good, 1.0), (0, defect, -1.0)):
        chosen = labels == label
        if len(others):
            below = np.searchsorted(others, scores[chosen], "left")
            above = len(others) - np.searchsorted(others, scores[chosen], "right")
            tied = len(others) - below - above
            wrong = above if label == 1 else below
            miss[chosen] = (wrong + 0.5 * tied) / len(others)
        ranks = np.argsort(np.argsort(sign * scores[chosen], kind="stable"), kind="stable")
        within[chosen] = ranks / max(1, chosen.sum())
    return np.lexsort((np.arange(len(scores)), labels == 0, within, -miss))


def _gallery_section(
    outputs: TestOutputs,
    info: RunInfo,
    test_image: ImageLoader,
    matches: PrototypeMatches | None,
    limit: int,
    thumb_side: int,
) -> str:
    order = gallery_order(outputs.scores["fused"], outputs.labels)
    fused = outputs.maps["fused"]
    step = max(1, fused.size // COLOUR_SAMPLE)
    # the colour scale of a large test set comes from a strided sample of its map values
    low, high = (float(v) for v in np.percentile(fused.reshape(-1)[::step], [1.0, 99.9]))
    explainer = _Explainer(matches, info, outputs) if matches is not None else None
    shown, listed = order[:limit], order[limit:]

    rows = []
    for rank, i in enumerate(shown):
        image = test_image(int(i))
        panel = _panel(
            image, outputs.masks[i], fused[i], info.pixel_threshold, low, high, thumb_side
        )
        extra = "" if explainer is None else explainer.html(int(i), image)
        rows.append(_gallery_row(outputs, int(i), rank, panel + extra))
    rest = [_gallery_row(outputs, int(i), limit + k, "") for k, i in enumerate(listed)]

    note = (
        f"<p>All {len(order)} test images are shown."
        if not len(listed)
        else f"<p>The {len(shown)} worst-ranked of {len(order)} test images are shown with "
        f"pictures; the other {len(listed)} are listed below without pictures."
    )
    head = _gallery_head()
    parts = [
        "<h2>Test images</h2>",
        note + " Order: worst misses first (defect images with the lowest scores, good images "
        "with the highest). Click a column header to sort; click again to reverse.</p>",
        "<p>Panels: input | ground truth (green) | anomaly map (colour scale "
        f"{low:.4g} to {high:.4g}) | map above the pixel threshold (red).</p>",
        f'<table id="gallery" class="gallery sortable">{head}<tbody>{"".join(rows)}</tbody>'
        "</table>",
    ]
    if rest:
        parts.append("<h3>Images without pictures</h3>")
        parts.append(
            f'<table id="rest" class="gallery sortable">{head}<tbody>{"".join(rest)}'
            "</tbody></table>"
        )
    return "\n".join(parts)


def _gallery_head() -> str:
    columns = [
        ("rank", "num", "miss rank"),
        ("", "", "panels"),
        ("score", "num", "score"),
        ("label", "num", "label"),
        ("type", "text", "defect type"),
        ("path", "text", "path"),
    ]
    cells = "".join(
        f'<th data-key="{k}" data-type="{t}" onclick="sortBy(this)">{_e(n)}</th>'
        if k
        else f"<th>{_e(n)}</th>"
        for k, t, n in columns
    )
    return f"<thead><tr>{cells}</tr></thead>"


def _gallery_row(outputs: TestOutputs, i: int, rank: int, pictures: str) -> str:
    sample = outputs.samples[i]
    score = float(outputs.scores["fused"][i])
    label = int(outputs.labels[i])
    data = {
        "rank": rank,
        "score": repr(score),
        "label": label,
        "type": sample.defect_type,
        "path": str(sample.image),
        "index": i,
    }
    attributes = " ".join(f'data-{k}="{_e(str(v))}"' for k, v in data.items())
    others = ", ".join(
        f"{PART_NAMES[p]} {float(s[i]):.4g}" for p, s in outputs.scores.items() if p != "fused"
    )
    return (
        f"<tr {attributes}><td>{rank + 1}</td><td>{pictures}</td>"
        f'<td title="{_e(others)}">{score:.4g}</td><td>{"defect" if label else "good"}</td>'
        f'<td>{_e(sample.defect_type)}</td><td class="path">{_e(str(sample.image))}</td></tr>'
    )


def _panel(image, mask, amap, threshold, low, high, thumb_side) -> str:
    image, mask, amap = shrink(image, mask, amap, thumb_side)
    panel = overlay_panel(image, mask, amap, threshold, low, high)
    zoom = max(1, MIN_PANEL_DISPLAY // amap.shape[0])  # small model sizes drawn larger
    alt = "input, ground truth, anomaly map, region"
    return _img(encode(panel, "JPEG"), alt, "panel heatmap", panel.shape[1] * zoom)


class _Explainer:
    """For each flagged region: the training patch its peak cell's nearest prototype came from."""

    def __init__(self, matches: PrototypeMatches, info: RunInfo, outputs: TestOutputs) -> None:
        self.matches = matches
        self.size = info.image_size
        self.threshold = info.pixel_threshold
        self.maps = outputs.maps
        grid = matches.kp_index.shape[-2:]
        self.stride = (self.size / grid[0], self.size / grid[1])
        self.side = max(MIN_PATCH_SIDE, round(PATCH_CELLS * max(self.stride)))
        self.train_cache: dict[int, np.ndarray | None] = {}

    def html(self, i: int, image: np.ndarray) -> str:
        """The explanations of test image ``i`` ([S, S, 3] float at the model size)."""
        regions = flagged_regions(self.maps["fused"][i], self.threshold)
        if not regions:
            return ""
        items = [self._region(i, image, r) for r in regions[:REGIONS_SHOWN]]
        more = len(regions) - REGIONS_SHOWN
        if more > 0:
            items.append(f'<p class="note">and {more} smaller-peaked region(s)</p>')
        return '<div class="explain">' + "".join(items) + "</div>"

    def _region(self, i: int, image: np.ndarray, region: Region) -> str:
        y, x = region.peak
        gy = min(int(y / self.stride[0]), self.matches.kp_index.shape[1] - 1)
        gx = min(int(x / self.stride[1]), self.matches.kp_index.shape[2] - 1)
        k = int(self.matches.kp_index[i, gy, gx])
        t, ty, tx = (int(v) for v in self.matches.provenance[k])
        here = self._patch(outline(image, region.mask), gy, gx)
        train = self._train_image(t)
        kp = self.maps.get("kp")
        distance = "" if kp is None else f"; A_kp there {float(kp[i, y, x]):.4g}"
        caption = f"this region ({region.area} px, peak {region.peak_value:.4g} at y {y}, x {x}"
        left = _figure(here, caption + distance + ")")
        if train is None:
            name = self.matches.train_images[t] if t < len(self.matches.train_images) else "?"
            right = f'<p class="note">training image {_e(name)} is not available</p>'
        else:
            patch = self._patch(np.round(np.clip(train, 0, 1) * 255).astype(np.uint8), ty, tx)
            name = Path(self.matches.train_images[t]).name
            right = _figure(patch, f"{name}, grid y {ty}, x {tx} (prototype {k})")
        return (
            f'<div class="match">{left}<span class="unlike">looks unlike this normal '
            f"patch</span>{right}</div>"
        )

    def _patch(self, picture: np.ndarray, gy: int, gx: int) -> np.ndarray:
        """A window of a few grid cells around cell (gy, gx), the cell itself boxed."""
        sy, sx = self.stride
        center = ((gy + 0.5) * sy, (gx + 0.5) * sx)
        window, top, left = crop(picture, center, self.side)
        window = window.copy()
        cell = (round(gy * sy) - top, round(gx * sx) - left)
        return box(window, cell[0], cell[1], cell[0] + round(sy), cell[1] + round(sx))

    def _train_image(self, t: int) -> np.ndarray | None:
        if t not in self.train_cache:
            self.train_cache[t] = self._load_train(t)
        return self.train_cache[t]

    def _load_train(self, t: int) -> np.ndarray | None:
        if t >= len(self.matches.train_images):
            logger.warning(
                "prototype refers to training image %d; the run lists %d",
                t,
                len(self.matches.train_images),
            )
            return None
        path = self.matches.train_images[t]
        try:
            return resize_image(load_image(path), self.size).permute(1, 2, 0).numpy()
        except (CpkpError, OSError) as err:
            logger.warning("report: training image %s not shown (%s)", path, err)
            return None


def _figure(picture: np.ndarray, caption: str) -> str:
    return (
        f"<figure>{_img(encode(picture), caption, 'patch', PATCH_DISPLAY)}"
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


# --- benchmark report ----------------------------------------------------------------------


def write_benchmark_report(results: Sequence[tuple[Job, dict[str, Any]]], out: Path) -> Path:
    """Write ``benchmark.html`` beside ``benchmark.md`` from the runs finished so far.

    Args:
        results: (job, metrics) per finished run, as :func:`cpkp.benchmark.write_tables` takes.
        out: the benchmark folder.

    Returns:
        The page's path.
    """
    out = Path(out)
    path = out / BENCHMARK_REPORT_FILE
    runio.write_text(path, benchmark_report_html(results, out))
    logger.info("benchmark report written to %s", path)
    return path


def benchmark_report_html(results: Sequence[tuple[Job, dict[str, Any]]], out: Path) -> str:
    """The benchmark page: the paper-style table, image AUROC bars, links to each run."""
    # Imported here: cpkp.benchmark calls this module from write_tables.
    from cpkp.benchmark import format_table

    sections = [
        "<h1>cpkp benchmark</h1>",
        f"<p>Folder {_e(str(out))}; {len(results)} run(s) finished; written "
        f"{datetime.now().astimezone().isoformat('T', 'seconds')} by cpkp {cpkp.__version__}."
        "</p>",
        "<h2>Image / pixel AUROC (fused map)</h2>",
        markdown_table_html(format_table(results)),
        "<h2>Image AUROC per category</h2>",
        _benchmark_chart(results),
        "<h2>Runs</h2>",
        _run_links(results, out),
    ]
    return _page("cpkp benchmark", "\n".join(sections))


def markdown_table_html(text: str) -> str:
    """A Markdown pipe table (and the paragraphs around it) as HTML; ``**x**`` turns bold."""
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    paragraphs = [line for line in lines if line.strip() and not line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
    rows = [row for row in rows if not all(set(cell) <= set("-: ") for cell in row)]
    html_rows = []
    for n, row in enumerate(rows):
        tag = "th" if n == 0 else "td"
        cells = "".join(f"<{tag}>{_bold(_e(cell))}</{tag}>" for cell in row)
        html_rows.append(f"<tr>{cells}</tr>")
    head = html_rows[0] if html_rows else ""
    body = "".join(html_rows[1:])
    notes = "".join(f'<p class="note">{_bold(_e(p))}</p>' for p in paragraphs)
    return (
        f'<table id="benchmark" class="metrics"><thead>{head}</thead><tbody>{body}</tbody>'
        f"</table>{notes}"
    )


def _bold(text: str) -> str:
    pieces = text.split("**")
    return "".join(f"<strong>{p}</strong>" if k % 2 else p for k, p in enumerate(pieces))


def _benchmark_chart(results: Sequence[tuple[Job, dict[str, Any]]]) -> str:
    values: dict[tuple[str, str], list[float]] = {}
    for job, metrics in results:
        value = metrics.get("fused", {}).get("overall", {}).get("image_auroc")
        values.setdefault((job.category, job.label), [])
        if value is not None:
            values[(job.category, job.label)].append(float(value))
    if not any(values.values()):
        return '<p class="note">No image AUROC to plot (undefined in every run).</p>'
    categories = list(dict.fromkeys(c for c, _ in values))
    labels = list(dict.fromkeys(v for _, v in values))
    series = {}
    for label in labels:
        runs = [values.get((c, label), []) for c in categories]
        means = [statistics.fmean(r) if r else float("nan") for r in runs]
        stds = [statistics.stdev(r) if len(r) > 1 else 0.0 for r in runs]
        series[label] = (means, stds)
    png = bar_chart(categories, series, "image AUROC (fused)")
    return (
        _img(png, "image AUROC per category and variant", "plot bars")
        + '<p class="note">Bars: mean over seeds; error bars: standard deviation.</p>'
    )


def _run_links(results: Sequence[tuple[Job, dict[str, Any]]], out: Path) -> str:
    items = []
    for job, _ in results:
        report = Path(job.run_dir) / REPORT_FILE
        name = f"{job.category} / {job.label} / seed {job.seed}"
        if report.exists():
            href = _relative(report, out)
            items.append(f'<li><a href="{_e(href)}">{_e(name)}</a></li>')
        else:
            items.append(f"<li>{_e(name)} (no report.html)</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _relative(path: Path, start: Path) -> str:
    try:
        return path.resolve().relative_to(start.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()


# --- page ----------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(data: bytes, alt: str, css: str, width: int | None = None) -> str:
    kind = "jpeg" if data[:3] == b"\xff\xd8\xff" else "png"
    uri = f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")
    size = "" if width is None else f' width="{width}"'
    return f'<img class="{css}" src="{uri}" alt="{_e(alt)}"{size}>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
table.metrics td[data-value] { text-align: right; font-variant-numeric: tabular-nums; }
td.undefined { color: #999; }
table.header th { background: #f4f4f4; }
table.sortable th[data-key] { cursor: pointer; background: #eef; }
td.path { font-size: 0.8em; word-break: break-all; max-width: 20em; }
img.panel { display: block; max-width: 100%; }
img.patch, img.panel { image-rendering: pixelated; }
.plots img { margin-right: 1em; }
.explain .match { display: flex; align-items: center; gap: 0.6em; margin-top: 0.4em; }
figure { margin: 0; font-size: 0.75em; width: 13em; }
.unlike { font-style: italic; color: #a00; }
p.note { color: #555; font-size: 0.9em; }
"""

SCRIPT = """
function sortBy(th) {
  var table = th.closest("table"), body = table.tBodies[0], key = th.dataset.key;
  var numeric = th.dataset.type === "num", up = th.dataset.dir !== "up";
  th.dataset.dir = up ? "up" : "down";
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.dataset[key], y = b.dataset[key];
    if (numeric) { x = parseFloat(x); y = parseFloat(y); }
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  });
  rows.forEach(function (row) { body.appendChild(row); });
}
window.addEventListener("load", function () {
  var wanted = /^#sort=(\\w+)(-down)?$/.exec(location.hash);
  if (wanted) {
    document.querySelectorAll("table.sortable th[data-key='" + wanted[1] + "']")
      .forEach(function (th) { if (wanted[2]) th.dataset.dir = "up"; sortBy(th); });
  }
  var ok = 0, heat = 0;
  Array.prototype.forEach.call(document.images, function (img) {
    if (img.complete && img.naturalWidth > 0) {
      ok++;
      if (img.classList.contains("heatmap")) heat++;
    }
  });
  document.body.dataset.imagesOk = ok;
  document.body.dataset.imagesTotal = document.images.length;
  document.body.dataset.heatmapsOk = heat;
});
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
