"""Splits: the held-out test split never reaches training; validation is carved out of train."""

import numpy as np
import pytest
from PIL import Image

from hsft.data import DataConfig, DataSplits, DatasetError, carve_validation, load_splits, make_fundus, synthetic_pool
from hsft.data.synthetic import POOL_SEED_BASE, TEST_SEED_BASE


def _seeds(samples):
    return {int(s.source.split("=")[1]) for s in samples}


def test_synthetic_splits_are_disjoint_and_val_comes_from_train():
    cfg = DataConfig(synthetic_train=10, synthetic_test=4, synthetic_size=48, val_fraction=0.2, seed=3)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    train_ids = {s.id for s in splits.train}
    val_ids = {s.id for s in splits.val}
    test_ids = {s.id for s in splits.test}
    assert not (train_ids & val_ids) and not (train_ids & test_ids) and not (val_ids & test_ids)
    # Validation is carved out of the generated training range, never out of test.
    assert _seeds(splits.train) | _seeds(splits.val) == set(range(10))
    assert _seeds(splits.test) == set(range(TEST_SEED_BASE, TEST_SEED_BASE + 4))


def test_seed_moves_validation_but_never_the_test_split():
    cfgs = [DataConfig(synthetic_train=12, synthetic_test=3, synthetic_size=40, seed=s, val_fraction=0.25)
            for s in (0, 1)]
    a, b = (load_splits(cfg) for cfg in cfgs)
    assert {s.id for s in a.test} == {s.id for s in b.test}
    assert {s.id for s in a.val} != {s.id for s in b.val}
    again = load_splits(cfgs[0])
    assert [s.id for s in again.val] == [s.id for s in a.val]


def test_pretraining_pool_is_disjoint_from_the_splits():
    pool = synthetic_pool(3, seed=0, size=40)
    other_pool = synthetic_pool(3, seed=1, size=40)
    splits = load_splits(DataConfig(synthetic_train=3, synthetic_test=3, synthetic_size=40))
    used = {s.id for s in splits.train + splits.val + splits.test}
    assert not ({s.id for s in pool} & used) and not ({s.id for s in pool} & {s.id for s in other_pool})
    assert min(_seeds(pool)) >= POOL_SEED_BASE
    assert np.array_equal(pool[0].image, make_fundus(POOL_SEED_BASE, 40).image)


def test_carve_validation_depends_on_ids_not_order():
    samples = [make_fundus(i, 32) for i in range(8)]
    _, val_a = carve_validation(samples, 0.25, seed=5)
    _, val_b = carve_validation(list(reversed(samples)), 0.25, seed=5)
    assert sorted(s.id for s in val_a) == sorted(s.id for s in val_b) and len(val_a) == 2
    train, val = carve_validation(samples, 0.0, seed=5)
    assert len(train) == 8 and val == []
    with pytest.raises(DatasetError, match="val_fraction=0"):
        carve_validation(samples[:1], 0.1, seed=0)


def test_overlapping_splits_are_rejected():
    sample = make_fundus(0, 32)
    with pytest.raises(DatasetError, match="synth_0000000.*train.*test"):
        DataSplits(train=[sample], val=[], test=[sample])


def _write_folder_split(root, split, stems):
    for stem in stems:
        sample = make_fundus(sum(map(ord, stem)), 32)
        for sub, array in (("images", sample.image), ("masks", sample.mask.astype(np.uint8) * 255)):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / split / sub / f"{stem}.png")


def test_load_splits_from_disk_keeps_the_test_directory_out_of_training(tmp_path):
    _write_folder_split(tmp_path, "train", ["a", "b", "c", "d"])
    _write_folder_split(tmp_path, "test", ["e", "f"])
    splits = load_splits(DataConfig(format="folder", root=str(tmp_path), val_fraction=0.25))
    assert sorted(s.id for s in splits.test) == ["e", "f"]
    assert sorted(s.id for s in splits.train + splits.val) == ["a", "b", "c", "d"] and len(splits.val) == 1


def test_a_test_image_also_in_train_is_rejected(tmp_path):
    _write_folder_split(tmp_path, "train", ["a", "b", "c"])
    _write_folder_split(tmp_path, "test", ["c"])
    with pytest.raises(DatasetError, match="'c'.*train.*test"):
        load_splits(DataConfig(format="folder", root=str(tmp_path), val_fraction=0.0))


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"format": "drivee"}, "data.format"),
        ({"format": "drive"}, "data.root"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"synthetic_train": 0}, "data.synthetic_train"),
        ({"synthetic_size": 8}, "data.synthetic_size"),
        ({"seed": -1}, "data.seed"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**changes).validate()
