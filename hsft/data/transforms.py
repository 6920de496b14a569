"""Training augmentation on Samples: random flips and a small brightness/contrast jitter.

A library function: no stage applies it yet (it cannot be combined with the frozen-feature cache
of HSFT and DPO). Flips act on image, vessel mask and FOV together so the
ground truth stays exact; the photometric jitter touches the image only. A fundus flipped
horizontally is a plausible other eye, vertically a plausible rotated capture, so neither creates
anatomy that cannot occur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsft.data.sample import Sample

__all__ = ["AugmentParams", "augment_sample"]


@dataclass(frozen=True)
class AugmentParams:
    """hflip / vflip: flip probabilities. brightness: max additive shift as a fraction of full
    scale. contrast: max relative change of contrast around the image mean (0.1 = x0.9..x1.1)."""

    hflip: float = 0.5
    vflip: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentParams.{name} is a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"AugmentParams.{name} must lie in [0, 1), got {value}")


def augment_sample(
    sample: Sample, rng: np.random.Generator | int, params: AugmentParams = AugmentParams()
) -> Sample:
    """Return an augmented copy of `sample`; `rng` is a Generator or an integer seed."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    image, mask, fov = sample.image, sample.mask, sample.fov
    if rng.random() < params.hflip:
        image, mask = image[:, ::-1], mask[:, ::-1]
        fov = None if fov is None else fov[:, ::-1]
    if rng.random() < params.vflip:
        image, mask = image[::-1], mask[::-1]
        fov = None if fov is None else fov[::-1]
    gain = 1.0 + rng.uniform(-params.contrast, params.contrast)
    shift = 255.0 * rng.uniform(-params.brightness, params.brightness)
    pixels = image.astype(np.float32)
    # Jitter around the mean inside the FOV so the black border does not drag the pivot down.
    pivot = float(pixels[fov].mean()) if fov is not None and fov.any() else float(pixels.mean())
    pixels = (pixels - pivot) * gain + pivot + shift
    if fov is not None:
        # The area outside the aperture stays black, as a real camera would record it.
        pixels = np.where(fov[..., None], pixels, image.astype(np.float32))
    jittered = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return Sample(
        id=sample.id,
        image=np.ascontiguousarray(jittered),
        mask=np.ascontiguousarray(mask),
        fov=None if fov is None else np.ascontiguousarray(fov),
        source=sample.source,
    )
