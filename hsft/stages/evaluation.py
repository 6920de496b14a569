"""The evaluation stage: every model of the run (the starting model and each training stage's output)
through the evaluator (hsft.eval) on the held-out split, which no stage trains or mines on: the untouched
test split when the synthetic data has one (hsft.data.splits), else the test split.

Each training stage's held-out effect is measured against the model that stage started from, on the
same samples: the mean per-image Dice difference with a 95 % interval over the images
(hsft.eval.statistics.effect_interval with one seed). That interval covers the images only, for this
pair of checkpoints: another seed or another stage 0 trains other checkpoints, and the study
(launch/experiments.py) measures that spread. When both a stage and a variant beside it ran (HSFT and its
matched-compute control), the stage is also compared with the variant directly.

For the embedded default the report also shows, per stage, the range of that Δ over stage-0 seeds, read
from a table shipped beside this module (`default_spread.json`, written by the study: launch/experiments.py
writes `stage_spread.json`), with the seeds, machine and threads that measured it. The embedded default is
not bit-reproducible across thread counts and CPUs: another summation order (threads, vector width) rounds
stage 0's sums differently, training amplifies that into another stage 0, and every later stage inherits it.
A single run is one realisation of that spread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsft.config import EvalConfig
from hsft.data.splits import split_description
from hsft.engine.context import RunContext
from hsft.eval import evaluate_model
from hsft.eval.statistics import effect_interval
from hsft.model import load_model
from hsft.stages.training import StageResult

DEFAULT_SPREAD = Path(__file__).with_name("default_spread.json")
NOT_REPRODUCIBLE = ("The embedded default is not bit-reproducible across thread counts and CPUs: another summation "
                    "order (threads, vector width) rounds stage 0's sums differently, training amplifies that into "
                    "another stage 0, and every later stage inherits it. This run is one realisation.")


@dataclass(frozen=True)
class RunModel:
    """A model of the run, as the pipeline hands it to this stage: its label (the stage that produced it,
    or "start"), its directory, the directory its stage started from (its effect is measured against
    that model), and the stage it sits beside when it is a variant (compared with that stage directly)."""

    label: str
    model_dir: Path
    started_from: Path | None = None
    beside: str | None = None


def shipped_spread(path: Path = DEFAULT_SPREAD) -> dict | None:
    """The shipped per-stage Δ ranges over stage-0 seeds, or None when the package has none."""
    return json.loads(path.read_text()) if path.is_file() else None


def _per_sample_dice(summary: dict) -> list[float]:
    return [row["scores"]["generate"]["dice"] for row in sorted(summary["samples"], key=lambda r: r["index"])]


def _effect(before: list[float], after: list[float], cfg: EvalConfig) -> dict:
    """after - before on the same images, one pair of checkpoints: the images-only interval."""
    return effect_interval(np.asarray(after) - np.asarray(before), seed=cfg.bootstrap_seed,
                           resamples=cfg.bootstrap_resamples)


def run(ctx: RunContext, cfg: EvalConfig, start: Path | None, models: Sequence[RunModel] = ()) -> StageResult:
    """Evaluate `models` (the pipeline's list of the run's models, in order) on the held-out split; `start`
    is the model the run hands on, which is among them."""
    cfg = cfg.following(ctx.cfg.mining)  # the hard/easy threshold of the flips: mining's, unless set
    rows, dice = [], {}
    label_of = {Path(m.model_dir): m.label for m in models}
    split_name, samples = ctx.splits.report_split()
    split = split_description(split_name, len(samples), ctx.cfg.data)
    for model in models:
        name, path = model.label, model.model_dir
        tb = ctx.tb(f"eval_{name}")
        summary = evaluate_model(load_model(path, device=ctx.device, dtype=ctx.dtype), samples, cfg,
                                 out_dir=ctx.stage_dir("eval") / name, tb=tb, step=ctx.global_step, tag=f"eval/{name}")
        tb.close()
        gen, fwd = summary["paths"]["generate"], summary["paths"]["forward"]
        dice[name] = _per_sample_dice(summary)
        parent = model.started_from
        rows.append({"stage": name, "model": str(path), "dice": gen["dice"], "iou": gen["iou"],
                     "forward_dice": fwd["dice"], "seg_rate": summary["generate"]["seg_rate"],
                     "misses": summary["generate"]["misses"], "n": summary["n"],
                     "started_from": label_of.get(Path(parent)) if parent is not None else None,
                     "beside": model.beside, "split": split_name})
    baseline = rows[0]["dice"] if rows else 0.0
    for i, row in enumerate(rows):
        row["delta_prev"] = row["dice"] - rows[i - 1]["dice"] if i else 0.0
        row["delta_base"] = row["dice"] - baseline
        parent = row["started_from"]
        row["effect"] = _effect(dice[parent], dice[row["stage"]], cfg) if parent in dice else None
    comparisons = [{"after": a, "before": b, **_effect(dice[b], dice[a], cfg)}
                   for b, a in ((m.label, m.beside) for m in models if m.beside) if a in dice and b in dice]
    spread = shipped_spread() if ctx.cfg.embedded_default else None
    section = results_table(rows, comparisons, split, spread)
    if ctx.cfg.embedded_default and spread is None:
        section[-1:-1] = [NOT_REPRODUCIBLE, ""]
    return StageResult(summary=rows, section=section,
                       written={"evaluation": str(ctx.stage_dir("eval"))})


def _interval(effect: dict | None) -> str:
    if effect is None or effect["mean"] is None:
        return "-"
    return f"{effect['mean']:+.4f} [{effect['low']:+.4f}, {effect['high']:+.4f}]"


def _range(spread: dict | None, stage: str) -> str:
    entry = (spread or {}).get("stages", {}).get(stage)
    return f"[{entry['min']:+.4f}, {entry['max']:+.4f}]" if entry else "-"


def results_table(rows: list[dict], comparisons: list[dict] | None = None, split: str = "held-out split",
                  spread: dict | None = None) -> list[str]:
    n = rows[0]["n"] if rows else 0
    lines = ["## Held-out results (generate path, as a user's inference runs)", "",
             f"Split: {split}.", "",
             f"Δ start: the stage's effect on the same {n} held-out images, its Dice minus the Dice of the model it "
             "started from (mean over images, 95% interval: images only; this pair of checkpoints). An interval "
             "that contains 0 means these images cannot tell the effect from none; an interval that excludes 0 "
             "still says nothing about another seed or another stage 0, which train other checkpoints "
             "(the study, launch/experiments.py, measures that spread).", "",
             "| stage | Dice | started from | Δ start [95% CI] | Δ baseline | IoU | forward-path Dice | [SEG] rate |"
             + (" Δ start over stage-0 seeds |" if spread else ""),
             "|---|---:|---|---|---:|---:|---:|---:|" + ("---|" if spread else "")]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['dice']:.4f} | {row['started_from'] or '-'} | {_interval(row['effect'])} "
                     f"| {row['delta_base']:+.4f} | {row['iou']:.4f} | {row['forward_dice']:.4f} | "
                     f"{row['seg_rate']:.2f} |" + (f" {_range(spread, row['stage'])} |" if spread else ""))
    if spread:
        seeds = ", ".join(map(str, spread["seeds"]))
        lines += ["", f"Δ start over stage-0 seeds: the lowest and highest Δ of each stage over {len(spread['seeds'])} "
                      f"runs of the default settings, stage 0 trained with seeds {seeds} "
                      f"(the shipped `hsft/stages/default_spread.json`: {spread['machine']}, {spread['threads']} "
                      f"threads, {spread['date']}, on the {spread['split']}). {NOT_REPRODUCIBLE}"]
    for comparison in comparisons or []:
        lines += ["", f"{comparison['after']} - {comparison['before']} (same starting model, same steps; what "
                      f"differs is the training set): {_interval(comparison)}"]
    return lines + ["", "Per-path details, discrepancy and overlays: `eval/<stage>/eval.md`.", ""]
