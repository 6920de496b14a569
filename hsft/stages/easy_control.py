"""The easy-only control beside HSFT: the same fine-tuning (same starting model, trainable parts, settings,
seed and optimizer steps) on a seeded random subset of the *easy* training samples, those the mining
stage kept out of the hard set, instead of the hard set.

Where the random-subset control asks "is it the hard samples, or any training?", this one asks "does
training on what the model already segments well do the same?": if it matches HSFT on the hard held-out
images, the hard set is not what helped. It draws as many samples per epoch as HSFT trains on; with fewer
easy samples than that, each epoch goes through reshuffles of all of them, so the steps stay matched.
Writes `<out>/easy_control/`; reads the mining stage's hard set and per-sample Dice.
"""

from __future__ import annotations

from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.engine.context import RunContext
from hsft.stages.hsft import fine_tune, mined_hard_set, random_subset
from hsft.stages.selection import stream_over
from hsft.stages.training import StageResult

NAME = "easy_control"


def easy_subset(train, hard, size: int, seed: int):
    """A seeded random subset of the training samples outside the hard set, at most `size` of them."""
    hard_ids = {s.id for s in hard}
    easy = [s for s in train if s.id not in hard_ids]
    return random_subset(easy, min(size, len(easy)), seed), len(easy)


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    """The easy-only control from the model `start` (the one HSFT starts from), with HSFT's settings."""
    hard = mined_hard_set(ctx)
    per_epoch = len(cfg.limit(hard))
    subset, n_easy = easy_subset(ctx.splits.train, hard, per_epoch, ctx.seed)
    what = (f"{len(subset)} random easy training samples (of {n_easy} outside the hard set), seed {ctx.seed}, "
            f"{per_epoch} visits an epoch as HSFT has (easy-only control)")
    return fine_tune(ctx, cfg, start, name=NAME, title="Easy-only control",
                     plan=stream_over(subset, per_epoch if subset else 0, what), hard=hard)
