"""The evaluation stage: every model of the run (the starting model and each training stage's output)
through the evaluator (hsft.eval) on the held-out split, which no stage trains or mines on.

Each training stage's held-out effect is measured against the model that stage started from, on the
same samples: the mean per-image Dice difference with a paired-bootstrap 95 % interval. When both
a stage and a variant beside it ran (HSFT and its matched-compute control), the stage is also compared
with the variant directly.
"""

from __future__ import annotations

from pathlib import Path

from hsft.config import EvalConfig
from hsft.engine.context import RunContext
from hsft.eval import evaluate_model
from hsft.eval.statistics import paired_bootstrap
from hsft.model import load_model
from hsft.stages.training import StageResult


def _per_sample_dice(summary: dict) -> list[float]:
    return [row["scores"]["generate"]["dice"] for row in sorted(summary["samples"], key=lambda r: r["index"])]


def run(ctx: RunContext, cfg: EvalConfig, start: Path | None) -> StageResult:
    cfg = cfg.following(ctx.cfg.mining)  # the hard/easy threshold of the flips: mining's, unless set
    rows, dice = [], {}
    label_of = {Path(path): name for name, path in ctx.models}
    for name, path in ctx.models:
        tb = ctx.tb(f"eval_{name}")
        summary = evaluate_model(load_model(path, device=ctx.device, dtype=ctx.dtype), ctx.splits.test, cfg,
                                 out_dir=ctx.stage_dir("eval") / name, tb=tb, step=ctx.global_step, tag=f"eval/{name}")
        tb.close()
        gen, fwd = summary["paths"]["generate"], summary["paths"]["forward"]
        dice[name] = _per_sample_dice(summary)
        parent = ctx.started_from.get(name)
        rows.append({"stage": name, "model": str(path), "dice": gen["dice"], "iou": gen["iou"],
                     "forward_dice": fwd["dice"], "seg_rate": summary["generate"]["seg_rate"],
                     "misses": summary["generate"]["misses"], "n": summary["n"],
                     "started_from": label_of.get(Path(parent)) if parent is not None else None,
                     "beside": ctx.variants.get(name)})
    baseline = rows[0]["dice"] if rows else 0.0
    for i, row in enumerate(rows):
        row["delta_prev"] = row["dice"] - rows[i - 1]["dice"] if i else 0.0
        row["delta_base"] = row["dice"] - baseline
        parent = row["started_from"]
        row["effect"] = (paired_bootstrap(dice[parent], dice[row["stage"]], resamples=cfg.bootstrap_resamples,
                                          seed=cfg.bootstrap_seed) if parent in dice else None)
    comparisons = [{"after": a, "before": b, **paired_bootstrap(dice[b], dice[a], resamples=cfg.bootstrap_resamples,
                                                                seed=cfg.bootstrap_seed)}
                   for b, a in ctx.variants.items() if a in dice and b in dice]
    return StageResult(summary=rows, section=results_table(rows, comparisons),
                       written={"evaluation": str(ctx.stage_dir("eval"))})


def _interval(effect: dict | None) -> str:
    if effect is None or effect["mean"] is None:
        return "-"
    return f"{effect['mean']:+.4f} [{effect['low']:+.4f}, {effect['high']:+.4f}]"


def results_table(rows: list[dict], comparisons: list[dict] | None = None) -> list[str]:
    n = rows[0]["n"] if rows else 0
    lines = ["## Held-out results (generate path, as a user's inference runs)", "",
             f"Δ start: the stage's effect on the same {n} held-out images, its Dice minus the Dice of the model it "
             "started from (mean over images, paired-bootstrap 95% interval); an interval that contains 0 means "
             "this split cannot tell the effect from none.", "",
             "| stage | Dice | started from | Δ start [95% CI] | Δ baseline | IoU | forward-path Dice | [SEG] rate |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['dice']:.4f} | {row['started_from'] or '-'} | {_interval(row['effect'])} "
                     f"| {row['delta_base']:+.4f} | {row['iou']:.4f} | {row['forward_dice']:.4f} | "
                     f"{row['seg_rate']:.2f} |")
    for comparison in comparisons or []:
        lines += ["", f"{comparison['after']} - {comparison['before']} (same starting model, same steps; what "
                      f"differs is the training set): {_interval(comparison)}"]
    return lines + ["", "Per-path details, discrepancy and overlays: `eval/<stage>/eval.md`.", ""]
