"""Image preprocessing: any-size RGB uint8 images -> the VLM's and SAM2's square inputs.

Each image is resized (bilinear, antialiased, align_corners=False) to the VLM's square size and,
separately, to SAM2's square size, then normalised with that model's mean/std. No padding or
cropping: the whole image is squashed into the square. The decoder's low-resolution mask logits
therefore cover the square-resized image exactly, and upsampling them bilinearly (align_corners
False) straight to the original (H, W) is the inverse of this resize; that is what the losses and
metrics do.

With tiling (InternVL's dynamic resolution, hsft.model.tiling) the VLM's input is instead the image
resized to a grid of square tiles and cut into them, plus a thumbnail (the one-tile resize above)
when there is more than one tile; the tiles of all images are concatenated along the batch
dimension and `num_tiles` says how many belong to each image. SAM2's input is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hsft.model.tiling import TileSettings, choose_grid

__all__ = ["ImageBatch", "ImageNorm", "IMAGENET_NORM", "ImagePreprocessor"]


@dataclass
class ImageBatch:
    """vlm_pixels (N, 3, S, S): the VLM tiles of all B images in order, num_tiles[i] of image i (N is
    their sum; one tile each unless the model tiles its images); sam_pixels (B, 3, T, T); and each
    image's original (H, W)."""

    vlm_pixels: Tensor
    sam_pixels: Tensor
    original_sizes: list[tuple[int, int]]
    num_tiles: list[int] | None = None  # None: one tile per image

    def __post_init__(self) -> None:
        batch = len(self.original_sizes)
        if self.num_tiles is None:
            self.num_tiles = [1] * batch
        self.num_tiles = [int(n) for n in self.num_tiles]
        if len(self.num_tiles) != batch or int(self.sam_pixels.shape[0]) != batch:
            raise ValueError(f"ImageBatch: {batch} original sizes, {len(self.num_tiles)} tile counts and "
                             f"{self.sam_pixels.shape[0]} SAM2 inputs; expected one of each per image")
        if min(self.num_tiles, default=1) < 1 or sum(self.num_tiles) != int(self.vlm_pixels.shape[0]):
            raise ValueError(f"ImageBatch: tile counts {self.num_tiles} do not add up to the "
                             f"{self.vlm_pixels.shape[0]} VLM tiles")

    def __len__(self) -> int:
        return len(self.original_sizes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageBatch:
        return ImageBatch(self.vlm_pixels.to(device=device, dtype=dtype),
                          self.sam_pixels.to(device=device, dtype=dtype), list(self.original_sizes),
                          list(self.num_tiles))

    def select(self, indices: Sequence[int]) -> ImageBatch:
        rows = [int(i) for i in indices]
        starts = [0]
        for n in self.num_tiles:
            starts.append(starts[-1] + n)
        tiles = [t for i in rows for t in range(starts[i], starts[i + 1])]
        return ImageBatch(self.vlm_pixels[tiles], self.sam_pixels[rows], [self.original_sizes[i] for i in rows],
                          [self.num_tiles[i] for i in rows])


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
    own code does for both of its inputs). tiling: None feeds the VLM one tile per image (the whole
    image resized to vlm_size); else InternVL's dynamic tiling with these settings."""

    vlm_size: int
    sam_size: int
    vlm_norm: ImageNorm = IMAGENET_NORM
    sam_norm: ImageNorm = IMAGENET_NORM
    resize: str = "bilinear"
    tiling: TileSettings | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ValueError(f"resize: must be one of {', '.join(RESIZES)}, got {self.resize!r}")

    def __call__(self, images: Sequence[np.ndarray]) -> ImageBatch:
        if isinstance(images, np.ndarray) or len(images) == 0:
            raise ValueError("images: expected a non-empty list of (H, W, 3) uint8 RGB arrays")
        vlm, sam, sizes, counts = [], [], [], []
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
                shape = getattr(image, "shape", type(image).__name__)
                raise ValueError(f"images[{i}]: expected an (H, W, 3) RGB array, got {shape}")
            if image.dtype != np.uint8:
                raise ValueError(f"images[{i}]: expected dtype uint8, got {image.dtype}")
            if image.shape[0] < 1 or image.shape[1] < 1:
                raise ValueError(f"images[{i}]: empty image of shape {image.shape}")
            tiles = self._vlm_tiles(image)
            vlm.append(_normalise(tiles, self.vlm_norm))
            sam.append(_normalise(self._resized(image, self.sam_size, self.sam_size), self.sam_norm))
            sizes.append((int(image.shape[0]), int(image.shape[1])))
            counts.append(int(tiles.shape[0]))
        return ImageBatch(torch.cat(vlm), torch.cat(sam), sizes, counts)

    def _resized(self, image: np.ndarray, height: int, width: int) -> Tensor:
        """(1, 3, height, width) float pixels in [0, 1], resized by self.resize."""
        if self.resize == "pil_bicubic":
            return _pil_resize(image, height, width)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        if pixels.shape[-2:] != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False,
                                   antialias=True)
        return pixels

    def _vlm_tiles(self, image: np.ndarray) -> Tensor:
        """(tiles, 3, S, S) VLM input of one image: one resized tile, or the tiling's grid (row by row)
        and its thumbnail."""
        size = self.vlm_size
        if self.tiling is None:
            return self._resized(image, size, size)
        grid = choose_grid(int(image.shape[1]), int(image.shape[0]), size, self.tiling)
        if grid.tiles == 1:
            return self._resized(image, size, size)
        whole = self._resized(image, grid.rows * size, grid.columns * size)[0]
        # (3, rows*S, cols*S) -> (rows, cols, 3, S, S): tile (r, c) is whole[:, r*S:(r+1)*S, c*S:(c+1)*S]
        tiles = whole.reshape(3, grid.rows, size, grid.columns, size).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(grid.tiles, 3, size, size)
        if self.tiling.thumbnail:
            tiles = torch.cat([tiles, self._resized(image, size, size)])
        return tiles


def _pil_resize(image: np.ndarray, height: int, width: int) -> Tensor:
    """(1, 3, height, width) float pixels in [0, 1] from PIL's bicubic resize of the uint8 image."""
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None].float() / 255.0


def _normalise(pixels: Tensor, norm: ImageNorm) -> Tensor:
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (pixels - mean) / std
