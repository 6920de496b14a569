#!/usr/bin/env python
"""Rehearse the paper's run at a published size: a random-weight Sa2VA release of that size through
import, the main command (LoRA, DPO, mining, HSFT, control, evaluation), export and re-import, with
real-resolution images; writes rehearsal.json and rehearsal.md (time, peak memory, the memory plan
beside it, tokens per sample, disk written, each stage's evidence).

    python launch/rehearse.py --shape sa2va-1b --device cpu --images 4
    python launch/rehearse.py --shape sa2va-4b --device cuda --images 16 --output-dir runs/rehearsal-4b
"""

import argparse
import shlex
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.bench.rehearsal import SHAPES, RehearsalConfig, RehearsalError, format_markdown, rehearse, summarise
from hsft.engine.config import PRECISIONS


def parse(argv) -> tuple[RehearsalConfig, str | None]:
    parser = command_line.Parser(prog="launch/rehearse.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="sa2va-1b",
                        help="published size to rehearse ('tiny': the embedded preset's sizes, for tests)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=4,
                        help="synthetic images at DRIVE / STARE / CHASE_DB1 resolutions (a quarter held out)")
    command_line.add_output_dir(parser, default="runs/rehearsal")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                        help="default: fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json", help="DeepSpeed config of the main command")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of LoRA, DPO, HSFT and the control")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget of mining and evaluation (default: the main command's)")
    command_line.add_overwrite(parser)
    parser.add_argument("--summarise", default=None, metavar="DIR",
                        help="write DIR/rehearsal.json and .md again from what DIR holds (a rehearsal stopped during "
                             "the main command: the stages it finished), with the memory plan of this code")
    parser.add_argument("--shares", choices=("on", "off"), default=None,
                        help="time the parts of an uncached HSFT step at the end (default: on with --device cuda)")
    parser.add_argument("--main-args", default="", metavar="OPTIONS",
                        help="more options for the main command, one string (e.g. --main-args='--hsft-cuda-graph')")
    args = parser.parse_args(argv)
    return RehearsalConfig(shape=args.shape, device=args.device, images=args.images, output_dir=args.output_dir,
                           precision=args.precision, deepspeed=args.deepspeed, epochs=args.epochs,
                           max_new_tokens=args.max_new_tokens, overwrite=args.overwrite,
                           main_args=tuple(shlex.split(args.main_args)),
                           shares=None if args.shares is None else args.shares == "on"), args.summarise


def main(argv=None) -> int:
    cfg, again = parse(sys.argv[1:] if argv is None else argv)
    try:
        return command_line.run("launch/rehearse.py", lambda: run(cfg, again))
    except RehearsalError as error:  # a step failed at this size: the finding, named with its log
        print(f"launch/rehearse.py: failed: {error}", file=sys.stderr)
        return 1


def run(cfg: RehearsalConfig, again: str | None) -> None:
    if again is not None:
        print(format_markdown(summarise(again, replanned=True)))
    else:
        rehearse(cfg, echo=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
