"""Numpy image filters used by the synthetic generator and by FOV derivation.

Kept numpy-only (no scipy) so the data layer has no dependency beyond numpy and Pillow.
All filters take float32 arrays and return new arrays; inputs are never modified.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gaussian_blur", "box_mean", "jpeg_like"]


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def _convolve_axis(image: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate `image` with a 1-D symmetric `kernel` along `axis` (reflect padding)."""
    radius = len(kernel) // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(image, pad, mode="reflect" if image.shape[axis] > radius else "edge")
    length = image.shape[axis]
    out = np.zeros_like(image, dtype=np.float32)
    # One shifted slice per tap: the kernels are short (<= ~15 taps), so this loop of whole-array
    # multiply-adds is far cheaper than a per-pixel loop and needs no FFT padding logic.
    window = [slice(None)] * image.ndim
    for tap, weight in enumerate(kernel):
        window[axis] = slice(tap, tap + length)
        out += weight * padded[tuple(window)]
    return out


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the first two axes of an (H, W) or (H, W, C) float array."""
    image = np.asarray(image, dtype=np.float32)
    if sigma <= 0.05:
        return image.copy()
    kernel = _gaussian_kernel(sigma)
    return _convolve_axis(_convolve_axis(image, kernel, 0), kernel, 1)


def box_mean(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1) x (2r+1) window of a 2-D array, edges replicated (summed-area table)."""
    image = np.asarray(image, dtype=np.float64)
    if radius <= 0:
        return image.copy()
    padded = np.pad(image, radius + 1, mode="edge")
    table = padded.cumsum(0).cumsum(1)
    size = 2 * radius + 1
    h, w = image.shape
    window = (
        table[size : size + h, size : size + w]
        - table[0:h, size : size + w]
        - table[size : size + h, 0:w]
        + table[0:h, 0:w]
    )
    return window / (size * size)


# Quantisation tables of the JPEG standard (ITU-T T.81, Annex K), luminance then chrominance.
_LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float32,
)
_CHROMA_TABLE = np.array(
    [
        [17, 18, 24, 47, 99, 99, 99, 99],
        [18, 21, 26, 66, 99, 99, 99, 99],
        [24, 26, 56, 99, 99, 99, 99, 99],
        [47, 66, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
    ],
    dtype=np.float32,
)


def _dct_matrix(n: int = 8) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.astype(np.float32)


_DCT8 = _dct_matrix(8)


def _scaled_table(table: np.ndarray, quality: int) -> np.ndarray:
    # The usual libjpeg quality scaling: 50 = the standard table, lower = coarser.
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return np.clip(np.floor((table * scale + 50.0) / 100.0), 1.0, 255.0)


def _quantise_plane(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
    """8x8 block DCT, quantise with `table` (0..255 units), inverse DCT. `plane` is in 0..255."""
    h, w = plane.shape
    ph, pw = -h % 8, -w % 8
    padded = np.pad(plane - 128.0, ((0, ph), (0, pw)), mode="edge")
    hb, wb = padded.shape[0] // 8, padded.shape[1] // 8
    blocks = padded.reshape(hb, 8, wb, 8).transpose(0, 2, 1, 3)
    coeffs = _DCT8 @ blocks @ _DCT8.T
    coeffs = np.round(coeffs / table) * table
    restored = (_DCT8.T @ coeffs @ _DCT8).transpose(0, 2, 1, 3).reshape(hb * 8, wb * 8)
    return restored[:h, :w] + 128.0


def jpeg_like(image: np.ndarray, quality: int) -> np.ndarray:
    """Imitate JPEG compression artefacts on an (H, W, 3) float image in [0, 1].

    YCbCr conversion, 2x2 chroma subsampling and 8x8 DCT quantisation with the standard tables
    scaled by `quality` (1..100). Done in numpy rather than through an encoder so the result is
    bit-identical wherever numpy is, independent of the installed libjpeg.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality}")
    rgb = np.asarray(image, dtype=np.float32) * 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b

    y = _quantise_plane(y, _scaled_table(_LUMA_TABLE, quality))
    h, w = cb.shape
    chroma = []
    for plane in (cb, cr):
        even = np.pad(plane, ((0, h % 2), (0, w % 2)), mode="edge")
        small = even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2).mean(axis=(1, 3))
        small = _quantise_plane(small, _scaled_table(_CHROMA_TABLE, quality))
        chroma.append(np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)[:h, :w])
    cb, cr = chroma

    out = np.stack(
        [
            y + 1.402 * (cr - 128.0),
            y - 0.344136 * (cb - 128.0) - 0.714136 * (cr - 128.0),
            y + 1.772 * (cb - 128.0),
        ],
        axis=-1,
    )
    return np.clip(out / 255.0, 0.0, 1.0).astype(np.float32)
