"""Decoding dataset files into arrays, with errors that name the file.

Images become (H, W, 3) uint8 RGB. Masks (vessel ground truth and FOV) are binarised by one
explicit rule: a pixel is foreground when its brightest channel exceeds half the full scale of
the file's sample type (> 127 for 8-bit, > 32767 for 16-bit, True for 1-bit files), except that a
mask whose values are all 0 or 1 is read as a label map (foreground = 1) -- without that exception
a 0/1 PNG would silently binarise to an empty mask.

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
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
            image = Image.open(io.BytesIO(data))
        else:
            image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
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
    if float(values.max(initial=0)) <= 1:
        return values > 0
    return values > _full_scale(values, image.mode) / 2


def probe_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, after decoding it fully to catch corrupt data."""
    image = decode(path)
    width, height = image.size
    return height, width
