"""The HTML reports: the page parses, its images decode, its numbers are the run's, the gallery
is ordered worst misses first, regions are explained by their training patch, and the page
renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpkp import cli, evaluate, report
from cpkp.api import Detector
from cpkp.benchmark import Job, format_table
from cpkp.config import apply_overrides, load_preset
from cpkp.data.dataset import ImageDataset
from cpkp.data.demo import make_demo_dataset
from cpkp.data.readers import read_mvtec
from cpkp.data.records import Sample
from cpkp.evaluate import run_test
from cpkp.html_report import (
    REPORT_FILE,
    PrototypeMatches,
    RunInfo,
    gallery_order,
    markdown_table_html,
    run_report_html,
    write_benchmark_report,
    write_run_report,
)
from cpkp.metrics import compute_metrics

SIZE = 64  # model size of the synthetic runs
GRID = 8  # their prototype grid (stride 8)
TYPES = ["good", "good", "good", "crack", "crack", "crack", "spot", "spot"]
STRENGTH = [0.0, 0.0, 0.0, 1.5, 0.3, 2.0, 1.2, 0.6]  # defect signal per image
EXPLAINED = 5  # the image whose every grid cell is matched to prototype 3
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr"}
DATA_URI = re.compile(r'<img class="([^"]*)" src="data:image/(png|jpeg);base64,([^"]+)"')


# --- synthetic test passes -------------------------------------------------------------------


def _outputs(types: list[str], strength: list[float]) -> evaluate.TestOutputs:
    """A test pass with known maps: noise plus a square blob of ``strength`` on defects."""
    rng = np.random.default_rng(0)
    n = len(types)
    labels = np.array([0 if t == "good" else 1 for t in types])
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in np.flatnonzero(labels):
        y, x = 6 + (7 * i) % 36, 10 + (5 * i) % 36
        masks[i, y : y + 14, x : x + 14] = True
    fused = rng.normal(0, 0.05, (n, SIZE, SIZE)) + masks * np.array(strength)[:, None, None]
    maps = {
        "fused": fused.astype(np.float32),
        "kd": (0.5 * fused + rng.normal(0, 0.05, fused.shape)).astype(np.float32),
        "kp": (fused + rng.normal(0, 0.2, fused.shape)).astype(np.float32),
    }
    scores = {part: m.reshape(n, -1).max(1) for part, m in maps.items()}
    samples = [
        Sample(Path(f"/data/widget/test/{t}/{i:03d}.png"), int(lab), t, category="widget")
        for i, (t, lab) in enumerate(zip(types, labels))
    ]
    metrics = {
        part: compute_metrics(scores[part], labels, maps[part], masks, defect_types=types)
        for part in maps
    }
    return evaluate.TestOutputs(samples, scores, maps, masks, labels, metrics)


def _info(pixel_threshold: float = 0.9) -> RunInfo:
    return RunInfo("/runs/widget", "widget", "rd", "random:tiny", SIZE, 0.7, pixel_threshold)


def _test_image(i: int) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    return rng.uniform(0.2, 0.8, (SIZE, SIZE, 3)).astype(np.float32)


def _train_image(path: Path) -> None:
    """A training image whose pixels tell where they are: red 4*y, green 4*x."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([4 * y, 4 * x, np.full_like(y, 100)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def matches(tmp_path_factory) -> PrototypeMatches:
    folder = tmp_path_factory.mktemp("train")
    _train_image(folder / "a.png")
    _train_image(folder / "b.png")
    provenance = np.array([[0, 5, 5], [0, 1, 1], [2, 0, 0], [1, 2, 3]])
    kp_index = np.zeros((len(TYPES), GRID, GRID), np.int64)
    kp_index[EXPLAINED] = 3
    kp_index[3] = 2  # training image 2 has gone missing
    names = [str(folder / "a.png"), str(folder / "b.png"), str(folder / "gone.png")]
    return PrototypeMatches(kp_index, provenance, names)


@pytest.fixture(scope="module")
def synthetic(matches):
    outputs = _outputs(TYPES, STRENGTH)
    page = run_report_html(outputs, _info(), _test_image, matches)
    return outputs, page


# --- page checks -----------------------------------------------------------------------------


class _TagChecker(HTMLParser):
    """Every opened element is closed, in order; collects the element ids."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.ids += [value for key, value in attrs if key == "id"]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def _check_tags(page: str) -> list[str]:
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.stack == [], f"left open: {checker.stack}"
    return checker.ids


def _images(page: str) -> list[tuple[str, Image.Image]]:
    found = []
    for css, kind, data in DATA_URI.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format == kind.upper()
        found.append((css, image))
    return found


def _row(page: str, index: int) -> str:
    gallery = page[page.index('id="gallery"') :]
    start = gallery.index(f'data-index="{index}"')
    return gallery[start : gallery.index("</tr>", start)]


def _gallery_indices(page: str, table: str = "gallery") -> list[int]:
    section = page[page.index(f'id="{table}"') :]
    section = section[: section.index("</table>")]
    return [int(i) for i in re.findall(r'data-index="(\d+)"', section)]


def test_page_parses_with_balanced_tags_and_every_image_decodes(synthetic):
    outputs, page = synthetic
    assert page.startswith("<!DOCTYPE html>")
    ids = _check_tags(page)
    assert {"metrics", "gallery"} <= set(ids)
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside

    images = _images(page)
    assert len(images) == page.count("<img ")  # every picture is an embedded data URI
    panels = [im for css, im in images if "heatmap" in css]
    assert len(panels) == len(TYPES)
    assert panels[0].size == (4 * SIZE + 3 * report.PANEL_GAP, SIZE)
    assert sum(css.startswith("plot") for css, _ in images) == 3  # ROC, PRO, histogram
    assert all(np.asarray(im).std() > 0 for _, im in images)


def test_metrics_table_holds_the_numbers_of_metrics_json(synthetic):
    outputs, page = synthetic
    row = re.search(r'<tr data-part="fused" data-group="overall">(.*?)</tr>', page).group(1)
    values = re.findall(r'<td data-value="([^"]+)">([^<]+)</td>', row)
    expected = outputs.metrics["fused"]["overall"]
    image_auroc, pixel_auroc, aupro = values[0], values[1], values[2]
    assert float(image_auroc[0]) == expected["image_auroc"]  # exactly, not rounded
    assert image_auroc[1] == f"{expected['image_auroc']:.4f}"
    assert float(pixel_auroc[0]) == expected["pixel_auroc"]
    assert float(aupro[0]) == expected["aupro"]
    spot = re.search(r'<tr data-part="kp" data-group="spot">(.*?)</tr>', page).group(1)
    kp_ap = re.findall(r'data-value="([^"]+)"', spot)[-1]
    assert float(kp_ap) == outputs.metrics["kp"]["per_defect_type"]["spot"]["pixel_ap"]
    parts = re.findall(r'<tr data-part="(\w+)" data-group="overall">', page)
    assert parts == ["fused", "kd", "kp"]


def test_gallery_order_puts_worst_misses_first():
    scores = np.array([0.9, 0.1, 0.5, 0.95, 0.2])
    labels = np.array([0, 0, 1, 1, 1])
    # misses: good 0.9 is above 2 of 3 defects; defects 0.2 and 0.5 are below 1 of 2 goods
    # (the lower first); then good 0.1 and defect 0.95, which no image of the other class passes
    assert gallery_order(scores, labels).tolist() == [0, 4, 2, 1, 3]
    tied = gallery_order(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 1]))
    assert tied.tolist()[0] in (1, 2)  # a tie counts half; defects first within a miss level


def test_gallery_rows_follow_that_order_lowest_defect_first(synthetic):
    outputs, page = synthetic
    shown = _gallery_indices(page)
    assert shown == gallery_order(outputs.scores["fused"], outputs.labels).tolist()
    scores = outputs.scores["fused"]
    defects = [i for i in shown if outputs.labels[i] == 1]
    assert defects[0] == int(np.argmin(np.where(outputs.labels == 1, scores, np.inf)))
    goods = [i for i in shown if outputs.labels[i] == 0]
    assert goods[0] == int(np.argmax(np.where(outputs.labels == 0, scores, -np.inf)))


def test_flagged_region_is_shown_beside_its_matched_training_patch(synthetic, matches):
    outputs, page = synthetic
    row = _row(page, EXPLAINED)
    assert "looks unlike this normal patch" in row
    assert "b.png, grid y 2, x 3 (prototype 3)" in row

    fused = outputs.maps["fused"][EXPLAINED]
    y, x = np.unravel_index(np.argmax(fused), fused.shape)
    kp = outputs.maps["kp"][EXPLAINED, y, x]
    assert f"peak {fused[y, x]:.4g} at y {y}, x {x}; A_kp there {kp:.4g}" in row

    train_patch = np.asarray(_images(row)[-1][1])
    # the 32-pixel window around grid cell (2, 3), cell centre (20, 28): rows 4.., columns 12..
    assert train_patch.shape == (32, 32, 3)
    assert train_patch[1, 1].tolist() == [4 * 5, 4 * 13, 100]
    assert train_patch[16, 16].tolist() == [4 * 20, 4 * 28, 100]
    assert train_patch[12, 12].tolist() == [255, 220, 0]  # the matched cell is boxed

    missing = _row(page, 3)
    assert "gone.png is not available" in missing
    assert "looks unlike" not in _row(page, 4)  # its blob stays below the pixel threshold


def test_page_without_prototype_and_with_only_good_images():
    types = ["good"] * 4
    outputs = _outputs(types, [0.0] * 4)
    del outputs.maps["kp"], outputs.scores["kp"], outputs.metrics["kp"]
    page = run_report_html(outputs, _info(0.1), _test_image)
    _check_tags(page)
    assert "looks unlike" not in page
    assert "No ROC curve" in page and "No PRO curve" in page
    assert page.count('class="undefined">undefined</td>') >= 4
    assert re.findall(r'<tr data-part="(\w+)" data-group="overall">', page) == ["fused", "kd"]


def test_gallery_is_capped_and_the_rest_listed_without_pictures(matches):
    outputs = _outputs(TYPES, STRENGTH)
    page = run_report_html(outputs, _info(), _test_image, matches, gallery_limit=3)
    _check_tags(page)
    order = gallery_order(outputs.scores["fused"], outputs.labels).tolist()
    assert _gallery_indices(page) == order[:3]
    assert _gallery_indices(page, "rest") == order[3:]
    assert page.count('class="panel heatmap"') == 3
    assert "The 3 worst-ranked of 8 test images are shown" in page


def test_large_model_sizes_get_small_thumbnails():
    image, mask, amap = np.ones((300, 300, 3)), np.eye(300, dtype=bool), np.ones((300, 300))
    small = report.shrink(image, mask, amap, 192)
    assert [a.shape[:2] for a in small] == [(192, 192)] * 3
    assert small[1].dtype == bool and small[2].max() == pytest.approx(1.0)


def test_flagged_regions_are_the_connected_components_highest_peak_first():
    amap = np.zeros((10, 10))
    amap[1:3, 1:3] = 2.0
    amap[1, 2] = 2.5
    amap[6:9, 6:9] = 5.0
    amap[7, 7] = 6.0
    amap[0, 9] = 1.0  # equal to the threshold: normal
    regions = report.flagged_regions(amap, 1.0)
    assert [(r.peak, r.peak_value, r.area) for r in regions] == [((7, 7), 6.0, 9), ((1, 2), 2.5, 4)]


# --- benchmark report ------------------------------------------------------------------------


def _job(category: str, variant: str, seed: int, run_dir: str) -> Job:
    return Job("mvtec", "/data", category, variant, seed, None, run_dir, {})


def _bench_metrics(image: float | None, pixel: float | None) -> dict:
    return {"fused": {"overall": {"image_auroc": image, "pixel_auroc": pixel}}}


def test_benchmark_page_has_the_table_the_chart_and_links(tmp_path):
    run = tmp_path / "runs/a/cpkp-rd/seed0"
    run.mkdir(parents=True)
    (run / REPORT_FILE).write_text("<!DOCTYPE html>")
    results = [
        (_job("a", "cpkp-rd", 0, str(run)), _bench_metrics(0.9, 0.8)),
        (_job("a", "cpkp-rd", 1, str(tmp_path / "x")), _bench_metrics(0.7, 0.8)),
        (_job("a", "rd@cpkp", 0, str(tmp_path / "y")), _bench_metrics(0.6, 0.95)),
        (_job("b", "cpkp-rd", 0, str(tmp_path / "z")), _bench_metrics(1.0, None)),
    ]
    path = write_benchmark_report(results, tmp_path)
    page = path.read_text()
    _check_tags(page)
    assert path.name == "benchmark.html"

    cells = re.findall(r"<td>(.*?)</td>", page[page.index('id="benchmark"') :])
    markdown_rows = [line for line in format_table(results).splitlines() if line.startswith("| a")]
    expected = [c.strip().replace("**", "") for c in markdown_rows[0].strip("|").split("|")]
    assert [re.sub(r"</?strong>", "", c) for c in cells[: len(expected)]] == expected
    assert "<strong>0.800 ± 0.141</strong>" in page  # mean ± std over seeds, best in bold
    assert '<a href="runs/a/cpkp-rd/seed0/report.html">' in page
    charts = _images(page)
    assert len(charts) == 1 and charts[0][1].size[0] > 300


def test_markdown_table_becomes_an_html_table():
    text = "| x | y |\n|---|---|\n| 1 | **2** |\n\nA note."
    assert markdown_table_html(text) == (
        '<table id="benchmark" class="metrics"><thead><tr><th>x</th><th>y</th></tr></thead>'
        "<tbody><tr><td>1</td><td><strong>2</strong></td></tr></tbody></table>"
        '<p class="note">A note.</p>'
    )


# --- a real (tiny) run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A random-backbone CPKP(RD) at 64 px, tested; the pixel threshold lowered so that regions
    are flagged, and the report written again."""
    root = tmp_path_factory.mktemp("report-data")
    make_demo_dataset(
        root, categories=["brick"], n_train=4, n_test_good=2, n_defect=4, size=64, seed=0
    )
    config = load_preset("cpu_rd_lite0")
    apply_overrides(
        config,
        {
            "data": {"image_size": 64},
            "model": {"backbone": "random:tf_efficientnet_lite0"},
            "train": {"batch_size": 2, "epochs": 1},
        },
    )
    splits = read_mvtec(root, "brick")
    detector = Detector(config)
    run_dir = tmp_path_factory.mktemp("report-run")
    detector.fit(splits.train, run_dir=run_dir, progress=False)
    outputs = run_test(detector, splits.test, out_dir=run_dir, overlays=False, progress=False)
    first = (run_dir / REPORT_FILE).read_text()
    detector.calibration.pixel_threshold = float(np.quantile(outputs.maps["fused"], 0.99))
    write_run_report(detector, outputs, run_dir, ImageDataset(outputs.samples, 64))
    return detector, outputs, run_dir, first


def test_run_test_writes_the_report_with_the_run_metrics(real_run):
    detector, outputs, run_dir, first = real_run
    _check_tags(first)
    value = outputs.metrics["kd"]["overall"]["pixel_auroc"]
    assert f'<td data-value="{value!r}">' in first
    assert outputs.kp_index.shape == (6, 8, 8)  # 64 px at stride 8
    assert "random:tf_efficientnet_lite0" in first and "brick" in first


def test_real_explanations_point_at_the_prototype_provenance(real_run):
    detector, outputs, run_dir, _ = real_run
    page = (run_dir / REPORT_FILE).read_text()
    captions = re.findall(r"<figcaption>([^<]*?), grid y (\d+), x (\d+) \(prototype (\d+)\)", page)
    assert captions, "no flagged region was explained"
    names = [Path(p).name for p in detector.train_images]
    provenance = detector.prototype.provenance.numpy()
    for name, gy, gx, k in captions:
        image, y, x = provenance[int(k)]
        assert (names[image], y, x) == (name, int(gy), int(gx))
    _images(page)


def test_cli_has_a_no_report_switch():
    parser = cli.build_parser()
    assert parser.parse_args(["test", "--run", "r", "--no-report"]).no_report is True
    assert parser.parse_args(["train", "--out", "o", "--test"]).no_report is False


# --- headless Chromium -----------------------------------------------------------------------


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    return found


def _run_chromium(browser: str, profile: Path, *args: str) -> str:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)
    return done.stdout


def test_report_renders_in_headless_chromium(real_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed; .ci/run installs it with apt-get when run as root")
    _, outputs, run_dir, _ = real_run
    url = (run_dir / REPORT_FILE).resolve().as_uri()
    shot = tmp_path / "report.png"
    _run_chromium(
        browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url
    )
    print(f"screenshot: {shot}")
    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 10  # not a blank page

    dom = _run_chromium(browser, tmp_path / "profile", "--dump-dom", url)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    ok = int(re.search(r'data-images-ok="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert ok == total >= 3 + len(outputs.labels)
    assert int(re.search(r'data-heatmaps-ok="(\d+)"', body).group(1)) == len(outputs.labels)
    assert '<table id="metrics"' in dom

    by_score = _run_chromium(browser, tmp_path / "profile", "--dump-dom", url + "#sort=score-down")
    gallery = by_score[by_score.index('id="gallery"') :]
    scores = [float(s) for s in re.findall(r'data-score="([^"]+)"', gallery)]
    assert len(scores) == len(outputs.labels) and scores == sorted(scores, reverse=True)
