"""The suite's results from its run directories: every table's cells, statistics and plain verdicts.

Every cell is the mean +- sd over seeds of a run's held-out Dice (generate path, per image, mean over
images). Every difference is paired: the same held-out images under two models, pooled over seeds (one
pair per seed and image), with a percentile-bootstrap 95 % interval, and listed per seed. Nothing here
reads the held-out split to choose anything: the picked-tau row chooses by validation Dice.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from hsft.config import RunConfig
from hsft.engine.files import write_json
from hsft.eval.compare import CHANGES, DIFFICULTIES, categorise
from hsft.eval.statistics import paired_bootstrap
from hsft.experiments.suites import Arm, Suite, Table

__all__ = ["collect", "write_results", "format_results", "write_per_sample_csv", "RunReader"]

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
        """{sample id: (generate-path Dice, forward-path Dice)} of the model evaluated as `label`."""
        summary = self._json("eval", label, "eval.json")
        return {row["id"]: (float(row["scores"]["generate"]["dice"]), float(row["scores"]["forward"]["dice"]))
                for row in summary["samples"]}

    def stage_metrics(self, stage: str) -> dict:
        if stage == "iterative":  # the last round's fine-tuning carries the epoch metrics
            rounds = self._json("iterative", "metrics.json")["rounds"]
            last = self._json("iterative", f"round{rounds[-1]['round']}", "hsft", "metrics.json")
            return {**last, "optimizer_steps": sum(r["optimizer_steps"] or 0 for r in rounds)}
        return self._json(stage, "metrics.json")

    def val_dice(self, stage: str) -> float | None:
        epochs = self.stage_metrics(stage).get("epochs") or []
        return epochs[-1].get("val_dice") if epochs else None

    def hard_count(self) -> int:
        return int(self._json("mining", "hard_samples.json")["hard_count"])

    def train_dice(self, file: str) -> float | None:
        path = self.dir / file
        return json.loads(path.read_text())["mean"] if path.is_file() else None


def _mean_sd(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0, "n": int(array.size)}


def _paired(before: dict[int, dict[str, tuple]], after: dict[int, dict[str, tuple]], cfg: RunConfig) -> dict:
    """Pooled paired bootstrap of after - before over (seed, image) pairs, plus each seed's mean difference."""
    b, a, per_seed = [], [], {}
    for seed in before:
        ids = sorted(before[seed])
        if set(ids) != set(after[seed]):
            raise ValueError(f"seed {seed}: the two evaluations cover different held-out images")
        b_seed = [before[seed][i][0] for i in ids]
        a_seed = [after[seed][i][0] for i in ids]
        per_seed[str(seed)] = float(np.mean(a_seed) - np.mean(b_seed))  # str: as JSON keys
        b += b_seed
        a += a_seed
    result = paired_bootstrap(b, a, resamples=cfg.eval.bootstrap_resamples, seed=cfg.eval.bootstrap_seed)
    return {**result, "per_seed": per_seed}


def _dice(per_sample: dict[int, dict[str, tuple]]) -> dict:
    return _mean_sd([float(np.mean([v[0] for v in rows.values()])) for rows in per_sample.values()])


def _discrepancy(per_sample: dict[int, dict[str, tuple]]) -> float:
    """Mean |forward-path Dice - generate-path Dice| over images and seeds."""
    return float(np.mean([abs(f - g) for rows in per_sample.values() for g, f in rows.values()]))


class _Study:
    def __init__(self, suite: Suite, seeds: list[int], out: Path, cfg: RunConfig):
        self.suite, self.seeds, self.out, self.cfg = suite, seeds, Path(out), cfg
        self.prefix = {s: RunReader(self.out / f"seed{s}" / "prefix") for s in seeds}

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
                                  "hard": reader.hard_count(),
                                  "train_dice": reader.train_dice("train_dice.json") if arm.train_dice else None}
            vals = [v["val_dice"] for v in per_seed.values() if v["val_dice"] is not None]
            trains = [v["train_dice"] for v in per_seed.values() if v["train_dice"] is not None]
            rows.append({"name": arm.name, "row": arm.label, "value": arm.value, "dice": _dice(samples),
                         "delta_start": _paired(start, samples, self.cfg),
                         "delta_hsft": None if arm.same_as == "hsft" else _paired(hsft, samples, self.cfg),
                         "val_dice": _mean_sd(vals) if vals else None,
                         "train_dice": _mean_sd(trains) if trains else None,
                         "steps": _mean_sd([v["steps"] for v in per_seed.values()]),
                         "hard": _mean_sd([v["hard"] for v in per_seed.values()]),
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


def collect(suite: Suite, seeds: list[int], out: Path, cfg: RunConfig, *, reference: dict | None = None) -> dict:
    """results.json's content: every table of the suite, computed from the run directories."""
    study = _Study(suite, seeds, out, cfg)
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
                    reference=(reference or {}).get(table.key))
        body["verdict"] = verdict(body)
        tables[table.key] = body
    held_out = len(next(iter(study.prefix_samples("dpo").values())))
    return {"suite": suite.name, "seeds": list(seeds), "held_out_images": held_out,
            "bootstrap_resamples": cfg.eval.bootstrap_resamples, "tables": tables}


# --- words -------------------------------------------------------------------------------------------

def _ci(effect: dict | None) -> str:
    if not effect or effect.get("mean") is None:
        return "-"
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


def _list(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def verdict(body: dict) -> str:
    """A short plain-language reading of a table, stated whichever way it falls."""
    kind, rows = body["kind"], body.get("rows", [])
    if kind == "stages":
        parts = []
        for row in rows[1:]:
            direction = _direction(row["delta_prev"])
            against = "DPO" if row["name"] == "control" else "the stage before"
            word = {"up": "raised", "down": "lowered", "unclear": "did not measurably change"}[direction]
            parts.append(f"{row['row']} {word} held-out Dice against {against} ({_ci(row['delta_prev'])})")
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
        text = (f"Against the DPO model they start from, held-out Dice rose with {_list(up)} and fell with "
                f"{_list(down)} (95 % intervals excluding 0); the rest cannot be told from no change. "
                f"Highest mean: {best['row']} ({best['dice']['mean']:.4f}).")
        if any(r.get("delta_hsft") for r in rows):
            text += (f" Better than HSFT: {_list(beats)}; worse than HSFT: {_list(loses)}; every other row is "
                     "indistinguishable from HSFT here.")
        if kind == "picked":
            text += f" Picks per seed: {rows[0]['picks']}."
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


def format_table(body: dict) -> list[str]:
    lines = [f"## {body['key']}: {body['title']}", ""]
    if body.get("note"):
        lines += [body["note"], ""]
    ref = body.get("reference") is not None
    ref_head, ref_rule = (" | paper (reference) |", "---:|") if ref else (" |", "")
    if body["kind"] == "stages":
        lines += ["| stage | held-out Dice | Δ previous [95% CI] | Δ baseline [95% CI] | per-seed Δ previous | "
                  "|forward - generate|" + ref_head, "|---|---:|---|---|---|---:|" + ref_rule]
        for row in body["rows"]:
            lines.append(f"| {row['row']} | {_dice_cell(row)} | {_ci(row['delta_prev'])} | {_ci(row['delta_base'])} | "
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
        lines += ["| run | held-out Dice | Δ vs DPO [95% CI] | per-seed Δ | Δ vs HSFT [95% CI] | val Dice | hard set | "
                  "steps | " + ("train Dice | " if extra else "") + "|fwd - gen| before -> after" + ref_head,
                  "|---|---:|---|---|---|---:|---:|---:|" + ("---:|" if extra else "") + "---|" + ref_rule]
        for row in body["rows"]:
            val = f"{row['val_dice']['mean']:.4f}" if row.get("val_dice") else "-"
            hard = f"{row['hard']['mean']:.1f}" if row.get("hard") else "-"
            steps = f"{row['steps']['mean']:.0f}" if row.get("steps") else "-"
            train = (f" {row['train_dice']['mean']:.4f} |" if row.get("train_dice") else " - |") if extra else ""
            disc = row.get("discrepancy")
            disc_cell = f"{disc['before']:.4f} -> {disc['after']:.4f}" if disc else "-"
            lines.append(f"| {row['row']} | {_dice_cell(row)} | {_ci(row['delta_start'])} | {_per_seed(row['delta_start'])} "
                         f"| {_ci(row.get('delta_hsft'))} | {val} | {hard} | {steps} |{train} {disc_cell} |"
                         + (f" {_reference_cell(body, row)} |" if ref else ""))
    return lines + ["", f"**Reading:** {body['verdict']}", ""]


def format_results(results: dict) -> str:
    lines = [f"# hsft experiments: suite `{results['suite']}`", "",
             f"Seeds: {', '.join(map(str, results['seeds']))}. Held-out images: {results['held_out_images']} per seed "
             "(never trained, mined or chosen on). Cells: mean +- sd over seeds of the held-out Dice (generate path). "
             "Δ: paired differences on the same images, pooled over seeds, percentile bootstrap 95 % interval "
             f"({results['bootstrap_resamples']} resamples); per-seed Δ: each seed's mean difference. An interval "
             "containing 0 means these images cannot tell the difference from none.", ""]
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


def write_results(results: dict, suite: Suite, out: Path) -> None:
    """results.json, results.md, plots/*.png and TensorBoard hparams under `out`."""
    from hsft.experiments.plots import draw_plots, log_hparams

    out = Path(out)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(format_results(results))
    for body in results["tables"].values():
        if body["kind"] == "per_sample":
            write_per_sample_csv(body, out / f"per_sample_{body['key']}.csv")
    draw_plots(results, suite, out / "plots")
    log_hparams(results, suite, out / "tb")
