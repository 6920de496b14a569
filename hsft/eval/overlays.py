"""Overlay pictures: image, ground truth and predictions with true/false positives/negatives in colour.

All drawing is plain numpy on (H, W, 3) uint8 arrays plus Pillow for captions, so the pictures
are identical on every machine and need no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Panel", "TP_COLOUR", "FP_COLOUR", "FN_COLOUR", "PREDICTION_COLOUR", "ERROR_LEGEND", "error_map", "tint",
           "compose", "save_png"]

TP_COLOUR = (40, 200, 70)  # predicted vessel that is vessel: green
FP_COLOUR = (235, 50, 50)  # predicted vessel that is background: red
FN_COLOUR = (60, 130, 255)  # missed vessel: blue
GT_COLOUR = (255, 215, 60)  # ground-truth vessel: yellow
PREDICTION_COLOUR = (40, 230, 90)  # a prediction without ground truth (predict CLI)

# Small images are enlarged (nearest neighbour, whole-number factor) to at least this many pixels
# on their short side, so that one-pixel vessels stay visible and the captions fit.
MIN_PANEL_SIDE = 192
GAP = 4
BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (235, 235, 235)


@dataclass
class Panel:
    title: str
    pixels: np.ndarray  # (H, W, 3) uint8


def _dimmed(image: np.ndarray, fov: np.ndarray | None, inside: float = 0.45, outside: float = 0.2) -> np.ndarray:
    # The image is dimmed so the colours of the masks dominate; outside the field of view (where
    # nothing is scored) it is dimmed further.
    factor = np.full(image.shape[:2], inside, dtype=np.float32)
    if fov is not None:
        factor[~fov] = outside
    return image.astype(np.float32) * factor[..., None]


def _paint(base: np.ndarray, where: np.ndarray, colour: tuple[int, int, int], alpha: float) -> None:
    base[where] = base[where] * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha


def error_map(image: np.ndarray, prediction: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None,
              alpha: float = 0.85) -> np.ndarray:
    """The image dimmed, with TP green, FP red and FN blue (only inside the FOV, where they are scored)."""
    _check_shapes(image, prediction=prediction, target=target, fov=fov)
    scored = np.ones(prediction.shape, dtype=bool) if fov is None else fov
    base = _dimmed(image, fov)
    _paint(base, prediction & target & scored, TP_COLOUR, alpha)
    _paint(base, prediction & ~target & scored, FP_COLOUR, alpha)
    _paint(base, ~prediction & target & scored, FN_COLOUR, alpha)
    return base.round().clip(0, 255).astype(np.uint8)


def tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = GT_COLOUR, alpha: float = 0.85,
         fov: np.ndarray | None = None, dim: bool = True) -> np.ndarray:
    """The image (dimmed unless dim=False) with `mask` painted in `colour`."""
    _check_shapes(image, mask=mask, fov=fov)
    base = _dimmed(image, fov) if dim else image.astype(np.float32)
    _paint(base, mask, colour, alpha)
    return base.round().clip(0, 255).astype(np.uint8)


def _check_shapes(image: np.ndarray, **masks: np.ndarray | None) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    for name, mask in masks.items():
        if mask is not None and (mask.shape != image.shape[:2] or mask.dtype != np.bool_):
            raise ValueError(f"{name}: expected a {image.shape[:2]} bool mask, got {mask.shape} {mask.dtype}")


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _enlarge(pixels: np.ndarray, factor: int) -> np.ndarray:
    return pixels if factor == 1 else pixels.repeat(factor, axis=0).repeat(factor, axis=1)


# The colour key drawn under error maps.
ERROR_LEGEND = (("true positive", TP_COLOUR), ("false positive", FP_COLOUR), ("false negative", FN_COLOUR))


def compose(panels: Sequence[Panel], footer: str = "",
            legend: Sequence[tuple[str, tuple[int, int, int]]] = ()) -> np.ndarray:
    """Panels side by side, each under its caption, with an optional footer line (text, then a
    colour key of (label, colour) swatches); (H', W', 3) uint8."""
    if not panels:
        raise ValueError("compose: no panels")
    height, width = panels[0].pixels.shape[:2]
    for panel in panels:
        if panel.pixels.shape != (height, width, 3):
            raise ValueError(f"compose: panel {panel.title!r} is {panel.pixels.shape}, expected {(height, width, 3)}")
    factor = max(1, math.ceil(MIN_PANEL_SIDE / min(height, width)))
    panel_h, panel_w = height * factor, width * factor
    font_size = max(12, round(panel_w / 24))
    font = _font(font_size)
    strip = font_size + 8
    footer_h = strip if footer or legend else 0
    canvas_w = len(panels) * panel_w + (len(panels) + 1) * GAP
    canvas_h = strip + panel_h + footer_h + 2 * GAP
    canvas = Image.new("RGB", (canvas_w, canvas_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, panel in enumerate(panels):
        left = GAP + i * (panel_w + GAP)
        draw.text((left + 2, GAP), _fit(draw, panel.title, font, panel_w - 4), fill=TEXT_COLOUR, font=font)
        canvas.paste(Image.fromarray(_enlarge(panel.pixels, factor)), (left, GAP + strip))
    x, y = GAP + 2, GAP + strip + panel_h + 4
    if footer:
        text = _fit(draw, footer, font, canvas_w - 2 * GAP - 4)
        draw.text((x, y), text, fill=TEXT_COLOUR, font=font)
        x += draw.textlength(text, font=font) + 2 * font_size
    for label, colour in legend:
        width = font_size + 4 + draw.textlength(label, font=font)
        if x + width > canvas_w - GAP:
            break  # no room left: a cut-off key would mislead more than a missing one
        draw.rectangle((x, y + 2, x + font_size - 2, y + font_size), fill=colour)
        draw.text((x + font_size + 2, y), label, fill=colour, font=font)
        x += width + font_size
    return np.asarray(canvas)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
