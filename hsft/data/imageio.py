"""Decoding dataset files into arrays, with errors that name the file.

Images become (H, W, 3) uint8 RGB. Masks (vessel ground truth and FOV) are binarised from their
brightest channel by one explicit rule:
  - a two-valued mask whose lower value is 0 is a label map: foreground is the higher value, whatever
    it is ({0, 1}, {0, 255}, {0, 65535}, 8-bit values stored in a 16-bit file, a palette whose
    foreground colour is dark) -- a fixed threshold would read some of these as empty masks;
  - any other mask (soft or anti-aliased values, JPEG noise) is thresholded at half the full scale
    of its sample type: > 127 for 8-bit, > 32767 for 16-bit, > 0.5 for floating-point maps in [0, 1].
1-bit files are read as they are.

Before any pixel is decoded, an image larger than MAX_IMAGE_PIXELS is refused (a decompression bomb
is a small file that claims an enormous size), and an empty file is named as such.

EXIF orientation is deliberately ignored: ground truths are drawn on the stored pixel grid.
Gzipped files (STARE's `.ppm.gz`) are decompressed transparently.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hsft.data.sample import DatasetError

__all__ = ["IMAGE_SUFFIXES", "image_stem", "is_image_file", "decode", "read_rgb", "read_binary", "probe_size"]

# Lower-case suffixes of the files the readers consider images (".ppm.gz" is matched whole).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".bmp")

# The largest image decoded, in pixels: 16x the largest public fundus sets' images (HRF, 3504 x 2336),
# far below what would exhaust memory. Checked from the header, before decoding.
MAX_IMAGE_PIXELS = 16 * 3504 * 2336

# What Pillow and the decompressors raise on unreadable, truncated or corrupt data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, UnidentifiedImageError,
                  Image.DecompressionBombError)


def image_stem(path: Path) -> str:
    """File name without its image suffix, `.gz` included: im0001.ppm.gz -> im0001."""
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return Path(name).stem


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return path.is_file() and not path.name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def decode(path: Path) -> Image.Image:
    """Open and fully decode one image file (so truncated files fail here, not later)."""
    try:
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: empty file (0 bytes), not an image")
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
            if not data:
                raise DatasetError(f"{path}: decompresses to an empty file, not an image")
            image = Image.open(io.BytesIO(data))
        else:
            image = Image.open(path)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise DatasetError(f"{path}: claims {width}x{height} = {width * height} pixels, more than the limit of "
                               f"{MAX_IMAGE_PIXELS} (decompression-bomb guard); refusing to decode it")
        image.load()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except PermissionError:
        raise DatasetError(f"{path}: permission denied (cannot read the file)") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, not an image file") from None
    except Image.DecompressionBombError:
        # Pillow's own guard, at twice its warning size, fires inside open() before ours can.
        raise DatasetError(f"{path}: claims more pixels than the limit of {MAX_IMAGE_PIXELS} (decompression-bomb "
                           "guard); refusing to decode it") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not an image (no known image format recognised in its bytes)") from None
    except _DECODE_ERRORS as error:
        raise DatasetError(f"{path}: unreadable or corrupt image ({type(error).__name__}: {error})") from None
    return image


def _full_scale(array: np.ndarray, mode: str) -> int:
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 65535
    if mode in ("I", "F"):
        # 32-bit modes do not say their range; Pillow uses them for 16-bit PNG/TIFF.
        return 65535 if float(array.max(initial=0)) > 255 else 255
    return 255


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file."""
    image = decode(path)
    if image.mode in ("RGB",):
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode.startswith("I") or image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = _full_scale(grey, image.mode)
        grey8 = np.clip(np.round(grey * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except ValueError as error:
        raise DatasetError(f"{path}: cannot convert image mode {image.mode!r} to RGB ({error})") from None


def read_binary(path: Path) -> np.ndarray:
    """(H, W) bool mask of a vessel or FOV file, by the rule in the module docstring."""
    image = decode(path)
    if image.mode == "1":
        return np.asarray(image, dtype=bool).copy()
    if image.mode in ("L", "I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image)
    else:
        # Palette, RGB, RGBA, LA, CMYK: compare the brightest colour channel (alpha dropped).
        try:
            values = np.asarray(image.convert("RGB")).max(axis=2)
        except ValueError as error:
            raise DatasetError(f"{path}: cannot read mask of image mode {image.mode!r} ({error})") from None
    if values.ndim != 2:
        raise DatasetError(f"{path}: expected a single-channel mask, got array of shape {values.shape}")
    low, high = values.min(), values.max()
    if not np.isfinite(float(high)) or not np.isfinite(float(low)):
        raise DatasetError(f"{path}: mask holds non-finite values (NaN or infinity)")
    if low == 0 and high > 0 and bool(np.all((values == 0) | (values == high))):
        return values == high  # a label map
    if float(high) <= 1:
        # Floating-point maps in [0, 1] (and constant 0/1 masks).
        return values > 0.5
    return values > _full_scale(values, image.mode) / 2


def probe_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, after decoding it fully to catch corrupt data."""
    image = decode(path)
    width, height = image.size
    return height, width
