"""Image and mask loading: every pixel format to RGB in [0, 1] by value, every bad file refused."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cpkp.data.images import (
    check_image,
    is_image_file,
    load_image,
    load_mask,
    resize_image,
    resize_mask,
)
from cpkp.errors import ImageError

GREY8 = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
GREY16 = np.array([[0, 1, 257], [32768, 65534, 65535]], dtype=np.uint16)


def _rgb8(height: int = 2, width: int = 3) -> np.ndarray:
    values = np.arange(height * width * 3, dtype=np.int64) * 37 % 256
    return values.reshape(height, width, 3).astype(np.uint8)


def _expect_grey(loaded: np.ndarray, values: np.ndarray) -> None:
    assert loaded.dtype == np.float32
    assert loaded.shape == (*values.shape, 3)
    for channel in range(3):
        np.testing.assert_allclose(loaded[:, :, channel], values, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- pixel formats


def test_grey_8bit_png_is_divided_by_255(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(GREY8, mode="L").save(path)
    _expect_grey(load_image(path), GREY8 / 255.0)


def test_grey_16bit_png_is_divided_by_65535(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY16).save(path)
    assert Image.open(path).mode == "I;16"
    _expect_grey(load_image(path), GREY16 / 65535.0)


def test_16bit_pgm_read_as_int32_is_divided_by_65535(tmp_path: Path) -> None:
    # Pillow decodes 16-bit PGM as mode "I"; the content decides, not the extension.
    path = tmp_path / "pgm16.png"
    path.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 1000, 65535], ">u2").tobytes())
    assert Image.open(path).mode == "I"
    _expect_grey(load_image(path), np.array([[0, 1000, 65535]]) / 65535.0)


def test_rgb_png_bmp_keep_every_channel(tmp_path: Path) -> None:
    rgb = _rgb8()
    for name in ("rgb.png", "rgb.bmp", "rgb.tif"):
        Image.fromarray(rgb).save(tmp_path / name)
        np.testing.assert_allclose(load_image(tmp_path / name), rgb / 255.0, atol=1e-7)


def test_alpha_is_dropped_even_where_transparent(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb8(), np.zeros((2, 3), np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png"), rgba[:, :, :3] / 255.0)

    grey_alpha = np.dstack([GREY8, np.full((2, 3), 7, np.uint8)])
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    _expect_grey(load_image(tmp_path / "la.png"), GREY8 / 255.0)


def test_palette_png_applies_the_palette(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50, 255, 255, 0])
    image.save(tmp_path / "palette.png")
    loaded = load_image(tmp_path / "palette.png")
    np.testing.assert_allclose(loaded[0, 0], np.array([10, 20, 30]) / 255.0, atol=1e-7)
    np.testing.assert_allclose(loaded[1, 0], np.array([200, 100, 50]) / 255.0, atol=1e-7)
    np.testing.assert_allclose(loaded[1, 1], np.array([255, 255, 0]) / 255.0, atol=1e-7)


def test_bilevel_png_gives_zero_and_one(tmp_path: Path) -> None:
    bits = np.array([[True, False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    _expect_grey(load_image(tmp_path / "bits.png"), bits.astype(float))


def test_jpeg_is_close_to_its_source(tmp_path: Path) -> None:
    flat = np.full((16, 16, 3), (30, 140, 220), np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.jpg", quality=95)
    np.testing.assert_allclose(load_image(tmp_path / "flat.jpg"), flat / 255.0, atol=3 / 255)


def test_tiff_16bit_grey_and_colour_keep_all_bits(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "grey16.tif", GREY16)
    _expect_grey(load_image(tmp_path / "grey16.tif"), GREY16 / 65535.0)

    # Pillow would keep only the high byte of 16-bit RGB (1 -> 0); tifffile keeps all 16 bits.
    rgb16 = np.stack([GREY16, GREY16[::-1], np.full((2, 3), 1, np.uint16)], axis=-1)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    np.testing.assert_allclose(load_image(tmp_path / "rgb16.tif"), rgb16 / 65535.0, atol=1e-7)


def test_tiff_planar_multipage_and_32bit(tmp_path: Path) -> None:
    rgb16 = np.stack([GREY16, GREY16[::-1], GREY16 // 2], axis=0)  # [3, H, W], planar
    tifffile.imwrite(tmp_path / "planar.tif", rgb16, photometric="rgb", planarconfig="separate")
    expected = np.moveaxis(rgb16, 0, -1) / 65535.0
    np.testing.assert_allclose(load_image(tmp_path / "planar.tif"), expected, atol=1e-7)

    pages = np.stack([GREY16, GREY16 // 2])
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack", metadata=None)
    _expect_grey(load_image(tmp_path / "pages.tif"), GREY16 / 65535.0)

    u32 = np.array([[0, 2**31, 2**32 - 1]], np.uint32)
    tifffile.imwrite(tmp_path / "u32.tif", u32)
    _expect_grey(load_image(tmp_path / "u32.tif"), u32 / (2**32 - 1))


def test_float_tiff_in_unit_range_is_kept(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    tifffile.imwrite(tmp_path / "float.tif", values)
    _expect_grey(load_image(tmp_path / "float.tif"), values)

    tifffile.imwrite(tmp_path / "float64.tif", values.astype(np.float64))
    _expect_grey(load_image(tmp_path / "float64.tif"), values)

    Image.fromarray(values, mode="F").save(tmp_path / "pillow_float.tif")
    _expect_grey(load_image(tmp_path / "pillow_float.tif"), values)


def test_uppercase_extensions_are_read(tmp_path: Path) -> None:
    for name in ("UPPER.PNG", "UPPER.JPG", "UPPER.JPEG", "UPPER.BMP", "UPPER.TIF", "UPPER.TIFF"):
        Image.fromarray(_rgb8()).save(tmp_path / name, format=_format_of(name))
        assert is_image_file(tmp_path / name)
        assert load_image(tmp_path / name).shape == (2, 3, 3)
    assert not is_image_file(tmp_path / "notes.txt")
    assert not is_image_file(tmp_path / "anim.gif")


def _format_of(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        suffix, suffix[1:].upper()
    )


# ------------------------------------------------------------------------------- bad files


def _assert_image_error(path: Path, fragment: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_empty_and_folder_paths(tmp_path: Path) -> None:
    _assert_image_error(tmp_path / "absent.png", "not found")
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_image_error(tmp_path / "empty.png", "0 bytes")
    (tmp_path / "folder.png").mkdir()
    _assert_image_error(tmp_path / "folder.png", "not a regular file")


def test_truncated_and_non_image_files(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rgb8(32, 32)).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-40])
    _assert_image_error(tmp_path / "cut.png", "cannot decode")

    buffer = io.BytesIO()
    Image.fromarray(_rgb8(64, 64)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_image_error(tmp_path / "cut.jpg", "cannot decode")

    (tmp_path / "notes.png").write_text("not an image at all\n")
    _assert_image_error(tmp_path / "notes.png", "cannot decode")
    (tmp_path / "notes.tif").write_text("not a tiff either\n")
    _assert_image_error(tmp_path / "notes.tif", "cannot decode TIFF")


def test_out_of_range_and_unsupported_pixels(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "big_float.tif", np.array([[0.0, 255.0]], np.float32))
    _assert_image_error(tmp_path / "big_float.tif", "[0, 1]")

    tifffile.imwrite(tmp_path / "nan.tif", np.array([[0.0, np.nan]], np.float32))
    _assert_image_error(tmp_path / "nan.tif", "NaN")

    tifffile.imwrite(tmp_path / "negative.tif", np.array([[-5, 3]], np.int16))
    _assert_image_error(tmp_path / "negative.tif", "negative")

    cmyk16 = np.zeros((2, 2, 4), np.uint16)
    tifffile.imwrite(tmp_path / "cmyk16.tif", cmyk16, photometric="separated")
    _assert_image_error(tmp_path / "cmyk16.tif", "not supported")


def test_check_image_finds_what_load_image_finds(tmp_path: Path) -> None:
    Image.fromarray(_rgb8(32, 32)).save(tmp_path / "fine.png")
    Image.fromarray(_rgb8(32, 32)).save(tmp_path / "fine.jpg")
    check_image(tmp_path / "fine.png")
    check_image(tmp_path / "fine.jpg")

    for name in ("fine.png", "fine.jpg"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError, match=str(cut)):
            check_image(cut)


# -------------------------------------------------------------------------------------- masks


def test_mask_01_and_0255_give_the_same_mask(tmp_path: Path) -> None:
    shape = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    Image.fromarray(shape).save(tmp_path / "ones.png")
    Image.fromarray(shape * 255).save(tmp_path / "full.png")
    for name in ("ones.png", "full.png"):
        mask = load_mask([tmp_path / name], (2, 3))
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, shape > 0)


def test_mask_union_and_colour_masks(tmp_path: Path) -> None:
    first = np.zeros((4, 4), np.uint8)
    first[0, 0] = 255
    second = np.zeros((4, 4, 3), np.uint8)
    second[3, 3, 2] = 9  # only the blue channel is set
    Image.fromarray(first).save(tmp_path / "000.png")
    Image.fromarray(second).save(tmp_path / "001.png")
    mask = load_mask([tmp_path / "000.png", tmp_path / "001.png"])
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[3, 3] = True
    np.testing.assert_array_equal(mask, expected)


def test_mask_of_another_size_is_resized_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = np.array([[255, 0], [0, 0]], np.uint8)
    Image.fromarray(small).save(tmp_path / "small_mask.png")
    with caplog.at_level(logging.WARNING, logger="cpkp.data.images"):
        mask = load_mask([tmp_path / "small_mask.png"], (4, 6))
    expected = np.zeros((4, 6), bool)
    expected[:2, :3] = True
    np.testing.assert_array_equal(mask, expected)
    assert any(str(tmp_path / "small_mask.png") in r.getMessage() for r in caplog.records)


def test_no_mask_files_give_zeros(tmp_path: Path) -> None:
    np.testing.assert_array_equal(load_mask([], (3, 5)), np.zeros((3, 5), bool))
    with pytest.raises(ValueError):
        load_mask([])


# ------------------------------------------------------------------------------------ resizing


def test_resize_image_matches_pillow_bilinear() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((37, 23, 3)).astype(np.float32)
    resized = resize_image(image, 16)
    assert resized.shape == (3, 16, 16) and resized.dtype == torch.float32
    for channel in range(3):
        # Pillow's BILINEAR widens its filter when shrinking: an independent antialiased resize.
        reference = Image.fromarray(image[:, :, channel], mode="F").resize((16, 16), Image.BILINEAR)
        np.testing.assert_allclose(resized[channel].numpy(), np.asarray(reference), atol=1e-5)


def test_resize_image_keeps_the_whole_frame_and_range() -> None:
    image = np.zeros((8, 16, 3), np.float32)
    image[:, :8] = 1.0  # left half white: no crop keeps it the left half
    resized = resize_image(image, 8)
    np.testing.assert_allclose(resized[:, :, :3].numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(resized[:, :, 5:].numpy(), 0.0, atol=1e-6)
    assert float(resized.min()) >= 0.0 and float(resized.max()) <= 1.0

    same = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(resize_image(same, 8).permute(1, 2, 0).numpy(), same)


def test_resize_mask_is_nearest_and_binary() -> None:
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    resized = resize_mask(mask, 11)
    assert resized.shape == (1, 11, 11) and resized.dtype == torch.float32
    assert set(np.unique(resized.numpy())) <= {0.0, 1.0}
    reference = Image.fromarray(mask.astype(np.uint8) * 255).resize((11, 11), Image.NEAREST)
    np.testing.assert_array_equal(resized[0].numpy(), np.asarray(reference) / 255.0)


# --------------------------------------------------------------------------------- properties

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"P5\n"]
EXTENSIONS = [".png", ".jpg", ".bmp", ".tif", ".tiff", ".PNG"]
# mode -> formats Pillow can write it in
MODE_FORMATS = {
    "1": ["PNG", "BMP", "TIFF"],
    "L": ["PNG", "BMP", "JPEG", "TIFF"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "BMP", "TIFF"],
    "RGB": ["PNG", "BMP", "JPEG", "TIFF"],
    "RGBA": ["PNG", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "YCbCr": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
}
SUFFIX = {"PNG": ".png", "BMP": ".bmp", "JPEG": ".jpg", "TIFF": ".tif"}


def _assert_valid_or_image_error(path: Path) -> np.ndarray | None:
    try:
        image = load_image(path)
    except ImageError as err:
        assert str(path) in str(err)
        return None
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    return image


# Both fuzz tests draw the same examples on every run: the suite is deterministic.
FUZZ = settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's note on damaged TIFFs
@FUZZ
@given(
    magic=st.sampled_from(MAGIC),
    body=st.binary(max_size=256),
    suffix=st.sampled_from(EXTENSIONS),
)
def test_random_bytes_load_or_raise_image_error(
    tmp_path: Path, magic: bytes, body: bytes, suffix: str
) -> None:
    path = tmp_path / f"random{suffix}"
    path.write_bytes(magic + body)
    _assert_valid_or_image_error(path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's note on damaged TIFFs
@FUZZ
@given(
    data=st.data(),
    mode=st.sampled_from(sorted(MODE_FORMATS)),
    width=st.integers(1, 12),
    height=st.integers(1, 12),
    damage=st.sampled_from(["none", "truncate", "flip"]),
)
def test_random_images_of_every_mode_load_or_raise_image_error(
    tmp_path: Path, data: st.DataObject, mode: str, width: int, height: int, damage: str
) -> None:
    format_ = data.draw(st.sampled_from(MODE_FORMATS[mode]))
    raw_size = len(Image.new(mode, (width, height)).tobytes())
    pixels = data.draw(st.binary(min_size=raw_size, max_size=raw_size))
    buffer = io.BytesIO()
    Image.frombytes(mode, (width, height), pixels).save(buffer, format=format_)
    encoded = bytearray(buffer.getvalue())

    if damage == "truncate":
        encoded = encoded[: data.draw(st.integers(0, len(encoded) - 1))]
    elif damage == "flip":
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] ^= data.draw(st.integers(1, 255))
    path = tmp_path / f"image{SUFFIX[format_]}"
    path.write_bytes(bytes(encoded))

    image = _assert_valid_or_image_error(path)
    # Intact files of modes with a fixed range must load, at their own size.
    if damage == "none" and mode not in ("I", "F"):
        assert image is not None and image.shape[:2] == (height, width)
