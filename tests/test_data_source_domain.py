"""The source domain of the embedded default's stage 0: another style than the target data."""

from __future__ import annotations

import numpy as np

from hsft.data import load_splits, make_fundus
from hsft.data.config import DataConfig
from hsft.data.source_domain import MIN_STRENGTH, SOURCE_DIFFICULTY, source_domain_pool, to_source_style
from hsft.data.synthetic import POOL_SEED_BASE


def test_pool_is_deterministic_and_disjoint_from_the_splits():
    pool = source_domain_pool(4, seed=0, size=48)
    again = source_domain_pool(4, seed=0, size=48)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(pool, again))
    splits = load_splits(DataConfig(synthetic_train=4, synthetic_test=2, synthetic_size=48))
    ids = {s.id for s in splits.train + splits.val + splits.test}
    assert not ids & {s.id for s in pool}


def test_source_style_is_another_colour_and_population_with_the_same_annotation():
    target = make_fundus(POOL_SEED_BASE, 64)
    source = source_domain_pool(1, seed=0, size=64)[0]
    easy = make_fundus(POOL_SEED_BASE, 64, difficulty=SOURCE_DIFFICULTY)
    assert np.array_equal(source.mask, easy.mask) and np.array_equal(source.fov, easy.fov)
    def red_over_green(sample):
        red, green = (sample.image[..., c][sample.fov].mean() for c in (0, 1))
        return red / green

    # The target photograph is a saturated red; the full source rendering is nearly grey, and every
    # pool image is blended at least MIN_STRENGTH of the way towards it.
    restyled = to_source_style(target)
    assert restyled.id != target.id and np.array_equal(restyled.mask, target.mask)
    assert red_over_green(target) > 1.5 and red_over_green(restyled) < 1.2
    assert red_over_green(source) < red_over_green(make_fundus(POOL_SEED_BASE, 64, difficulty=SOURCE_DIFFICULTY))
    assert 0 < MIN_STRENGTH < 1
