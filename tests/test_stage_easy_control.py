"""The easy-only control's training set: random samples from outside the hard set, at HSFT's visits an epoch."""

from __future__ import annotations

from hsft.data import make_fundus
from hsft.stages.variants import easy_subset
from hsft.stages.selection import stream_over


def test_the_easy_subset_is_disjoint_from_the_hard_set_seeded_and_capped():
    train = [make_fundus(seed=300 + i, size=32) for i in range(10)]
    hard = train[2:5]
    subset, n_easy = easy_subset(train, hard, 3, seed=0)
    assert n_easy == 7 and len(subset) == 3 and not {s.id for s in subset} & {s.id for s in hard}
    assert [s.id for s in subset] == [s.id for s in easy_subset(train, hard, 3, seed=0)[0]]
    assert [s.id for s in subset] != [s.id for s in easy_subset(train, hard, 3, seed=1)[0]]
    # Fewer easy samples than HSFT's visits: all of them, and the plan still visits as many as HSFT an epoch.
    few, n_easy = easy_subset(train, train[:8], 5, seed=0)
    assert n_easy == 2 and len(few) == 2
    plan = stream_over(few, 5, "easy")
    assert all(len(plan.epoch_indices(epoch, 0)) == 5 for epoch in range(3))
