"""The variants beside HSFT, each a stage of its own: the same fine-tuning as HSFT (hsft.stages.hsft.fine_tune:
the model HSFT started from, the same trainable parts, settings and seed) at HSFT's compute, each epoch
visiting as many samples as HSFT trains on, so they take the same optimizer steps. What differs is only
which samples they train on, and in which order (hsft.stages.selection):

    control          a seeded random subset of the training split the size of the hard set: "is it the hard
                     samples, or just more training?"
    all_data         the whole training split, per-epoch share taken in turn from reshuffles, so every sample
                     is seen about equally often: "would the same compute on all the data do as well?"
    curriculum       the whole training split from the easiest sample to the hardest by the mined Dice, every
                     sample an equal share of the stage's visits
    anti_curriculum  the same walk, hardest first
    loss_weighted    draws with replacement from the whole split, each sample with probability proportional
                     to its mined Dice loss 1 - Dice (plus a small floor): a soft hard-sample selection
    easy_control     a seeded random subset of the easy samples (those outside the hard set), reshuffled when
                     there are fewer of them than HSFT's visits: "does training on what the model already
                     segments well do the same?"

Each writes `<out>/<name>/`, reads the mining stage's hard set (for its size, and to measure the hard set's
loss as HSFT does) and, for the orders and weights, the mined per-sample Dice. The pipeline hands each the
model HSFT started from; their models are evaluated but not passed on to later stages. Iterative HSFT
(hsft.stages.iterative) mines again between rounds and is a module of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.data import Sample
from hsft.engine.context import RunContext
from hsft.stages.hsft import fine_tune, mined_hard_set, random_subset
from hsft.stages.mining import read_mined_dice
from hsft.stages.report import TITLES
from hsft.stages.selection import TrainingPlan, by_difficulty, stream_over, weighted_by_difficulty, whole_set
from hsft.stages.training import StageResult

# (run context, HSFT's config, the mined hard set, HSFT's samples an epoch) -> the variant's training plan
PlanFor = Callable[[RunContext, HSFTStageConfig, list[Sample], int], TrainingPlan]


def easy_subset(train: list[Sample], hard: list[Sample], size: int, seed: int) -> tuple[list[Sample], int]:
    """A seeded random subset of the training samples outside the hard set, at most `size` of them, and how
    many easy samples there are."""
    hard_ids = {s.id for s in hard}
    easy = [s for s in train if s.id not in hard_ids]
    return random_subset(easy, min(size, len(easy)), seed), len(easy)


def _control(ctx: RunContext, cfg: HSFTStageConfig, hard: list[Sample], per_epoch: int) -> TrainingPlan:
    subset = random_subset(ctx.splits.train, per_epoch, ctx.seed)
    overlap = len({s.id for s in subset} & {s.id for s in hard})
    return whole_set(subset, f"a random training subset of the hard set's size, seed {ctx.seed}; {overlap} of them "
                             "are in the hard set (matched-compute control)")


def _all_data(ctx: RunContext, cfg: HSFTStageConfig, hard: list[Sample], per_epoch: int) -> TrainingPlan:
    train = ctx.splits.train
    return stream_over(train if per_epoch else [], per_epoch,
                       f"the whole training split ({len(train)} samples), {per_epoch} an epoch in turn "
                       "(full fine-tuning at HSFT's compute)")


def _ordered(easy_first: bool) -> PlanFor:
    def plan(ctx: RunContext, cfg: HSFTStageConfig, hard: list[Sample], per_epoch: int) -> TrainingPlan:
        train = ctx.splits.train
        direction = "easiest to hardest" if easy_first else "hardest to easiest"
        what = (f"the whole training split ({len(train)} samples) from {direction} by mined Dice, {per_epoch} an "
                f"epoch ({'curriculum' if easy_first else 'anti-curriculum'} at HSFT's compute)")
        return by_difficulty(train if per_epoch else [], read_mined_dice(ctx.stage_dir("mining")), per_epoch,
                             cfg.train.epochs, easy_first=easy_first, describe=what)
    return plan


def _loss_weighted(ctx: RunContext, cfg: HSFTStageConfig, hard: list[Sample], per_epoch: int) -> TrainingPlan:
    train = ctx.splits.train
    what = (f"{per_epoch} draws an epoch from the whole training split ({len(train)} samples), weighted by the "
            "mined Dice loss 1 - Dice (loss-weighted sampling at HSFT's compute)")
    return weighted_by_difficulty(train if per_epoch else [], read_mined_dice(ctx.stage_dir("mining")), per_epoch,
                                  what)


def _easy_control(ctx: RunContext, cfg: HSFTStageConfig, hard: list[Sample], per_epoch: int) -> TrainingPlan:
    subset, n_easy = easy_subset(ctx.splits.train, hard, per_epoch, ctx.seed)
    what = (f"{len(subset)} random easy training samples (of {n_easy} outside the hard set), seed {ctx.seed}, "
            f"{per_epoch} visits an epoch as HSFT has (easy-only control)")
    return stream_over(subset, per_epoch if subset else 0, what)


def variant(name: str, plan_for: PlanFor) -> Callable[[RunContext, HSFTStageConfig, Path | None], StageResult]:
    """The stage entry of the variant `name`: HSFT's fine-tuning from `start` on the plan `plan_for` makes."""

    def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
        hard = mined_hard_set(ctx)
        plan = plan_for(ctx, cfg, hard, len(cfg.limit(hard)))
        return fine_tune(ctx, cfg, start, name=name, title=TITLES[name], plan=plan, hard=hard)

    run.__name__ = run.__qualname__ = name
    return run


control = variant("control", _control)
all_data = variant("all_data", _all_data)
curriculum = variant("curriculum", _ordered(easy_first=True))
anti_curriculum = variant("anti_curriculum", _ordered(easy_first=False))
loss_weighted = variant("loss_weighted", _loss_weighted)
easy_control = variant("easy_control", _easy_control)
