"""The demo dataset: layout, determinism, masks that are exactly where the image changed, and
defects that change the surface's structure (flat fills, uniform lines, flattened stains, opaque
material), not only its brightness."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cpkp.data import demo
from cpkp.data.demo import (
    DEFECT_KINDS,
    DEFECT_SPECS,
    DEMO_CATEGORIES,
    DONOR_MIN_OFFSET,
    MASK_FRACTION,
    MIN_RANGE,
    PHOTOS,
    defect_image,
    load_photo,
    make_demo_dataset,
    normal_image,
    synthesize_defect,
)
from cpkp.errors import ConfigError, DatasetError

SIZE = 64
SMALL = {"n_train": 3, "n_test_good": 2, "n_defect": 9, "size": SIZE}  # 3 scratches, 2 of the rest
PER_KIND = {"scratch": 3, "hole": 2, "stain": 2, "foreign": 2}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small demos: seed 0 twice (in different folders) and seed 1."""
    root = tmp_path_factory.mktemp("demo")
    folders = {"a": root / "a", "b": root / "b", "other_seed": root / "c"}
    make_demo_dataset(folders["a"], seed=0, **SMALL)
    make_demo_dataset(folders["b"], seed=0, **SMALL)
    make_demo_dataset(folders["other_seed"], seed=1, **SMALL)
    return folders


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_bundled_photos_are_present_offline() -> None:
    for category, photo in PHOTOS.items():
        pixels = load_photo(photo)
        assert pixels.dtype == np.uint8
        assert pixels.ndim == (2 if photo.mode == "L" else 3), category
        assert min(pixels.shape[:2]) >= 256, category
        assert pixels.std() > 20, category  # a real photograph, not a blank placeholder
    assert load_photo(demo.DONOR).shape == (400, 600, 3)


def test_same_seed_gives_identical_bytes(written: dict[str, Path]) -> None:
    first, second = _files(written["a"]), _files(written["b"])
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_other_seed_gives_other_images(written: dict[str, Path]) -> None:
    first, other = _files(written["a"]), _files(written["other_seed"])
    images = [name for name in first if name.endswith(".png")]
    assert first.keys() == other.keys()
    assert sum(first[name] != other[name] for name in images) == len(images)


def test_layout_is_mvtec(written: dict[str, Path]) -> None:
    root = written["a"]
    expected = {"demo.json", "defects.json"}
    for category in DEMO_CATEGORIES:
        expected |= {f"{category}/train/good/{i:03d}.png" for i in range(3)}
        expected |= {f"{category}/test/good/{i:03d}.png" for i in range(2)}
        for kind, count in PER_KIND.items():
            expected |= {f"{category}/test/{kind}/{i:03d}.png" for i in range(count)}
            expected |= {f"{category}/ground_truth/{kind}/{i:03d}_mask.png" for i in range(count)}
    assert set(_files(root)) == expected

    for name in expected - {"demo.json", "defects.json"}:
        with Image.open(root / name) as image:
            assert image.size == (SIZE, SIZE), name
            grey = "_mask" in name or PHOTOS[name.split("/")[0]].mode == "L"
            assert image.mode == ("L" if grey else "RGB"), name
        if "_mask" in name:
            assert set(np.unique(_read(root / name))) == {0, 255}, name


def test_summary_and_marker_count_the_files(written: dict[str, Path], tmp_path: Path) -> None:
    summary = make_demo_dataset(tmp_path / "d", seed=0, categories=["grass"], **SMALL)
    assert summary["categories"] == {
        "grass": {"train": {"good": 3}, "test": {"good": 2, **PER_KIND}}
    }
    marker = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert marker["complete"] and marker["categories"] == summary["categories"]

    records = json.loads((written["a"] / "defects.json").read_text(), parse_constant=_no_nan)
    assert len(records) == 9 * len(DEMO_CATEGORIES)
    for record in records:
        mask = _read(
            written["a"] / (record["file"].replace("/test/", "/ground_truth/")[:-4] + "_mask.png")
        )
        assert (mask > 0).mean() == pytest.approx(record["area_fraction"]), record["file"]


def _no_nan(name: str) -> None:
    raise AssertionError(f"defects.json holds {name}, which is not JSON")


def test_a_category_does_not_depend_on_the_others(written: dict[str, Path], tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "d", seed=0, categories=["tissue"], **SMALL)
    alone, together = _files(tmp_path / "d" / "tissue"), _files(written["a"] / "tissue")
    assert alone == together


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_files_match_the_clean_crops(written: dict[str, Path], category: str) -> None:
    root = written["a"] / category
    assert np.array_equal(
        _read(root / "train/good/002.png"), normal_image(category, "train", 2, 0, SIZE)
    )
    assert np.array_equal(
        _read(root / "test/good/001.png"), normal_image(category, "test", 1, 0, SIZE)
    )
    for kind, count in PER_KIND.items():
        for i in range(count):
            sample = defect_image(category, kind, i, count, seed=0, size=SIZE)
            assert np.array_equal(_read(root / f"test/{kind}/{i:03d}.png"), sample.image)
            assert np.array_equal(
                _read(root / f"ground_truth/{kind}/{i:03d}_mask.png"), sample.mask_png
            )


def _change(sample: demo.DefectSample) -> np.ndarray:
    """Largest absolute change over the channels: [S, S] int."""
    change = np.abs(sample.image.astype(int) - sample.clean.astype(int))
    return change if change.ndim == 2 else change.max(axis=2)


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_mask_is_exactly_where_the_image_changed(category: str, kind: str) -> None:
    for i in range(3):
        sample = defect_image(category, kind, i, 3, seed=0, size=SIZE)
        change = _change(sample)
        assert sample.mask.any()
        assert (change[~sample.mask] == 0).all()
        assert (change[sample.mask] >= 1).all()
        record = sample.record
        if kind in ("hole", "stain"):
            assert change.max() >= 0.5 * record["amplitude"]
        if kind == "foreign":
            assert change[sample.mask].mean() >= 0.5 * record["mean_core_change"]


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_area_lies_in_its_stated_range(kind: str) -> None:
    low, high = DEFECT_SPECS[kind].area
    count = 4
    for category in ("brick", "tissue"):
        for i in range(count):
            record = defect_image(category, kind, i, count, seed=0, size=SIZE).record
            assert low <= record["footprint_fraction"] <= high + 2 / SIZE**2
            assert 0.9 * record["footprint_fraction"] <= record["area_fraction"]
            assert record["area_fraction"] <= record["footprint_fraction"]


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_schedule_spreads_area_and_contrast_evenly(kind: str) -> None:
    spec = DEFECT_SPECS[kind]
    records = [defect_image("gravel", kind, i, 5, seed=3, size=128).record for i in range(5)]
    pixels = [math.ceil(a * 128**2) for a in np.geomspace(*spec.area, 5)]
    footprints = [round(r["footprint_fraction"] * 128**2) for r in records]
    assert all(p <= f <= p + 2 for p, f in zip(pixels, footprints))
    contrasts = sorted(r["contrast"] for r in records)
    if spec.contrast is None:  # foreign: the donor sets the change, at least DONOR_MIN_OFFSET
        assert min(contrasts) >= DONOR_MIN_OFFSET - 0.05
        assert all(r["opacity"] == 1.0 for r in records)
    else:
        np.testing.assert_allclose(contrasts, np.linspace(*spec.contrast, 5))


@pytest.mark.parametrize("kind", ["scratch", "hole", "stain"])
@pytest.mark.parametrize("channels", [1, 3])
def test_defect_on_a_flat_image_has_the_stated_contrast(kind: str, channels: int) -> None:
    """On flat grey the local range is the floor, nothing clips and the mask is the footprint.

    The stain's blurred copy of a flat image is the image itself, so every kind moves the
    surface by exactly ``contrast * R`` where the defect is complete.
    """
    shape = (128, 128) if channels == 1 else (128, 128, 3)
    clean = np.full(shape, 120, dtype=np.uint8)
    image, mask, record = synthesize_defect(clean, kind, 0.01, 0.25, np.random.default_rng(5))

    amplitude = 0.25 * MIN_RANGE
    change = np.abs(image.astype(int) - 120)
    change = change if channels == 1 else change.max(axis=2)
    assert record["local_range"] == MIN_RANGE and record["amplitude"] == amplitude
    assert mask.sum() == math.ceil(0.01 * 128**2)
    assert (change[~mask] == 0).all()
    assert change.max() == pytest.approx(amplitude, abs=0.5 if kind != "scratch" else 4)
    assert change.max() <= amplitude + 0.5
    assert (change[mask] >= math.floor(MASK_FRACTION * amplitude + 0.5)).all()


def test_hole_darkens_and_foreign_copies_the_donor() -> None:
    clean = np.full((96, 96), 120, dtype=np.uint8)
    hole, mask, _ = synthesize_defect(clean, "hole", 0.02, 0.5, np.random.default_rng(0))
    assert (hole[mask] < 120).all()

    donor = np.full((96, 96), 20, dtype=np.uint8)
    pasted, mask, record = synthesize_defect(
        clean, "foreign", 0.02, 2.0, np.random.default_rng(0), donor
    )
    assert record["opacity"] == 1.0 and not record["inverted"] and record["shift"] == 0.0
    assert (pasted[mask] < 120).all()
    assert pasted[mask].min() == 20  # the core takes the donor's values exactly
    assert record["level_offset"] == -100.0 and record["contrast"] == 100.0 / MIN_RANGE


def _noise(low: int, high: int, size: int = 128) -> np.ndarray:
    """A high-variance texture: uniform noise in [low, high), [size, size] uint8."""
    return np.random.default_rng(1).integers(low, high, (size, size)).astype(np.uint8)


def _residual_ratio(sample: tuple, clean: np.ndarray, target: float | np.ndarray) -> float:
    """Median distance from ``target`` over the mask, after the defect over before it.

    With ``new = (1 - w) * clean + w * target`` this is about ``1 - w`` at the mask's median
    pixel: how much of the clean surface still shows through.
    """
    image, mask, _ = sample
    target = np.broadcast_to(target, clean.shape)[mask]
    after = np.abs(image[mask].astype(float) - target)
    before = np.abs(clean[mask].astype(float) - target)
    return float(np.median(after) / np.median(before))


@pytest.mark.parametrize("seed", range(3))
def test_hole_replaces_the_texture_by_a_flat_dark_fill(seed: int) -> None:
    clean = _noise(60, 200)
    sample = synthesize_defect(clean, "hole", 0.02, 0.7, np.random.default_rng(seed))
    record = sample[2]
    assert record["fill"] == pytest.approx(record["local_median"] - 0.7 * record["local_range"])
    assert _residual_ratio(sample, clean, record["fill"]) < 0.2  # half of it is >= 80% fill
    assert sample[0][sample[1]].mean() < np.percentile(clean, 5)


@pytest.mark.parametrize("seed", range(3))
def test_scratch_is_a_uniform_line(seed: int) -> None:
    clean = _noise(60, 200)
    sample = synthesize_defect(clean, "scratch", 0.005, 0.7, np.random.default_rng(seed))
    record = sample[2]
    level = record["local_median"] + record["polarity"] * 0.7 * record["local_range"]
    assert record["level"] == pytest.approx(level)
    assert _residual_ratio(sample, clean, record["level"]) < 0.25


@pytest.mark.parametrize("seed", range(3))
def test_stain_flattens_and_tints_the_texture(seed: int) -> None:
    clean = _noise(60, 200)
    image, mask, record = synthesize_defect(clean, "stain", 0.03, 0.7, np.random.default_rng(seed))
    depth = ndimage.distance_transform_edt(mask)
    inner = depth >= 0.5 * depth.max()  # where the stain is strongest
    pairs = inner[:, 1:] & inner[:, :-1]

    def roughness(a: np.ndarray) -> float:
        return float(np.abs(np.diff(a.astype(float), axis=1))[pairs].mean())

    assert roughness(image) < 0.5 * roughness(clean)
    shift = (image[mask].astype(float) - clean[mask]).mean()
    assert np.sign(shift) == record["polarity"]
    assert abs(shift) > 0.25 * record["amplitude"]
    assert record["flatten"] == demo.STAIN_FLATTEN


def test_foreign_material_is_inverted_or_shifted_when_it_matches_the_surface() -> None:
    dark = _noise(30, 90)
    sample = synthesize_defect(
        dark, "foreign", 0.02, float("nan"), np.random.default_rng(0), donor=dark
    )
    image, mask, record = sample
    assert record["inverted"] and record["shift"] == 0.0
    assert record["level_offset"] > DONOR_MIN_OFFSET * record["local_range"]
    assert (image[mask] > dark[mask]).all()
    assert _residual_ratio(sample, dark, 255 - dark.astype(float)) < 0.2  # as a hole: opaque

    grey = _noise(96, 160)  # its inverse has the same level: shift it instead
    image, mask, record = synthesize_defect(
        grey, "foreign", 0.02, float("nan"), np.random.default_rng(0), donor=grey
    )
    assert record["shift"] != 0.0
    least = DONOR_MIN_OFFSET * record["local_range"]
    assert abs(record["level_offset"]) == pytest.approx(least, abs=0.5)
    assert record["contrast"] == pytest.approx(abs(record["level_offset"]) / record["local_range"])


@pytest.mark.parametrize("kind", ["hole", "scratch"])
def test_on_grass_holes_and_scratches_leave_the_range_of_the_texture(kind: str) -> None:
    """v1's additive defects hid inside grass; v2's fill and line levels lie outside it."""
    for i in range(3):
        sample = defect_image("grass", kind, i, 3, seed=0, size=128)
        window = demo._local_window(sample.mask)
        low, high = np.percentile(sample.clean[window], [2, 98])
        target = sample.record["fill" if kind == "hole" else "level"]
        assert target <= low or target >= high, (i, target, low, high)


def test_bands_are_disjoint_and_cover_the_photo() -> None:
    photo = np.arange(512 * 512).reshape(512, 512)
    side = demo._crop_side(photo)
    train, test = demo._split_bands(photo, side)
    assert side == 128 and test.shape == (512, 128) and train.shape == (512, 384)
    assert np.array_equal(np.concatenate([train, test], axis=1), photo)


def test_same_parameters_reuse_and_others_rewrite(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = make_demo_dataset(out, seed=0, categories=["brick"], **SMALL)
    stamp = (out / "brick/train/good/000.png").stat().st_mtime_ns
    again = make_demo_dataset(out, seed=0, categories=["brick"], **SMALL)
    assert not first["reused"] and again["reused"]
    assert again["categories"] == first["categories"]
    assert (out / "brick/train/good/000.png").stat().st_mtime_ns == stamp

    (out / "brick/train/good/001.png").unlink()
    assert not make_demo_dataset(out, seed=0, categories=["brick"], **SMALL)["reused"]
    assert (out / "brick/train/good/001.png").is_file()

    make_demo_dataset(out, seed=0, categories=["grass"], **{**SMALL, "n_train": 2})
    assert not (out / "brick").exists()
    assert len(list((out / "grass/train/good").iterdir())) == 2


def test_the_command_says_whether_it_wrote_or_reused(tmp_path: Path, capsys) -> None:
    from cpkp.cli import main

    out = tmp_path / "demo"
    argv = ["-q", "demo-data", "--out", str(out), "--categories", "brick"]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith(f"demo dataset written to {out}\n")
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith(
        f"demo dataset already in {out} (same parameters), reused\n"
    )


def test_a_users_folder_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not empty"):
        make_demo_dataset(tmp_path, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "keep"

    with pytest.raises(DatasetError, match="not a folder"):
        make_demo_dataset(tmp_path / "mine.txt", **SMALL)

    demo_root = tmp_path / "d"
    make_demo_dataset(demo_root, categories=["brick"], **SMALL)
    (demo_root / "grass").mkdir()
    with pytest.raises(DatasetError, match="grass"):
        make_demo_dataset(demo_root, categories=["grass"], **SMALL)
    assert (demo_root / "brick").is_dir()


def test_files_of_a_user_in_an_earlier_demo_stop_its_replacement(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    make_demo_dataset(out, categories=["brick"], **SMALL)
    mine = [out / "brick/train/good/mine.png", out / "brick/runs/log.txt"]
    n_train = SMALL.get("n_train", 60)
    mine.append(out / f"brick/train/good/{n_train:03d}.png")  # the demo's naming, past its count
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"keep")
    before = sorted(p for p in out.rglob("*"))
    with pytest.raises(DatasetError, match=r"3 file\(s\).*not written by the demo"):
        make_demo_dataset(out, categories=["brick"], **{**SMALL, "n_train": 2})
    assert sorted(p for p in out.rglob("*")) == before
    assert all(path.read_bytes() == b"keep" for path in mine)

    for path in mine:
        path.unlink()
    assert not make_demo_dataset(out, categories=["brick"], **{**SMALL, "n_train": 2})["reused"]


@pytest.mark.parametrize(
    "bad",
    [
        {"categories": ["bricks"]},
        {"categories": []},
        {"n_train": 0},
        {"n_test_good": 0},
        {"n_defect": 0},
        {"size": 16},
        {"size": 64.0},
        {"seed": -1},
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError):
        make_demo_dataset(tmp_path / "d", **{**SMALL, **bad})
    assert not (tmp_path / "d").exists()
