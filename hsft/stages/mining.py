"""Hard-sample mining: run the real inference path (generate) over the training split and keep the
samples the model segments badly (Dice < tau, or the hardest fraction q).

Only the training split is mined: the held-out split must not influence what the model trains on.
The work is sharded over ranks and gathered, so every rank ends with the same, deterministic list.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from hsft.config import DICE_BUCKETS, MiningConfig
from hsft.data import Sample
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.tensorboard import TBWriter
from hsft.errors import BadValue, MissingFile
from hsft.eval.inference import generate_and_score
from hsft.model import load_model
from hsft.stages.training import StageResult


@dataclass
class MinedSample:
    id: str
    dice: float
    bucket: str
    seg_emitted: bool


@dataclass
class MiningResult:
    samples: list[MinedSample]  # every training sample, hardest first
    hard_ids: list[str]  # the hard set, hardest first
    rule: str  # how the hard set was chosen, in words

    def table(self) -> list[dict]:
        return bucket_table([s.dice for s in self.samples])


def bucket_of(dice: float) -> str:
    return next(label for upper, label in DICE_BUCKETS if dice < upper)


def bucket_table(dices: list[float]) -> list[dict]:
    """The published distribution table: count and percentage per Dice bucket."""
    rows, lower = [], 0.0
    total = max(1, len(dices))
    for upper, label in DICE_BUCKETS:
        count = sum(1 for d in dices if lower <= d < upper)
        span = f"< {upper:.2f}" if lower == 0.0 else (f">= {lower:.2f}" if math.isinf(upper) else f"{lower:.2f}-{upper:.2f}")
        rows.append({"range": span, "count": count, "percent": 100.0 * count / total, "category": label})
        lower = upper
    return rows


def mine_hard_samples(model, train_samples: list[Sample], cfg: MiningConfig) -> MiningResult:
    scored = generate_and_score(model, train_samples, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                desc="mining")
    gathered = [(s.id, s.dice, s.seg_emitted) for s in scored]
    # Hardest first; ties broken by id so the order does not depend on the rank layout.
    gathered.sort(key=lambda row: (row[1], row[0]))
    samples = [MinedSample(id=i, dice=d, bucket=bucket_of(d), seg_emitted=e) for i, d, e in gathered]
    if cfg.hard_quantile is not None:
        keep = max(1, math.ceil(cfg.hard_quantile * len(samples)))
        hard = samples[:keep]
        rule = f"hardest {cfg.hard_quantile:.0%} of the training split ({keep} samples)"
    else:
        hard = [s for s in samples if s.dice < cfg.tau]
        rule = f"Dice < tau = {cfg.tau}"
    return MiningResult(samples=samples, hard_ids=[s.id for s in hard], rule=rule)


def table_lines(table: list[dict]) -> list[str]:
    """The bucket table (`bucket_table`'s rows) in markdown."""
    lines = ["| Dice | count | percent | category |", "|---|---:|---:|---|"]
    for row in table:
        lines.append(f"| {row['range']} | {row['count']} | {row['percent']:.1f}% | {row['category']} |")
    return lines


def format_table(result: MiningResult) -> str:
    lines = table_lines(result.table())
    n, k = len(result.samples), len(result.hard_ids)
    lines.append("")
    lines.append(f"hard set ({result.rule}): {k} of {n} training samples ({100.0 * k / max(1, n):.1f}%)")
    misses = sum(1 for s in result.samples if not s.seg_emitted)
    if misses:
        lines.append(f"{misses} samples emitted no [SEG] (counted as empty masks)")
    return "\n".join(lines)


def write_mining(result: MiningResult, out_dir: Path, tb: TBWriter, step: int) -> None:
    """`<out>/mining/hard_samples.json` + the table, printed and logged (rank 0)."""
    if not distributed.is_main():
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hard = set(result.hard_ids)
    payload = {
        "rule": result.rule,
        "hard": [asdict(s) for s in result.samples if s.id in hard],
        "all": [asdict(s) for s in result.samples],
        "table": result.table(),
        "hard_count": len(result.hard_ids),
        "hard_fraction": len(result.hard_ids) / max(1, len(result.samples)),
    }
    tmp = out_dir / "hard_samples.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out_dir / "hard_samples.json")
    table = format_table(result)
    (out_dir / "table.md").write_text(table + "\n")
    print("\nHard-sample mining on the training split\n" + table)
    tb.text("mining/table", table, step)
    tb.histogram("mining/train_dice", [s.dice for s in result.samples], step)
    tb.scalars({"mining/hard_count": len(result.hard_ids),
                "mining/hard_fraction": payload["hard_fraction"]}, step)


def _read_rows(out_dir: Path, key: str, fields: tuple[tuple[str, type | tuple], ...]) -> list[dict]:
    path = Path(out_dir) / "hard_samples.json"
    if not path.is_file():
        raise MissingFile(f"{path}: no mining result; run the 'mining' stage first (--stages mining,hsft)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadValue(f"{path}: not valid JSON ({err}); run the 'mining' stage again") from None
    rows = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) and all(isinstance(row.get(name), kind)
                                                                           for name, kind in fields) for row in rows):
        wanted = ", ".join(f'\"{name}\": ...' for name, _ in fields)
        raise BadValue(f"{path}: expected {{\"{key}\": [{{{wanted}}}, ...]}} as the 'mining' stage writes it")
    return rows


def read_rule(out_dir: Path) -> str:
    """How the mined hard set was chosen, in words (e.g. "Dice < tau = 0.5")."""
    path = Path(out_dir) / "hard_samples.json"
    _read_rows(out_dir, "hard", (("id", str),))  # the file's checks, with their messages
    rule = json.loads(path.read_text(encoding="utf-8")).get("rule")
    if not isinstance(rule, str):
        raise BadValue(f"{path}: expected a \"rule\" string as the 'mining' stage writes it")
    return rule


def read_hard_ids(out_dir: Path) -> list[str]:
    """The mined hard set's ids, hardest first."""
    return [row["id"] for row in _read_rows(out_dir, "hard", (("id", str),))]


def read_mined_dice(out_dir: Path) -> dict[str, float]:
    """Every training sample's mined Dice (the difficulty the curricula and loss-weighted sampling use)."""
    rows = _read_rows(out_dir, "all", (("id", str), ("dice", (int, float))))
    return {row["id"]: float(row["dice"]) for row in rows}


def run(ctx: RunContext, cfg: MiningConfig, start: Path | None) -> StageResult:
    """Mine the training split with the model `start`; writes `<out>/mining/` and trains nothing."""
    if start is None:
        raise BadValue("mining: needs a model to mine with (--model, or an earlier stage)")
    # The inference path as the run's models train and will be used: this rank's device, training dtype.
    model = load_model(start, device=ctx.device, dtype=ctx.dtype)
    result = mine_hard_samples(model, ctx.splits.train, cfg)
    stage_dir = ctx.stage_dir("mining")
    tb = ctx.tb("mining")
    write_mining(result, stage_dir, tb, ctx.global_step)
    tb.close()
    distributed.barrier()
    return StageResult(summary={"rule": result.rule, "hard": len(result.hard_ids), "total": len(result.samples),
                                "table": result.table()},
                       written={"hard set": str(stage_dir / "hard_samples.json")})
