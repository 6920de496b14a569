#!/usr/bin/env python
"""Check that an imported Sa2VA checkpoint infers in hsft what the release's OWN code infers.

The model (a directory written by `launch/convert.py import-sa2va`) is exported back to the
release's format and run on the same images by the release's predict_forward, imported from your
copy of its remote code (--release-code: the directory with modeling_sa2va_chat.py, sam2.py ...;
hsft ships none of it), and by hsft's inference path (the one launch/predict.py uses), both in
float32 on the CPU. The release's code runs in a separate process under --release-python, a Python
whose environment runs it (it was written for transformers 4.x; hsft needs 5.x).

Prints per image the [SEG] prompt cosine, the mask Dice and pixel agreement and whether the answers
are equal; exits 1 when an image misses the targets (cosine >= 0.999, Dice >= 0.99, equal answers
and tile counts), 2 on bad input.

    python launch/compare_with_release.py --release-code /src/Sa2VA-1B --model runs/sa2va1b \
        --release-python /envs/sa2va/bin/python --images a.png b.png
"""

import argparse
import json
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.model.release.agreement import DEFAULT_PROMPT, compare_with_release, format_table


def parse(argv):
    parser = command_line.Parser(prog="launch/compare_with_release.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-code", required=True, metavar="DIR",
                        help="the release's remote-code files (modeling_sa2va_chat.py, sam2.py, ...)")
    command_line.add_model(parser, "--model", aliases=("--checkpoint",),
                           help="an hsft model directory imported from a release")
    parser.add_argument("--images", required=True, nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"the request, starting with <image> (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation budget of both sides (default: 16)")
    parser.add_argument("--release-python", default=sys.executable, metavar="PYTHON",
                        help="the Python that runs the release's code (default: this one)")
    parser.add_argument("--json", metavar="FILE", help="also write the per-image numbers to FILE")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    compared = []

    def work() -> None:
        compared.extend(compare_with_release(args.release_code, args.model, args.images, prompt=args.prompt,
                                             max_new_tokens=args.max_new_tokens, release_python=args.release_python))

    code = command_line.run("launch/compare_with_release.py", work)
    if code:
        return code
    rows, meta = compared
    print(format_table(rows))
    print(f"release side: torch {meta['torch']}, transformers {meta['transformers']}; "
          f"CPU shims: {'; '.join(meta['shims']) or 'none'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"images": [vars(r) | {"passed": r.passed} for r in rows], "release": meta}, handle, indent=2)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
