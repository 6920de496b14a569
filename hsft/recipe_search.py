"""Choose the tiny recipe's values on the validation split, stage by stage.

The search runs the real pipeline (hsft.pipeline.run_pipeline) on the embedded default: stage 0 once
(cached, as every run caches it), then each fine-tuning stage once per point of its grid, every point
starting from the model the previous stage's best point wrote. A point's score is the generate path's
Dice on the validation split after the stage's last epoch (the `val_dice` every training stage logs in
metrics.json); the held-out split is never read. The stage's starting model is scored the same way, so
each row also shows the stage's effect on the validation split.

    python launch/tune_recipe.py --output-dir runs/tune          # BENCHMARKS.md "Recipe search" shows its table

The order follows the pipeline: LoRA, then DPO from the best LoRA model, then mining + HSFT from the best
DPO model (mining is repeated per HSFT point: a stage reads the hard set from its own output directory).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from hsft.config import RunConfig, replace_nested
from hsft.data import load_splits
from hsft.errors import BadValue
from hsft.eval.inference import validation_metrics
from hsft.model import load_model
from hsft.recipes import recipe_config

__all__ = ["DEFAULT_GRID", "SearchPoint", "search_recipe", "format_table"]

# The stages searched, in pipeline order; the stages each point runs (mining precedes HSFT); and the
# values tried. Each stage's grid is the product of its settings' values.
SEARCH_STAGES = {"lora": ("lora",), "dpo": ("dpo",), "hsft": ("mining", "hsft")}
DEFAULT_GRID: dict[str, dict[str, list]] = {
    "lora": {"lora.train.lr": [1e-3, 3e-3, 1e-2], "lora.train.epochs": [2, 3]},
    "dpo": {"dpo.train.lr": [1e-4, 3e-4, 1e-3]},
    "hsft": {"hsft.train.lr": [1e-4, 3e-4, 1e-3]},
}


@dataclass
class SearchPoint:
    stage: str
    values: dict[str, object]
    start_val_dice: float  # the stage's starting model on the validation split
    val_dice: float  # after the stage's last epoch
    seconds: float
    model_dir: str
    chosen: bool = False

    @property
    def effect(self) -> float:
        return self.val_dice - self.start_val_dice


def _points(grid: dict[str, list]) -> list[dict[str, object]]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _label(values: dict[str, object]) -> str:
    return "-".join(f"{key.split('.')[-1]}{value}" for key, value in values.items())


def _precision(cfg: RunConfig) -> str:
    """The precision a run of `cfg` trains in on this machine."""
    from hsft.engine import distributed
    from hsft.engine.context import run_precision
    from hsft.engine.ds_config import load_ds_config

    return run_precision(cfg, load_ds_config(cfg.deepspeed), distributed.local_device())


def _validation_dice(cfg: RunConfig, model_dir: Path, splits) -> float:
    """The validation Dice of a model directory, measured as the stages' epoch validation measures it
    (in the run's precision, which `cfg` holds)."""
    from hsft.engine import distributed
    from hsft.engine.context import DTYPES

    model = load_model(model_dir, device=distributed.local_device(), dtype=DTYPES[cfg.precision])
    return validation_metrics(model, splits.val, batch_size=cfg.mining.batch_size,
                              max_new_tokens=cfg.mining.max_new_tokens)["val_dice"]


def search_recipe(out_dir: Path, *, base: RunConfig | None = None, grid: dict[str, dict[str, list]] | None = None,
                  log=print) -> list[SearchPoint]:
    """Run the grid below `out_dir` (one directory per point) and return every point, the chosen ones
    marked. `base` (default: the tiny recipe's RunConfig) gives every other setting; `grid` defaults to
    DEFAULT_GRID (a subset of its stages may be given)."""
    from hsft.pipeline import run_pipeline

    out_dir = Path(out_dir)
    grid = DEFAULT_GRID if grid is None else grid
    unknown = set(grid) - set(SEARCH_STAGES)
    if unknown:
        raise ValueError(f"grid: unknown stage(s) {sorted(unknown)}; searchable stages are {', '.join(SEARCH_STAGES)}")
    cfg = base or recipe_config("tiny")
    # Every point starts from a saved model (--model), which would make it follow the DeepSpeed config's
    # precision; pin the precision the embedded default run itself trains in, so the grid scores what
    # the default run does.
    cfg = replace(cfg, precision=_precision(cfg))
    splits = load_splits(cfg.data)
    if not splits.val:
        raise BadValue("data.val_fraction: the search scores on the validation split, which is empty")

    run_pipeline(replace(cfg, stages=("base",), output_dir=str(out_dir / "base"), overwrite=True))
    start = out_dir / "base" / "base" / "model"
    start_dice = _validation_dice(cfg, start, splits)
    log(f"[search] stage 0: validation Dice {start_dice:.4f}")
    points: list[SearchPoint] = []
    for stage, stages in SEARCH_STAGES.items():
        if stage not in grid:
            continue
        tried: list[SearchPoint] = []
        for values in _points(grid[stage]):
            point_dir = out_dir / stage / _label(values)
            point_cfg = replace(replace_nested(cfg, **values), stages=stages, start_model=str(start),
                                output_dir=str(point_dir), overwrite=True)
            began = time.time()
            run_pipeline(point_cfg)
            metrics = json.loads((point_dir / stage / "metrics.json").read_text())
            epochs = metrics.get("epochs") or []
            if not epochs or "val_dice" not in epochs[-1]:
                raise RuntimeError(f"{point_dir / stage / 'metrics.json'}: no validation Dice after the last epoch "
                                   f"(the stage trained nothing: {metrics.get('reason', 'no epochs')})")
            point = SearchPoint(stage, values, start_dice, float(epochs[-1]["val_dice"]), time.time() - began,
                                str(point_dir / stage / "model"))
            log(f"[search] {stage} {values}: validation Dice {point.val_dice:.4f} ({point.effect:+.4f})")
            tried.append(point)
        # Ties go to the earlier point of the grid (smaller values first).
        best = max(tried, key=lambda p: (round(p.val_dice, 6), -tried.index(p)))
        best.chosen = True
        points += tried
        start, start_dice = Path(best.model_dir), best.val_dice
    return points


def format_table(points: list[SearchPoint]) -> str:
    """The Markdown table BENCHMARKS.md shows: every point, its validation Dice and the stage's effect."""
    lines = ["| stage | values | validation Dice before | after | change | chosen |", "|---|---|---:|---:|---:|---|"]
    for p in points:
        values = ", ".join(f"{key.removeprefix(p.stage + '.').replace('train.', '')} {value:g}"
                           if isinstance(value, float) else f"{key.removeprefix(p.stage + '.').replace('train.', '')} "
                           f"{value}" for key, value in p.values.items())
        lines.append(f"| {p.stage} | {values} | {p.start_val_dice:.4f} | {p.val_dice:.4f} | {p.effect:+.4f} | "
                     f"{'yes' if p.chosen else ''} |")
    return "\n".join(lines)
