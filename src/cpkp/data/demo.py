"""A small demo dataset in the MVTec AD layout, cut from real photographs bundled with scikit-image.

Each category is one photograph of a fairly stationary surface. Normal images are crops (with
flips and 90-degree rotations) from one band of the photo; test images come from a band held
apart. Defects are synthesised on test crops with exact masks, and their sizes and contrasts
follow fixed schedules (:data:`DEFECT_SPECS`), so the demo is equally hard for every run. Every
defect changes the surface's structure, not only its brightness (a hole is a flat dark fill, a
scratch a uniform line, a stain a flattened and tinted patch, a foreign body opaque material), so
that a person sees it even on a texture that spans its whole intensity range.
``docs/demo-data.md`` states every parameter.

Layout written under ``out``::

    <category>/train/good/000.png
    <category>/test/good/000.png
    <category>/test/<kind>/000.png
    <category>/ground_truth/<kind>/000_mask.png     (0/255, single channel)
    demo.json                                       (marker: parameters and counts)
    defects.json                                    (one record per defect image)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from cpkp.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

DEMO_CATEGORIES = ("brick", "grass", "gravel", "tissue")
DEFECT_KINDS = ("scratch", "hole", "stain", "foreign")

GENERATOR = "cpkp.data.demo"
GENERATOR_VERSION = 3  # bump when the images change for the same parameters
MARKER_FILE = "demo.json"
DEFECTS_FILE = "defects.json"

CROP_FRACTION = 1 / 4  # crop side, as a fraction of the photo's shorter side (the magnification)
MASK_FRACTION = 0.1  # a pixel is in the footprint where the defect weight is >= 10% of its peak
MIN_RANGE = 64.0  # floor on the local intensity range, in 8-bit levels
MIN_DEFECT_PIXELS = 4  # floor on the footprint of the smallest defects at small sizes
STAIN_FLATTEN = 0.9  # share of the way a stain moves the texture towards its blurred copy
STAIN_BLUR = 0.25  # blur sigma of a stain, as a fraction of its footprint's diameter
DONOR_MIN_OFFSET = 0.5  # least distance of a foreign body's level from the surface's, of R
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as Pillow's "L" conversion


@dataclass(frozen=True)
class Photo:
    """A photograph bundled inside an installed package."""

    package: str
    file: str
    mode: str  # Pillow mode the demo images are written in: "L" or "RGB"


PHOTOS = {
    "brick": Photo("skimage", "data/brick.png", "L"),
    "grass": Photo("skimage", "data/grass.png", "L"),
    "gravel": Photo("skimage", "data/gravel.png", "L"),
    "tissue": Photo("skimage", "data/ihc.png", "RGB"),
}
DONOR = Photo("skimage", "data/coffee.png", "RGB")  # source of the "foreign" material


@dataclass(frozen=True)
class DefectSpec:
    """Fixed schedule of one defect kind.

    Areas are fractions of the image area, spread geometrically from the first to the second
    value over the images of the kind; contrasts are fractions of the local intensity range,
    spread linearly and paired with the areas in a seeded order. A kind without a contrast
    ("foreign") replaces the surface opaquely, so its change is set by the donor material.
    """

    area: tuple[float, float]
    contrast: tuple[float, float] | None
    power: float  # weight profile: MASK_FRACTION ** (level ** power); larger is a harder edge
    irregularity: float  # total amplitude of the outline's harmonics (0 is an ellipse)


DEFECT_SPECS = {
    "scratch": DefectSpec(area=(0.001, 0.01), contrast=(0.7, 1.0), power=4.0, irregularity=0.0),
    "hole": DefectSpec(area=(0.002, 0.025), contrast=(0.7, 1.0), power=8.0, irregularity=0.15),
    "stain": DefectSpec(area=(0.005, 0.05), contrast=(0.7, 1.0), power=2.0, irregularity=0.3),
    "foreign": DefectSpec(area=(0.003, 0.04), contrast=None, power=8.0, irregularity=0.45),
}


def make_demo_dataset(
    out: Path,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 60,
    n_test_good: int = 20,
    n_defect: int = 40,
    size: int = 256,
) -> dict[str, Any]:
    """Write the demo dataset in the MVTec AD layout under ``out``.

    The same arguments always give byte-identical files. A folder that already holds a demo
    written with the same arguments is reused; one written with other arguments is replaced.
    Any other non-empty folder is left alone.

    Args:
        out: Dataset root; created if missing.
        seed: Seed of every random choice (crop positions, shapes, pairings).
        categories: Names from :data:`DEMO_CATEGORIES`; ``None`` writes them all.
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_defect: Defective test images per category, spread evenly over :data:`DEFECT_KINDS`.
        size: Side of the square images in pixels.

    Returns:
        ``{"root", "reused", "parameters", "categories"}`` where ``categories`` maps each name
        to ``{"train": {"good": n}, "test": {"good": n, <kind>: n, ...}}``.

    Raises:
        ConfigError: An argument is out of range or names an unknown category.
        DatasetError: ``out`` holds something other than a previous demo dataset, or a photo is
            missing from the installed packages.
    """
    out = Path(out)
    categories = _check_arguments(seed, categories, n_train, n_test_good, n_defect, size)
    parameters = {
        "seed": int(seed),
        "categories": list(categories),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_defect": int(n_defect),
        "size": int(size),
        "generator_version": GENERATOR_VERSION,
    }

    previous = _prepare_output(out, parameters)
    if previous is not None:
        logger.info("Reusing the demo dataset in %s (same parameters)", out)
        return {"root": str(out), "reused": True, **previous}

    _write_marker(out, parameters, counts={}, complete=False)
    counts: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for category in categories:
        counts[category], category_records = _write_category(out, category, parameters)
        records.extend(category_records)

    (out / DEFECTS_FILE).write_text(json.dumps(records, indent=1) + "\n")
    _write_marker(out, parameters, counts, complete=True)
    logger.info("Demo dataset: %d categories written to %s", len(categories), out)
    return {"root": str(out), "reused": False, "parameters": parameters, "categories": counts}


def load_photo(photo: Photo) -> np.ndarray:
    """Read a bundled photograph in its demo mode.

    Returns:
        uint8 array, [H, W] for mode "L" or [H, W, 3] for "RGB".
    """
    path = resources.files(photo.package).joinpath(photo.file)
    if not path.is_file():
        raise DatasetError(
            f"{photo.package}/{photo.file}: photo not found in the installed package; "
            f"reinstall {photo.package} (the demo never downloads images)"
        )
    try:
        with resources.as_file(path) as local, Image.open(local) as image:
            return np.asarray(image.convert(photo.mode))
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... on bad files
        raise DatasetError(
            f"{photo.package}/{photo.file}: the bundled photo cannot be decoded "
            f"({type(err).__name__}: {err}); reinstall {photo.package}"
        ) from err


@dataclass(frozen=True)
class DefectSample:
    """One defective test image with the clean crop it was made from.

    Attributes:
        clean: uint8, [S, S] or [S, S, 3]: the crop before the defect.
        image: uint8, shaped like ``clean``: the crop with the defect.
        mask: bool, [S, S]: exactly the pixels whose value changed.
        record: The defect's category, kind, areas, contrast and amplitude.
    """

    clean: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    record: dict[str, Any]

    @property
    def mask_png(self) -> np.ndarray:
        """The mask as written to ``ground_truth``: uint8 0/255, [S, S]."""
        return self.mask.astype(np.uint8) * 255


def normal_image(
    category: str, split: str, index: int, seed: int = 0, size: int = 256
) -> np.ndarray:
    """The ``index``-th normal image of a category's "train" or "test" split.

    Training images come from the photo's training band, test images from the band held apart;
    both are crops of the same physical size, flipped and rotated by multiples of 90 degrees.

    Returns:
        uint8 array, [size, size] (grey categories) or [size, size, 3] (colour ones).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"demo split {split!r}: expected 'train' or 'test'")
    train_band, test_band, side, _ = _sources(category)
    split_code = 0 if split == "train" else 1
    rng = np.random.default_rng([seed, _code(category), split_code, index])
    return _random_crop(train_band if split_code == 0 else test_band, side, size, rng)


def defect_image(
    category: str, kind: str, index: int, count: int, seed: int = 0, size: int = 256
) -> DefectSample:
    """The ``index``-th of ``count`` defective test images of one kind.

    Its area and contrast are entry ``index`` of the kind's schedule over ``count`` images
    (:data:`DEFECT_SPECS`), so the same ``count`` always spreads the same values.
    """
    if kind not in DEFECT_KINDS or not 0 <= index < count:
        raise ConfigError(
            f"demo defect {kind!r} #{index} of {count}: expected a kind in "
            f"{', '.join(DEFECT_KINDS)} and 0 <= index < count"
        )
    _, test_band, side, donor = _sources(category)
    k = DEFECT_KINDS.index(kind)
    areas, contrasts = _schedule(kind, count, np.random.default_rng([seed, _code(category), 9, k]))

    rng = np.random.default_rng([seed, _code(category), 2 + k, index])
    clean = _random_crop(test_band, side, size, rng)
    donor_crop = _random_crop(donor, min(donor.shape[:2]), size, rng)
    image, mask, record = synthesize_defect(
        clean, kind, areas[index], contrasts[index], rng, donor_crop
    )
    return DefectSample(clean, image, mask, {"category": category, **record})


def synthesize_defect(
    clean: np.ndarray,
    kind: str,
    area: float,
    contrast: float,
    rng: np.random.Generator,
    donor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Put one defect of a given kind, area and contrast on a clean image.

    Each kind has a target, what the surface becomes where the defect is complete (a flat dark
    fill, a uniform line level, a flattened and tinted copy, the donor material), and the image
    is the blend ``(1 - w) * clean + w * target`` with the defect's weight ``w``. The footprint
    is where ``w`` reaches :data:`MASK_FRACTION` of its peak; ``w`` is zero outside it, so pixels
    outside the mask keep their clean values exactly. The mask is the footprint less the pixels
    whose 8-bit value did not change (where the target happens to match the surface).

    Args:
        clean: uint8 image, [S, S] or [S, S, 3].
        kind: One of :data:`DEFECT_KINDS`.
        area: Footprint area as a fraction of the image area.
        contrast: How far the target lies from the local median, as a fraction of the local
            intensity range; ignored for "foreign", whose donor replaces the surface opaquely
            (its record holds the contrast it achieved).
        rng: Source of the shape, position, polarity and colour.
        donor: uint8 image shaped like ``clean``; required for "foreign".

    Returns:
        The defective image (uint8, shaped like ``clean``), the mask (bool, [S, S]) and a record
        of the defect's parameters.
    """
    if kind not in DEFECT_SPECS:
        raise ConfigError(f"defect kind {kind!r}: expected one of {', '.join(DEFECT_KINDS)}")
    spec = DEFECT_SPECS[kind]
    size = clean.shape[0]
    pixels = max(math.ceil(area * size * size), MIN_DEFECT_PIXELS)
    if kind == "scratch":
        level = _scratch_level(size, pixels, rng)
    else:
        level = _blob_level(size, pixels, spec.irregularity, rng)
    footprint = level <= 1.0
    weight = np.where(footprint, MASK_FRACTION ** (np.minimum(level, 1.0) ** spec.power), 0.0)

    local_range, median, luminance = _local_surface(clean, footprint)
    if kind == "foreign":
        target, extra = _foreign_target(clean, weight, luminance, local_range, donor)
        contrast = abs(extra["level_offset"]) / local_range
    else:
        amplitude = contrast * local_range
        target, extra = _defect_target(kind, clean, pixels, median, luminance, amplitude, rng)

    change = (weight if clean.ndim == 2 else weight[..., None]) * (target - clean)
    image, mask = _apply_change(clean, change, footprint)

    record = {
        "kind": kind,
        "footprint_fraction": float(footprint.mean()),
        "area_fraction": float(mask.mean()),
        "contrast": float(contrast),
        "local_range": float(local_range),
        "local_median": _rounded(median),
        "amplitude": float(contrast * local_range),
        **extra,
    }
    return image, mask, record


def _check_arguments(
    seed: int,
    categories: Sequence[str] | None,
    n_train: int,
    n_test_good: int,
    n_defect: int,
    size: int,
) -> tuple[str, ...]:
    if not _is_integer(seed) or seed < 0:
        raise ConfigError(f"demo seed={seed!r}: expected a non-negative integer")
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_defect", n_defect)):
        if not _is_integer(value) or value < 1:
            raise ConfigError(f"demo {name}={value!r}: expected an integer of at least 1")
    if not _is_integer(size) or size < 32:
        raise ConfigError(f"demo size={size!r}: expected an integer of at least 32 pixels")

    if categories is None:
        return DEMO_CATEGORIES
    if isinstance(categories, str):
        categories = [categories]
    unknown = [c for c in categories if c not in DEMO_CATEGORIES]
    if unknown or not categories:
        raise ConfigError(
            f"demo categories {list(categories)!r}: expected one or more of "
            f"{', '.join(DEMO_CATEGORIES)}"
        )
    return tuple(dict.fromkeys(categories))


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _prepare_output(out: Path, parameters: dict[str, Any]) -> dict[str, Any] | None:
    """Make ``out`` ready for writing; return the previous summary when it can be reused."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder; choose a folder for the demo")
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.iterdir()):
        return None

    marker = _read_marker(out)
    if marker is None:
        raise DatasetError(
            f"{out}: folder is not empty and holds no {MARKER_FILE} of a cpkp demo dataset; "
            "choose an empty or new folder (the demo never overwrites other files)"
        )
    if marker["complete"] and marker["parameters"] == parameters and _files_match(out, marker):
        return {"parameters": marker["parameters"], "categories": marker["categories"]}

    _remove_previous_demo(out, marker, parameters["categories"])
    return None


def _read_marker(out: Path) -> dict[str, Any] | None:
    path = out / MARKER_FILE
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    keys = {"generator", "parameters", "categories", "complete"}
    if not isinstance(marker, dict) or not keys <= marker.keys():
        return None
    if not isinstance(marker["parameters"], dict) or not isinstance(marker["categories"], dict):
        return None
    return marker if marker["generator"] == GENERATOR else None


def _files_match(out: Path, marker: dict[str, Any]) -> bool:
    """Whether every image the marker counts is on disk, and no more."""
    for category, splits in marker["categories"].items():
        for split, kinds in splits.items():
            for kind, count in kinds.items():
                if len(list((out / category / split / kind).glob("*.png"))) != count:
                    return False
                if kind != "good":
                    masks = (out / category / "ground_truth" / kind).glob("*_mask.png")
                    if len(list(masks)) != count:
                        return False
    return True


def _remove_previous_demo(out: Path, marker: dict[str, Any], categories: Sequence[str]) -> None:
    """Delete what an earlier demo wrote; refuse to touch a category folder it did not write."""
    previous = set(marker["parameters"].get("categories") or []) & set(DEMO_CATEGORIES)
    unlisted = [c for c in categories if (out / c).exists() and c not in previous]
    if unlisted:
        raise DatasetError(
            f"{out}: folder(s) {', '.join(unlisted)} were not written by the demo recorded in "
            f"{MARKER_FILE}; move them away or choose another folder"
        )
    counts = marker["categories"]
    foreign = [
        p for c in sorted(previous) for p in _files_not_written_by_demo(out / c, counts.get(c))
    ]
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise DatasetError(
            f"{out}: the earlier demo would be replaced, but {len(foreign)} file(s) in its "
            f"category folders were not written by the demo ({shown}); move them away or "
            "choose another folder (nothing was changed)"
        )
    for category in sorted(previous):
        if (out / category).is_dir():
            shutil.rmtree(out / category)
    (out / DEFECTS_FILE).unlink(missing_ok=True)
    logger.info("Replacing the earlier demo dataset in %s", out)


def _files_not_written_by_demo(folder: Path, counts: Any) -> list[Path]:
    """Files under a demo category folder that the demo recorded in ``counts`` did not write.

    The demo writes ``train/good/<i>.png``, ``test/<kind>/<i>.png`` and
    ``ground_truth/<kind>/<i>_mask.png`` with ``i`` below the count of that split and kind;
    anything else (another name, a number past the count, a link) is someone else's.
    """
    if folder.is_symlink():
        return [folder]
    written = re.compile(r"(train|test|ground_truth)/(\w+)/(\d+)(_mask)?\.png")
    foreign = []
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        match = written.fullmatch(path.relative_to(folder).as_posix())
        if match is None or path.is_symlink():
            foreign.append(path)
            continue
        folder_name, kind, index, mask = match.groups()
        is_mask = folder_name == "ground_truth"  # the masks of test/<kind>
        count = _count(counts, "test" if is_mask else folder_name, kind)
        if is_mask != bool(mask) or (is_mask and kind == "good") or int(index) >= count:
            foreign.append(path)
    return foreign


def _count(counts: Any, split: str, kind: str) -> int:
    """Images of one split and kind in a demo marker's counts (0 when it has none)."""
    try:
        return int(counts[split][kind])
    except (KeyError, TypeError, ValueError):
        return 0


def _write_marker(
    out: Path, parameters: dict[str, Any], counts: dict[str, Any], complete: bool
) -> None:
    marker = {
        "generator": GENERATOR,
        "complete": complete,
        "parameters": parameters,
        "categories": counts,
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")


def _write_category(
    out: Path, category: str, parameters: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write one category's images and masks; return its counts and defect records."""
    seed, size = parameters["seed"], parameters["size"]
    root = out / category
    for split, count in (("train", parameters["n_train"]), ("test", parameters["n_test_good"])):
        for i in range(count):
            image = normal_image(category, split, i, seed, size)
            _write_png(root / split / "good" / _name(i, count), image)

    records = []
    per_kind = _defects_per_kind(parameters["n_defect"])
    for kind, count in per_kind.items():
        for i in range(count):
            sample = defect_image(category, kind, i, count, seed, size)
            name = _name(i, count)
            _write_png(root / "test" / kind / name, sample.image)
            _write_png(root / "ground_truth" / kind / f"{name[:-4]}_mask.png", sample.mask_png)
            records.append({"file": f"{category}/test/{kind}/{name}", **sample.record})

    counts = {
        "train": {"good": parameters["n_train"]},
        "test": {"good": parameters["n_test_good"], **{k: n for k, n in per_kind.items() if n}},
    }
    logger.info(
        "%s: %d train, %d test good, %d defective (%s) images of %dx%d px from %s/%s",
        category,
        parameters["n_train"],
        parameters["n_test_good"],
        parameters["n_defect"],
        ", ".join(f"{n} {k}" for k, n in per_kind.items()),
        size,
        size,
        PHOTOS[category].package,
        PHOTOS[category].file,
    )
    return counts, records


@functools.cache
def _sources(category: str) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """A category's training band, test band, crop side and donor photo (in its mode)."""
    if category not in PHOTOS:
        raise ConfigError(f"demo category {category!r}: expected one of {', '.join(PHOTOS)}")
    photo = load_photo(PHOTOS[category])
    side = _crop_side(photo)
    train_band, test_band = _split_bands(photo, side)
    donor = load_photo(DONOR)
    return train_band, test_band, side, (donor if photo.ndim == 3 else _to_gray(donor))


def _code(category: str) -> int:
    """A stable number per category, so a category's images do not depend on the others."""
    return zlib.crc32(category.encode())


def _crop_side(photo: np.ndarray) -> int:
    # Crops keep one physical scale at every `size`; at 256 px they are upsampled by 2.
    return int(min(photo.shape[:2]) * CROP_FRACTION)


def _split_bands(photo: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the photo along its longer axis: training band first, a test band ``side`` wide last."""
    if photo.shape[1] >= photo.shape[0]:
        return photo[:, :-side], photo[:, -side:]
    return photo[:-side], photo[-side:]


def _random_crop(band: np.ndarray, side: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A square crop at a random position and orientation, resized to ``size``.

    Returns:
        uint8 array, [size, size] or [size, size, 3].
    """
    y = int(rng.integers(0, band.shape[0] - side + 1))
    x = int(rng.integers(0, band.shape[1] - side + 1))
    crop = band[y : y + side, x : x + side]
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.integers(2):
        crop = crop[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(crop))
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))


def _to_gray(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("L"))


def _luminance(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as Pillow's "L" conversion: [S, S] float."""
    if image.ndim == 2:
        return image.astype(np.float64)
    return image.astype(np.float64) @ LUMA


def _defects_per_kind(n_defect: int) -> dict[str, int]:
    """Spread ``n_defect`` over the kinds as evenly as possible, earlier kinds first."""
    base, rest = divmod(n_defect, len(DEFECT_KINDS))
    return {kind: base + (i < rest) for i, kind in enumerate(DEFECT_KINDS)}


def _schedule(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Areas (geometric, ascending) and contrasts (linear, seeded order) of a kind's images.

    A kind without a contrast ("foreign") gets NaN contrasts, which :func:`synthesize_defect`
    ignores for it.
    """
    spec = DEFECT_SPECS[kind]
    if n == 1:
        areas = np.array([math.sqrt(spec.area[0] * spec.area[1])])
    else:
        areas = np.geomspace(spec.area[0], spec.area[1], n)

    if spec.contrast is None:
        return areas, np.full(n, np.nan)
    if n == 1:
        return areas, np.array([sum(spec.contrast) / 2])
    return areas, rng.permutation(np.linspace(spec.contrast[0], spec.contrast[1], n))


def _blob_level(
    size: int, pixels: int, irregularity: float, rng: np.random.Generator
) -> np.ndarray:
    """Level function of an irregular blob whose footprint (level <= 1) has ``pixels`` pixels.

    The outline is an ellipse (axis ratio 1-2, random angle) whose radius is modulated by
    harmonics 2-5 of random phase and total amplitude ``irregularity``.

    Returns:
        [size, size] float, 0 at the centre and growing outwards.
    """
    aspect = rng.uniform(1.0, 2.0)
    angle = rng.uniform(0.0, math.pi)
    amplitudes = rng.dirichlet(np.ones(4)) * irregularity
    phases = rng.uniform(0.0, 2 * math.pi, 4)
    reach = math.sqrt(pixels * aspect / math.pi) * (1 + irregularity) + 1
    margin = min(reach, size / 2)
    cy, cx = rng.uniform(margin, size - margin, 2)

    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
    v = ((y - cy) * math.cos(angle) - (x - cx) * math.sin(angle)) * aspect
    theta = np.arctan2(v, u)
    radius = 1 + sum(
        a * np.cos((h + 2) * theta + p) for h, (a, p) in enumerate(zip(amplitudes, phases))
    )
    level = np.hypot(u, v) / radius
    return level / np.partition(level.ravel(), pixels - 1)[pixels - 1]


def _scratch_level(size: int, pixels: int, rng: np.random.Generator) -> np.ndarray:
    """Distance to a thin curved path, scaled so that the footprint has ``pixels`` pixels.

    The path is an arc of constant curvature (total turn up to 1 rad) whose length makes the
    footprint 1.5-4 px wide at 256 px (scaled with ``size``).

    Returns:
        [size, size] float, 0 on the path and growing away from it.
    """
    width = max(1.5, rng.uniform(1.5, 4.0) * size / 256)
    length = min(pixels / width, 0.9 * size)
    path = _arc_inside(size, length, rng)
    y, x = np.mgrid[0:size, 0:size]
    distance, _ = cKDTree(path).query(np.stack([y.ravel(), x.ravel()], axis=1))
    distance = distance.reshape(size, size)
    return distance / np.partition(distance.ravel(), pixels - 1)[pixels - 1]


def _arc_inside(size: int, length: float, rng: np.random.Generator) -> np.ndarray:
    """Points (y, x) every 0.25 px along a random arc of ``length`` px that stays inside the image.

    Returns:
        [P, 2] float.
    """
    steps = np.arange(0.0, length + 0.25, 0.25)
    turn = rng.uniform(-1.0, 1.0) / max(length, 1.0)
    for _ in range(100):
        heading = rng.uniform(0.0, 2 * math.pi) + turn * steps
        start = rng.uniform(2.0, size - 3.0, 2)
        dy = np.concatenate([[0.0], np.cumsum(np.sin(heading[:-1]) * 0.25)])
        dx = np.concatenate([[0.0], np.cumsum(np.cos(heading[:-1]) * 0.25)])
        path = np.stack([start[0] + dy, start[1] + dx], axis=1)
        if path.min() >= 2.0 and path.max() <= size - 3.0:
            return path
    return np.stack([np.full_like(steps, size / 2), size / 2 - length / 2 + steps], axis=1)


def _local_window(footprint: np.ndarray) -> tuple[slice, slice]:
    """The footprint's bounding box grown by half its larger side on every side."""
    rows, cols = np.nonzero(footprint)
    grow = max(int(np.ptp(rows)), int(np.ptp(cols)), 8) // 2 + 1
    return (
        slice(max(rows.min() - grow, 0), rows.max() + grow + 1),
        slice(max(cols.min() - grow, 0), cols.max() + grow + 1),
    )


def _local_surface(clean: np.ndarray, footprint: np.ndarray) -> tuple[float, np.ndarray, float]:
    """The surface around a defect: its range ``R``, its median value and that median's luminance.

    ``R`` is the luminance spread from the 1st to the 99th percentile, floored at MIN_RANGE.

    Returns:
        ``R``, the median ([] grey or [3] colour, per channel) and its luminance.
    """
    surface = clean[_local_window(footprint)]
    low, high = np.percentile(_luminance(surface), [1, 99])
    median = np.median(surface.reshape(-1, *clean.shape[2:]), axis=0)
    luminance = float(median if clean.ndim == 2 else median @ LUMA)
    return max(float(high - low), MIN_RANGE), median, luminance


def _defect_target(
    kind: str,
    clean: np.ndarray,
    pixels: int,
    median: np.ndarray,
    luminance: float,
    amplitude: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, Any]]:
    """What a scratch, hole or stain turns the surface into at full weight.

    Args:
        clean: uint8 image, [S, S] or [S, S, 3].
        pixels: Footprint size in pixels (sets the stain's blur).
        median: The local surface's median value: [] grey or [3] colour.
        luminance: The luminance of ``median``.
        amplitude: Distance of the target from the median, in luminance levels.

    Returns:
        The target, float and shaped like ``clean``, and the kind's record fields.
    """
    if kind == "hole":
        fill = np.clip(median - amplitude, 0.0, 255.0)
        return _uniform(fill, clean.shape), {"fill": _rounded(fill)}

    if kind == "scratch":
        polarity = _polarity(luminance, amplitude, rng)
        level = np.clip(median + polarity * amplitude, 0.0, 255.0)
        return _uniform(level, clean.shape), {"polarity": polarity, "level": _rounded(level)}

    sigma = STAIN_BLUR * 2.0 * math.sqrt(pixels / math.pi)
    flattened = clean + STAIN_FLATTEN * (_blurred(clean, sigma) - clean)
    tint, extra = _stain_tint(clean, luminance, amplitude, rng)
    return flattened + tint, {**extra, "flatten": STAIN_FLATTEN, "blur_sigma": round(sigma, 3)}


def _stain_tint(
    clean: np.ndarray, luminance: float, amplitude: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """A stain's tint: ``±amplitude`` on grey, ``amplitude * u`` on colour.

    ``u`` is a random colour direction whose largest component is ±1.

    Returns:
        The tint, [] or [3] float, and its record fields (``polarity`` or ``colour``).
    """
    if clean.ndim == 2:
        polarity = _polarity(luminance, amplitude, rng)
        return np.array(float(polarity * amplitude)), {"polarity": polarity}
    colour = rng.uniform(-1.0, 1.0, clean.shape[2])
    colour /= np.abs(colour).max()
    return amplitude * colour, {"colour": _rounded(colour)}


def _foreign_target(
    clean: np.ndarray,
    weight: np.ndarray,
    median: float,
    local_range: float,
    donor: np.ndarray | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The donor material, made to stand apart from the surface it covers.

    The material's level is the mean luminance of its core (``w >= 0.5``). When that lies
    within ``DONOR_MIN_OFFSET * R`` of the surface's median, the donor is inverted (255 - donor)
    if that moves it further away, and then, if still too close, shifted to exactly that offset.

    Args:
        clean: uint8 image, [S, S] or [S, S, 3].
        weight: [S, S] defect weight.
        median: The local surface's median luminance.
        local_range: The surface's luminance range ``R``.
        donor: uint8 image shaped like ``clean``.

    Returns:
        The target, float and shaped like ``clean``, and the record fields ``opacity`` (1),
        ``inverted``, ``shift``, ``level_offset`` (material level minus surface median) and
        ``mean_core_change`` (mean absolute change over the core and channels).
    """
    if donor is None:
        raise ValueError("a 'foreign' defect needs a donor image")
    core = weight >= 0.5
    least = DONOR_MIN_OFFSET * local_range
    material = donor.astype(np.float64)
    offset = float(_luminance(material)[core].mean()) - median

    inverted = False
    if abs(offset) < least:
        inverse_offset = float(_luminance(255.0 - material)[core].mean()) - median
        if abs(inverse_offset) > abs(offset):
            material, offset, inverted = 255.0 - material, inverse_offset, True

    shift = 0.0
    if abs(offset) < least:
        side = _side_with_room(1 if offset >= 0 else -1, median, least)
        shift = side * least - offset
        material = np.clip(material + shift, 0.0, 255.0)
        offset = float(_luminance(material)[core].mean()) - median

    return material, {
        "opacity": 1.0,
        "inverted": inverted,
        "shift": round(shift, 3),
        "level_offset": round(offset, 3),
        "mean_core_change": float(np.abs(material - clean)[core].mean()),
    }


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two image axes (edges reflected): float, shaped like ``image``."""
    sigmas = (sigma, sigma) if image.ndim == 2 else (sigma, sigma, 0.0)
    return ndimage.gaussian_filter(image.astype(np.float64), sigmas, mode="reflect")


def _polarity(median: float, amplitude: float, rng: np.random.Generator) -> int:
    """Bright (+1) or dark (-1) at random, flipped when that side has no room for the change."""
    return _side_with_room(1 if rng.integers(2) else -1, median, amplitude)


def _side_with_room(side: int, median: float, amount: float) -> int:
    """``side`` (+1 brighter, -1 darker), or the other one where it lacks room.

    A side lacks room when ``median`` is less than ``amount`` levels from its end (255 or 0).
    """
    room = 255.0 - median if side > 0 else median
    return -side if room < amount else side


def _uniform(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A float image of ``shape`` filled with a grey level ([]) or a colour ([3])."""
    return np.broadcast_to(value, shape).astype(np.float64)


def _rounded(value: np.ndarray) -> float | list[float]:
    """A grey value as a float, a colour as a list, both to 3 decimals (for the records)."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 0:
        return round(float(value), 3)
    return [round(float(v), 3) for v in value]


def _apply_change(
    clean: np.ndarray, change: np.ndarray, footprint: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Add a change that is zero outside the footprint; the mask is where the 8-bit value moved."""
    image = np.floor(np.clip(clean + change, 0.0, 255.0) + 0.5).astype(np.uint8)
    moved = image != clean
    if moved.ndim == 3:
        moved = moved.any(axis=2)
    return image, footprint & moved


def _name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}.png"


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")
