"""The in-memory sample every reader and the synthetic generator produce, and the data error type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsft.errors import BadValue

__all__ = ["Sample", "DatasetError"]


class DatasetError(BadValue):
    """A dataset cannot be used as given. The message names the file(s) and the problem(s).

    `problems` holds one "path: what is wrong" line per problem found, so tools can list them all.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]


@dataclass
class Sample:
    """One fundus image with its vessel ground truth.

    image:  (H, W, 3) uint8 RGB.
    mask:   (H, W) bool, True on vessel pixels.
    fov:    (H, W) bool field-of-view mask (True inside the camera aperture), or None when the
            dataset provides none and none was derived.
    source: where it came from: a file path, or "synthetic:seed=N" for generated samples.
    """

    id: str
    image: np.ndarray
    mask: np.ndarray
    fov: np.ndarray | None
    source: str

    def __post_init__(self) -> None:
        # Checked here because every consumer relies on these shapes; a wrong array found late
        # (in a loss, after the model ran) is much harder to trace back to its file.
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"sample {self.id!r} ({self.source}): image must be (H, W, 3) uint8, "
                f"got {self.image.shape} {self.image.dtype}"
            )
        height, width = self.image.shape[:2]
        if self.mask.shape != (height, width) or self.mask.dtype != np.bool_:
            raise ValueError(
                f"sample {self.id!r} ({self.source}): mask must be ({height}, {width}) bool, "
                f"got {self.mask.shape} {self.mask.dtype}"
            )
        if self.fov is not None and (self.fov.shape != (height, width) or self.fov.dtype != np.bool_):
            raise ValueError(
                f"sample {self.id!r} ({self.source}): fov must be ({height}, {width}) bool, "
                f"got {self.fov.shape} {self.fov.dtype}"
            )

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def vessel_fraction(self) -> float:
        """Fraction of field-of-view pixels (all pixels when there is no FOV) that are vessel."""
        if self.fov is None:
            return float(self.mask.mean())
        inside = int(self.fov.sum())
        return float((self.mask & self.fov).sum() / inside) if inside else 0.0
