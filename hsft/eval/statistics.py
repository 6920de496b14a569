"""Statistics of the reports: the interval of an effect over seeds and images, the paired bootstrap of one
evaluation, value summaries and hard/easy flips."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["effect_interval", "crossed_intervals", "detectable_effect", "paired_bootstrap", "describe",
           "difficulty", "label_flips", "POWER"]

POWER = 0.8  # the power at which the smallest detectable effect is stated

# Bound on the index matrix drawn per chunk of resamples (elements), so that a large evaluation
# set does not allocate resamples x n integers at once.
_CHUNK_ELEMENTS = 1 << 22


def paired_bootstrap(before: Sequence[float], after: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Mean of the paired differences (after - before) with a percentile bootstrap interval.

    Samples are resampled with replacement as pairs, so the interval reflects the per-sample
    correlation of the two measurements (both come from the same image). Seeded: the same inputs
    give the same interval.
    """
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: expected two equal-length 1-D sequences, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"paired_bootstrap: resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: confidence must lie in (0, 1), got {confidence}")
    n = a.size
    result = {"mean": None, "low": None, "high": None, "confidence": confidence, "resamples": resamples,
              "seed": seed, "n": n}
    if n == 0:
        return result
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, per_chunk):
        count = min(per_chunk, resamples - start)
        picks = rng.integers(0, n, size=(count, n))
        means[start:start + count] = diff[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    result.update(mean=float(diff.mean()), low=float(low), high=float(high))
    return result


METHOD_CROSSED = ("seeds x images crossed: Var(mean) = (MS_seed + MS_image - MS_residual) / (seeds x images), "
                  "t quantile on Satterthwaite's degrees of freedom")
METHOD_ONE_SEED = "images only; this pair of checkpoints (one seed: BCa bootstrap over images)"


def _check_confidence(confidence: float, power: float = POWER) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"effect_interval: confidence must lie in (0, 1), got {confidence}")
    if not 0 < power < 1:
        raise ValueError(f"effect_interval: power must lie in (0, 1), got {power}")


def _mean_squares(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(MS_seed, MS_image, MS_residual) of the two-way layout d[..., seed, image], one observation a cell."""
    seeds, images = d.shape[-2:]
    grand = d.mean(axis=(-2, -1), keepdims=True)
    seed_means = d.mean(axis=-1, keepdims=True)
    image_means = d.mean(axis=-2, keepdims=True)
    ms_seed = images * ((seed_means - grand) ** 2).sum(axis=(-2, -1)) / max(seeds - 1, 1)
    ms_image = seeds * ((image_means - grand) ** 2).sum(axis=(-2, -1)) / max(images - 1, 1)
    residual = d - seed_means - image_means + grand
    ms_residual = (residual ** 2).sum(axis=(-2, -1)) / max((seeds - 1) * (images - 1), 1)
    return ms_seed, ms_image, ms_residual


def _combined(ms_seed, ms_image, ms_residual, seeds: int, images: int):
    """Var(grand mean) and its Satterthwaite degrees of freedom for the crossed random-effects model
    d = mu + seed + image + seed x image. MS_seed + MS_image - MS_residual estimates
    sigma_e^2 + I sigma_seed^2 + S sigma_image^2 without bias; when sampling noise makes it smaller than
    MS_seed or MS_image (each of which estimates a part of it), that larger mean square is used instead,
    so the variance is never below what either factor alone shows."""
    df_seed, df_image, df_residual = seeds - 1, images - 1, (seeds - 1) * (images - 1)
    combo = ms_seed + ms_image - ms_residual
    denom = ms_seed ** 2 / df_seed + ms_image ** 2 / df_image + ms_residual ** 2 / df_residual
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, combo ** 2 / np.where(denom > 0, denom, 1.0), np.inf)
    use_seed = (combo < ms_seed) & (ms_seed >= ms_image)
    use_image = (combo < ms_image) & ~use_seed
    combo = np.where(use_seed, ms_seed, np.where(use_image, ms_image, combo))
    df = np.where(use_seed, df_seed, np.where(use_image, df_image, df))
    return combo / (seeds * images), df


def crossed_intervals(d: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high, se) of the grand mean of each layout d[..., seeds, images] (seeds >= 2, images >= 2),
    vectorised over the leading axes: the crossed interval of effect_interval."""
    d = np.asarray(d, dtype=np.float64)
    seeds, images = d.shape[-2:]
    if seeds < 2 or images < 2:
        raise ValueError(f"crossed_intervals: need at least 2 seeds and 2 images, got {seeds} x {images}")
    var, df = _combined(*_mean_squares(d), seeds, images)
    se = np.sqrt(var)
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    mean = d.mean(axis=(-2, -1))
    return mean, mean - half, mean + half, se


def detectable_effect(components: dict, seeds: int, images: int, *, confidence: float = 0.95,
                      power: float = POWER) -> float | None:
    """The smallest true effect that a design of `seeds` x `images` detects with probability `power` by a
    two-sided test at level 1 - confidence, given variance components {"seed", "image", "residual"}
    (as effect_interval measures them): (t_{1-a/2} + t_{power}) x the standard error of the mean, on the
    Satterthwaite degrees of freedom of the design's expected mean squares."""
    _check_confidence(confidence, power)
    if seeds < 1 or images < 2:
        raise ValueError(f"detectable_effect: need at least 1 seed and 2 images, got {seeds} x {images}")
    s2_seed, s2_image, s2_res = (max(0.0, float(components.get(k) or 0.0)) for k in ("seed", "image", "residual"))
    if seeds == 1:  # one seed: the seed's own deviation is part of the effect; images alone vary
        var, df = (s2_image + s2_res) / images, images - 1
    else:
        ms = [np.float64(s2_res + images * s2_seed), np.float64(s2_res + seeds * s2_image), np.float64(s2_res)]
        var, df = _combined(*ms, seeds, images)
    se = float(np.sqrt(var))
    if se == 0.0:
        return 0.0
    return float((stats.t.ppf(0.5 + confidence / 2, df) + stats.t.ppf(power, df)) * se)


def effect_interval(diffs, *, confidence: float = 0.95, seed: int = 0, resamples: int = 2000) -> dict:
    """The mean of paired differences (after - before) with an interval that covers what varies between runs.

    `diffs` has shape (seeds, images): the same images under two models, once per training seed (a 1-D array
    is one seed). With two or more seeds the interval treats seeds and images as crossed random factors
    (d = mu + seed + image + seed x image): the variance of the mean is
    (MS_seed + MS_image - MS_residual) / (S I), with a t quantile on Satterthwaite's degrees of freedom, so
    the spread between training runs widens it and the images' shared difficulty is not counted once per
    seed. With one seed only the images vary: a BCa bootstrap over images (seeded by `seed`), which
    covers this pair of checkpoints and nothing about another run.

    Returns mean, low, high, method, per_seed (each seed's mean difference), seeds, images, confidence,
    se, df, components (variance estimates: seed, image, residual) and detectable (the smallest effect this
    design detects with 80 % power at the 1 - confidence level, from those components).
    """
    _check_confidence(confidence)
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2:
        raise ValueError(f"effect_interval: diffs must have shape (seeds, images), got {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("effect_interval: diffs holds NaN or infinite values")
    seeds, images = d.shape
    result = {"mean": None, "low": None, "high": None, "confidence": confidence, "seeds": seeds, "images": images,
              "per_seed": [float(v) for v in d.mean(axis=1)] if images else [], "se": None, "df": None,
              "components": None, "detectable": None,
              "method": METHOD_ONE_SEED if seeds == 1 else METHOD_CROSSED}
    if seeds == 0 or images == 0:
        return result
    mean = float(d.mean())
    result["mean"] = mean
    if images < 2:
        raise ValueError(f"effect_interval: need at least 2 images, got {images}")
    if seeds == 1:
        x = d[0]
        sd = float(x.std(ddof=1))
        result.update(se=float(sd / np.sqrt(images)), df=float(images - 1),
                      components={"seed": None, "image": sd ** 2, "residual": 0.0})
        if sd == 0.0:
            low = high = mean
        else:
            boot = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                   method="BCa", random_state=np.random.default_rng(seed))
            low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
        result.update(low=low, high=high)
        result["detectable"] = detectable_effect(result["components"], 1, images, confidence=confidence)
        return result
    ms_seed, ms_image, ms_residual = (float(v) for v in _mean_squares(d))
    _, low, high, se = (float(v) for v in crossed_intervals(d, confidence))
    var, df = _combined(np.float64(ms_seed), np.float64(ms_image), np.float64(ms_residual), seeds, images)
    components = {"seed": max(0.0, (ms_seed - ms_residual) / images),
                  "image": max(0.0, (ms_image - ms_residual) / seeds), "residual": ms_residual}
    result.update(low=low, high=high, se=se, df=float(df), components=components,
                  detectable=detectable_effect(components, seeds, images, confidence=confidence))
    return result


def describe(values: Sequence[float | None]) -> dict:
    """mean / min / max / median / std of the values that are not None, and how many there were."""
    kept = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return {"n": 0, "mean": None, "min": None, "max": None, "median": None, "std": None}
    return {"n": int(kept.size), "mean": float(kept.mean()), "min": float(kept.min()), "max": float(kept.max()),
            "median": float(np.median(kept)), "std": float(kept.std())}


def difficulty(dice: float, tau: float) -> str:
    """'hard' below tau, 'easy' at or above it (the mining rule: hard means Dice < tau)."""
    return "hard" if dice < tau else "easy"


def label_flips(ids: Sequence[str], first: Sequence[float], second: Sequence[float], tau: float) -> list[dict]:
    """The samples whose hard/easy label at tau differs between two measurements."""
    if not len(ids) == len(first) == len(second):
        raise ValueError("label_flips: ids and both Dice lists must have the same length")
    flips = []
    for sample_id, a, b in zip(ids, first, second):
        label_a, label_b = difficulty(a, tau), difficulty(b, tau)
        if label_a != label_b:
            flips.append({"id": sample_id, "dice_first": float(a), "dice_second": float(b),
                          "first": label_a, "second": label_b})
    return flips
