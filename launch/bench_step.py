#!/usr/bin/env python
"""Step time, samples/s and peak memory of LoRA and HSFT micro-batches at the published Sa2VA sizes
(random weights, nothing downloaded); HSFT with and without the frozen-feature cache.

    python launch/bench_step.py --shape sa2va-1b --stage hsft --steps 1 --warmup 1
    python launch/bench_step.py --shape sa2va-4b --stage lora,hsft --device cuda --dtype bfloat16
"""

import argparse
import sys
from pathlib import Path

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.errors import BadValue
from hsft.bench.step import COMPILE_MODES, SHAPES, STAGES, format_summary, run


def main(argv=None) -> int:
    parser = command_line.Parser(prog="launch/bench_step.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="sa2va-1b")
    parser.add_argument("--stage", default="lora,hsft", help=f"comma-separated: {', '.join(STAGES)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=584, help="synthetic fundus image side (DRIVE-like)")
    command_line.add_output_dir(parser, default="results/bench_step",
                                help="where the JSON goes (one file per shape and device, replaced)", old=("--out",))
    parser.add_argument("--profile", action="store_true",
                        help="also profile the cached HSFT step (operators, device kernels, host time per step)")
    parser.add_argument("--compile", default="", metavar="MODES",
                        help=f"also time the cached HSFT step with the decoder compiled, comma-separated torch.compile "
                             f"modes: {', '.join(COMPILE_MODES)}")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time both HSFT steps with the fused AdamW, and the cached one with the decoder "
                             "captured as CUDA graphs (what removing the cached step's launches would buy)")
    parser.add_argument("--lora-checkpointing", action="store_true",
                        help="LoRA with the LLM's activations recomputed in backward, as the LoRA stage runs from a "
                             "real checkpoint")
    args = parser.parse_args(argv)

    def work() -> None:
        try:
            summary = run(shape=args.shape, stages=[s for s in args.stage.split(",") if s], device=args.device,
                          dtype=args.dtype, steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch,
                          image_size=args.image_size, out=Path(args.output_dir),
                          echo=lambda line: print(line, flush=True), profile=args.profile,
                          compile_modes=tuple(m for m in args.compile.split(",") if m), cuda_graph=args.cuda_graph,
                          lora_checkpointing=args.lora_checkpointing)
        except ValueError as error:  # the benchmark's own argument checks
            raise BadValue(str(error)) from None
        print(format_summary(summary))

    return command_line.run("launch/bench_step.py", work)


if __name__ == "__main__":
    sys.exit(main())
