#!/usr/bin/env python
"""Evaluate a model checkpoint on both [SEG] paths and report the training-inference discrepancy.

Every sample runs three ways: the teacher-forced forward pass with the training response
("Sure, [SEG]."), the teacher-forced pass with [SEG] appended to the instruction, and greedy
generation with the KV cache (what a user's inference does; no [SEG] = empty mask). Dice and IoU
are computed per image at the original resolution, inside the FOV when the dataset has one.

    python launch/evaluate.py --checkpoint runs/hsft/hsft --output-dir runs/eval_hsft
    python launch/evaluate.py --checkpoint DIR --data-format drive --data-root /data/DRIVE --output-dir OUT
    python launch/evaluate.py --checkpoint runs/hsft/dpo --compare runs/hsft/hsft --output-dir OUT
"""

import argparse
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.engine.verbosity import set_verbosity
from hsft.arguments import add_config_arguments, apply_arguments
from hsft.eval.cli import EVAL_SPLITS, EvaluateOptions, add_inference_options, run_evaluate

ALIASES = {
    "eval.batch_size": ["--batch-size"],
    "eval.max_new_tokens": ["--max-new-tokens"],
    "eval.overlays": ["--overlays"],
    "eval.tau": ["--tau"],
    "eval.stable_tolerance": ["--tolerance"],
}


def parse(argv):
    parser = command_line.Parser(
        prog="launch/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs: OUT/eval.json (summary), OUT/eval.md (summary table, per-sample table, discrepancy "
               "section), OUT/per_sample.csv, OUT/overlays/*.png (worst and fixed samples: green TP, red FP, "
               "blue FN), OUT/tb (TensorBoard). With --compare DIR2: OUT/compare/ holds DIR2's report and "
               "OUT/comparison.{md,csv,json} the per-sample table (before = --checkpoint, after = --compare; "
               "category Easy/Hard by the before Dice at --tau, then Better/Stable/Worse beyond --tolerance).",
    )
    command_line.add_model(parser, "--checkpoint")
    command_line.add_output_dir(parser, help="directory the report is written to", old=("--output",))
    command_line.add_overwrite(parser)
    command_line.add_verbose(parser)
    parser.add_argument("--split", default="test", choices=EVAL_SPLITS,
                        help="which split to evaluate (default: test, the held-out split)")
    parser.add_argument("--compare", metavar="DIR2", default=None,
                        help="a second model directory evaluated on the same samples ('after' in the comparison)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N samples")
    add_inference_options(parser)
    parser.add_argument("--no-tensorboard", action="store_true", help="do not write OUT/tb")
    dests = add_config_arguments(parser, EvaluateOptions, aliases=ALIASES)
    args = parser.parse_args(argv)
    return args, apply_arguments(EvaluateOptions(), args, dests)


def main(argv=None) -> int:
    args, options = parse(sys.argv[1:] if argv is None else argv)
    set_verbosity(args.verbose, deepspeed=False)
    return command_line.run("launch/evaluate.py", lambda: run_evaluate(
        args.checkpoint, args.output_dir, data=options.data, split=args.split, compare=args.compare,
        cfg=options.eval, device=args.device, dtype=args.dtype, limit=args.limit,
        tensorboard=not args.no_tensorboard, prompt=args.prompt, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
