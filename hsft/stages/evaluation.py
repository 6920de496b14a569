"""The evaluation stage: every model of the run (the starting model and each training stage's output)
through the evaluator (hsft.eval) on the held-out split, which no stage trains or mines on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hsft.config import EvalConfig
from hsft.engine.context import RunContext
from hsft.eval import evaluate_model
from hsft.model import load_model
from hsft.stages.training import StageResult


def run(ctx: RunContext, cfg: EvalConfig, start: Path | None) -> StageResult:
    if cfg.tau is None:
        # Unless set, the hard/easy threshold of the flips and categories is the one mining used.
        cfg = dataclasses.replace(cfg, tau=ctx.cfg.mining.tau)
    rows = []
    for name, path in ctx.models:
        tb = ctx.tb(f"eval_{name}")
        summary = evaluate_model(load_model(path, device=ctx.device, dtype=ctx.dtype), ctx.splits.test, cfg,
                                 out_dir=ctx.stage_dir("eval") / name, tb=tb, step=ctx.global_step, tag=f"eval/{name}")
        tb.close()
        gen, fwd = summary["paths"]["generate"], summary["paths"]["forward"]
        rows.append({"stage": name, "model": str(path), "dice": gen["dice"], "iou": gen["iou"],
                     "forward_dice": fwd["dice"], "seg_rate": summary["generate"]["seg_rate"],
                     "misses": summary["generate"]["misses"], "n": summary["n"]})
    baseline = rows[0]["dice"] if rows else 0.0
    for i, row in enumerate(rows):
        row["delta_prev"] = row["dice"] - rows[i - 1]["dice"] if i else 0.0
        row["delta_base"] = row["dice"] - baseline
    return StageResult(summary=rows, section=results_table(rows),
                       written={"evaluation": str(ctx.stage_dir("eval"))})


def results_table(rows: list[dict]) -> list[str]:
    lines = ["## Held-out results (generate path, as a user's inference runs)", "",
             "| stage | Dice | Δ prev | Δ baseline | IoU | forward-path Dice | [SEG] rate |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['dice']:.4f} | {row['delta_prev']:+.4f} | {row['delta_base']:+.4f} "
                     f"| {row['iou']:.4f} | {row['forward_dice']:.4f} | {row['seg_rate']:.2f} |")
    return lines + ["", "Per-path details, discrepancy and overlays: `eval/<stage>/eval.md`.", ""]
