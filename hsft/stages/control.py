"""The matched-compute control beside HSFT: the same fine-tuning (same starting model, same trainable
parts, same settings and seed, hence the same number of optimizer steps) on a seeded random subset of
the training split the size of the hard set, instead of the hard set itself.

It answers "is it the hard samples, or just more training?": the report compares HSFT and the
control on the same held-out samples. It writes `<out>/control/` and reads the mining stage's hard
set only for its size (and to measure the hard set's loss, as HSFT does). The pipeline hands it the
model HSFT started from, and its model is evaluated but not passed on to later stages.
"""

from __future__ import annotations

from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.engine.context import RunContext
from hsft.stages.hsft import fine_tune, mined_hard_set, random_subset
from hsft.stages.selection import whole_set
from hsft.stages.training import StageResult

NAME = "control"


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    """The control from the model `start` (the one HSFT starts from), with HSFT's settings."""
    hard = mined_hard_set(ctx)
    subset = random_subset(ctx.splits.train, len(cfg.limit(hard)), ctx.seed)
    overlap = len({s.id for s in subset} & {s.id for s in hard})
    what = (f"a random training subset of the hard set's size, seed {ctx.seed}; {overlap} of them are in the hard "
            "set (matched-compute control)")
    return fine_tune(ctx, cfg, start, name=NAME, title="Control", plan=whole_set(subset, what), hard=hard)
