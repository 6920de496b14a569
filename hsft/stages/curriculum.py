"""Easy-to-hard curriculum at HSFT's compute, beside HSFT: the same fine-tuning (starting model, trainable
parts, settings, optimizer steps) walking the whole training split from the easiest sample to the
hardest, by the mining stage's Dice, every sample given an equal share of the stage's visits.

Writes `<out>/curriculum/`. `anti_curriculum` walks the same order backwards.
"""

from __future__ import annotations

from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.engine.context import RunContext
from hsft.stages.hsft import fine_tune, mined_hard_set
from hsft.stages.mining import read_mined_dice
from hsft.stages.selection import by_difficulty
from hsft.stages.training import StageResult

NAME = "curriculum"


def ordered_run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None, *, name: str, easy_first: bool
                ) -> StageResult:
    """The curriculum (`easy_first`) or the anti-curriculum over the training split, at HSFT's compute."""
    hard = mined_hard_set(ctx)
    per_epoch = len(cfg.limit(hard))
    direction = "easiest to hardest" if easy_first else "hardest to easiest"
    what = (f"the whole training split ({len(ctx.splits.train)} samples) from {direction} by mined Dice, "
            f"{per_epoch} an epoch ({'curriculum' if easy_first else 'anti-curriculum'} at HSFT's compute)")
    pool = ctx.splits.train if per_epoch else []
    plan = by_difficulty(pool, read_mined_dice(ctx.stage_dir("mining")), per_epoch, cfg.train.epochs,
                         easy_first=easy_first, describe=what)
    title = "Curriculum" if easy_first else "Anti-curriculum"
    return fine_tune(ctx, cfg, start, name=name, title=title, plan=plan, hard=hard)


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    return ordered_run(ctx, cfg, start, name=NAME, easy_first=True)
