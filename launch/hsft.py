#!/usr/bin/env python
"""hsft main command: stage 0 (embedded default) -> LoRA -> DPO -> mining -> HSFT -> evaluation.

    deepspeed launch/hsft.py --deepspeed ds_configs/zero2.json            # everything, embedded default
    deepspeed --num_gpus 2 launch/hsft.py --deepspeed ds_configs/zero2.json --stages mining,hsft,eval
"""

import argparse
import dataclasses
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft.arguments import RUN_ALIASES, add_config_arguments
from hsft.command_line import Parser
from hsft.config import DEFAULT_STAGES, MAIN_OPTIONS, OPTION_GROUPS, SHARED_SETTINGS, STAGE_ORDER, RunConfig
from hsft.recipes import RECIPES, config_from_arguments


def parse(argv):
    return parse_with_plan(argv)[0]


def build_parser() -> tuple[Parser, dict]:
    """The main command's parser, and what hsft.arguments needs to turn its namespace into a RunConfig."""
    parser = Parser(
        prog="launch/hsft.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stage options are named after their stage: --hsft-lr, --hsft-epochs, --lora-rank, --dpo-beta ... "
               "Every other setting is reached with --set KEY=VALUE (dotted key, e.g. --set base.referring=true); "
               "--help-all lists them all. Each default shown is the paper recipe's, followed by the tiny "
               "recipe's where it differs; the embedded default runs the tiny recipe, a released checkpoint the "
               "paper recipe, and --model of a directory this command trained the recipe and precision it records. "
               "Outputs: "
               "<output-dir>/<stage>/ (model/, trainable.safetensors, checkpoints/, metrics.json), "
               "<output-dir>/tb/, report.json and report.md.",
    )
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"stages to run, an ordered subset of {','.join(STAGE_ORDER)} (default: "
                             f"{','.join(DEFAULT_STAGES)})")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan (GiB per stage and rank on a GPU) and exit")
    parser.add_argument("--plan-gpu-memory", default=None, metavar="SIZE",
                        help="with --plan: also say which shipped DeepSpeed configs fit a GPU of SIZE (e.g. 24GiB)")
    dests = add_config_arguments(parser, RunConfig, aliases=RUN_ALIASES, recipes={"tiny": RECIPES["tiny"]},
                                 options=MAIN_OPTIONS, shared=SHARED_SETTINGS, groups=OPTION_GROUPS)
    return parser, dests


def parse_with_plan(argv):
    """The run's config, and (--plan, --plan-gpu-memory in GiB or None)."""
    parser, dests = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args, dests)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if args.stages == ",".join(DEFAULT_STAGES) and not cfg.embedded_default:
        stages = stages[1:]  # stage 0 only exists for the embedded default model
    gpu_memory = None
    if args.plan_gpu_memory is not None:
        from hsft.memory_plan import parse_size

        try:
            gpu_memory = parse_size(args.plan_gpu_memory)
        except ValueError as error:
            parser.error(str(error))
    return dataclasses.replace(cfg, stages=stages), (args.plan, gpu_memory)


def main(argv=None) -> int:
    cfg, (plan, gpu_memory) = parse_with_plan(sys.argv[1:] if argv is None else argv)
    if plan:
        from hsft.memory_plan import main as print_plan

        return print_plan(cfg, gpu_memory=gpu_memory)
    from hsft.pipeline import main as run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
