#!/usr/bin/env python
"""Choose the tiny recipe's learning rates and epochs on the validation split (never the held-out split).

    python launch/tune_recipe.py --output-dir runs/tune                  # the grid BENCHMARKS.md "Recipe search" shows
    python launch/tune_recipe.py --output-dir runs/tune --tune-stages hsft --hsft-lr-grid 1e-4,3e-4

Every main-command option sets what the grid does not vary (the tiny recipe is the starting point).
Prints a Markdown table of every point's validation Dice and writes it, with the points as JSON, under
--output-dir.
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.arguments import add_config_arguments
from hsft.config import RunConfig
from hsft.recipe_search import DEFAULT_GRID, format_table, search_recipe
from hsft.recipes import RECIPES, config_from_arguments


def main(argv=None) -> int:
    parser = command_line.Parser(prog="launch/tune_recipe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune-stages", default=",".join(DEFAULT_GRID),
                        help=f"stages to search, in pipeline order (default: {','.join(DEFAULT_GRID)})")
    grid_options = {}
    for stage, settings in DEFAULT_GRID.items():
        for key, values in settings.items():
            flag = f"--{stage}-{key.split('.')[-1].replace('_', '-')}-grid"
            grid_options[key] = (flag, type(values[0]))
            parser.add_argument(flag, default=",".join(str(v) for v in values),
                                help=f"comma-separated values of {key} (default: %(default)s)")
    dests = add_config_arguments(parser, RunConfig, recipes={"tiny": RECIPES["tiny"]})
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args, dests)
    if cfg.output_dir == RunConfig().output_dir:
        cfg = dataclasses.replace(cfg, output_dir="runs/tune")
    stages = [s.strip() for s in args.tune_stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in DEFAULT_GRID]
    if unknown:
        parser.error(f"--tune-stages: unknown stage(s) {unknown}; searchable stages are {', '.join(DEFAULT_GRID)}")
    grid = {}
    for stage in stages:
        grid[stage] = {}
        for key in DEFAULT_GRID[stage]:
            flag, kind = grid_options[key]
            text = getattr(args, flag.removeprefix("--").replace("-", "_"))
            try:
                grid[stage][key] = [kind(v) for v in text.split(",") if v.strip()]
            except ValueError:
                parser.error(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}")

    def work() -> None:
        cfg.validate()
        points = search_recipe(Path(cfg.output_dir), base=cfg, grid=grid)
        table = format_table(points)
        print(table)
        out = Path(cfg.output_dir)
        (out / "search.md").write_text(table + "\n")
        (out / "search.json").write_text(json.dumps([asdict(p) for p in points], indent=2) + "\n")

    return command_line.run("launch/tune_recipe.py", work)


if __name__ == "__main__":
    sys.exit(main())
