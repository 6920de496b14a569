"""Hard-to-easy (anti-)curriculum at HSFT's compute, beside HSFT: the curriculum's walk over the training
split in the opposite order, hardest first. Writes `<out>/anti_curriculum/`."""

from __future__ import annotations

from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.engine.context import RunContext
from hsft.stages.curriculum import ordered_run
from hsft.stages.training import StageResult

NAME = "anti_curriculum"


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    return ordered_run(ctx, cfg, start, name=NAME, easy_first=False)
