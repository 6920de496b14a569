"""Field-of-view masks for datasets that ship none (STARE, CHASE_DB1).

Metrics are computed inside the FOV: counting the black border as true negatives would inflate
specificity and accuracy and makes numbers incomparable with published ones, which use FOV masks
for these datasets too. So instead of leaving the FOV empty we derive it the usual way: the red
channel is bright everywhere on the retina (even over vessels and in the dim periphery) and near
zero outside the camera aperture, so a threshold on the smoothed red channel finds the aperture.
Then the mask is cleaned (majority filter) and filled row- and column-wise, which is exact for
the convex aperture shapes of fundus cameras (a disc, possibly clipped by the image border).
"""

from __future__ import annotations

import numpy as np

from hsft.data.filters import box_mean

__all__ = ["derive_fov", "FOV_RED_FRACTION", "FOV_RED_MINIMUM"]

# Red level (of the 99th percentile) above which a pixel is inside the aperture, and an absolute
# floor so JPEG noise in a black border never passes.
FOV_RED_FRACTION = 0.15
FOV_RED_MINIMUM = 20.0


def _fill_convex(mask: np.ndarray) -> np.ndarray:
    """Fill between the first and last foreground pixel of every row and every column."""
    height, width = mask.shape
    rows = mask.any(axis=1)
    first = mask.argmax(axis=1)
    last = width - 1 - mask[:, ::-1].argmax(axis=1)
    cols = np.arange(width)
    by_row = rows[:, None] & (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
    columns = mask.any(axis=0)
    top = mask.argmax(axis=0)
    bottom = height - 1 - mask[::-1, :].argmax(axis=0)
    lines = np.arange(height)
    by_col = columns[None, :] & (lines[:, None] >= top[None, :]) & (lines[:, None] <= bottom[None, :])
    return by_row & by_col


def derive_fov(image: np.ndarray) -> np.ndarray:
    """(H, W) bool FOV mask estimated from an (H, W, 3) uint8 fundus image."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"derive_fov expects an (H, W, 3) image, got shape {image.shape}")
    radius = max(1, min(image.shape[:2]) // 200)
    red = box_mean(image[..., 0].astype(np.float64), radius)
    level = max(FOV_RED_MINIMUM, FOV_RED_FRACTION * float(np.percentile(red, 99)))
    bright = red > level
    # Majority vote over a small window removes isolated bright specks and dark holes.
    cleaned = box_mean(bright.astype(np.float64), max(2, radius * 2)) > 0.5
    return _fill_convex(cleaned)
