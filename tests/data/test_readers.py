"""Dataset readers on small generated trees: each layout, each error, deterministic order."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpkp.data.readers import (
    list_categories,
    list_images,
    read_dataset,
    read_folder,
    read_mvtec,
    read_visa,
)
from cpkp.data.records import DatasetSplits, Sample
from cpkp.errors import ConfigError, DatasetError


def _image(path: Path, value: int = 128, size: tuple[int, int] = (4, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _images(folder: Path, names: list[str]) -> list[Path]:
    return [_image(folder / name) for name in names]


def _mvtec(root: Path, category: str = "bottle") -> Path:
    """MVTec AD layout: train/good, test/{good,broken,crack}, ground_truth/<type>/<stem>_mask."""
    folder = root / category
    _images(folder / "train" / "good", ["001.png", "000.png", "002.PNG"])
    _images(folder / "test" / "good", ["000.png", "001.png"])
    _images(folder / "test" / "crack", ["000.png"])
    _images(folder / "test" / "broken", ["001.png", "000.png"])
    _images(folder / "ground_truth" / "crack", ["000_mask.png"])
    _images(folder / "ground_truth" / "broken", ["000_mask.png", "001_mask.png"])
    return folder


def _assert_dataset_error(call, *fragments: object) -> str:
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


# -------------------------------------------------------------------------------------- MVTec


def test_mvtec_reads_every_split_in_sorted_order(tmp_path: Path) -> None:
    folder = _mvtec(tmp_path)
    splits = read_mvtec(tmp_path, "bottle")

    assert isinstance(splits, DatasetSplits)
    assert [s.image.name for s in splits.train] == ["000.png", "001.png", "002.PNG"]
    assert all(
        s.label == 0 and s.defect_type == "good" and s.split == "train" for s in splits.train
    )
    assert all(s.category == "bottle" and s.masks == () for s in splits.train)

    test = [(s.defect_type, s.image.name, s.label) for s in splits.test]
    assert test == [
        ("broken", "000.png", 1),
        ("broken", "001.png", 1),
        ("crack", "000.png", 1),
        ("good", "000.png", 0),
        ("good", "001.png", 0),
    ]
    truth = folder / "ground_truth"
    assert splits.test[1].masks == (truth / "broken" / "001_mask.png",)
    assert splits.test[2].masks == (truth / "crack" / "000_mask.png",)
    assert splits.test[3].masks == ()
    assert splits.summary() == {
        "train": {"good": 3},
        "test": {"good": 2, "broken": 2, "crack": 1},
    }
    assert read_mvtec(tmp_path, "bottle") == splits  # deterministic


def test_mvtec_logs_counts_and_skipped_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _mvtec(tmp_path)
    (folder / "train" / "good" / "notes.txt").write_text("hello")
    (folder / "train" / "good" / "clip.gif").write_bytes(b"GIF89a")
    (folder / "train" / "good" / "._000.png").write_bytes(b"\x00")
    with caplog.at_level(logging.INFO, logger="cpkp.data.readers"):
        splits = read_mvtec(tmp_path, "bottle")
    messages = "\n".join(r.getMessage() for r in caplog.records)

    assert len(splits.train) == 3
    for name in ("notes.txt", "clip.gif", "._000.png"):
        assert name in messages
    assert "train 3 (good 3); test 5 (good 2, broken 2, crack 1)" in messages


def test_btad_naming_with_ok_folders_and_bmp_masks(tmp_path: Path) -> None:
    folder = tmp_path / "01"
    _images(folder / "train" / "ok", ["0000.bmp", "0001.bmp"])
    _images(folder / "test" / "ok", ["0000.bmp"])
    _images(folder / "test" / "ko", ["0003.bmp", "0002.bmp"])
    _images(folder / "ground_truth" / "ko", ["0002.bmp", "0003.BMP"])

    splits = read_dataset("btad", tmp_path, "01")
    assert [s.image.name for s in splits.train] == ["0000.bmp", "0001.bmp"]
    assert [(s.defect_type, s.image.name) for s in splits.test] == [
        ("ko", "0002.bmp"),
        ("ko", "0003.bmp"),
        ("good", "0000.bmp"),
    ]
    assert splits.test[1].masks == (folder / "ground_truth" / "ko" / "0003.BMP",)


def test_mvtec_loco_folder_of_masks_per_image(tmp_path: Path) -> None:
    folder = tmp_path / "juice_bottle"
    _images(folder / "train" / "good", ["000.png"])
    _images(folder / "validation" / "good", ["000.png"])
    _images(folder / "test" / "good", ["000.png"])
    _images(folder / "test" / "logical_anomalies", ["000.png", "001.png"])
    truth = folder / "ground_truth" / "logical_anomalies"
    _images(truth / "000", ["001.png", "000.png"])
    _images(truth / "001", ["000.png"])

    splits = read_mvtec(tmp_path, "juice_bottle")
    assert [s.defect_type for s in splits.test] == ["good"] + ["logical_anomalies"] * 2
    assert splits.test[0].masks == ()
    assert splits.test[1].masks == (truth / "000" / "000.png", truth / "000" / "001.png")
    assert splits.test[2].masks == (truth / "001" / "000.png",)
    assert len(splits.train) == 1  # validation/ is not read


def test_without_ground_truth_defects_have_no_masks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "plain"
    _images(folder / "train" / "good", ["a.png"])
    _images(folder / "test" / "dent", ["b.png"])
    with caplog.at_level(logging.WARNING, logger="cpkp.data.readers"):
        splits = read_mvtec(tmp_path, "plain")
    assert splits.test[0].label == 1 and splits.test[0].masks == ()
    assert str(folder / "ground_truth") in caplog.text


def test_mvtec_layout_errors_name_the_path(tmp_path: Path) -> None:
    folder = _mvtec(tmp_path)
    _mvtec(tmp_path, "cable")

    _assert_dataset_error(lambda: read_mvtec(tmp_path / "nowhere", "bottle"), tmp_path / "nowhere")
    _assert_dataset_error(lambda: read_mvtec(tmp_path, "screw"), "screw", "bottle, cable")

    (folder / "ground_truth" / "crack" / "000_mask.png").unlink()
    _assert_dataset_error(
        lambda: read_mvtec(tmp_path, "bottle"), folder / "ground_truth" / "crack", "000.png"
    )
    _image(folder / "ground_truth" / "crack" / "000_mask.png")

    _image(folder / "ground_truth" / "broken" / "007_mask.png")
    _assert_dataset_error(lambda: read_mvtec(tmp_path, "bottle"), "without an image", "007_mask")
    (folder / "ground_truth" / "broken" / "007_mask.png").unlink()

    _image(folder / "ground_truth" / "scratch" / "000_mask.png")
    _assert_dataset_error(
        lambda: read_mvtec(tmp_path, "bottle"), folder / "ground_truth" / "scratch"
    )


def test_mvtec_missing_and_empty_folders(tmp_path: Path) -> None:
    folder = _mvtec(tmp_path)
    (folder / "test" / "dent").mkdir()
    _assert_dataset_error(
        lambda: read_mvtec(tmp_path, "bottle"), folder / "test" / "dent", "no images"
    )
    (folder / "test" / "dent").rmdir()

    for path in (folder / "train" / "good").iterdir():
        path.unlink()
    _assert_dataset_error(lambda: read_mvtec(tmp_path, "bottle"), folder / "train" / "good")
    (folder / "train" / "good").rmdir()
    _assert_dataset_error(lambda: read_mvtec(tmp_path, "bottle"), folder / "train", "good or ok")

    other = tmp_path / "other"
    _images(other / "train" / "good", ["0.png"])
    _assert_dataset_error(lambda: read_mvtec(tmp_path, "other"), other / "test", "not found")


def test_two_images_with_one_stem_are_refused(tmp_path: Path) -> None:
    folder = _mvtec(tmp_path)
    _image(folder / "test" / "crack" / "000.jpg")
    _assert_dataset_error(lambda: read_mvtec(tmp_path, "bottle"), folder / "test" / "crack")


def test_list_categories(tmp_path: Path) -> None:
    _mvtec(tmp_path, "zipper")
    _mvtec(tmp_path, "bottle")
    (tmp_path / "docs").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    assert list_categories("mvtec", tmp_path) == ["bottle", "zipper"]
    _assert_dataset_error(lambda: list_categories("mvtec", tmp_path / "docs"), "no category")


# --------------------------------------------------------------------------------------- VisA


def _visa(root: Path) -> Path:
    """Two VisA objects, masks stored as 0/1, a split CSV with paths relative to root."""
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        data = root / obj / "Data"
        for i in range(3):
            image = _image(data / "Images" / "Normal" / f"{i:04d}.JPG")
            split = "train" if i < 2 else "test"
            rows.append(f"{obj},{split},normal,{image.relative_to(root)},")
        for i in (1, 0):
            image = _image(data / "Images" / "Anomaly" / f"{i:03d}.JPG")
            mask = data / "Masks" / "Anomaly" / f"{i:03d}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.eye(4, dtype=np.uint8)).save(mask)  # values 0 and 1
            rows.append(f"{obj},test,anomaly,{image.relative_to(root)},{mask.relative_to(root)}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root / "split_csv" / "1cls.csv"


def test_visa_follows_the_split_file(tmp_path: Path) -> None:
    _visa(tmp_path)
    splits = read_visa(tmp_path, "candle")
    data = tmp_path / "candle" / "Data"

    assert [s.image for s in splits.train] == [
        data / "Images" / "Normal" / "0000.JPG",
        data / "Images" / "Normal" / "0001.JPG",
    ]
    assert [(s.image.name, s.label, s.defect_type) for s in splits.test] == [
        ("000.JPG", 1, "anomaly"),
        ("001.JPG", 1, "anomaly"),
        ("0002.JPG", 0, "good"),
    ]
    assert splits.test[0].masks == (data / "Masks" / "Anomaly" / "000.png",)
    assert splits.test[2].masks == ()
    assert {s.category for s in splits.train + splits.test} == {"candle"}
    assert list_categories("visa", tmp_path) == ["candle", "pcb1"]
    assert read_dataset("visa", tmp_path, "pcb1").summary() == {
        "train": {"good": 2},
        "test": {"good": 1, "anomaly": 2},
    }


def test_visa_errors_name_the_file_and_line(tmp_path: Path) -> None:
    split_file = _visa(tmp_path)
    text = split_file.read_text()

    _assert_dataset_error(lambda: read_visa(tmp_path, "capsules"), split_file, "candle, pcb1")

    split_file.write_text(text.replace("train,normal", "train,weird", 1))
    _assert_dataset_error(lambda: read_visa(tmp_path, "candle"), split_file, "line 2", "weird")

    split_file.write_text(text.replace("test,normal", "train,anomaly", 1))
    _assert_dataset_error(lambda: read_visa(tmp_path, "candle"), "line 4", "anomalous")

    split_file.write_text(text.replace("0000.JPG", "9999.JPG", 1))
    _assert_dataset_error(lambda: read_visa(tmp_path, "candle"), "9999.JPG", "not found")

    split_file.write_text(text.replace("object,", "thing,", 1))
    _assert_dataset_error(lambda: read_visa(tmp_path, "candle"), split_file, "object")

    split_file.write_text(text)
    _image(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "077.png")
    _assert_dataset_error(lambda: read_visa(tmp_path, "candle"), "077.png", "without an image")

    split_file.unlink()
    _assert_dataset_error(lambda: read_visa(tmp_path, "candle"), split_file, "not found")


def test_visa_anomaly_without_mask_is_refused(tmp_path: Path) -> None:
    split_file = _visa(tmp_path)
    lines = split_file.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ","
    split_file.write_text("\n".join(lines) + "\n")
    _assert_dataset_error(lambda: read_visa(tmp_path, "candle"), "line 5", "no mask")


# ------------------------------------------------------------------------------------- folders


def test_folder_flat_normal_abnormal_and_masks(tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    _images(normal, ["b.png", "a.jpg"])
    _images(tmp_path / "bad", ["x.png", "y.png"])
    _images(tmp_path / "masks", ["x_mask.png", "y.PNG"])

    splits = read_folder(normal, tmp_path / "bad", tmp_path / "masks", category="widget")
    assert [s.image.name for s in splits.train] == ["a.jpg", "b.png"]
    assert [(s.image.name, s.label, s.defect_type) for s in splits.test] == [
        ("x.png", 1, "abnormal"),
        ("y.png", 1, "abnormal"),
    ]
    assert splits.test[0].masks == (tmp_path / "masks" / "x_mask.png",)
    assert splits.test[1].masks == (tmp_path / "masks" / "y.PNG",)
    assert {s.category for s in splits.train + splits.test} == {"widget"}

    only_normal = read_folder(normal)
    assert len(only_normal.train) == 2 and only_normal.test == []


def test_folder_with_train_and_test_subfolders(tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    _images(normal / "train", ["0.png", "1.png"])
    _images(normal / "test", ["2.png"])
    _images(tmp_path / "bad", ["3.png"])

    splits = read_dataset("folder", None, "widget", normal=normal, abnormal=tmp_path / "bad")
    assert [s.image.name for s in splits.train] == ["0.png", "1.png"]
    assert [(s.image.name, s.label) for s in splits.test] == [("2.png", 0), ("3.png", 1)]
    assert splits.test[1].masks == ()


def test_folder_errors(tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    _images(normal, ["a.png"])
    _images(tmp_path / "bad", ["x.png", "y.png"])
    _images(tmp_path / "masks", ["x.png"])

    _assert_dataset_error(
        lambda: read_folder(normal, tmp_path / "bad", tmp_path / "masks"), "y.png", "no mask"
    )
    _image(tmp_path / "masks" / "y_mask.png")
    _image(tmp_path / "masks" / "z_mask.png")
    _assert_dataset_error(
        lambda: read_folder(normal, tmp_path / "bad", tmp_path / "masks"),
        "z_mask.png",
        "without an image",
    )
    _image(tmp_path / "masks" / "x_mask.png")
    _assert_dataset_error(
        lambda: read_folder(normal, tmp_path / "bad", tmp_path / "masks"), "two masks"
    )
    _assert_dataset_error(lambda: read_folder(normal, masks=tmp_path / "masks"), tmp_path / "masks")

    (tmp_path / "empty").mkdir()
    _assert_dataset_error(lambda: read_folder(tmp_path / "empty"), tmp_path / "empty", "no images")
    _assert_dataset_error(lambda: read_folder(tmp_path / "absent"), tmp_path / "absent")

    _images(normal / "train", ["b.png"])
    _assert_dataset_error(lambda: read_folder(normal), normal, "a.png", "train/")


def test_list_images_is_sorted_and_case_insensitive(tmp_path: Path) -> None:
    _images(tmp_path, ["c.TIFF", "a.Jpeg", "b.bmp", "d.tif"])
    (tmp_path / "e.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.Jpeg", "b.bmp", "c.TIFF", "d.tif"]


# ------------------------------------------------------------------------------ dispatch, records


def test_read_dataset_dispatch_and_option_errors(tmp_path: Path) -> None:
    _mvtec(tmp_path)
    assert read_dataset("MVTEC", tmp_path, "bottle") == read_mvtec(tmp_path, "bottle")
    assert read_dataset("mpdd", tmp_path, "bottle") == read_mvtec(tmp_path, "bottle")

    with pytest.raises(ConfigError, match="imagenet"):
        read_dataset("imagenet", tmp_path, "bottle")
    with pytest.raises(ConfigError, match="abnormal"):
        read_dataset("mvtec", tmp_path, "bottle", abnormal=tmp_path)
    with pytest.raises(ConfigError, match="normal"):
        read_dataset("folder", tmp_path, None, normal=tmp_path)
    _assert_dataset_error(lambda: read_dataset("mvtec", tmp_path, None), "no category", "bottle")


def test_sample_checks_its_fields() -> None:
    sample = Sample("a.png", 1, "crack", ["m.png"], "bottle", "test")
    assert sample.image == Path("a.png") and sample.masks == (Path("m.png"),)
    with pytest.raises(ValueError):
        Sample(Path("a.png"), 0, "crack")
    with pytest.raises(ValueError):
        Sample(Path("a.png"), 1, "good")
    with pytest.raises(ValueError):
        Sample(Path("a.png"), 2, "crack")
    with pytest.raises(ValueError):
        Sample(Path("a.png"), 0, "good", split="val")
    assert DatasetSplits().summary() == {"train": {}, "test": {}}
