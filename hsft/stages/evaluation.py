"""The evaluation stage: every model of the run (the starting model and each training stage's output)
through the evaluator (hsft.eval) on the held-out split, which no stage trains or mines on: the untouched
test split when the synthetic data has one (hsft.data.splits), else the test split.

Each training stage's held-out effect is measured against the model that stage started from, on the
same samples: the mean per-image Dice difference with a 95 % interval over the images
(hsft.eval.statistics.effect_interval with one seed). That interval covers the images only, for this
pair of checkpoints: another seed or another stage 0 trains other checkpoints, and the study
(launch/experiments.py) measures that spread. When both a stage and a variant beside it ran (HSFT and its
matched-compute control), the stage is also compared with the variant directly.

For the embedded default the report (hsft.stages.report) also shows, per stage, the range of that Δ over
stage-0 seeds, read from a table shipped beside this module (`default_spread.json`, written by the study:
launch/experiments.py writes `stage_spread.json`), with the seeds, machine and threads that measured it. The
embedded default is not bit-reproducible across thread counts and CPUs: another summation order (threads,
vector width) rounds stage 0's sums differently, training amplifies that into another stage 0, and every later
stage inherits it. A single run is one realisation of that spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsft.config import EvalConfig, MiningConfig
from hsft.engine.context import RunContext
from hsft.eval import evaluate_model
from hsft.eval.statistics import effect_interval
from hsft.model import load_model
from hsft.stages.training import StageResult


@dataclass(frozen=True)
class RunModel:
    """A model of the run, as the pipeline hands it to this stage: its label (the stage that produced it,
    or "start"), its directory, the directory its stage started from (its effect is measured against
    that model), and the stage it sits beside when it is a variant (compared with that stage directly)."""

    label: str
    model_dir: Path
    started_from: Path | None = None
    beside: str | None = None


def _per_sample_dice(summary: dict) -> list[float]:
    return [row["scores"]["generate"]["dice"] for row in sorted(summary["samples"], key=lambda r: r["index"])]


def _effect(before: list[float], after: list[float], cfg: EvalConfig) -> dict:
    """after - before on the same images, one pair of checkpoints: the images-only interval."""
    return effect_interval(np.asarray(after) - np.asarray(before), seed=cfg.bootstrap_seed,
                           resamples=cfg.bootstrap_resamples)


def run(ctx: RunContext, cfg: EvalConfig, start: Path | None, models: Sequence[RunModel],
        mining: MiningConfig) -> StageResult:
    """Evaluate `models` (the pipeline's list of the run's models, in order) on the held-out split; `start`
    is the model the run hands on, which is among them. The hard/easy threshold of the flips is
    `cfg.tau`, else the mining stage's (`mining`), so evaluation and mining call the same samples hard."""
    cfg = cfg.following(mining)
    rows, dice = [], {}
    label_of = {Path(m.model_dir): m.label for m in models}
    split_name, samples = ctx.splits.report_split()
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
        # A variant against the stage it sits beside, on the same images: that stage minus the variant.
        beside = row["beside"]
        row["beside_effect"] = _effect(dice[row["stage"]], dice[beside], cfg) if beside in dice else None
    return StageResult(summary=rows, written={"evaluation": str(ctx.stage_dir("eval"))})
