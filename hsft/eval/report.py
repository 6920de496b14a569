"""The evaluation report: eval.json (the summary), eval.md (tables for people), per_sample.csv."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hsft.eval.records import METRIC_NAMES, PATH_TITLES, PATHS, TEACHER_FORCED

__all__ = ["visible_text", "format_summary_table", "format_markdown", "format_csv", "write_report", "write_text"]


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def visible_text(text: str) -> str:
    """Generated text on one line: newlines, tabs and carriage returns written as escapes, so an
    answer of blank lines shows up as such instead of as empty space or a broken row."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _code(text: str) -> str:
    """Generated text as inline code in a table cell (pipes and backticks would break the table)."""
    cleaned = visible_text(text).replace("|", "\\|").replace("`", "'")
    return f"`{cleaned}`" if cleaned else "(empty)"


def format_summary_table(summary: dict) -> str:
    lines = ["| path | Dice | IoU | sensitivity | specificity | precision | pooled Dice |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for path in PATHS:
        row = summary["paths"][path]
        cells = " | ".join(_num(row[name]) for name in METRIC_NAMES)
        lines.append(f"| {PATH_TITLES[path]} | {cells} | {_num(row['pooled']['dice'])} |")
    return "\n".join(lines)


def _generate_section(summary: dict) -> list[str]:
    gen, n = summary["generate"], summary["n"]
    lines = ["## Generate path", "",
             f"- `[SEG]` emitted by {gen['emitted']} of {n} samples (rate {gen['seg_rate']:.3f}); "
             f"misses: {gen['misses']} (each scored as an empty mask)",
             f"- answers with more than one `[SEG]`: {gen['multi_seg']} (the first one's state is decoded)",
             f"- distinct answers: {gen['distinct_texts']}; most frequent:"]
    lines += [f"  - {_code(row['text'])} x {row['count']}" for row in gen["texts"]]
    if gen["miss_ids"]:
        shown = ", ".join(gen["miss_ids"][:20]) + (" ..." if len(gen["miss_ids"]) > 20 else "")
        lines.append(f"- samples without `[SEG]`: {shown}")
    return lines + [""]


def _discrepancy_section(summary: dict) -> list[str]:
    disc, gen = summary["discrepancy"], summary["generate"]
    settings = summary["settings"]
    confidence = round(100 * disc["pairs"][TEACHER_FORCED[0]]["dice_difference"]["confidence"])
    lines = ["## Discrepancy: teacher-forced paths vs generate", "",
             f"`[SEG]` emission rate of generate: {gen['seg_rate']:.3f} ({gen['misses']} misses). Cosines are "
             "over the samples where generate emitted a `[SEG]`; Dice differences are generate minus the "
             f"teacher-forced path, with a paired bootstrap {confidence}% interval "
             f"({settings['bootstrap_resamples']} resamples, seed {settings['bootstrap_seed']}).", "",
             "| vs generate | cosine [SEG] state mean / min | cosine decoder prompt mean / min "
             f"| mask agreement Dice mean / min | mean Δ Dice (gen - path) | {confidence}% CI | flips at tau |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for path in TEACHER_FORCED:
        pair = disc["pairs"][path]
        hidden, prompt, agree = pair["cosine_hidden"], pair["cosine_embedding"], pair["mask_agreement_dice"]
        diff = pair["dice_difference"]
        # Cosines get more digits: "~1" is the finding they exist for, and 4 digits round 0.99996 to 1.
        lines.append(
            f"| {path} | {_num(hidden['mean'], 6)} / {_num(hidden['min'], 6)} | {_num(prompt['mean'], 6)} / "
            f"{_num(prompt['min'], 6)} | {_num(agree['mean'])} / {_num(agree['min'])} "
            f"| {_num(diff['mean'], signed=True)} "
            f"| [{_num(diff['low'], signed=True)}, {_num(diff['high'], signed=True)}] | {len(pair['flips'])} |")
    lines.append("")
    for path in TEACHER_FORCED:
        flips = disc["pairs"][path]["flips"]
        lines.append(f"Hard/easy label flips between {path} and generate at tau = {disc['tau']}: {len(flips)}")
        if flips:
            lines += ["", f"| sample | {path} Dice | generate Dice | label |", "|---|---:|---:|---|"]
            lines += [f"| {f['id']} | {_num(f[path])} | {_num(f['generate'])} | {f['from']} -> {f['to']} |"
                      for f in flips]
        lines.append("")
    return lines


def _per_sample_section(summary: dict) -> list[str]:
    lines = ["## Per sample (worst generate Dice first)", "",
             "| sample | forward | prompt | generate | Δ gen - fwd | [SEG] | answer |",
             "|---|---:|---:|---:|---:|---|---|"]
    rows = sorted(summary["samples"], key=lambda r: (r["scores"]["generate"]["dice"], r["index"]))
    for row in rows:
        dice = {path: row["scores"][path]["dice"] for path in PATHS}
        seg = "yes" if row["seg_emitted"] else "**miss**"
        if row["num_seg"] > 1:
            seg += f" (x{row['num_seg']})"
        lines.append(f"| {row['id']} | {_num(dice['forward'])} | {_num(dice['prompt'])} | {_num(dice['generate'])} | "
                     f"{_num(dice['generate'] - dice['forward'], signed=True)} | {seg} | {_code(row['text'])} |")
    return lines + [""]


def format_markdown(summary: dict, overlay_files: list[str] | None = None) -> str:
    n, fov = summary["n"], summary["with_fov"]
    scope = (f"inside the field of view ({fov} of {n} samples have one)" if fov else "over all pixels (no FOV masks)")
    lines = [f"# Evaluation: {summary['title']}", "",
             f"{n} samples. Dice and IoU per image at the original resolution, {scope}; the tables show "
             "means over images (pooled Dice: all pixels of the split together). Masks: "
             f"{summary['settings']['threshold']}. Generation: greedy, at most "
             f"{summary['settings']['max_new_tokens']} new tokens.", "",
             "## Summary", "", format_summary_table(summary), ""]
    lines += _generate_section(summary)
    lines += _discrepancy_section(summary)
    if overlay_files:
        lines += ["## Overlays", "", "Green: true positive, red: false positive, blue: false negative.", ""]
        lines += [f"- [{name}](overlays/{name})" for name in overlay_files]
        lines.append("")
    lines += _per_sample_section(summary)
    return "\n".join(lines)


def format_csv(summary: dict) -> str:
    """One row per sample, in evaluation order."""
    header = ["index", "id", "source", "height", "width", "has_fov"]
    header += [f"{path}_{name}" for path in PATHS for name in METRIC_NAMES]
    header += [f"delta_generate_minus_{path}" for path in TEACHER_FORCED]
    header += ["seg_emitted", "num_seg", "text"]
    for kind in ("cosine_hidden", "cosine_embedding", "agreement_dice"):
        header += [f"{kind}_{path}" for path in TEACHER_FORCED]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in summary["samples"]:
        scores = row["scores"]
        values = [row["index"], row["id"], row["source"], row["height"], row["width"], int(row["has_fov"])]
        values += [f"{scores[path][name]:.6f}" for path in PATHS for name in METRIC_NAMES]
        values += [f"{scores['generate']['dice'] - scores[path]['dice']:.6f}" for path in TEACHER_FORCED]
        values += [int(row["seg_emitted"]), row["num_seg"], visible_text(row["text"])]
        for kind in ("cosine_hidden", "cosine_embedding", "agreement_dice"):
            values += ["" if row[kind][path] is None else f"{row[kind][path]:.6f}" for path in TEACHER_FORCED]
        writer.writerow(values)
    return buffer.getvalue()


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file, so a reader never sees a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(out_dir: Path, summary: dict, overlay_files: list[str] | None = None) -> None:
    out_dir = Path(out_dir)
    write_text(out_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
    write_text(out_dir / "eval.md", format_markdown(summary, overlay_files))
    write_text(out_dir / "per_sample.csv", format_csv(summary))
