"""Dataset readers: MVTec AD and its near relatives, VisA, and plain folders of images.

Every reader returns a :class:`~cpkp.data.records.DatasetSplits` of the same
:class:`~cpkp.data.records.Sample` records, in sorted order, and checks the layout while
reading: a missing or empty folder, a defect image without its mask, a mask without its image
or an unknown category is a :class:`~cpkp.errors.DatasetError` that names the folder or file
and what was expected, raised before any long work starts. Files are matched to images by
extension in any letter case (png, jpg, jpeg, bmp, tif, tiff); every other entry of a folder
is skipped and listed in an INFO log line.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path

from cpkp.data.images import IMAGE_EXTENSIONS, is_image_file
from cpkp.data.records import GOOD, DatasetSplits, Sample
from cpkp.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

DATASET_KINDS = ("mvtec", "visa", "folder")
KIND_ALIASES = {"mpdd": "mvtec", "btad": "mvtec", "mvtec_loco": "mvtec", "loco": "mvtec"}
GOOD_FOLDERS = ("good", "ok")  # MVTec AD, MPDD and LOCO say "good"; BTAD says "ok"
MASK_SUFFIX = "_mask"  # MVTec AD and MPDD: ground_truth/<type>/<stem>_mask.png
ABNORMAL = "abnormal"  # defect_type of the images of a plain --abnormal folder
VISA_DEFECT = "anomaly"  # VisA's 1cls split names no defect types
VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}
_FOLDER_OPTIONS = ("normal", "abnormal", "masks")
_LISTED = 8  # names shown in a message before "and N more"


def read_dataset(
    kind: str,
    root: str | Path | None,
    category: str | None = None,
    **folder_args: str | Path | None,
) -> DatasetSplits:
    """Read one category of a dataset with the reader that ``kind`` names.

    Args:
        kind: ``"mvtec"`` (also MPDD, BTAD, MVTec LOCO; the names ``mpdd``, ``btad``,
            ``mvtec_loco`` and ``loco`` are accepted), ``"visa"`` or ``"folder"``.
        root: the dataset's root folder; for ``"folder"``, the folder of normal images (or
            None and ``normal=`` among ``folder_args``).
        category: the category to read; for ``"folder"``, only the name to give the samples.
        **folder_args: ``normal``, ``abnormal`` and ``masks`` folders, for ``"folder"`` only.

    Raises:
        ConfigError: unknown kind, or folder options given to another kind.
        DatasetError: what the reader finds wrong with the files.
    """
    kind = resolve_kind(kind)
    if kind == "folder":
        return _read_folder_args(root, category, folder_args)

    given = [name for name, value in folder_args.items() if value is not None]
    if given:
        raise ConfigError(f"options {', '.join(given)} apply only to the dataset kind 'folder'")
    if root is None:
        raise ConfigError(f"dataset kind {kind!r} needs a root folder")
    if category is None:
        found = ", ".join(list_categories(kind, root))
        raise DatasetError(f"{root}: no category given (found: {found})")
    return read_mvtec(root, category) if kind == "mvtec" else read_visa(root, category)


def _read_folder_args(
    root: str | Path | None, category: str | None, folder_args: dict[str, str | Path | None]
) -> DatasetSplits:
    unknown = sorted(set(folder_args) - set(_FOLDER_OPTIONS))
    if unknown:
        known = ", ".join(_FOLDER_OPTIONS)
        raise ConfigError(f"unknown folder dataset options {', '.join(unknown)} (known: {known})")
    normal = folder_args.pop("normal", None)
    if (root is None) == (normal is None):
        raise ConfigError(
            "a folder dataset needs its folder of normal images as root or as normal=, once"
        )
    return read_folder(normal or root, category=category or "folder", **folder_args)


def resolve_kind(kind: str) -> str:
    """The reader name for a dataset kind or alias; :class:`ConfigError` when unknown."""
    name = KIND_ALIASES.get(kind.lower(), kind.lower())
    if name not in DATASET_KINDS:
        known = ", ".join((*DATASET_KINDS, *KIND_ALIASES))
        raise ConfigError(f"unknown dataset kind {kind!r} (expected one of {known})")
    return name


def list_categories(kind: str, root: str | Path) -> list[str]:
    """Categories present under ``root``, sorted.

    MVTec-like datasets: every subfolder holding a ``train`` folder. VisA: every ``object`` of
    ``split_csv/1cls.csv``. A plain folder has no categories, so ``"folder"`` is refused.
    """
    kind = resolve_kind(kind)
    root = Path(root)
    _require_dir(root, "dataset root folder")
    if kind == "folder":
        raise ConfigError("a folder dataset has a single category; name it with 'category'")
    if kind == "visa":
        return sorted({row["object"] for _, row in _read_visa_rows(root / VISA_SPLIT_FILE)})

    categories = [d.name for d in _subfolders(root) if (d / "train").is_dir()]
    if not categories:
        raise DatasetError(f"{root}: no category folders (expected <category>/train/ inside)")
    return categories


def read_mvtec(root: str | Path, category: str) -> DatasetSplits:
    """Read one category of MVTec AD, MPDD, BTAD or MVTec LOCO.

    Layout: ``<root>/<category>/train/good`` (or ``ok``) holds the normal training images,
    ``test/<type>`` the test images of each defect type (``good`` or ``ok`` being normal), and
    ``ground_truth/<type>`` the masks of each defect image, found by the image's stem as
    ``<stem>_mask.<ext>`` (MVTec AD, MPDD), ``<stem>.<ext>`` (BTAD) or a folder ``<stem>/`` of
    mask files whose union is the mask (MVTec LOCO). Without a ``ground_truth`` folder the
    defect images get no masks (a warning says so); with one, every defect image needs its
    mask and every mask its image. Other folders (LOCO's ``validation``) are not read.

    Raises:
        DatasetError: unknown category (the message lists those found), a missing or empty
            folder, a defect image without a mask, or a mask without an image.
    """
    root = Path(root)
    folder = _category_folder(root, category)
    splits = DatasetSplits(
        train=_read_mvtec_train(folder, category), test=_read_mvtec_test(folder, category)
    )
    _log_counts(folder, splits)
    return splits


def read_visa(root: str | Path, category: str) -> DatasetSplits:
    """Read one category of VisA, split as ``<root>/split_csv/1cls.csv`` says.

    The CSV has the columns object, split (train/test), label (normal/anomaly), image and mask,
    paths relative to ``root``, images under ``<category>/Data/Images/{Normal,Anomaly}`` and
    masks under ``<category>/Data/Masks/Anomaly``. Masks hold 0/1 or 0/255; the mask loader
    reads any value above 0 as defect. Images on disk that the CSV does not list are left out
    (logged); a mask file with no image of the same stem is an error.

    Raises:
        DatasetError: missing CSV or columns, a category the CSV does not name (the message
            lists those it does), an unknown split or label, a listed file that is missing,
            an anomalous training image, or a mask without an image.
    """
    root = Path(root)
    _require_dir(root, "VisA root folder")
    split_file = root / VISA_SPLIT_FILE
    rows = _read_visa_rows(split_file)
    objects = sorted({row["object"] for _, row in rows})
    if category not in objects:
        raise DatasetError(
            f"{split_file}: unknown category {category!r} (found: {', '.join(objects)})"
        )
    folder = root / category
    _require_dir(folder, f"VisA category folder of {category!r}")

    samples = [
        _visa_sample(root, split_file, n, row) for n, row in rows if row["object"] == category
    ]
    splits = DatasetSplits(
        train=sorted((s for s in samples if s.split == "train"), key=lambda s: s.image),
        test=sorted((s for s in samples if s.split == "test"), key=lambda s: s.image),
    )
    if not splits.train:
        raise DatasetError(f"{split_file}: no training images for category {category!r}")
    _check_visa_folders(folder, samples)
    _log_counts(folder, splits)
    return splits


def read_folder(
    normal: str | Path,
    abnormal: str | Path | None = None,
    masks: str | Path | None = None,
    category: str = "folder",
) -> DatasetSplits:
    """Read plain folders of images: normal ones to train on, abnormal ones to test on.

    Train: the images in ``normal``, or in ``normal/train`` when that subfolder exists; then
    the images of ``normal/test`` (if present) are normal test images. Test: those normal test
    images plus every image in ``abnormal`` (label 1, defect type ``"abnormal"``). With
    ``masks``, each abnormal image needs a mask there named by its stem, with or without a
    ``_mask`` suffix (``012.png`` or ``012_mask.png`` for ``012.jpg``). Without ``abnormal``
    and without ``normal/test``, the test split is empty (enough to train and to predict).

    Raises:
        DatasetError: a missing or empty folder, images beside a ``train`` subfolder,
            ``masks`` without ``abnormal``, an abnormal image without a mask, or a mask without
            an image.
    """
    normal = Path(normal)
    _require_dir(normal, "folder of normal images")
    train_images, normal_test = _read_normal_folder(normal)
    train = [_sample(p, category, "train") for p in train_images]
    test = [_sample(p, category, "test") for p in normal_test]

    if abnormal is not None:
        images = list_images(Path(abnormal))
        found = _match_masks(images, Path(masks)) if masks is not None else [()] * len(images)
        test += [_sample(p, category, "test", ABNORMAL, m) for p, m in zip(images, found)]
    elif masks is not None:
        raise DatasetError(f"{masks}: a mask folder needs a folder of abnormal images with it")

    splits = DatasetSplits(train=train, test=test)
    _log_counts(normal, splits)
    return splits


def _read_normal_folder(normal: Path) -> tuple[list[Path], list[Path]]:
    """(train images, normal test images) of a plain folder, with or without train/ test/."""
    train_dir, test_dir = normal / "train", normal / "test"
    if not train_dir.is_dir():
        if test_dir.is_dir():
            raise DatasetError(f"{normal}: has a test/ subfolder but no train/ subfolder")
        return list_images(normal), []

    loose = [p.name for p in _entries(normal) if p.is_file() and is_image_file(p)]
    if loose:
        raise DatasetError(
            f"{normal}: holds images ({_names(loose)}) beside a train/ subfolder; move them "
            "into train/ or test/"
        )
    return list_images(train_dir), list_images(test_dir) if test_dir.is_dir() else []


def _category_folder(root: Path, category: str) -> Path:
    _require_dir(root, "dataset root folder")
    folder = root / category
    if category in ("", ".", "..") or not folder.is_dir():
        found = [d.name for d in _subfolders(root) if (d / "train").is_dir()]
        raise DatasetError(
            f"{root}: unknown category {category!r} (found: {', '.join(found) or 'none'})"
        )
    return folder


def _read_mvtec_train(folder: Path, category: str) -> list[Sample]:
    train_dir = folder / "train"
    _require_dir(train_dir, "training folder")
    subfolders = _subfolders(train_dir)
    good = [d for d in subfolders if d.name in GOOD_FOLDERS]
    if len(good) != 1:
        raise DatasetError(
            f"{train_dir}: expected one folder of normal images named "
            f"{' or '.join(GOOD_FOLDERS)}, found {_names(d.name for d in subfolders) or 'none'}"
        )
    _log_skipped(train_dir, [d for d in subfolders if d not in good])
    return [_sample(p, category, "train") for p in list_images(good[0])]


def _read_mvtec_test(folder: Path, category: str) -> list[Sample]:
    test_dir, truth_dir = folder / "test", folder / "ground_truth"
    _require_dir(test_dir, "test folder")
    type_dirs = _subfolders(test_dir)
    if not type_dirs:
        raise DatasetError(f"{test_dir}: no defect-type subfolders (expected good/, <type>/...)")
    has_truth = truth_dir.is_dir()
    if not has_truth:
        logger.warning("%s: not found; defect images get no masks (no pixel metrics)", truth_dir)

    samples = []
    for type_dir in type_dirs:
        images = list_images(type_dir)
        if type_dir.name in GOOD_FOLDERS:
            samples += [_sample(p, category, "test") for p in images]
            continue
        masks = _match_masks(images, truth_dir / type_dir.name) if has_truth else [()] * len(images)
        samples += [_sample(p, category, "test", type_dir.name, m) for p, m in zip(images, masks)]

    if has_truth:
        _check_truth_types(truth_dir, {d.name for d in type_dirs})
    return samples


def _check_truth_types(truth_dir: Path, test_types: set[str]) -> None:
    """Every mask folder must belong to a test folder of images."""
    for mask_dir in _subfolders(truth_dir):
        if mask_dir.name in GOOD_FOLDERS and mask_dir.name not in test_types:
            _log_skipped(truth_dir, [mask_dir])
        elif mask_dir.name not in test_types:
            raise DatasetError(
                f"{mask_dir}: masks of defect type {mask_dir.name!r} but no test/"
                f"{mask_dir.name} folder of images"
            )


def _match_masks(images: list[Path], mask_dir: Path) -> list[tuple[Path, ...]]:
    """The mask files of each image, found in ``mask_dir`` by the image's stem.

    A mask is ``<stem>_mask.<ext>``, ``<stem>.<ext>`` or a folder ``<stem>/`` of mask files.
    """
    _require_dir(mask_dir, f"mask folder of the images in {images[0].parent}")
    index = _index_masks(mask_dir)
    _check_unique_stems(images)

    matched, missing = [], []
    for image in images:
        keys = [k for k in (image.stem + MASK_SUFFIX, image.stem) if k in index]
        if len(keys) > 1:
            both = _names(str(index[k][0]) for k in keys)
            raise DatasetError(f"{image}: two masks match this image ({both}); keep one")
        if not keys:
            missing.append(image)
            continue
        matched.append(keys[0])

    if missing:
        raise DatasetError(
            f"{mask_dir}: no mask for {len(missing)} defect image(s) {_names(map(str, missing))}; "
            f"expected <stem>{MASK_SUFFIX}.png, <stem>.png or a folder <stem>/ of masks"
        )
    orphans = sorted(set(index) - set(matched))
    if orphans:
        files = _names(str(index[k][0]) for k in orphans)
        raise DatasetError(
            f"{mask_dir}: {len(orphans)} mask(s) without an image in {images[0].parent}: {files}"
        )
    return [index[key] for key in matched]


def _index_masks(mask_dir: Path) -> dict[str, tuple[Path, ...]]:
    """Mask files by file stem, or by folder name for a folder of masks (MVTec LOCO)."""
    index: dict[str, tuple[Path, ...]] = {}
    skipped = []
    for entry in _entries(mask_dir):
        if entry.is_dir() and not entry.name.startswith("."):
            key, files = entry.name, tuple(list_images(entry))
        elif entry.is_file() and is_image_file(entry) and not entry.name.startswith("."):
            key, files = entry.stem, (entry,)
        else:
            skipped.append(entry)
            continue
        if key in index:
            raise DatasetError(f"{entry}: a second mask named {key!r} (also {index[key][0]})")
        index[key] = files
    _log_skipped(mask_dir, skipped)
    return index


def _check_unique_stems(images: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise DatasetError(
                f"{image}: same name as {seen[image.stem].name} but another extension, so "
                "masks cannot be matched by name; keep one of them"
            )
        seen[image.stem] = image


def _read_visa_rows(split_file: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of the VisA split CSV, values stripped."""
    if not split_file.is_file():
        raise DatasetError(
            f"{split_file}: VisA split file not found (VisA ships it as split_csv/1cls.csv)"
        )
    with split_file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{split_file}: missing column(s) {', '.join(missing)} "
                f"(expected {', '.join(VISA_COLUMNS)})"
            )
        rows = []
        for row in reader:
            if any(row[c] is None for c in VISA_COLUMNS):
                raise DatasetError(f"{split_file}, line {reader.line_num}: too few columns")
            rows.append((reader.line_num, {c: row[c].strip() for c in VISA_COLUMNS}))
    return rows


def _visa_sample(root: Path, split_file: Path, line: int, row: dict[str, str]) -> Sample:
    where = f"{split_file}, line {line}"
    split, label_name = row["split"].lower(), row["label"].lower()
    if split not in ("train", "test"):
        raise DatasetError(f"{where}: split {row['split']!r}, expected train or test")
    if label_name not in VISA_LABELS:
        raise DatasetError(f"{where}: label {row['label']!r}, expected normal or anomaly")
    label = VISA_LABELS[label_name]
    if split == "train" and label == 1:
        raise DatasetError(f"{where}: an anomalous image in the train split; train on normal ones")

    image = _listed_file(root, row["image"], where, "image")
    masks = (_listed_file(root, row["mask"], where, "mask"),) if label == 1 else ()
    defect_type = VISA_DEFECT if label == 1 else GOOD
    return Sample(image, label, defect_type, masks, row["object"], split)


def _listed_file(root: Path, relative: str, where: str, what: str) -> Path:
    if not relative:
        raise DatasetError(f"{where}: no {what} path given")
    path = root / relative
    if not path.is_file():
        raise DatasetError(f"{where}: {what} {path} not found")
    if not is_image_file(path):
        raise DatasetError(f"{where}: {what} {path} is not a {'/'.join(IMAGE_EXTENSIONS)} file")
    return path


def _check_visa_folders(folder: Path, samples: list[Sample]) -> None:
    """Masks need images of the same stem; images the CSV leaves out are logged."""
    data = folder / "Data"
    image_dir, mask_dir = data / "Images" / "Anomaly", data / "Masks" / "Anomaly"
    if mask_dir.is_dir():
        stems = {p.stem for p in _image_entries(image_dir)}
        orphans = [p for p in _image_entries(mask_dir) if p.stem not in stems]
        if orphans:
            raise DatasetError(
                f"{mask_dir}: {len(orphans)} mask(s) without an image in {image_dir}: "
                f"{_names(p.name for p in orphans)}"
            )

    listed = {s.image for s in samples}
    unlisted = [p for sub in ("Normal", "Anomaly") for p in _image_entries(data / "Images" / sub)]
    unlisted = [p for p in unlisted if p not in listed]
    if unlisted:
        logger.info(
            "%s: %d image(s) not in the split file, not used: %s",
            data / "Images",
            len(unlisted),
            _names(p.name for p in unlisted),
        )


def _sample(
    image: Path,
    category: str,
    split: str,
    defect_type: str = GOOD,
    masks: tuple[Path, ...] = (),
) -> Sample:
    label = 0 if defect_type == GOOD else 1
    return Sample(image, label, defect_type, masks, category, split)


def _require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "not found"
        raise DatasetError(f"{folder}: {what} {state}")


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir(), key=lambda p: p.name)


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders, sorted by name; files beside them are logged and skipped."""
    entries = _entries(folder)
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    _log_skipped(folder, [p for p in entries if p not in folders])
    return folders


def _image_entries(folder: Path) -> list[Path]:
    """Image files of a folder (sorted; empty when the folder is missing), nothing logged."""
    if not folder.is_dir():
        return []
    return [p for p in _entries(folder) if _is_visible_image(p)]


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in a folder, sorted by name; skipped entries are logged.

    Raises:
        DatasetError: the folder is missing or holds no image.
    """
    folder = Path(folder)
    _require_dir(folder, "image folder")
    entries = _entries(folder)
    images = [p for p in entries if _is_visible_image(p)]
    _log_skipped(folder, [p for p in entries if p not in images])
    if not images:
        raise DatasetError(
            f"{folder}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return images


def _is_visible_image(path: Path) -> bool:
    # Hidden files (macOS "._000.png" copies) are metadata, not images.
    return path.is_file() and is_image_file(path) and not path.name.startswith(".")


def _log_skipped(folder: Path, entries: list[Path]) -> None:
    if entries:
        names = _names(p.name + ("/" if p.is_dir() else "") for p in entries)
        logger.info("%s: skipped %d entries that are not read: %s", folder, len(entries), names)


def _log_counts(where: Path, splits: DatasetSplits) -> None:
    logger.info("%s: %s", where, splits.describe())


def _names(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
