"""Checkpoint comparison on the same samples: the per-sample table in the published form.

Each sample is labelled by its 'before' Dice (Easy at or above tau, Hard below), then by its change:
Better when after - before > tolerance, Worse when < -tolerance, Stable otherwise.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hsft.eval.report import write_text
from hsft.eval.statistics import paired_bootstrap

__all__ = ["DIFFICULTIES", "CHANGES", "categorise", "compare_summaries", "format_comparison", "write_comparison"]

DIFFICULTIES = ("Easy", "Hard")
CHANGES = ("Better", "Stable", "Worse")


# Slack on the tolerance test: a difference of exactly the tolerance (0.89 vs 0.90) is Stable as
# stated, even though the subtraction lands a few ulps beyond it.
_ROUNDING_SLACK = 1e-12


def categorise(before: float, after: float, *, tau: float, tolerance: float) -> tuple[str, str]:
    difficulty = "Hard" if before < tau else "Easy"
    delta = after - before
    if delta > tolerance + _ROUNDING_SLACK:
        change = "Better"
    elif delta < -tolerance - _ROUNDING_SLACK:
        change = "Worse"
    else:
        change = "Stable"
    return difficulty, change


def compare_summaries(before: dict, after: dict, *, tau: float, tolerance: float, path: str = "generate",
                      before_name: str = "before", after_name: str = "after", resamples: int = 2000,
                      seed: int = 0) -> dict:
    """Per-sample Dice of `path` in two evaluation summaries of the same samples."""
    before_rows = {row["id"]: row for row in before["samples"]}
    after_rows = {row["id"]: row for row in after["samples"]}
    if set(before_rows) != set(after_rows):
        only_before = sorted(set(before_rows) - set(after_rows))[:5]
        only_after = sorted(set(after_rows) - set(before_rows))[:5]
        raise ValueError(f"compare: the two evaluations cover different samples (only in {before_name}: "
                         f"{only_before}, only in {after_name}: {only_after})")
    rows = []
    counts = {d: {c: 0 for c in CHANGES} for d in DIFFICULTIES}
    for row in before["samples"]:
        sample_id = row["id"]
        b = float(row["scores"][path]["dice"])
        a = float(after_rows[sample_id]["scores"][path]["dice"])
        difficulty, change = categorise(b, a, tau=tau, tolerance=tolerance)
        counts[difficulty][change] += 1
        rows.append({"id": sample_id, "before": b, "after": a, "delta": a - b, "difficulty": difficulty,
                     "change": change, "category": f"{difficulty} -> {change}"})
    befores, afters = [r["before"] for r in rows], [r["after"] for r in rows]
    return {
        "path": path, "before": before_name, "after": after_name, "tau": tau, "tolerance": tolerance, "n": len(rows),
        "mean_before": sum(befores) / len(rows), "mean_after": sum(afters) / len(rows),
        "delta": paired_bootstrap(befores, afters, resamples=resamples, seed=seed),
        "counts": counts, "rows": rows,
    }


def format_comparison(comparison: dict) -> str:
    c = comparison
    delta = c["delta"]
    lines = [f"# Checkpoint comparison ({c['path']} path Dice)", "",
             f"before: `{c['before']}`  ", f"after: `{c['after']}`  ",
             f"{c['n']} samples. Category: Easy when the before Dice >= tau = {c['tau']}, else Hard; then Better "
             f"when delta > {c['tolerance']}, Worse when delta < -{c['tolerance']}, Stable otherwise "
             f"(tolerance {c['tolerance']}).", "",
             f"Mean Dice {c['mean_before']:.4f} -> {c['mean_after']:.4f}, delta {delta['mean']:+.4f} "
             f"(paired bootstrap {round(100 * delta['confidence'])}% CI [{delta['low']:+.4f}, {delta['high']:+.4f}], "
             f"{delta['resamples']} resamples)", "",
             "| | Better | Stable | Worse |", "|---|---:|---:|---:|"]
    for difficulty in DIFFICULTIES:
        row = c["counts"][difficulty]
        lines.append(f"| {difficulty} | {row['Better']} | {row['Stable']} | {row['Worse']} |")
    lines += ["", "| sample | before | after | delta | category |", "|---|---:|---:|---:|---|"]
    for row in c["rows"]:
        lines.append(f"| {row['id']} | {row['before']:.4f} | {row['after']:.4f} | {row['delta']:+.4f} | "
                     f"{row['category']} |")
    return "\n".join(lines) + "\n"


def _format_csv(comparison: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample", "before", "after", "delta", "category"])
    for row in comparison["rows"]:
        writer.writerow([row["id"], f"{row['before']:.6f}", f"{row['after']:.6f}", f"{row['delta']:.6f}",
                         row["category"]])
    return buffer.getvalue()


def write_comparison(out_dir: Path, comparison: dict) -> None:
    """`out_dir/comparison.{json,md,csv}`."""
    out_dir = Path(out_dir)
    write_text(out_dir / "comparison.json", json.dumps(comparison, indent=2) + "\n")
    write_text(out_dir / "comparison.md", format_comparison(comparison))
    write_text(out_dir / "comparison.csv", _format_csv(comparison))
