#!/usr/bin/env python
"""Convert between a released Sa2VA checkpoint and an hsft model directory (no network, no remote code).

    python launch/convert.py import-sa2va /ckpt/Sa2VA-1B runs/sa2va1b
    python launch/convert.py export-sa2va runs/hsft/hsft/model out/Sa2VA-1B-vessels

import-sa2va writes an hsft model directory (for --model, launch/evaluate.py --checkpoint and
launch/predict.py --checkpoint) with conversion_report.md beside it; export-sa2va writes the release's
format back (tensor names, shards, config, tokenizer, remote code) for a model that was imported.
"""

import argparse
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.model.release import export_sa2va, import_sa2va


def parse(argv):
    parser = command_line.Parser(prog="launch/convert.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=command_line.Parser)
    imp = commands.add_parser("import-sa2va", help="released Sa2VA checkpoint -> hsft model directory")
    imp.add_argument("source", metavar="SRC",
                     help="the released checkpoint directory (config.json, safetensors, tokenizer)")
    imp.add_argument("output", metavar="OUT", help="the hsft model directory to write")
    imp.add_argument("--sam2-config", metavar="FILE", default=None,
                     help="transformers Sam2VisionConfig JSON for SAM2 sizes other than the release's Hiera-L")
    imp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="parameter dtype of the hsft model (default: the checkpoint's)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    exp = commands.add_parser("export-sa2va", help="hsft model directory (imported from a release) -> release format")
    exp.add_argument("model", metavar="MODEL", help="an hsft model directory, e.g. runs/hsft/hsft/model")
    exp.add_argument("output", metavar="OUT", help="the release-format directory to write")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)

    def work() -> None:
        if args.command == "import-sa2va":
            report = import_sa2va(args.source, args.output, sam2_config_file=args.sam2_config, dtype=args.dtype,
                                  overwrite=args.overwrite)
            print(f"imported {report.mapped} of {report.tensors} tensors into {report.output} "
                  f"({len(report.kept)} kept beside the model); see {report.output}/conversion_report.md")
        else:
            out = export_sa2va(args.model, args.output, overwrite=args.overwrite)
            print(f"exported {args.model} to {out}")

    return command_line.run("launch/convert.py", work)


if __name__ == "__main__":
    sys.exit(main())
