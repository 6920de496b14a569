"""report.md, rendered from the stages' results: every sentence of the run's report is written here.

A stage returns data (`StageResult.summary`: its steps, losses before and after, what it trained, its
pairs, its evidence), which is its entry in report.json and is kept in `<stage>/stage_result.json`, so a
resumed run renders the stages it skipped exactly as the run that ran them. This module turns those
summaries into the report's parts:

    NOTES     stage -> its bullet lines under "## Stages" (also recorded beside the stage's resources)
    SECTIONS  stage -> a section of its own (the mining table, the held-out results)

and joins them with the run's header into report.md (`format_report`); `console_summary` is what the
console shows of it. A stage with no entry in either table has no lines of its own in report.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hsft.data.splits import split_description
from hsft.engine.verbosity import is_verbose
from hsft.model.directory import EMBEDDED_DESCRIPTION
from hsft.stages.mining import table_lines

if TYPE_CHECKING:
    from hsft.config import RunConfig
    from hsft.stages.training import StageResult

# The fine-tuning stages (HSFT and the variants beside it) by name, as report.md names them.
TITLES = {"hsft": "HSFT", "control": "Control", "all_data": "Full fine-tuning", "curriculum": "Curriculum",
          "anti_curriculum": "Anti-curriculum", "loss_weighted": "Loss-weighted sampling",
          "easy_control": "Easy-only control"}
SEG_SOURCES = {"response": "teacher-forced input, [SEG] in the response", "prompt": "teacher-forced input, [SEG] "
               "in the prompt", "generate": "generate path (as inference computes it)"}
DEFAULT_SPREAD = Path(__file__).with_name("default_spread.json")
NOT_REPRODUCIBLE = ("The embedded default is not bit-reproducible across thread counts and CPUs: another summation "
                    "order (threads, vector width) rounds stage 0's sums differently, training amplifies that into "
                    "another stage 0, and every later stage inherits it. This run is one realisation.")


# --- the stages' notes --------------------------------------------------------------------------------

def base_notes(name: str, summary: dict) -> list[str]:
    encoder_pool = summary.get("encoder_pool_size")
    trained = ("the SAM2 image encoder and mask decoder on "
               f"{encoder_pool} images of every colour style (mask loss, as SAM2 is pre-trained on broad "
               "data); then every other module, the image encoder frozen" if encoder_pool
               else "every module of the tiny preset")
    dilation = summary.get("source_mask_dilation")
    return [f"- base: stand-in pre-training: {trained}, on CE + Dice/BCE over {summary['pool_size']} "
            + ("source-domain images (desaturated colours, clean and easy; not the target domain)"
               if summary["source"] == "other-style" else "images of the target distribution")
            + (f" with vessel masks {dilation} px wider than the target's annotation" if dilation else "")
            + ("; each asked for its vessels, its optic disc and its field of view, in words unlike the target's "
               "question (referring segmentation)" if summary.get("referring") else "")
            + f"; cached at `{summary['cache']}`"]


def lora_notes(name: str, summary: dict) -> list[str]:
    note = (f"- LoRA: {summary['optimizer_steps']} optimizer steps on {summary['samples']} samples; trains "
            f"{summary['trains']}; everything else frozen")
    if summary.get("first_loss") is not None:
        note += f"; loss {summary['first_loss']:.4f} (first step) -> {summary['last_loss']:.4f} (last step)"
    return [note]


def dpo_evidence(summary: dict) -> str:
    """What the DPO stage learned, over its pairs after training (its report line and its console line)."""
    return (f"  - {summary['optimizer_steps']} optimizer steps; over the {summary['pairs']} pairs after training: "
            f"DPO loss {summary['pair_loss']:.4f} (log 2 = {math.log(2):.4f} at the start), reward accuracy "
            f"{summary['pair_reward_accuracy']:.2f} (0 at the start), mean reward margin "
            f"{summary['pair_reward_margin']:+.4f}")


def dpo_notes(name: str, summary: dict) -> list[str]:
    note = (f"- DPO: {summary['pairs']} preference pairs of {summary['samples']} training samples (Dice < "
            f"{summary['pair_threshold']}), {summary['loss']} loss, beta {summary['beta']}, "
            f"{summary['normalisation']} normalisation")
    if summary.get("skipped"):
        return [note + " -- skipped: no pair"]
    return [note + "; trains text_hidden_fcs and the SAM2 mask decoder with its prompt encoder (conv_s0/conv_s1 "
            "frozen), against the frozen input model as reference", dpo_evidence(summary)]


def fine_tune_evidence(summary: dict) -> str:
    """The hard set's loss before and after a fine-tuning stage (its report line and its console line)."""
    by_epoch = list(summary["hard_set_loss_by_epoch"].items())
    shown = [by_epoch[0], by_epoch[-1]] if len(by_epoch) > 1 else by_epoch[-1:]
    evidence = (f"  - {summary['optimizer_steps']} optimizer steps; loss over the hard set ({summary['hard_set']} "
                f"samples): {summary['hard_set_loss_before']:.4f} before, "
                + ", ".join(f"{loss:.4f} after epoch {epoch}" for epoch, loss in shown))
    if "train_set_loss_before" in summary:
        evidence += (f"; over its own training pool: {summary['train_set_loss_before']:.4f} -> "
                     f"{summary['train_set_loss_after']:.4f}")
    return evidence


def fine_tune_notes(name: str, summary: dict) -> list[str]:
    note = (f"- {TITLES[name]}: {summary['samples']} samples an epoch ({summary['training_set']}); trains "
            f"{summary['trains']}; frozen-feature cache {'on' if summary['cache'] else 'off'}; [SEG] state from the "
            f"{SEG_SOURCES[summary['seg_form']]}")
    if summary.get("skipped"):
        return [note + " -- skipped: empty hard set"]
    return [note, fine_tune_evidence(summary)]


def iterative_notes(name: str, summary: dict) -> list[str]:
    rounds = summary["rounds"]
    return ([f"- Iterative HSFT: {len(rounds)} rounds of mining then fine-tuning on that round's hard set, "
             f"{summary['optimizer_steps']} optimizer steps in all"]
            + [f"  - round {r['round']}: {r['hard']} hard samples, {r['optimizer_steps'] or 0} optimizer steps"
               for r in rounds])


def unet_notes(name: str, summary: dict) -> list[str]:
    val_dice = summary["val_dice"]
    return [f"- unet: reference, MONAI UNet ({summary['parameters'] / 1e6:.2f} M parameters, channels "
            f"{summary['channels']}, {summary['res_units']} residual units a level) from scratch on the "
            f"{summary['train_samples']} training images, Dice + BCE in the FOV, {summary['epochs']} epochs "
            f"({summary['optimizer_steps']} steps) until validation Dice stopped improving for {summary['patience']} "
            f"epochs; kept epoch {summary['best_epoch']}"
            + (f" (validation Dice {val_dice:.4f})" if val_dice is not None else " (no validation split: lowest loss)")
            + f"; Dice {summary['dice']:.4f} on the {summary['split']} split ({summary['n']} images)"]


NOTES: dict[str, Callable[[str, dict], list[str]]] = {
    "base": base_notes, "lora": lora_notes, "dpo": dpo_notes, **{name: fine_tune_notes for name in TITLES},
    "iterative": iterative_notes, "unet": unet_notes}


def stage_notes(name: str, summary: dict | list) -> list[str]:
    """The stage's bullet lines under "## Stages" ([] for a stage that has none)."""
    render = NOTES.get(name)
    return render(name, summary) if render is not None else []


# --- the stages' sections -----------------------------------------------------------------------------

def mining_section(summary: dict, cfg: RunConfig) -> list[str]:
    return (["## Hard-sample mining (training split)", ""] + table_lines(summary["table"])
            + ["", f"Hard set ({summary['rule']}): {summary['hard']} of {summary['total']} training samples.", ""])


def shipped_spread(path: Path = DEFAULT_SPREAD) -> dict | None:
    """The shipped per-stage Δ ranges over stage-0 seeds, or None when the package has none."""
    return json.loads(path.read_text()) if path.is_file() else None


def _interval(effect: dict | None) -> str:
    if effect is None or effect["mean"] is None:
        return "-"
    return f"{effect['mean']:+.4f} [{effect['low']:+.4f}, {effect['high']:+.4f}]"


def _range(spread: dict | None, stage: str) -> str:
    entry = (spread or {}).get("stages", {}).get(stage)
    return f"[{entry['min']:+.4f}, {entry['max']:+.4f}]" if entry else "-"


def results_table(rows: list[dict], split: str = "held-out split", spread: dict | None = None) -> list[str]:
    """The held-out results: every evaluated model's row, each variant's comparison with the stage it sits
    beside (`beside_effect`), and, with `spread`, each stage's range over stage-0 seeds."""
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
                      f"thread{'s' if spread['threads'] != 1 else ''}, {spread['date']}, on the {spread['split']}). {NOT_REPRODUCIBLE}"]
    for row in rows:
        if row.get("beside_effect") is not None:
            lines += ["", f"{row['beside']} - {row['stage']} (same starting model, same steps; what differs is the "
                          f"training set): {_interval(row['beside_effect'])}"]
    return lines + ["", "Per-path details, discrepancy and overlays: `eval/<stage>/eval.md`.", ""]


def evaluation_section(rows: list[dict], cfg: RunConfig) -> list[str]:
    split = split_description(rows[0]["split"], rows[0]["n"], cfg.data) if rows else "held-out split"
    spread = shipped_spread() if cfg.embedded_default else None
    section = results_table(rows, split, spread)
    if cfg.embedded_default and spread is None:
        section[-1:-1] = [NOT_REPRODUCIBLE, ""]
    return section


SECTIONS: dict[str, Callable[[dict | list, RunConfig], list[str]]] = {
    "mining": mining_section, "eval": evaluation_section}


def stage_section(name: str, summary: dict | list, cfg: RunConfig) -> list[str]:
    """The stage's own section of report.md ([] for a stage that has none)."""
    render = SECTIONS.get(name)
    return render(summary, cfg) if render is not None else []


# --- report.md ----------------------------------------------------------------------------------------

def predict_command(model: Path, out: Path) -> str:
    return f"python launch/predict.py --checkpoint {model} --output-dir {out / 'predictions'} IMAGE [IMAGE ...]"


def format_report(cfg: RunConfig, report: dict, results: dict[str, StageResult]) -> str:
    """report.md: the run's header (from report.json's facts), then each stage's section (the held-out
    results first, then pipeline order), the stages' notes, where everything is, and the model to use next."""
    data = report["data"]
    lines = ["# hsft run report", "", f"Output directory: `{report['output_dir']}`  ",
             f"Started from: {report['start']}  ", f"Stages: {', '.join(report['stages'])}  ",
             f"Recipe: {report['recipe'] or 'none (the configs as given)'}  ",
             f"Held-out split: {data['test']} samples ({data['format']}); training split {data['train']}, "
             f"validation {data['val']}", ""]
    ordered = sorted(results, key=lambda name: name != "eval")  # results lead, then pipeline order
    for name in ordered:
        lines += stage_section(name, results[name].summary, cfg)
    notes = [note for name, result in results.items() for note in stage_notes(name, result.summary)]
    if notes:
        lines += ["## Stages", ""] + notes + [""]
    lines += ["## Where things are", ""]
    for label, path in report["written"].items():
        lines.append(f"- {label}: `{path}`")
    lines += ["", f"TensorBoard: `tensorboard --logdir {Path(report['output_dir']) / 'tb'}`", ""]
    final = report.get("final_model")
    if final:
        lines += ["## The model to use next", "",
                  f"`{final}`: the last model this run hands on (variants beside HSFT are evaluated, not handed on)."]
        if cfg.embedded_default:
            lines.append(f"It is {EMBEDDED_DESCRIPTION}.")
        lines += ["", f"Predict with it: `{predict_command(Path(final), Path(report['output_dir']))}`", ""]
    return "\n".join(lines)


def console_summary(report_md: str, out: Path) -> str:
    """What the console shows of report.md: its header and first section (the held-out results) and the
    model to use next, then where the whole report is; with --verbose, the whole report."""
    if is_verbose():
        return report_md
    sections = report_md.split("\n## ")
    keep = sections[:2] + [s for s in sections[2:] if s.startswith("The model to use next")]
    return "\n\n## ".join(s.strip("\n") for s in keep) + f"\n\nThe whole report: {out / 'report.md'}"
