#!/usr/bin/env python
"""Re-run the method's study with one command: per-stage table, amount of hard data, per-sample
categories, tau / epochs / learning-rate grids, alternatives at matched compute (full fine-tuning, a
random subset, curricula, loss-weighted sampling) and iterative HSFT, adaptive tau and the unified
training path, over several seeds, with paired-bootstrap intervals, plots and plain verdicts.

    deepspeed launch/experiments.py --deepspeed ds_configs/zero2.json --suite paper --seeds 0 1 2 --output-dir runs/exp
    deepspeed launch/experiments.py --deepspeed ds_configs/zero2.json --suite paper --model DIR \\
        --data-format drive --data-root /data/DRIVE
    deepspeed launch/experiments.py --deepspeed ds_configs/zero2.json --suite smoke     # CI-sized

Every run is an ordinary output directory below --output-dir; killed, the same command continues at the
first unfinished run. Results: <output-dir>/results.md, results.json, plots/*.png, tb/ (HParams).
Every option of launch/hsft.py (and its --set KEY=VALUE) is accepted and applies to every run of the suite.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft.arguments import RUN_ALIASES, add_config_arguments
from hsft.command_line import Parser
from hsft.config import MAIN_OPTIONS, OPTION_GROUPS, SHARED_SETTINGS, RunConfig
from hsft.experiments.suites import SUITES
from hsft.recipes import config_from_arguments


def parse(argv):
    parser = Parser(prog="launch/experiments.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="paper", choices=sorted(SUITES),
                        help="paper: every table (about 20 runs a seed); smoke: a CI-sized subset on a shrunken run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of every run: stage 0 of the embedded default (unless --shared-stage0), the "
                             "validation split's draw, LoRA onwards; the held-out split stays fixed")
    parser.add_argument("--shared-stage0", action="store_true",
                        help="embedded default: train stage 0 once for every seed (as a released checkpoint is one "
                             "model), instead of once per seed")
    parser.add_argument("--reference", type=Path, default=None,
                        help="JSON of the paper's own numbers, {table key: {row: value}}, shown as a labelled column")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    dests = add_config_arguments(parser, RunConfig, aliases=RUN_ALIASES, skip={"output_dir", "resume", "overwrite"},
                                 options=MAIN_OPTIONS, shared=SHARED_SETTINGS, groups=OPTION_GROUPS)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/exp"), help="where the suite's runs and results go")
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args, dests)
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse(sys.argv[1:] if argv is None else argv)
    from hsft.experiments import main as run

    return run(dataclasses.replace(cfg, output_dir=str(args.output_dir)), args.suite, args.seeds, args.output_dir,
               args.reference, shared_stage0=args.shared_stage0)


if __name__ == "__main__":
    sys.exit(main())
