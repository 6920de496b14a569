"""Small statistics of the report: the paired bootstrap, value summaries and hard/easy flips."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["paired_bootstrap", "describe", "difficulty", "label_flips"]

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
