"""Aggregate several runs' report.json files: one row per group of runs (e.g. one method over several
seeds), the held-out Dice of the first and last evaluated stage and the change, as mean +- std.

A single run's delta says little on a small held-out split; comparing a method with its matched-compute
control over several seeds is what an experiment needs.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from hsft.errors import BadValue


class RunsError(BadValue):
    pass


@dataclass
class RunResult:
    path: Path
    seed: int
    stages: list[str]
    start_dice: float
    end_dice: float
    end_iou: float

    @property
    def delta(self) -> float:
        return self.end_dice - self.start_dice


def read_run(run_dir: str | Path) -> RunResult:
    """One run's first evaluated stage and where it ends: the last stage of its main line, or the stage
    named after a colon (`runs/a:control` ends at the control's row, a variant beside the main line)."""
    text, stage = str(run_dir), None
    if ":" in text and not Path(text).exists():
        text, stage = text.rsplit(":", 1)
    path = Path(text)
    report_path = path / "report.json" if path.is_dir() else path
    if not report_path.is_file():
        raise RunsError(f"{run_dir}: no report.json (not an hsft output directory, or the run did not finish)")
    report = json.loads(report_path.read_text())
    every = report.get("evaluation") or []
    if not every:
        raise RunsError(f"{report_path}: holds no evaluation; run the 'eval' stage")
    if stage is None:
        # A variant evaluated beside the main line (the control) is not where the run ends.
        end = [row for row in every if not row.get("beside")][-1]
    else:
        named = [row for row in every if row["stage"] == stage]
        if not named:
            raise RunsError(f"{run_dir}: the run evaluated no stage {stage!r} (it has "
                            f"{', '.join(row['stage'] for row in every)})")
        end = named[0]
    return RunResult(path=report_path.parent, seed=report.get("seed", -1), stages=[every[0]["stage"], end["stage"]],
                     start_dice=every[0]["dice"], end_dice=end["dice"], end_iou=end["iou"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_groups(groups: dict[str, list[str | Path]]) -> list[dict]:
    rows = []
    for label, dirs in groups.items():
        runs = [read_run(d) for d in dirs]
        start, start_sd = _mean_std([r.start_dice for r in runs])
        end, end_sd = _mean_std([r.end_dice for r in runs])
        delta, delta_sd = _mean_std([r.delta for r in runs])
        rows.append({"group": label, "runs": len(runs), "seeds": [r.seed for r in runs],
                     "stages": runs[0].stages, "start_dice": start, "start_dice_std": start_sd,
                     "end_dice": end, "end_dice_std": end_sd, "delta": delta, "delta_std": delta_sd,
                     "deltas": [r.delta for r in runs], "runs_dirs": [str(r.path) for r in runs]})
    return rows


def format_groups(rows: list[dict]) -> str:
    lines = ["| group | runs (seeds) | first stage Dice | last stage Dice | change | per run |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        seeds = ", ".join(str(s) for s in r["seeds"])
        per_run = " ".join(f"{d:+.4f}" for d in r["deltas"])
        lines.append(f"| {r['group']} | {r['runs']} ({seeds}) | {r['start_dice']:.4f} +- {r['start_dice_std']:.4f} "
                     f"| {r['end_dice']:.4f} +- {r['end_dice_std']:.4f} | {r['delta']:+.4f} +- {r['delta_std']:.4f} "
                     f"| {per_run} |")
    lines.append("")
    lines.append("Held-out generate-path Dice (mean +- sample std over runs); change = last - first evaluated stage.")
    return "\n".join(lines)
