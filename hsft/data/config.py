"""Settings of the data layer (re-exported by hsft.config as part of the run configuration)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hsft.data.layouts import FORMATS
from hsft.errors import BadValue
from hsft.data.synthetic import MIN_SIZE, SEEDS_PER_RANGE, SEEDS_PER_SPLIT

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Which dataset to read and how to split it.

    The test split is the dataset's standard held-out split and never reaches training; the
    validation split is a seeded subset carved out of the training split.
    """

    format: str = field(default="synthetic", metadata={"help": f"dataset layout, one of {', '.join(FORMATS)}"})
    root: str | None = field(
        default=None,
        metadata={"help": "dataset directory; for 'synthetic' without a root the data is generated in memory"},
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "fraction of the training split held out as the validation split"}
    )
    seed: int = field(default=0, metadata={"help": "seeds which training samples form the validation split"})
    synthetic_train: int = field(default=64, metadata={"help": "generated training images (synthetic, no root)"})
    synthetic_test: int = field(default=32, metadata={
        "help": "generated held-out test images, the development split (synthetic, no root)"})
    synthetic_untouched: int = field(default=0, metadata={
        "help": "generated images of a second, untouched test split from its own generator seeds (synthetic, no "
                "root); when > 0 the evaluation reports on it instead of the development split. For a dataset "
                "read from files the official test split plays this role"})
    synthetic_size: int = field(default=96, metadata={"help": "side of generated images in pixels"})

    def validate(self) -> None:
        def check(condition: bool, name: str, message: str) -> None:
            if not condition:
                raise BadValue(f"data.{name}: {message}")

        check(self.format in FORMATS, "format",
              f"unknown format {self.format!r}; valid formats are {', '.join(FORMATS)}")
        check(self.root is None or (isinstance(self.root, str) and self.root != ""), "root",
              f"must be a directory path or None, got {self.root!r}")
        check(self.root is not None or self.format == "synthetic", "root",
              f"format {self.format!r} reads files: give the dataset directory")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must lie in [0, 1), got {self.val_fraction}")
        check(isinstance(self.seed, int) and self.seed >= 0, "seed",
              f"must be a non-negative integer, got {self.seed!r}")
        for name, low, high in (("synthetic_train", 1, SEEDS_PER_RANGE), ("synthetic_test", 1, SEEDS_PER_SPLIT),
                                ("synthetic_untouched", 0, SEEDS_PER_SPLIT)):
            value = getattr(self, name)
            check(isinstance(value, int) and low <= value <= high, name, f"must lie in [{low}, {high}], got {value}")
        check(self.synthetic_untouched == 0 or (self.format == "synthetic" and self.root is None), "synthetic_untouched",
              "only the generated synthetic data has an untouched split; a dataset's official test split plays "
              "that role")
        check(self.synthetic_size >= MIN_SIZE, "synthetic_size", f"must be >= {MIN_SIZE}, got {self.synthetic_size}")
