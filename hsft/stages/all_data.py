"""Full fine-tuning at HSFT's compute, beside HSFT: the same fine-tuning (starting model, trainable parts,
settings, seed, optimizer steps) drawing from the whole training split instead of the hard set. Each
epoch visits as many samples as the hard set holds, taken in turn from reshuffles of the whole split, so
over the stage every training sample is seen about equally often.

It answers "would the same compute spent on all the data do as well?". Writes `<out>/all_data/`.
"""

from __future__ import annotations

from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.engine.context import RunContext
from hsft.stages.hsft import fine_tune, mined_hard_set
from hsft.stages.selection import stream_over
from hsft.stages.training import StageResult

NAME = "all_data"


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    hard = mined_hard_set(ctx)
    per_epoch = len(cfg.limit(hard))
    what = (f"the whole training split ({len(ctx.splits.train)} samples), {per_epoch} an epoch in turn "
            "(full fine-tuning at HSFT's compute)")
    plan = stream_over(ctx.splits.train if per_epoch else [], per_epoch, what)
    return fine_tune(ctx, cfg, start, name=NAME, title="Full fine-tuning", plan=plan, hard=hard)
