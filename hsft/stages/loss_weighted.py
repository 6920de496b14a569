"""Loss-weighted sampling at HSFT's compute, beside HSFT: a soft version of hard-sample selection. Each
epoch draws as many samples as the hard set holds from the whole training split, with replacement,
each with probability proportional to its Dice loss at the start (1 - its mined Dice, plus a small
floor). Writes `<out>/loss_weighted/`."""

from __future__ import annotations

from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.engine.context import RunContext
from hsft.stages.hsft import fine_tune, mined_hard_set
from hsft.stages.mining import read_mined_dice
from hsft.stages.selection import weighted_by_difficulty
from hsft.stages.training import StageResult

NAME = "loss_weighted"


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    hard = mined_hard_set(ctx)
    per_epoch = len(cfg.limit(hard))
    what = (f"{per_epoch} draws an epoch from the whole training split ({len(ctx.splits.train)} samples), "
            "weighted by the mined Dice loss 1 - Dice (loss-weighted sampling at HSFT's compute)")
    plan = weighted_by_difficulty(ctx.splits.train if per_epoch else [], read_mined_dice(ctx.stage_dir("mining")),
                                  per_epoch, what)
    return fine_tune(ctx, cfg, start, name=NAME, title="Loss-weighted sampling", plan=plan, hard=hard)
