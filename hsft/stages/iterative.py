"""Iterative HSFT, beside HSFT: R rounds of (mine the training split with the current model, fine-tune on
that round's hard set), each round with HSFT's settings, so a sample the last round fixed leaves the hard
set and one it broke joins it. Round r lives in `<out>/iterative/round<r>/` (its mining/ and hsft/
directories, as a run's would be); the last round's model is the stage's model, `<out>/iterative/model`.

Compute is not matched: R rounds take about R times HSFT's steps when the hard set stays as large (the
report gives the steps of every round). Set --hsft-epochs to split a budget across rounds.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from hsft.config import HSFTStageConfig, MiningConfig
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.files import write_json
from hsft.stages import mining as mining_stage
from hsft.stages.hsft import fine_tune, mined_hard_set
from hsft.stages.selection import whole_set
from hsft.stages.training import StageResult, model_dir

NAME = "iterative"


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None, mining: MiningConfig) -> StageResult:
    """R rounds from the model `start`: each mines the training split with the mining stage's settings
    `mining`, then fine-tunes with HSFT's settings `cfg` on that round's hard set."""
    if start is None:
        raise ValueError(f"{NAME}: needs a starting model directory (--model, or an earlier stage)")
    stage_dir = ctx.stage_dir(NAME)
    current, rounds, step = Path(start), [], ctx.global_step
    for number in range(1, cfg.rounds + 1):
        # Each round is a small run of its own below the stage directory: its mining, then its fine-tuning.
        round_ctx = dataclasses.replace(ctx, out_dir=stage_dir / f"round{number}", global_step=step)
        mining_stage.run(round_ctx, mining, current)
        hard = mined_hard_set(round_ctx)
        used = cfg.limit(hard)
        result = fine_tune(round_ctx, cfg, current, name="hsft", title=f"Iterative HSFT, round {number}",
                           plan=whole_set(used, f"round {number}'s mined hard set"), hard=hard)
        step = result.global_step
        rounds.append({"round": number, "hard": len(hard), "trained_on": len(used), **{
            k: result.summary.get(k) for k in ("optimizer_steps", "hard_set_loss_before", "hard_set_loss_after",
                                               "skipped")}})
        current = result.model_dir
    # The last round's model becomes the stage's model (it is a whole model: every round saves one).
    if distributed.is_main():
        if model_dir(stage_dir).exists():
            shutil.rmtree(model_dir(stage_dir))
        shutil.copytree(current, model_dir(stage_dir))
        write_json(stage_dir / "metrics.json", {"stage": NAME, "rounds": rounds,
                                                "optimizer_steps": sum(r["optimizer_steps"] or 0 for r in rounds),
                                                "global_step_end": step})
    distributed.barrier()
    summary = {"rounds": rounds, "optimizer_steps": sum(r["optimizer_steps"] or 0 for r in rounds),
               "trains": "as HSFT, round after round"}
    return StageResult(model_dir=model_dir(stage_dir), summary=summary, global_step=step)
