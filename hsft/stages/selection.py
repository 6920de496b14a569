"""What a fine-tuning stage trains on, epoch by epoch: the training plan of HSFT and of the variants
beside it (the random-subset control, full fine-tuning, curricula, loss-weighted sampling).

A plan is a pool of samples and, for every epoch, the pool indices to visit in order. Every variant
visits as many samples per epoch as HSFT does (the hard set's size), so with the same epochs, micro-batch
and accumulation they take the same optimizer steps on the same trainable parts with the same schedule:
what differs between them is only *which* samples they train on, and in which order.

The difficulty a plan orders or weights by is the mining stage's per-sample Dice on the training split
(the model the stage starts from, the real inference path), never anything from the held-out split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hsft.data import Sample
from hsft.engine.loop import wrap_to_batches

__all__ = ["TrainingPlan", "nothing", "whole_set", "stream_over", "by_difficulty", "weighted_by_difficulty"]


@dataclass
class TrainingPlan:
    """`pool`: the samples the stage may draw from; `per_epoch`: how many it visits each epoch (the
    epoch's length, hence the optimizer steps); `epochs_order(epoch, seed)`: the pool indices of that
    epoch, `per_epoch` of them; `describe`: the plan in words (report.md and report.json)."""

    pool: list[Sample]
    per_epoch: int
    describe: str
    _order: Callable[[int, int], list[int]] = field(repr=False, default=lambda epoch, seed: [])

    def epoch_indices(self, epoch: int, seed: int) -> list[int]:
        indices = self._order(epoch, seed)
        if len(indices) != self.per_epoch:
            raise AssertionError(f"plan '{self.describe}': epoch {epoch} lists {len(indices)} samples, expected "
                                 f"{self.per_epoch}")
        return indices

    def order(self, epoch: int, global_batch: int, seed: int) -> list[int]:
        """The epoch's indices wrapped to whole global batches (the engine loop's data order)."""
        return wrap_to_batches(self.epoch_indices(epoch, seed), global_batch)


def nothing(describe: str) -> TrainingPlan:
    """An empty plan (no hard sample: the stage passes its input model on)."""
    return TrainingPlan([], 0, describe, lambda epoch, seed: [])


def whole_set(samples: list[Sample], describe: str) -> TrainingPlan:
    """Every sample once per epoch, in a seeded random order (HSFT on its hard set, the control on its subset)."""
    n = len(samples)
    return TrainingPlan(samples, n, describe,
                        lambda epoch, seed: np.random.default_rng([seed, epoch]).permutation(n).tolist())


def stream_over(pool: list[Sample], per_epoch: int, describe: str) -> TrainingPlan:
    """`per_epoch` samples an epoch taken in turn from a stream of seeded reshuffles of the whole pool
    (full fine-tuning at matched compute: every sample is visited equally often over the stage)."""
    n = len(pool)
    if not n or not per_epoch:
        return nothing(describe)

    def order(epoch: int, seed: int) -> list[int]:
        begin, end = epoch * per_epoch, (epoch + 1) * per_epoch
        stream: list[int] = []
        for cycle in range(begin // n, (end - 1) // n + 1):
            stream += np.random.default_rng([seed, 7919, cycle]).permutation(n).tolist()
        offset = (begin // n) * n
        return stream[begin - offset:end - offset]

    return TrainingPlan(pool, per_epoch, describe, order)


def by_difficulty(pool: list[Sample], dice: dict[str, float], per_epoch: int, epochs: int, *, easy_first: bool,
                  describe: str) -> TrainingPlan:
    """A curriculum: the whole stage (epochs x per_epoch visits) walks the pool sorted by difficulty, easiest
    first (`easy_first`) or hardest first, each sample given an equal share of the visits. The order is
    fixed: a curriculum is an order, so no epoch is shuffled."""
    if not pool or not per_epoch:
        return nothing(describe)
    ranked = sorted(range(len(pool)), key=lambda i: (dice[pool[i].id], pool[i].id), reverse=easy_first)
    total = epochs * per_epoch
    # Visit j of the stage goes to the sample at fraction j / total of the ranking.
    stream = [ranked[j * len(ranked) // total] for j in range(total)]
    return TrainingPlan(pool, per_epoch, describe,
                        lambda epoch, seed: stream[epoch * per_epoch:(epoch + 1) * per_epoch])


def weighted_by_difficulty(pool: list[Sample], dice: dict[str, float], per_epoch: int, describe: str,
                           floor: float = 0.01) -> TrainingPlan:
    """Loss-weighted sampling: each epoch draws `per_epoch` samples with replacement, sample i with probability
    proportional to its mined Dice loss 1 - Dice_i (plus `floor`, so a perfect sample keeps a small chance).
    The weights are those at the start of the stage (the mining pass), not re-measured every epoch."""
    if not pool or not per_epoch:
        return nothing(describe)
    weights = np.array([1.0 - dice[s.id] + floor for s in pool], dtype=np.float64)
    weights /= weights.sum()
    return TrainingPlan(pool, per_epoch, describe,
                        lambda epoch, seed: np.random.default_rng([seed, 104729, epoch]).choice(
                            len(pool), size=per_epoch, replace=True, p=weights).tolist())
