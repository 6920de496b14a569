"""The interval of an effect over seeds and images: its coverage in simulations with known variance
components, against the pooled bootstrap it replaces, and the detectable-effect bound."""

from __future__ import annotations

import numpy as np
import pytest

from hsft.eval.statistics import crossed_intervals, detectable_effect, effect_interval, paired_bootstrap

IMAGES = 32


def _layouts(rng, n: int, seeds: int, seed_sd: float, image_sd: float, residual_sd: float) -> np.ndarray:
    """n studies of paired differences with true effect 0: d = seed + image + seed x image."""
    return (rng.normal(0.0, seed_sd, (n, seeds, 1)) + rng.normal(0.0, image_sd, (n, 1, IMAGES))
            + rng.normal(0.0, residual_sd, (n, seeds, IMAGES)))


# (seed sd, image sd, residual sd): training-seed variance dominant (a run's checkpoint is its own draw), and
# absent (every seed trains the same model up to noise; the images' shared difficulty dominates).
SEED_DOMINANT = (0.02, 0.005, 0.005)
SEED_ABSENT = (0.0, 0.01, 0.01)


@pytest.mark.parametrize("components", [SEED_DOMINANT, SEED_ABSENT], ids=["seed-dominant", "seed-absent"])
def test_the_crossed_interval_covers_a_zero_effect_95_percent_of_the_time(components):
    rng = np.random.default_rng(20)
    d = _layouts(rng, 4000, 5, *components)
    _, low, high, _ = crossed_intervals(d)
    coverage = float(((low <= 0) & (high >= 0)).mean())
    assert 0.93 <= coverage <= 0.97, coverage  # 4000 studies: Monte-Carlo sd of the coverage 0.0035
    # effect_interval is the same interval (one study checked against the vectorised form).
    one = effect_interval(d[0])
    assert (one["low"], one["high"]) == pytest.approx((float(low[0]), float(high[0])))
    assert one["method"].startswith("seeds x images crossed") and len(one["per_seed"]) == 5


def test_the_pooled_bootstrap_over_seed_image_pairs_fails_the_same_simulation():
    """Pooling every (seed, image) pair and resampling them as independent ignores that the training seed
    shifts all of a seed's images together and that the same images recur in every seed."""
    rng = np.random.default_rng(21)
    d = _layouts(rng, 200, 5, *SEED_DOMINANT)
    covered = [(r["low"] <= 0 <= r["high"])
               for r in (paired_bootstrap(np.zeros(d[k].size), d[k].ravel(), resamples=1000, seed=k)
                         for k in range(len(d)))]
    assert np.mean(covered) < 0.6
    _, low, high, _ = crossed_intervals(d)
    assert ((low <= 0) & (high >= 0)).mean() > 0.9  # the same 200 studies


def test_one_seed_is_an_image_interval_that_says_so():
    rng = np.random.default_rng(3)
    x = rng.normal(0.02, 0.03, IMAGES)
    result = effect_interval(x, seed=4)
    assert result == effect_interval(x[None, :], seed=4)  # a 1-D array is one seed
    assert result["low"] < x.mean() < result["high"] and result["seeds"] == 1
    assert "images only; this pair of checkpoints" in result["method"]
    half = 1.96 * x.std(ddof=1) / np.sqrt(IMAGES)
    assert result["high"] - result["low"] == pytest.approx(2 * half, rel=0.25)
    constant = effect_interval(np.full((1, 8), 0.01))
    assert constant["low"] == constant["high"] == pytest.approx(0.01)


def test_seed_spread_widens_the_interval_and_shows_in_the_components():
    rng = np.random.default_rng(5)
    images = rng.normal(0.0, 0.01, (1, IMAGES))
    agree = 0.01 + images + rng.normal(0, 0.001, (5, IMAGES))
    disagree = agree + np.array([[-0.03], [0.0], [0.03], [0.01], [-0.01]])
    tight, wide = effect_interval(agree), effect_interval(disagree)
    assert tight["mean"] == pytest.approx(wide["mean"])
    assert wide["high"] - wide["low"] > 5 * (tight["high"] - tight["low"])
    assert wide["components"]["seed"] == pytest.approx(np.var([-0.03, 0, 0.03, 0.01, -0.01], ddof=1), rel=0.05)
    assert wide["per_seed"] == pytest.approx(list(disagree.mean(axis=1)))


def test_the_detectable_effect_is_detected_80_percent_of_the_time():
    rng = np.random.default_rng(6)
    components = {"seed": 0.01 ** 2, "image": 0.01 ** 2, "residual": 0.005 ** 2}
    bound = detectable_effect(components, 5, IMAGES)
    d = bound + _layouts(rng, 4000, 5, 0.01, 0.01, 0.005)
    _, low, high, _ = crossed_intervals(d)
    assert 0.75 <= float((low > 0).mean()) <= 0.85
    # More seeds, smaller bound; one seed cannot see the seed variance at all.
    assert detectable_effect(components, 10, IMAGES) < bound
    assert detectable_effect(components, 1, IMAGES) < bound


@pytest.mark.parametrize("diffs, message", [
    (np.zeros((2, 3, 4)), "shape (seeds, images)"),
    (np.array([[0.1, np.nan]]), "NaN"),
    (np.zeros((3, 1)), "at least 2 images"),
])
def test_bad_input_is_one_clear_error(diffs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        effect_interval(diffs)
