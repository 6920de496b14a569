"""Benchmark the fused mask loss against eager PyTorch and torch.compile; see hsft.bench.kernels.

    python launch/bench_kernels.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--shapes 16x256->1024 ...]
                                   [--output-dir results/bench_kernels]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.bench import kernels as benchmark


def main(argv=None) -> int:
    parser = command_line.Parser(prog="launch/bench_kernels.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="two shapes, 3 repeats: a smoke run")
    parser.add_argument("--dtype", default="float32", choices=sorted(benchmark.DTYPES), help="logits dtype")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="NxLOW->HIGH",
                        help="shapes to run, e.g. 16x256->1024 (default: the standard set, or --quick's)")
    parser.add_argument("--providers", nargs="+", default=list(benchmark.PROVIDERS), choices=benchmark.PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(benchmark.MODES), choices=benchmark.MODES)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    # Results are written under a new time-stamped name each run, so an existing directory is added to.
    command_line.add_output_dir(parser, default="results/bench_kernels", old=("--out",),
                                help="directory the timestamped results are added to")
    parser.add_argument("--targets", action="store_true",
                        help="check ours' fwd+bwd rows against the goals (5x eager, 1.5x torch.compile, 40%% of "
                             "the memory roofline); exit 1 when one is missed")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    shapes = benchmark.QUICK_SHAPES if args.quick else benchmark.DEFAULT_SHAPES
    if args.shapes:
        try:
            shapes = tuple(benchmark.Shape.parse(text) for text in args.shapes)
        except ValueError as error:
            parser.error(f"--shapes: {error}")

    return command_line.run("launch/bench_kernels.py", lambda: bench(args, shapes))


def bench(args: argparse.Namespace, shapes) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = benchmark.run(
        device=args.device,
        shapes=shapes,
        dtype=benchmark.DTYPES[args.dtype],
        providers=args.providers,
        modes=args.modes,
        repeats=args.repeats or (3 if args.quick else 7),
        warmup=args.warmup,
    )
    print(benchmark.format_table(rows))
    command = shlex.join([sys.executable, *sys.argv])
    json_path, csv_path = benchmark.write_results(rows, Path(args.output_dir), command=command)
    print(f"wrote {json_path} and {csv_path}")
    if args.targets:
        verdicts = benchmark.check_targets(rows)
        for line, met in verdicts:
            print(("target met: " if met else "TARGET MISSED: ") + line)
        if not verdicts or not all(met for _, met in verdicts):
            raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main())
