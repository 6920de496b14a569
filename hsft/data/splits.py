"""Train / validation / test splits, and the synthetic pre-training pool.

The test split is always the dataset's standard held-out split (see hsft.data.layouts for each
dataset's) and never reaches training. The validation split is a seeded subset carved out of the
training split, so changing the seed reshuffles train/val but never touches test.

The generated synthetic data can have a second held-out split, the *untouched* one, from generator
seeds no other split or pool uses. The ordinary synthetic test split was looked at while the defaults
were developed (it is the development split); final numbers are reported on the untouched split, on
which nothing was ever chosen. For a dataset read from files the official test split plays that role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hsft.data.config import DataConfig
from hsft.data.sample import DatasetError, Sample
from hsft.data.scan import scan_dataset
from hsft.data.synthetic import (POOL_SEED_BASE, SEEDS_PER_RANGE, TEST_SEED_BASE, TRAIN_SEED_BASE, UNTOUCHED_SEED_BASE,
                                 make_fundus)

__all__ = ["DataSplits", "load_splits", "carve_validation", "synthetic_pool", "split_description"]


@dataclass
class DataSplits:
    """Disjoint lists of samples (checked by id on construction); `untouched` is empty unless the synthetic
    data was asked for its untouched test split."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    untouched: list[Sample] = field(default_factory=list)

    def report_split(self) -> tuple[str, list[Sample]]:
        """The split final numbers are reported on: ("untouched", ...) when there is one, else ("test", ...)."""
        return ("untouched", self.untouched) if self.untouched else ("test", self.test)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for split, samples in (("train", self.train), ("val", self.val), ("test", self.test),
                               ("untouched", self.untouched)):
            for sample in samples:
                if sample.id in seen:
                    raise DatasetError(
                        f"sample id {sample.id!r} ({sample.source}) is in both the {seen[sample.id]} and the "
                        f"{split} split; splits must be disjoint (the test split must never reach training)"
                    )
                seen[sample.id] = split


def carve_validation(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split `train` into (train, val) with round(fraction * n) validation samples (at least one
    when fraction > 0). The choice depends only on the seed and the sample ids, not on the order
    the samples were read in."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(train), []
    if len(train) < 2:
        raise DatasetError(
            f"cannot carve a validation subset out of {len(train)} training sample(s); "
            "use more training data or val_fraction=0"
        )
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))
    ids = sorted(sample.id for sample in train)
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:n_val].tolist())
    val_ids = {ids[i] for i in chosen}
    return [s for s in train if s.id not in val_ids], [s for s in train if s.id in val_ids]


def synthetic_pool(n: int, seed: int = 0, size: int = 128) -> list[Sample]:
    """`n` synthetic samples for pre-training, from generator seeds that no split ever uses.

    Pool `seed` s draws seeds 2e6 + s*1e6 + i (see hsft.data.synthetic), so pools with different
    seeds are disjoint from each other and from the in-memory train/test splits.
    """
    if not 0 <= n <= SEEDS_PER_RANGE:
        raise ValueError(f"n must lie in [0, {SEEDS_PER_RANGE}], got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    base = POOL_SEED_BASE + seed * SEEDS_PER_RANGE
    return [make_fundus(base + i, size) for i in range(n)]


def split_description(name: str, n: int, cfg: DataConfig) -> str:
    """How a table names the split it reports on."""
    if name == "untouched":
        return (f"untouched test split ({n} synthetic images, generator seeds {UNTOUCHED_SEED_BASE:,}+; no choice "
                "was made on it)")
    if cfg.format == "synthetic" and cfg.root is None:
        return (f"development split ({n} held-out synthetic images, generator seeds {TEST_SEED_BASE:,}+; looked at "
                "while the defaults were chosen)")
    return f"official test split ({n} images of {cfg.format})"


def load_splits(cfg: DataConfig) -> DataSplits:
    """Read (or generate) the data described by `cfg` and split it into train / val / test."""
    cfg.validate()
    if cfg.format == "synthetic" and cfg.root is None:
        train = [make_fundus(TRAIN_SEED_BASE + i, cfg.synthetic_size) for i in range(cfg.synthetic_train)]
        test = [make_fundus(TEST_SEED_BASE + i, cfg.synthetic_size) for i in range(cfg.synthetic_test)]
        untouched = [make_fundus(UNTOUCHED_SEED_BASE + i, cfg.synthetic_size) for i in range(cfg.synthetic_untouched)]
    else:
        root = Path(cfg.root)
        # Scan both splits before decoding any pixels so a broken test split fails fast.
        train_refs = scan_dataset(cfg.format, root, split="train")
        test_refs = scan_dataset(cfg.format, root, split="test")
        train = [ref.load() for ref in train_refs]
        test = [ref.load() for ref in test_refs]
        untouched = []
    train, val = carve_validation(train, cfg.val_fraction, cfg.seed)
    return DataSplits(train=train, val=val, test=test, untouched=untouched)
