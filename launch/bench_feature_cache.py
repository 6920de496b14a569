#!/usr/bin/env python
"""Benchmark the HSFT frozen-feature cache: epoch time with and without it (writes JSON, prints a table)."""

import sys
from pathlib import Path

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.bench.feature_cache import format_summary, run
from hsft.model.directory import resolve_model_dir


def main(argv=None) -> int:
    parser = command_line.Parser(prog="launch/bench_feature_cache.py", description=__doc__)
    command_line.add_model(parser, "--model", aliases=(), required=False,
                           help="an hsft model directory or a run's stage directory (default: a fresh preset)")
    parser.add_argument("--preset", default="tiny", help="preset when --model is not given")
    parser.add_argument("--samples", type=int, default=16, help="hard-set size")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side in pixels")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per configuration")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json", help="DeepSpeed JSON config")
    command_line.add_output_dir(parser, default="results/bench_feature_cache", help="where the JSON goes",
                                old=("--out",))
    args = parser.parse_args(argv)

    def work() -> None:
        model = None if args.model is None else str(resolve_model_dir(args.model, "--model"))
        summary = run(model_dir=model, preset=args.preset, samples=args.samples, size=args.size,
                      epochs=args.epochs, precision=args.precision, ds_config=args.deepspeed,
                      out=Path(args.output_dir))
        print(format_summary(summary))

    return command_line.run("launch/bench_feature_cache.py", work)


if __name__ == "__main__":
    sys.exit(main())
