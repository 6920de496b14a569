"""Image preprocessing: any-size RGB uint8 images -> the VLM's and SAM2's square inputs.

Each image is resized (bilinear, antialiased, align_corners=False) to the VLM's square size and,
separately, to SAM2's square size, then normalised with that model's mean/std. No padding or
cropping: the whole image is squashed into the square. The decoder's low-resolution mask logits
therefore cover the square-resized image exactly, and upsampling them bilinearly (align_corners
False) straight to the original (H, W) is the inverse of this resize; that is what the losses and
metrics do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageBatch", "ImageNorm", "IMAGENET_NORM", "ImagePreprocessor"]


@dataclass
class ImageBatch:
    """vlm_pixels (B, 3, S, S), sam_pixels (B, 3, T, T), and each image's original (H, W)."""

    vlm_pixels: Tensor
    sam_pixels: Tensor
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.vlm_pixels.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageBatch:
        return ImageBatch(self.vlm_pixels.to(device=device, dtype=dtype),
                          self.sam_pixels.to(device=device, dtype=dtype), list(self.original_sizes))

    def select(self, indices: Sequence[int]) -> ImageBatch:
        rows = [int(i) for i in indices]
        return ImageBatch(self.vlm_pixels[rows], self.sam_pixels[rows], [self.original_sizes[i] for i in rows])


@dataclass(frozen=True)
class ImageNorm:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> ImageNorm:
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))


# Both InternVL and SAM2 are trained on ImageNet-normalised inputs.
IMAGENET_NORM = ImageNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


RESIZES = ("bilinear", "pil_bicubic")


@dataclass(frozen=True)
class ImagePreprocessor:
    """resize "bilinear": antialiased bilinear on float pixels (hsft); "pil_bicubic": PIL's bicubic
    resize of the uint8 image, rounded back to uint8, then scaled to [0, 1] (what a released Sa2VA's
    own code does for both of its inputs)."""

    vlm_size: int
    sam_size: int
    vlm_norm: ImageNorm = IMAGENET_NORM
    sam_norm: ImageNorm = IMAGENET_NORM
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ValueError(f"resize: must be one of {', '.join(RESIZES)}, got {self.resize!r}")

    def __call__(self, images: Sequence[np.ndarray]) -> ImageBatch:
        if isinstance(images, np.ndarray) or len(images) == 0:
            raise ValueError("images: expected a non-empty list of (H, W, 3) uint8 RGB arrays")
        vlm, sam, sizes = [], [], []
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
                shape = getattr(image, "shape", type(image).__name__)
                raise ValueError(f"images[{i}]: expected an (H, W, 3) RGB array, got {shape}")
            if image.dtype != np.uint8:
                raise ValueError(f"images[{i}]: expected dtype uint8, got {image.dtype}")
            if image.shape[0] < 1 or image.shape[1] < 1:
                raise ValueError(f"images[{i}]: empty image of shape {image.shape}")
            if self.resize == "pil_bicubic":
                vlm.append(_normalise(_pil_resize(image, self.vlm_size), self.vlm_norm))
                sam.append(_normalise(_pil_resize(image, self.sam_size), self.sam_norm))
            else:
                pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
                vlm.append(_resize_normalise(pixels, self.vlm_size, self.vlm_norm))
                sam.append(_resize_normalise(pixels, self.sam_size, self.sam_norm))
            sizes.append((int(image.shape[0]), int(image.shape[1])))
        return ImageBatch(torch.cat(vlm), torch.cat(sam), sizes)


def _pil_resize(image: np.ndarray, size: int) -> Tensor:
    """(1, 3, size, size) float pixels in [0, 1] from PIL's (default, bicubic) resize of the uint8 image."""
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None].float() / 255.0


def _resize_normalise(pixels: Tensor, size: int, norm: ImageNorm) -> Tensor:
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return _normalise(pixels, norm)


def _normalise(pixels: Tensor, norm: ImageNorm) -> Tensor:
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (pixels - mean) / std
