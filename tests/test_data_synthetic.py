"""The synthetic fundus generator: determinism, exact masks, difficulty spread."""

import math

import numpy as np
import pytest

from hsft.data import Difficulty, draw_difficulty, make_fundus
from hsft.data.filters import box_mean
from hsft.data.fov import derive_fov
from hsft.data.vessels import Capsules, _murray_split, rasterise


def test_same_seed_gives_identical_arrays():
    a, b = make_fundus(7, 96), make_fundus(7, 96)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.fov, b.fov)
    assert a.id == b.id and a.source == "synthetic:seed=7"


def test_different_seeds_differ():
    a, b = make_fundus(1, 96), make_fundus(2, 96)
    assert a.id != b.id
    assert not np.array_equal(a.image, b.image)
    # Different trees, not just different noise.
    assert (a.mask != b.mask).mean() > 0.05


def test_sample_shapes_and_masks_are_exact_and_sane():
    fractions = []
    for seed in range(12):
        sample = make_fundus(seed, 128)
        assert sample.image.shape == (128, 128, 3) and sample.image.dtype == np.uint8
        assert sample.mask.dtype == np.bool_ and sample.fov.dtype == np.bool_
        # Vessels only inside the aperture, aperture strictly inside the image, black outside it.
        assert not (sample.mask & ~sample.fov).any()
        assert not sample.fov[0].any() and not sample.fov[-1].any()
        assert not sample.fov[:, 0].any() and not sample.fov[:, -1].any()
        assert 0.55 < sample.fov.mean() < 0.75
        assert sample.image[~sample.fov].mean() < 30 < sample.image[sample.fov].mean()
        fractions.append(sample.vessel_fraction())
    fractions = np.asarray(fractions)
    assert 0.06 < fractions.min() and fractions.max() < 0.18, fractions
    assert 0.08 < np.median(fractions) < 0.15, fractions


def test_vessels_are_darker_in_green_than_their_surroundings():
    sample = make_fundus(3, 128, Difficulty(0.0, 1.0, 0.005, 1.0, 0.0))
    green = sample.image[..., 1].astype(np.float64)
    local = box_mean(green, 3)
    inside = sample.mask
    background = sample.fov & ~sample.mask
    contrast_vessel = (local - green)[inside].mean()
    contrast_background = (local - green)[background].mean()
    assert contrast_vessel > contrast_background + 3.0
    # Red is absorbed far less than green (haemoglobin), so vessels stay dark red, not black.
    red = sample.image[..., 0].astype(np.float64)
    assert (box_mean(red, 3) - red)[inside].mean() < contrast_vessel


def test_rasterised_mask_is_exactly_the_pixel_centres_inside_the_capsule():
    capsules = Capsules(
        x0=np.array([3.3, 20.0], np.float32), y0=np.array([5.2, 4.0], np.float32),
        x1=np.array([17.8, 27.5], np.float32), y1=np.array([9.6, 21.0], np.float32),
        radius=np.array([2.1, 0.35], np.float32), depth=np.array([1.0, 0.8], np.float32),
        reflex=np.array([0.4, 0.0], np.float32),
    )
    darkness, mask = rasterise(capsules, 24, 30)
    ys, xs = np.mgrid[0:24, 0:30].astype(np.float64)
    expected = np.zeros((24, 30), bool)
    for i in range(2):
        ax, ay = float(capsules.x0[i]), float(capsules.y0[i])
        dx, dy = float(capsules.x1[i]) - ax, float(capsules.y1[i]) - ay
        t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(xs - ax - t * dx, ys - ay - t * dy)
        # The thin vessel is drawn at the minimum visible radius of half a pixel.
        expected |= dist <= max(float(capsules.radius[i]), 0.5)
    assert np.array_equal(mask, expected)
    # Exactly the mask pixels are darkened: what is drawn is what is labelled.
    assert np.array_equal(darkness > 0, mask)


def test_generated_vessel_darkening_matches_mask(monkeypatch):
    from hsft.data import synthetic, vessels

    captured = {}

    def spy(*args, **kwargs):
        captured["result"] = vessels.rasterise(*args, **kwargs)
        return captured["result"]

    monkeypatch.setattr(synthetic, "rasterise", spy)
    sample = make_fundus(11, 128)
    darkness, drawn = captured["result"]
    assert np.array_equal(drawn & sample.fov, sample.mask)
    assert np.array_equal((darkness > 0) & sample.fov, sample.mask)


def test_murray_bifurcation():
    for asymmetry in (0.3, 0.6, 1.0):
        r1, r2, theta1, theta2 = _murray_split(2.0, asymmetry)
        assert math.isclose(r1**3 + r2**3, 8.0, rel_tol=1e-9)
        assert math.isclose(r2 / r1, asymmetry, rel_tol=1e-9)
        assert theta1 <= theta2 + 1e-12  # the thicker branch turns less
    _, _, theta1, theta2 = _murray_split(1.0, 1.0)
    assert math.isclose(theta1, theta2) and math.isclose(math.degrees(theta1), 37.47, abs_tol=0.05)


def test_difficulty_is_mostly_easy_with_a_hard_tail():
    rng = np.random.default_rng(0)
    knobs = [draw_difficulty(rng) for _ in range(4000)]
    hardness = np.array([k.hardness for k in knobs])
    assert np.median(hardness) < 0.25
    assert np.mean(hardness) > np.median(hardness)  # right-skewed
    tail = np.mean(hardness > 0.5)
    assert 0.04 < tail < 0.2, tail
    contrast = np.array([k.contrast for k in knobs])
    noise = np.array([k.noise for k in knobs])
    width = np.array([k.vessel_width for k in knobs])
    artefacts = np.array([k.artefacts for k in knobs])
    # Every knob gets worse with hardness.
    for values, sign in ((contrast, -1), (noise, 1), (width, -1), (artefacts, 1)):
        assert sign * np.corrcoef(hardness, values)[0, 1] > 0.6


def _baseline_dice(sample) -> float:
    """Dice of a crude vessel detector (green darker than its neighbourhood, oracle vessel count)."""
    green = sample.image[..., 1].astype(np.float64)
    response = np.where(sample.fov, box_mean(green, 3) - green, -np.inf)
    count = int(sample.mask.sum())
    threshold = np.sort(response.ravel())[-count]
    pred = response >= threshold
    return 2.0 * (pred & sample.mask).sum() / (pred.sum() + sample.mask.sum())


def test_hard_knobs_make_the_same_eye_harder_to_segment():
    easy = Difficulty(hardness=0.05, contrast=1.0, noise=0.006, vessel_width=1.05, artefacts=0.05)
    hard = Difficulty(hardness=0.8, contrast=0.45, noise=0.05, vessel_width=0.75, artefacts=0.8)
    for seed in range(4):
        assert _baseline_dice(make_fundus(seed, 96, easy)) > _baseline_dice(make_fundus(seed, 96, hard)) + 0.1


def test_drawn_hardness_predicts_baseline_failure():
    seeds = range(40)
    hardness, dice = [], []
    for seed in seeds:
        knobs = draw_difficulty(np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[0]))
        hardness.append(knobs.hardness)
        dice.append(_baseline_dice(make_fundus(seed, 64)))
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    spearman = np.corrcoef(ranks(np.array(hardness)), ranks(np.array(dice)))[0, 1]
    assert spearman < -0.4, spearman


def test_difficulty_validation_names_the_knob():
    with pytest.raises(ValueError, match="Difficulty.noise"):
        Difficulty(hardness=0.1, contrast=1.0, noise=-0.1, vessel_width=1.0, artefacts=0.0)


@pytest.mark.parametrize("seed,size", [(-1, 64), (0, 16), (1.5, 64)])
def test_bad_arguments_are_rejected(seed, size):
    with pytest.raises(ValueError):
        make_fundus(seed, size)


def test_derived_fov_matches_the_true_aperture():
    for seed in (0, 5):
        sample = make_fundus(seed, 128)
        derived = derive_fov(sample.image)
        iou = (derived & sample.fov).sum() / (derived | sample.fov).sum()
        assert iou > 0.97, iou
