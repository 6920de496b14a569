#!/usr/bin/env python
"""Segment vessels in image files with a model checkpoint, through the generate path (greedy, KV
cache) exactly as inference runs.

For each IMAGE, writes OUT/<name>_mask.png (0/255, the image's original size) and
OUT/<name>_overlay.png (the prediction in green over the image), prints the generated text and
whether [SEG] was emitted (no [SEG] means an empty mask), and writes OUT/predictions.json.
Accepted: RGB, greyscale, palette, RGBA (alpha dropped), CMYK and 16-bit greyscale images of any
size; an unreadable file stops the command before the model loads, naming the file.

    python launch/predict.py --checkpoint runs/hsft/hsft/model fundus1.png fundus2.tif --out preds/
"""

import argparse
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft.eval.cli import add_inference_options, run_predict
from hsft.eval.errors import InputError


def parse(argv):
    parser = argparse.ArgumentParser(prog="launch/predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a model directory (hsft.model.save_model writes one; or a run's stage directory holding model/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the masks and overlays")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation budget per image (default: 16)")
    add_inference_options(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        run_predict(args.checkpoint, args.images, args.out, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, prompt=args.prompt)
    except InputError as error:
        print(f"launch/predict.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
