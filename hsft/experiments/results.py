"""The suite's results from its run directories: every table's cells, statistics and plain verdicts.

Every cell is the mean +- sd over seeds of a run's held-out Dice (generate path, per image, mean over
images). Every difference is paired: the same held-out images under two models in every seed, a
(seeds, images) array of differences whose interval treats seeds and images as crossed random factors
(hsft.eval.statistics.effect_interval), so it covers what changes with another run (another training seed
and, unless stage 0 is shared, another stage 0) as well as other images; each seed's value is listed too.
Each difference also carries the smallest effect its design detects (80 % power, 5 % level), and a
"no measurable change" verdict is stated as "smaller than" that bound. Nothing here reads the held-out
split to choose anything: the picked-tau row chooses by validation Dice.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hsft.config import RunConfig
from hsft.data.splits import split_description
from hsft.engine.files import write_json
from hsft.eval.compare import CHANGES, DIFFICULTIES, categorise
from hsft.eval.statistics import detectable_effect, effect_interval
from hsft.experiments.suites import Arm, Suite, Table

__all__ = ["collect", "write_results", "format_results", "write_per_sample_csv", "RunReader", "stage_spread"]

STAGE_ROWS = (("start", "starting model"), ("lora", "LoRA"), ("dpo", "DPO"), ("hsft", "HSFT"))


class RunReader:
    """Reads what one run directory holds: per-sample held-out Dice of each evaluated model, a stage's
    metrics, the hard set's size. Missing files stop with the path named."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)

    def _json(self, *parts: str) -> dict:
        path = self.dir.joinpath(*parts)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; was the run interrupted? Run the same command again to finish it")
        return json.loads(path.read_text())

    def per_sample(self, label: str) -> dict[str, tuple[float, float]]:
        """{sample id: (generate-path Dice, forward-path Dice)} of the model evaluated as `label` (by the
        evaluation stage, or by a stage that evaluates its own model, such as the U-Net reference)."""
        own = self.dir / label / "eval.json"
        summary = self._json(label, "eval.json") if own.is_file() else self._json("eval", label, "eval.json")
        return {row["id"]: (float(row["scores"]["generate"]["dice"]), float(row["scores"]["forward"]["dice"]))
                for row in summary["samples"]}

    def stage_metrics(self, stage: str) -> dict:
        if stage == "iterative":  # the last round's fine-tuning carries the epoch metrics
            rounds = self._json("iterative", "metrics.json")["rounds"]
            last = self._json("iterative", f"round{rounds[-1]['round']}", "hsft", "metrics.json")
            return {**last, "optimizer_steps": sum(r["optimizer_steps"] or 0 for r in rounds)}
        return self._json(stage, "metrics.json")

    def val_dice(self, stage: str) -> float | None:
        """The validation Dice of the model the stage kept: its own "val_dice" when it keeps the best epoch
        (the U-Net reference), else its last epoch's."""
        metrics = self.stage_metrics(stage)
        if "val_dice" in metrics:
            return metrics["val_dice"]
        epochs = metrics.get("epochs") or []
        return epochs[-1].get("val_dice") if epochs else None

    def hard_count(self) -> int:
        return int(self._json("mining", "hard_samples.json")["hard_count"])

    def train_dice(self, file: str) -> float | None:
        path = self.dir / file
        return json.loads(path.read_text())["mean"] if path.is_file() else None


def cpu_model() -> str:
    """The CPU's model name (as lscpu shows it), for the record of what measured a number."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mean_sd(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0, "n": int(array.size)}


def _paired(before: dict[int, dict[str, tuple]], after: dict[int, dict[str, tuple]], cfg: RunConfig,
            images: list[str] | None = None) -> dict:
    """after - before on the same held-out images in every seed (all of them, or `images`): the crossed
    seeds x images interval, with each seed's mean difference under its seed (str: as JSON keys)."""
    seeds = list(before)
    ids = sorted(before[seeds[0]]) if images is None else sorted(images)
    diffs = []
    for seed in seeds:
        if set(before[seed]) != set(after[seed]) or set(before[seed]) != set(before[seeds[0]]):
            raise ValueError(f"seed {seed}: the two evaluations cover different held-out images")
        diffs.append([after[seed][i][0] - before[seed][i][0] for i in ids])
    result = effect_interval(np.asarray(diffs, dtype=np.float64).reshape(len(seeds), len(ids)),
                             seed=cfg.eval.bootstrap_seed, resamples=cfg.eval.bootstrap_resamples)
    result["per_seed"] = {str(s): v for s, v in zip(seeds, result["per_seed"])}
    return result


def _dice(per_sample: dict[int, dict[str, tuple]]) -> dict:
    return _mean_sd([float(np.mean([v[0] for v in rows.values()])) for rows in per_sample.values()])


def _discrepancy(per_sample: dict[int, dict[str, tuple]]) -> float:
    """Mean |forward-path Dice - generate-path Dice| over images and seeds."""
    return float(np.mean([abs(f - g) for rows in per_sample.values() for g, f in rows.values()]))


# Other designs (seeds, held-out images) whose detectable effect a table states beside its own: what
# more seeds or a larger split would buy, from the variance components this study measured.
DESIGNS = ((3, 256), (5, 256), (10, 256), (20, 256), (5, 1024), (10, 1024))


def _detectable(effects: list[dict | None]) -> dict | None:
    """A table's smallest detectable effect: the median (and range) over its differences' bounds, and the
    median bound each design of DESIGNS would have with the same variance components (seeds >= 2 only:
    one seed measures no seed variance to plan with)."""
    usable = [e for e in effects if e and e.get("detectable") is not None]
    if not usable:
        return None
    bounds = [e["detectable"] for e in usable]
    result = {"median": float(np.median(bounds)), "min": float(min(bounds)), "max": float(max(bounds))}
    if all(e.get("seeds", 1) >= 2 for e in usable):
        result["designs"] = {f"{seeds}x{images}": float(np.median([detectable_effect(e["components"], seeds, images)
                                                                   for e in usable]))
                             for seeds, images in DESIGNS}
    return result


class _Study:
    def __init__(self, suite: Suite, seeds: list[int], out: Path, cfg: RunConfig):
        self.suite, self.seeds, self.out, self.cfg = suite, seeds, Path(out), cfg
        self.prefix = {s: RunReader(self.out / f"seed{s}" / "prefix") for s in seeds}
        self._hard_easy: tuple[list[str], list[str]] | None = None

    def hard_easy(self) -> tuple[list[str], list[str]]:
        """The held-out images split by difficulty: hard when the DPO model's Dice, averaged over seeds, is
        below mining's tau (one partition for every seed, so each part stays a seeds x images layout)."""
        if self._hard_easy is None:
            dpo = self.prefix_samples("dpo")
            tau = self.cfg.mining.tau
            ids = sorted(next(iter(dpo.values())))
            mean = {i: float(np.mean([dpo[s][i][0] for s in self.seeds])) for i in ids}
            self._hard_easy = ([i for i in ids if mean[i] < tau], [i for i in ids if mean[i] >= tau])
        return self._hard_easy

    def against_control(self, control: Arm, samples: dict) -> dict:
        """A row against its own random-subset control: on every held-out image, the hard ones and the easy ones."""
        theirs = self.samples(control)
        hard, easy = self.hard_easy()
        return {"all": _paired(theirs, samples, self.cfg),
                "hard": _paired(theirs, samples, self.cfg, hard) if len(hard) >= 2 else None,
                "easy": _paired(theirs, samples, self.cfg, easy) if len(easy) >= 2 else None,
                "hard_images": len(hard), "easy_images": len(easy), "control": control.label}

    def run_of(self, arm: Arm, seed: int) -> tuple[RunReader, str]:
        """The run directory and evaluation label holding the arm's model for this seed."""
        if arm.same_as:
            return self.prefix[seed], arm.same_as
        return RunReader(self.out / f"seed{seed}" / arm.name), arm.stage

    def samples(self, arm: Arm) -> dict[int, dict[str, tuple]]:
        return {s: reader.per_sample(label) for s in self.seeds for reader, label in [self.run_of(arm, s)]}

    def prefix_samples(self, label: str) -> dict[int, dict[str, tuple]]:
        return {s: self.prefix[s].per_sample(label) for s in self.seeds}

    # --- tables -------------------------------------------------------------------------------
    def stages(self, table: Table) -> dict:
        rows, previous = [], None
        base = self.prefix_samples("start")
        for label, title in STAGE_ROWS + (("control", "control (beside HSFT)"),):
            samples = self.prefix_samples(label)
            against = self.prefix_samples("dpo") if label == "control" else previous
            rows.append({"name": label, "row": title, "dice": _dice(samples),
                         "delta_prev": _paired(against, samples, self.cfg) if against is not None else None,
                         "delta_base": _paired(base, samples, self.cfg) if label != "start" else None,
                         "discrepancy": _discrepancy(samples)})
            if label != "control":
                previous = samples
        return {"rows": rows}

    def arms(self, table: Table) -> dict:
        start = self.prefix_samples("dpo")
        hsft = self.prefix_samples("hsft")
        rows = []
        for arm in table.arms:
            samples = self.samples(arm)
            per_seed = {}
            for seed in self.seeds:
                # The arm's own run directory (or the prefix's) holds its mining result, copied or mined.
                reader, stage = self.run_of(arm, seed)
                metrics = reader.stage_metrics(stage)
                per_seed[str(seed)] = {"val_dice": reader.val_dice(stage), "steps": metrics.get("optimizer_steps"),
                                       "hard": reader.hard_count() if arm.stage != "unet" else None,
                                  "train_dice": reader.train_dice("train_dice.json") if arm.train_dice else None}
            vals = [v["val_dice"] for v in per_seed.values() if v["val_dice"] is not None]
            trains = [v["train_dice"] for v in per_seed.values() if v["train_dice"] is not None]
            rows.append({"name": arm.name, "row": arm.label, "value": arm.value, "dice": _dice(samples),
                         "delta_start": _paired(start, samples, self.cfg),
                         "delta_hsft": None if arm.same_as == "hsft" else _paired(hsft, samples, self.cfg),
                         "vs_control": self.against_control(arm.control, samples) if arm.control else None,
                         "val_dice": _mean_sd(vals) if vals else None,
                         "train_dice": _mean_sd(trains) if trains else None,
                         "steps": _mean_sd([v["steps"] for v in per_seed.values()]),
                         "hard": (_mean_sd([v["hard"] for v in per_seed.values()])
                                  if all(v["hard"] is not None for v in per_seed.values()) else None),
                         "discrepancy": {"before": _discrepancy(start), "after": _discrepancy(samples)},
                         "seeds": per_seed})
        return {"rows": rows}

    def per_sample(self, table: Table) -> dict:
        tau, tolerance = self.cfg.eval_settings().threshold, self.cfg.eval.stable_tolerance
        before = self.prefix_samples("dpo")
        result = {"tau": tau, "tolerance": tolerance}
        for label in ("hsft", "control"):
            after = self.prefix_samples(label)
            counts = {d: {c: 0 for c in CHANGES} for d in DIFFICULTIES}
            rows = []
            for seed in self.seeds:
                for sample_id in sorted(before[seed]):
                    b, a = before[seed][sample_id][0], after[seed][sample_id][0]
                    difficulty, change = categorise(b, a, tau=tau, tolerance=tolerance)
                    counts[difficulty][change] += 1
                    rows.append({"seed": seed, "id": sample_id, "before": b, "after": a, "delta": a - b,
                                 "difficulty": difficulty, "change": change})
            result[label] = {"counts": counts, "rows": rows}
        return result

    def picked(self, table: Table) -> dict:
        source = self.suite.table(table.picks_from)
        start = self.prefix_samples("dpo")
        chosen, samples = {}, {}
        for seed in self.seeds:
            scored = []
            for arm in source.arms:
                reader, label = self.run_of(arm, seed)
                scored.append((reader.val_dice(label), arm))
            usable = [(v, arm) for v, arm in scored if v is not None]
            if not usable:
                return {"rows": [], "note": "no validation Dice was recorded (empty validation split)"}
            best = max(usable, key=lambda item: item[0])[1]  # the first of equal values: the grid's order
            chosen[str(seed)] = best.label
            reader, label = self.run_of(best, seed)
            samples[seed] = reader.per_sample(label)
        return {"rows": [{"name": "picked", "row": "picked on the validation split", "picks": chosen,
                          "dice": _dice(samples), "delta_start": _paired(start, samples, self.cfg),
                          "delta_hsft": _paired(self.prefix_samples("hsft"), samples, self.cfg)}]}


def _table_effects(body: dict) -> list[dict | None]:
    """The differences a table's verdict rests on (for its detectable-effect bound)."""
    rows = body.get("rows", [])
    if body["kind"] == "stages":
        return [r["delta_prev"] for r in rows]
    if body["kind"] in ("arms", "picked"):
        return [r["delta_start"] for r in rows] + [r.get("delta_hsft") for r in rows]
    return []


def _split_name(study: _Study) -> str:
    rows = study.prefix[study.seeds[0]]._json("report.json").get("evaluation") or []
    return rows[0].get("split", "test") if rows else "test"


def collect(suite: Suite, seeds: list[int], out: Path, cfg: RunConfig, *, reference: dict | None = None,
            shared_stage0: bool = False) -> dict:
    """results.json's content: every table of the suite, computed from the run directories."""
    study = _Study(suite, seeds, out, cfg)
    held_out = len(next(iter(study.prefix_samples("dpo").values())))
    split_name = _split_name(study)
    split = split_description(split_name, held_out, cfg.data)
    tables = {}
    for table in suite.tables:
        if table.kind == "stages":
            body = study.stages(table)
        elif table.kind == "per_sample":
            body = study.per_sample(table)
        elif table.kind == "arms":
            body = study.arms(table)
        elif table.kind == "picked":
            body = study.picked(table)
        else:
            raise ValueError(f"table {table.key}: unknown kind {table.kind!r}")
        body.update(key=table.key, title=table.title, kind=table.kind, note=table.note,
                    reference=(reference or {}).get(table.key), split=split, split_name=split_name)
        body["detectable"] = _detectable(_table_effects(body))
        body["verdict"] = verdict(body)
        tables[table.key] = body
    method = next((e["method"] for t in tables.values() for e in _table_effects(t) if e), None)
    stage0 = ("embedded default, trained per seed" if cfg.embedded_default and not shared_stage0 else
              "embedded default, one for every seed" if cfg.embedded_default else f"the given model {cfg.start_model}")
    return {"suite": suite.name, "seeds": list(seeds), "held_out_images": held_out, "split": split,
            "split_name": split_name, "stage0": stage0, "shared_stage0": shared_stage0, "method": method,
            "tau": cfg.mining.tau, "tables": tables}


# --- words -------------------------------------------------------------------------------------------

# The smoke suite runs a shrunken pipeline to check that every run, table and file is produced.
PLUMBING_ONLY = {"smoke"}


def _ci(effect: dict | None) -> str:
    if not effect or effect.get("mean") is None:
        return "-"
    if effect.get("low") is None:
        return f"{effect['mean']:+.4f}"
    return f"{effect['mean']:+.4f} [{effect['low']:+.4f}, {effect['high']:+.4f}]"


def _direction(effect: dict | None) -> str:
    """'up' / 'down' when the 95 % interval excludes 0, else 'unclear'."""
    if not effect or effect.get("low") is None:
        return "unclear"
    if effect["low"] > 0:
        return "up"
    if effect["high"] < 0:
        return "down"
    return "unclear"


def _bound(effect: dict | None) -> str:
    """'smaller than X' for an interval that contains 0 (X: its design's detectable effect)."""
    if not effect or effect.get("detectable") is None:
        return ""
    return f"; a true effect, if any, is likely smaller than {effect['detectable']:.4f}"


def _said(effect: dict | None, up: str, down: str, flat: str) -> str:
    direction = _direction(effect)
    word = {"up": up, "down": down, "unclear": flat}[direction]
    return f"{word} ({_ci(effect)}{_bound(effect) if direction == 'unclear' else ''})"


def _list(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def _picks(picks: dict[str, str]) -> str:
    return "; ".join(f"seed {seed}: {label}" for seed, label in picks.items())


def verdict(body: dict) -> str:
    """A short plain-language reading of a table, stated whichever way it falls; a difference whose interval
    contains 0 is stated as smaller than its detectable-effect bound, not as "no effect"."""
    kind, rows = body["kind"], body.get("rows", [])
    if kind == "stages":
        parts = []
        for row in rows[1:]:
            against = "DPO" if row["name"] == "control" else "the stage before"
            parts.append(f"{row['row']} against {against}: " + _said(row["delta_prev"], "raised Dice", "lowered Dice",
                                                                       "no measurable change"))
        return "; ".join(parts) + "."
    if kind == "per_sample":
        text = []
        for label in ("hsft", "control"):
            c = body[label]["counts"]
            text.append(f"{label}: of the hard images {c['Hard']['Better']} better / {c['Hard']['Worse']} worse, of the "
                        f"easy images {c['Easy']['Better']} better / {c['Easy']['Worse']} worse")
        return ("; ".join(text) + ". Hard images improving under the random-subset control as well is what regression "
                "to the mean and plain perturbation look like; only a difference between the two speaks for the hard set.")
    if kind in ("arms", "picked"):
        if not rows:
            return body.get("note", "nothing to compare.")
        up = [r["row"] for r in rows if _direction(r["delta_start"]) == "up"]
        down = [r["row"] for r in rows if _direction(r["delta_start"]) == "down"]
        beats = [r["row"] for r in rows if _direction(r.get("delta_hsft")) == "up"]
        loses = [r["row"] for r in rows if _direction(r.get("delta_hsft")) == "down"]
        best = max(rows, key=lambda r: r["dice"]["mean"])
        bound = body.get("detectable")
        text = (f"Against the DPO model they start from, Dice rose with {_list(up)} and fell with {_list(down)} "
                "(95 % intervals excluding 0); for the rest the change is smaller than these seeds and images can "
                f"detect" + (f" (about {bound['median']:.4f})" if bound else "") + ". "
                f"Highest mean: {best['row']} ({best['dice']['mean']:.4f}).")
        if any(r.get("delta_hsft") for r in rows):
            text += (f" Better than HSFT: {_list(beats)}; worse than HSFT: {_list(loses)}; every other row cannot be "
                     "told from HSFT here.")
        controlled = [r for r in rows if r.get("vs_control")]
        if controlled:
            text += " Against its own random subset (same size, steps and schedule): " + "; ".join(
                f"{r['row']} " + _said(r["vs_control"]["all"], "better", "worse", "no measurable difference")
                for r in controlled) + "."
        if kind == "picked":
            text += f" Picks: {_picks(rows[0]['picks'])}."
        return text
    return ""


def _reference_cell(body: dict, row: dict) -> str:
    table = body.get("reference") or {}
    value = table.get(row["name"], table.get(row["row"]))
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _dice_cell(row: dict) -> str:
    d = row["dice"]
    return f"{d['mean']:.4f} +- {d['sd']:.4f}"


def _per_seed(effect: dict | None) -> str:
    if not effect:
        return "-"
    return " ".join(f"{v:+.4f}" for v in effect["per_seed"].values())


def _detectable_cell(effect: dict | None) -> str:
    return f"{effect['detectable']:.4f}" if effect and effect.get("detectable") is not None else "-"


def format_table(body: dict) -> list[str]:
    lines = [f"## {body['key']}: {body['title']}", "", f"Split: {body.get('split', 'held-out split')}.", ""]
    if body.get("note"):
        lines += [body["note"], ""]
    if body.get("detectable"):
        d = body["detectable"]
        lines += [f"Smallest effect these seeds and images detect (80 % power, 5 % level): {d['median']:.4f} "
                  f"(median over the table's differences; {d['min']:.4f} to {d['max']:.4f}).", ""]
        if d.get("designs"):
            lines += ["With the same variance components, other designs would detect (seeds x held-out images): "
                      + ", ".join(f"{name} {bound:.4f}" for name, bound in d["designs"].items()) + ".", ""]
    ref = body.get("reference") is not None
    ref_head, ref_rule = (" | paper (reference) |", "---:|") if ref else (" |", "")
    if body["kind"] == "stages":
        lines += ["| stage | Dice | Δ previous [95% CI] | detectable | Δ baseline [95% CI] | per-seed Δ previous | "
                  "|forward - generate|" + ref_head, "|---|---:|---|---:|---|---|---:|" + ref_rule]
        for row in body["rows"]:
            lines.append(f"| {row['row']} | {_dice_cell(row)} | {_ci(row['delta_prev'])} | "
                         f"{_detectable_cell(row['delta_prev'])} | {_ci(row['delta_base'])} | "
                         f"{_per_seed(row['delta_prev'])} | {row['discrepancy']:.4f} |"
                         + (f" {_reference_cell(body, row)} |" if ref else ""))
    elif body["kind"] == "per_sample":
        lines += [f"Categories against the DPO model, pooled over seeds: Easy when its Dice >= tau = {body['tau']}, "
                  f"Hard below; Better / Worse when the change exceeds {body['tolerance']}.", "",
                  "| model | category | Better | Stable | Worse |", "|---|---|---:|---:|---:|"]
        for label in ("hsft", "control"):
            for difficulty in DIFFICULTIES:
                c = body[label]["counts"][difficulty]
                lines.append(f"| {label} | {difficulty} | {c['Better']} | {c['Stable']} | {c['Worse']} |")
        lines += ["", f"The per-sample table (every seed and image): `per_sample_{body['key']}.csv`."]
    else:
        extra = any(r.get("train_dice") for r in body["rows"])
        lines += ["| run | Dice | Δ vs DPO [95% CI] | detectable | per-seed Δ | Δ vs HSFT [95% CI] | val Dice | "
                  "hard set | steps | " + ("train Dice | " if extra else "") + "|fwd - gen| before -> after" + ref_head,
                  "|---|---:|---|---:|---|---|---:|---:|---:|" + ("---:|" if extra else "") + "---|" + ref_rule]
        for row in body["rows"]:
            val = f"{row['val_dice']['mean']:.4f}" if row.get("val_dice") else "-"
            hard = f"{row['hard']['mean']:.1f}" if row.get("hard") else "-"
            steps = f"{row['steps']['mean']:.0f}" if row.get("steps") else "-"
            train = (f" {row['train_dice']['mean']:.4f} |" if row.get("train_dice") else " - |") if extra else ""
            disc = row.get("discrepancy")
            disc_cell = f"{disc['before']:.4f} -> {disc['after']:.4f}" if disc else "-"
            lines.append(f"| {row['row']} | {_dice_cell(row)} | {_ci(row['delta_start'])} | "
                         f"{_detectable_cell(row['delta_start'])} | {_per_seed(row['delta_start'])} "
                         f"| {_ci(row.get('delta_hsft'))} | {val} | {hard} | {steps} |{train} {disc_cell} |"
                         + (f" {_reference_cell(body, row)} |" if ref else ""))
        controlled = [r for r in body["rows"] if r.get("vs_control")]
        if controlled:
            first = controlled[0]["vs_control"]
            lines += ["", "Each subset row against its own random-subset control (same size, steps and schedule), on "
                      f"every image, on the {first['hard_images']} hard and on the {first['easy_images']} easy images "
                      "(hard: the DPO model's Dice, averaged over seeds, below tau):", "",
                      "| run | Δ vs control, all [95% CI] | detectable | hard images [95% CI] | easy images [95% CI] |",
                      "|---|---|---:|---|---|"]
            for row in controlled:
                c = row["vs_control"]
                lines.append(f"| {row['row']} | {_ci(c['all'])} | {_detectable_cell(c['all'])} | {_ci(c['hard'])} | "
                             f"{_ci(c['easy'])} |")
    return lines + ["", f"**Reading:** {body['verdict']}", ""]


def format_results(results: dict) -> str:
    lines = [f"# hsft experiments: suite `{results['suite']}`", ""]
    if results["suite"] in PLUMBING_ONLY:
        lines += [f"The `{results['suite']}` suite checks the plumbing, not the method: a shrunken pipeline (a few "
                  "images, one epoch a stage) that produces every run, table and file. Its numbers are no evidence "
                  "about hard-sample fine-tuning; the readings below only show how a real suite's are worded.", ""]
    lines += [f"Seeds: {', '.join(map(str, results['seeds']))}; stage 0: {results['stage0']}. "
              f"Split: {results['split']}, the same images for every seed, never trained, mined or chosen on. "
              "Cells: mean +- sd over seeds of the Dice (generate path). Δ: paired differences on the same images, "
              f"a (seeds, images) array; 95 % interval: {results['method']}, so it covers another training run "
              + ("(seed and stage 0)" if not results.get("shared_stage0") else "(seed; stage 0 is shared)")
              + " and other images. Per-seed Δ: each seed's mean difference. Detectable: the smallest effect "
              "that design detects with 80 % power at the 5 % level, from its measured variance components; an "
              "interval containing 0 says the effect is likely smaller than that, not that it is 0.", ""]
    for body in results["tables"].values():
        lines += format_table(body)
    return "\n".join(lines)


def write_per_sample_csv(body: dict, path: Path) -> None:
    """The per-sample table, every seed and held-out image, HSFT's and the control's rows."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "seed", "sample", "dice_dpo", "dice_after", "delta", "difficulty", "change"])
        for label in ("hsft", "control"):
            for row in body[label]["rows"]:
                writer.writerow([label, row["seed"], row["id"], f"{row['before']:.6f}", f"{row['after']:.6f}",
                                 f"{row['delta']:.6f}", row["difficulty"], row["change"]])


def stage_spread(results: dict, *, machine: str, threads: int, date: str) -> dict | None:
    """Each stage's Δ against the model it started from, over the suite's seeds (the per-stage table's per-seed
    values): the range a single run of the same settings falls in, with what measured it. None without a
    per-stage table or with one stage 0 for every seed (then the range says nothing about stage 0)."""
    table = next((t for t in results["tables"].values() if t["kind"] == "stages"), None)
    if table is None or results.get("shared_stage0"):
        return None
    stages = {}
    for row in table["rows"]:
        effect = row.get("delta_prev")
        if effect and effect.get("per_seed"):
            values = list(effect["per_seed"].values())
            stages[row["name"]] = {"min": min(values), "max": max(values), "per_seed": effect["per_seed"]}
    return {"suite": results["suite"], "seeds": results["seeds"], "split": results["split"], "machine": machine,
            "threads": threads, "date": date, "stages": stages}


def write_results(results: dict, suite: Suite, out: Path) -> None:
    """results.json, results.md, plots/*.png and TensorBoard hparams under `out`."""
    from hsft.experiments.plots import draw_plots, log_hparams

    out = Path(out)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(format_results(results))
    spread = stage_spread(results, machine=cpu_model(), threads=torch.get_num_threads(),
                          date=time.strftime("%Y-%m-%d", time.gmtime()))
    if spread:
        write_json(out / "stage_spread.json", spread)
    for body in results["tables"].values():
        if body["kind"] == "per_sample":
            write_per_sample_csv(body, out / f"per_sample_{body['key']}.csv")
    draw_plots(results, suite, out / "plots")
    log_hparams(results, suite, out / "tb")
