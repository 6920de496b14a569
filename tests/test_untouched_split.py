"""The untouched synthetic test split: its own generator seeds, disjoint from every other split and pool,
reported on when it exists; a dataset read from files has none (its official test split plays that role)."""

from __future__ import annotations

import pytest

from hsft.data import DataConfig, load_splits, synthetic_pool
from hsft.data.splits import split_description
from hsft.data.synthetic import POOL_SEED_BASE, TEST_SEED_BASE, UNTOUCHED_SEED_BASE


def test_the_untouched_split_has_its_own_seeds_and_is_what_the_evaluation_reports_on():
    cfg = DataConfig(synthetic_train=6, synthetic_test=4, synthetic_untouched=5, synthetic_size=32)
    splits = load_splits(cfg)
    assert [s.source for s in splits.untouched] == [f"synthetic:seed={UNTOUCHED_SEED_BASE + i}" for i in range(5)]
    ids = {split: {s.id for s in getattr(splits, split)} for split in ("train", "val", "test", "untouched")}
    pool = {s.id for s in synthetic_pool(4, seed=0, size=32)}
    for split, found in ids.items():
        others = set().union(pool, *(v for k, v in ids.items() if k != split))
        assert not found & others, split
    # The largest held-out splits the config accepts (one more is refused below) cannot meet each other or
    # the pools' seeds.
    largest = 500_000
    DataConfig(synthetic_test=largest, synthetic_untouched=largest).validate()
    assert TEST_SEED_BASE + largest <= UNTOUCHED_SEED_BASE and UNTOUCHED_SEED_BASE + largest <= POOL_SEED_BASE
    name, samples = splits.report_split()
    assert name == "untouched" and samples == splits.untouched
    assert split_description(name, 5, cfg).startswith("untouched test split (5 synthetic images")
    without = load_splits(DataConfig(synthetic_train=6, synthetic_test=4, synthetic_size=32))
    assert without.untouched == [] and without.report_split()[0] == "test"
    assert split_description("test", 4, cfg).startswith("development split")
    assert split_description("test", 20, DataConfig(format="drive", root="/data/DRIVE")) == \
        "official test split (20 images of drive)"


@pytest.mark.parametrize("changes, message", [
    ({"synthetic_untouched": -1}, "data.synthetic_untouched: must lie in [0, 500000]"),
    ({"synthetic_test": 500_001}, "data.synthetic_test: must lie in [1, 500000]"),
    ({"synthetic_untouched": 8, "format": "drive", "root": "/data/DRIVE"},
     "data.synthetic_untouched: only the generated synthetic data has an untouched split"),
])
def test_bad_split_sizes_are_one_clear_error(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DataConfig(**changes).validate()
