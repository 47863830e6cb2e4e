"""benchmarks/perf.py end to end on a tiny random network: every table and row is there."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[1] / "benchmarks" / "perf.py"
TINY = [
    "--quick",
    "--device", "cpu",
    "--backbone", "random:tf_efficientnet_lite0",
    "--image-size", "32",
    "--batch", "2",
    "--sizes", "32,64",
    "--category-images", "2",
    "--large-category", "3",
    "--original-size", "48",
]  # fmt: skip


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("perf", PERF)
    module = importlib.util.module_from_spec(spec)
    sys.modules["perf"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    del sys.modules["perf"]


@pytest.fixture(scope="module")
def run(perf, tmp_path_factory):
    """One quick run of every section, appended to a markdown file and written as JSON."""
    folder = tmp_path_factory.mktemp("perf")
    notes = folder / "benchmarks.md"
    notes.write_text("# Benchmarks\n")
    figures = folder / "perf.json"
    assert perf.main([*TINY, "--append", str(notes), "--json", str(figures)]) == 0
    return notes.read_text(), json.loads(figures.read_text())


def table_rows(text: str, title_start: str) -> list[list[str]]:
    """The cells of each row of the table whose heading starts with ``title_start``."""
    block = text.split(f"### {title_start}", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ")][2:]  # no header
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def by_name(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in rows}


def number(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell))


def test_the_report_is_appended_with_command_machine_and_every_table(run):
    text, _ = run
    assert text.startswith("# Benchmarks\n\n## Performance (benchmarks/perf.py)")
    assert "benchmarks/perf.py --quick --device cpu" in text
    assert re.search(r"Machine: .+, \d+ cores, (no GPU|.+); torch \d", text)
    assert "random:tf_efficientnet_lite0 with random weights" in text
    titles = [
        "Training",
        "Inference of CPKP(RD), 32x32",
        "Inference of CPKP(RD) against",
        "Inference cost of the prototype",
        "Inference of CPKP(RD) by precision",
    ]
    for title in titles:
        assert f"### {title}" in text


def test_training_rows_give_throughput_and_the_cost_of_co_progression(run):
    text, figures = run
    rows = by_name(table_rows(text, "Training"))
    assert list(rows) == ["cpkp-rd", "rd@cpkp", "cpkp-fd", "fd@cpkp"]
    for variant, cells in rows.items():
        step = figures["train"][variant]["seconds_per_step"]
        assert number(cells[0]) == pytest.approx(2 / step, rel=0.01)  # images/s at batch 2
    cost = (
        figures["train"]["cpkp-rd"]["seconds_per_step"]
        / figures["train"]["rd@cpkp"]["seconds_per_step"]
    )
    assert rows["cpkp-rd"][2] == f"{cost:.2f}x"
    assert rows["rd@cpkp"][2] == ""


def test_inference_is_split_into_stages_at_each_batch_size(run, perf):
    text, figures = run
    rows = by_name(table_rows(text, "Inference of CPKP(RD), 32x32"))
    stages = [perf.STAGE_NAMES[s] for s in (*perf.STAGES, "resize")]
    summary = ["sum of the four stages", "Detector.score_batch", "images/s (score_batch)"]
    assert list(rows) == [*stages, *summary, "peak RSS (MiB)", "peak GPU (MiB)"]
    assert set(figures["inference"]) == {"1", "2"}
    for batch, times in figures["inference"].items():
        total = sum(times[s] for s in perf.STAGES)
        column = 2 * (int(batch) == 2)
        assert number(rows["sum of the four stages"][column]) == pytest.approx(
            1000 * total / int(batch), abs=0.051
        )
    shares = [number(rows[perf.STAGE_NAMES[s]][3]) for s in perf.STAGES]
    assert sum(shares) == pytest.approx(100, abs=2)  # rounded percentages
    assert rows["peak GPU (MiB)"][0] == "-"  # on the CPU
    assert number(rows["peak RSS (MiB)"][0]) > 50


def test_size_and_prototype_tables_have_a_row_per_setting(run):
    text, figures = run
    sizes = by_name(table_rows(text, "Inference of CPKP(RD) against"))
    assert list(sizes) == ["32", "64"]
    assert sizes["32"][0] == "4x4" and sizes["64"][0] == "8x8"  # the stride-8 grid

    prototypes = table_rows(text, "Inference cost of the prototype")
    # the category at the preset's stride (8) and the other one, the large category
    assert [row[:2] for row in prototypes] == [["2", "8"], ["2", "4"], ["3", "8"]]
    assert [row[2] for row in prototypes] == ["32", "128", "48"]  # bank = images x grid
    for row, measured in zip(prototypes, figures["prototype"], strict=True):
        assert row[8] == f"{measured['ratio']:.2f}x"
        # one timed pair in --quick: the median of the paired ratios is that pair's ratio
        assert measured["ratio"] == pytest.approx(measured["cpkp_s"] / measured["plain_s"])
    assert re.search(
        r"Ratio of the first row: [\d.]+x, target at most 1.5x \((met|NOT met)\)", text
    )


def test_bf16_is_reported_as_cuda_only_on_a_cpu(perf):
    text = perf.Table("t", ["mode"]).markdown()
    assert text.startswith("### t")
    args = perf.parse_args([*TINY, "--modes", "fp32,bf16"])
    bench = perf.make_bench(args)
    perf.resolve_defaults(args, bench)
    table = perf.modes_section(bench, {})
    rows = {row[0]: row for row in table.rows}
    assert rows["bf16"][1] == "n/a: bf16 autocast applies on CUDA only"
    assert rows["fp32"][3] == "1.00x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sections", "train,speed"], "expected some of train, inference"),
        (["--prototypes", "60:2"], "expected IMAGES:STRIDE, stride 4 or 8"),
        (["--sizes", "0"], "expected positive integers"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_options_stop_with_one_line(perf, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        perf.parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_preset_is_one_line_and_exit_2(perf, capsys):
    assert perf.main(["--preset", "no_such_preset", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("perf.py: unknown preset 'no_such_preset'")
    assert len(err.splitlines()) == 1
