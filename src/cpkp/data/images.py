"""Reading images and masks from disk into arrays, and resizing them for the networks.

Every image becomes float32 RGB in [0, 1], scaled by the bit depth the file declares, so an
8-bit PNG, a 16-bit PNG and a 16-bit TIFF of the same scene give the same values. Every
problem with a file (empty, truncated, not an image, an unsupported pixel format) is an
:class:`~cpkp.errors.ImageError` that names the file. EXIF orientation is not applied, so an
image and its mask stay aligned pixel for pixel.

Pixel formats with no fixed range follow these rules:

- Pillow mode ``"I"`` (32-bit signed integers) is how Pillow hands over 16-bit samples of some
  formats, so it is divided by 65535; values outside [0, 65535] are refused.
- Float data (Pillow mode ``"F"``, float TIFF) are taken as intensities in [0, 1]; values
  slightly outside (by up to 1e-3) are clipped, anything further, NaN or infinity is refused.
- Integer TIFF samples read by tifffile are divided by ``2**bits - 1`` for unsigned data (the
  file's BitsPerSample, so 12-bit data use 4095) and by the type's maximum for signed data,
  which must not be negative.

Pillow reads 16-bit colour PNG with 8 bits per channel: the scale is right, the low byte is
lost. 16-bit colour TIFF keeps all its bits (tifffile).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from cpkp.errors import ImageError
from cpkp.geometry import resize_to

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
FLOAT_TOLERANCE = 1e-3  # float pixels this far outside [0, 1] are clipped, not refused

_GREY_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SUPPORTED_MODES = _GREY_MODES | _COLOUR_MODES | _UINT16_MODES | {"I", "F"}
_MASK_ON_LEVELS = np.array([1.0, 1 / 255, 1 / 65535], dtype=np.float32)  # 255 (or max), or 1
_WARNED_MASKS: set[str] = set()  # mask files already warned about in this process


def is_image_file(path: str | Path) -> bool:
    """Whether the name ends in an image extension cpkp reads (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path) -> np.ndarray:
    """Read one image file as RGB in [0, 1].

    TIFF files go through Pillow when it decodes them exactly and through tifffile otherwise
    (16-bit colour, 32-bit integers, float64, planar layouts). Grey images are repeated over
    the three channels; alpha is dropped; palettes are applied.

    Args:
        path: PNG, JPEG, BMP or TIFF file (the content decides, not the extension).

    Returns:
        image: [H, W, 3] float32, finite, in [0, 1].

    Raises:
        ImageError: the file is missing, empty, truncated, corrupt, not an image, or holds a
            pixel format with no sensible mapping to [0, 1].
    """
    path = Path(path)
    _check_file(path)

    read = _read_tiff if path.suffix.lower() in TIFF_EXTENSIONS else _read_with_pillow
    return _as_rgb(read(path), path)


def check_image(path: str | Path) -> None:
    """Check that a file is a readable image, faster than decoding it in full.

    PNG files get their chunk checksums verified up to the end marker, JPEG files are decoded
    at 1/8 scale (which still reads every compressed byte), other files are decoded in full.

    Raises:
        ImageError: the same problems :func:`load_image` reports, except out-of-range values
            in 32-bit integer or float images, which only a full decode can see.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        load_image(path)
        return

    try:
        with Image.open(path) as im:
            _check_mode(im, path)
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except ImageError:
        raise
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise _decode_error(path, err) from err


def load_mask(paths: Sequence[str | Path], size: tuple[int, int] | None = None) -> np.ndarray:
    """Read ground-truth mask files as one boolean mask: their union, any channel > 0.

    Masks stored as 0/1 and as 0/255 give the same result. Any other values (0/128, soft
    masks) are read the same way, every non-zero pixel being defect, with one warning per file
    that names it. A mask whose size differs from ``size`` is resized with nearest neighbour,
    with a warning that names it.

    Args:
        paths: mask files (several for MVTec LOCO); may be empty when ``size`` is given.
        size: (H, W) of the image the masks belong to; None takes the first mask's size.

    Returns:
        mask: [H, W] bool.
    """
    if not paths:
        if size is None:
            raise ValueError("load_mask needs at least one mask file or a size")
        return np.zeros(size, dtype=bool)

    union = None if size is None else np.zeros(size, dtype=bool)
    reference = "its image" if size is not None else "the first mask"
    for path in paths:
        pixels = load_image(path).max(axis=2)
        _warn_if_not_binary(pixels, Path(path))
        mask = pixels > 0
        target = mask.shape if union is None else union.shape
        if mask.shape != target:
            _warn_resized_once(Path(path), mask.shape, reference, target)
            mask = _resize_nearest(mask, target)
        union = mask if union is None else union | mask
    return union


def _warn_resized_once(
    path: Path, shape: tuple[int, ...], reference: str, target: tuple[int, ...]
) -> None:
    """Warn once per file and size that a mask is resized; sizes read width x height."""
    key = f"{path}|{target[1]}x{target[0]}"
    if key in _WARNED_MASKS:
        return
    _WARNED_MASKS.add(key)
    logger.warning(
        "%s: mask is %dx%d (width x height), %s is %dx%d; resizing the mask (nearest neighbour)",
        path,
        shape[1],
        shape[0],
        reference,
        target[1],
        target[0],
    )


def _warn_if_not_binary(pixels: np.ndarray, path: Path) -> None:
    """Warn once per file when a mask holds values other than 0 and one "on" level.

    The "on" level may be full scale (255 of 8 bits) or 1 (0/1 masks, at any bit depth).
    """
    on = np.unique(pixels[pixels > 0])
    if on.size == 0 or (on.size == 1 and np.isclose(on[0], _MASK_ON_LEVELS, atol=1e-7).any()):
        return
    if str(path) in _WARNED_MASKS:
        return
    _WARNED_MASKS.add(str(path))
    logger.warning(
        "%s: mask holds %d non-zero levels (%s of full scale), not only 0/1 or 0/255; every "
        "non-zero pixel counts as defect",
        path,
        on.size,
        ", ".join(f"{v:.4g}" for v in on[:4]) + (", ..." if on.size > 4 else ""),
    )


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize an image to size x size, the whole frame (no crop; the aspect ratio may change).

    Args:
        image: [H, W, 3] float in [0, 1], as :func:`load_image` returns.
        size: output side in pixels.

    Returns:
        image: [3, size, size] float32 in [0, 1]; bilinear with antialiasing when shrinking.
    """
    _check_size(size)
    return resize_to(image_tensor(image), (size, size))


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """An image as :func:`load_image` returns it, [H, W, 3], as a [3, H, W] float32 tensor."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image array, got shape {image.shape}")
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).contiguous()


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header where Pillow can read it.

    Raises:
        ImageError: as :func:`load_image`, for a file that only a full decode can size.
    """
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # Pillow refuses some valid TIFF layouts; the full reader decides
        return tuple(load_image(path).shape[:2])


def load_roi(path: str | Path) -> np.ndarray:
    """A region-of-interest mask: [H, W] bool, True (any channel non-zero) where to look.

    Raises:
        ImageError: naming the file, when it cannot be read or holds no non-zero pixel.
    """
    try:
        roi = load_image(path).max(axis=2) > 0
    except ImageError as err:
        raise ImageError(f"data.roi: the region-of-interest mask cannot be read: {err}") from err
    if not roi.any():
        raise ImageError(
            f"{path}: the region-of-interest mask (data.roi) has no non-zero pixel, so no "
            "pixel would be scored; mark the region to inspect with non-zero values"
        )
    return roi


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Resize a mask to size x size with nearest neighbour, so it stays binary.

    Args:
        mask: [H, W] bool (or any array, where non-zero means defect).
        size: output side in pixels.

    Returns:
        mask: [1, size, size] float32 with values in {0, 1}.
    """
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects an [H, W] array, got shape {mask.shape}")
    _check_size(size)
    resized = _resize_nearest(np.asarray(mask) != 0, (size, size))
    return torch.from_numpy(resized.astype(np.float32))[None]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")


def _check_size(size: int) -> None:
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")


def _check_mode(im: Image.Image, path: Path) -> None:
    if im.mode not in _SUPPORTED_MODES:
        raise ImageError(
            f"{path}: unsupported pixel mode {im.mode!r} "
            f"(cpkp reads {', '.join(sorted(_SUPPORTED_MODES))}); convert the file to RGB"
        )


def _decode_error(path: Path, err: Exception) -> ImageError:
    return ImageError(f"{path}: cannot decode as an image ({type(err).__name__}: {err})")


def _read_with_pillow(path: Path) -> np.ndarray:
    """Decode with Pillow; [H, W] or [H, W, C] float in [0, 1]."""
    try:
        with Image.open(path) as im:
            _check_mode(im, path)
            im.load()
            return _pillow_to_unit(im, path)
    except ImageError:
        raise
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise _decode_error(path, err) from err


def _pillow_to_unit(im: Image.Image, path: Path) -> np.ndarray:
    """Pixels of a decoded Pillow image scaled by its mode's bit depth."""
    if im.mode in _UINT16_MODES:
        return np.asarray(im).astype(np.float32) / 65535.0
    if im.mode == "I":
        return _int32_as_uint16(np.asarray(im), path)
    if im.mode == "F":
        return _float_to_unit(np.asarray(im), path)
    target = "L" if im.mode in _GREY_MODES else "RGB"
    pixels = np.asarray(im if im.mode == target else im.convert(target)).astype(np.float32)
    pixels /= 255.0
    return pixels


def _read_tiff(path: Path) -> np.ndarray:
    """Pillow when it keeps every bit of the samples, tifffile otherwise."""
    try:
        with Image.open(path) as im:
            exact = _pillow_is_exact(im)
            if exact:
                _check_mode(im, path)
                im.load()
                return _pillow_to_unit(im, path)
            reason = f"mode {im.mode} would drop bits"
    except ImageError:
        raise
    except Exception as err:  # Pillow refuses many valid TIFF layouts; tifffile gets a try
        reason = f"{type(err).__name__}: {err}"

    logger.debug("%s: reading with tifffile (Pillow: %s)", path, reason)
    return _read_with_tifffile(path, reason)


def _pillow_is_exact(im: Image.Image) -> bool:
    """Whether Pillow's decoded mode holds the TIFF's samples without loss."""
    bits = im.tag_v2.get(258, (1,)) if hasattr(im, "tag_v2") else (1,)
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    return bits <= 8 or im.mode in _UINT16_MODES or (im.mode == "F" and bits == 32)


def _read_with_tifffile(path: Path, pillow_reason: str) -> np.ndarray:
    """Decode the first page with tifffile; [H, W] or [H, W, C] float in [0, 1]."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            _check_pixel_count(page.imagewidth * page.imagelength, path)
            photometric = int(page.photometric)
            bits = int(page.bitspersample)
            data = page.asarray()
            axes = page.axes
    except ImageError:
        raise
    except Exception as err:  # tifffile raises TiffFileError, ValueError, KeyError, ...
        raise ImageError(
            f"{path}: cannot decode TIFF (Pillow: {pillow_reason}; "
            f"tifffile: {type(err).__name__}: {err})"
        ) from err

    if photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
        raise ImageError(
            f"{path}: TIFF with {bits}-bit {_photometric_name(photometric)} samples is not "
            "supported; save it as greyscale or RGB"
        )
    if data.ndim != len(axes) or data.size == 0:
        raise ImageError(f"{path}: TIFF pixel data of shape {data.shape} do not fit axes {axes}")
    return _samples_to_unit(_first_plane(data, axes), bits, path)


def _photometric_name(value: int) -> str:
    try:
        return tifffile.PHOTOMETRIC(value).name
    except ValueError:
        return f"photometric {value}"


def _first_plane(data: np.ndarray, axes: str) -> np.ndarray:
    """Keep the first of any depth or sequence axes; samples last: [H, W] or [H, W, S]."""
    data = data[tuple(slice(None) if axis in "YXS" else 0 for axis in axes)]
    axes = "".join(axis for axis in axes if axis in "YXS")
    if axes.startswith("S"):
        data = np.moveaxis(data, 0, -1)
    return data


def _check_pixel_count(pixels: int, path: Path) -> None:
    # Same limit as Pillow's decompression-bomb check, so both decoders refuse the same files.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > 2 * limit:
        raise ImageError(f"{path}: {pixels} pixels is more than the limit of {2 * limit}")


def _samples_to_unit(data: np.ndarray, bits: int, path: Path) -> np.ndarray:
    """Integer, boolean or float samples scaled to [0, 1] by the declared bit depth."""
    if data.dtype == bool:
        return data.astype(np.float32)
    if np.issubdtype(data.dtype, np.floating):
        return _float_to_unit(data, path)
    if not np.issubdtype(data.dtype, np.integer):
        raise ImageError(f"{path}: unsupported sample type {data.dtype}")

    info = np.iinfo(data.dtype)
    if info.min < 0 and data.size and data.min() < 0:
        raise ImageError(f"{path}: negative {data.dtype} pixel values; save as unsigned data")
    top = 2**bits - 1 if info.min == 0 and bits < info.bits else info.max
    if data.size and data.max() > top:
        raise ImageError(f"{path}: pixel values exceed the declared {bits} bits per sample")
    return data.astype(np.float64 if info.bits > 16 else np.float32) / top


def _int32_as_uint16(data: np.ndarray, path: Path) -> np.ndarray:
    if data.size and (data.min() < 0 or data.max() > 65535):
        raise ImageError(
            f"{path}: 32-bit integer pixels span [{data.min()}, {data.max()}]; cpkp reads this "
            "mode as 16-bit data in [0, 65535]; save the image as 8- or 16-bit"
        )
    return data.astype(np.float32) / 65535.0


def _float_to_unit(data: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(data).all():
        raise ImageError(f"{path}: float image holds NaN or infinite values")
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if low < -FLOAT_TOLERANCE or high > 1.0 + FLOAT_TOLERANCE:
        raise ImageError(
            f"{path}: float pixels span [{low:.4g}, {high:.4g}]; cpkp reads float images as "
            "intensities in [0, 1]; rescale the file or save it as 8- or 16-bit"
        )
    return np.clip(data, 0.0, 1.0)


def _as_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    """[H, W] or [H, W, C] in [0, 1] to [H, W, 3] float32: grey repeated, alpha dropped.

    Every decoder above already returns values in [0, 1]; this step only arranges channels.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4) or 0 in pixels.shape:
        raise ImageError(f"{path}: cannot read pixels of shape {pixels.shape} as an image")

    if pixels.shape[2] in (1, 2):
        pixels = np.repeat(pixels[:, :, :1], 3, axis=2)
    rgb = np.ascontiguousarray(pixels[:, :, :3], dtype=np.float32)
    if not np.isfinite(rgb).all():
        raise ImageError(f"{path}: decoded pixels are not finite")
    return rgb


def _resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour on pixel centres (as Pillow's NEAREST): [h, w] -> [H, W]."""
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(np.int64)
    rows = np.minimum(rows, mask.shape[0] - 1)
    cols = np.minimum(cols, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]
