#!/usr/bin/env python
"""Segment vessels in image files with a model checkpoint, through the generate path (greedy, KV
cache) exactly as inference runs.

For each IMAGE, writes OUT/<name>_mask.png (0/255, the image's original size) and
OUT/<name>_overlay.png (the prediction in green over the image), prints the generated text and
whether [SEG] was emitted (no [SEG] means an empty mask), and writes OUT/predictions.json. The mask
and the vessel fraction are restricted to the photograph's field of view (the camera aperture, found
as the dataset readers find it); --no-fov keeps the whole frame. The first line says what the model is.
Accepted: RGB, greyscale, palette, RGBA (alpha dropped), CMYK and 16-bit greyscale images of any
size; an unreadable file stops the command before the model loads, naming the file.

    python launch/predict.py --checkpoint runs/hsft/hsft fundus1.png fundus2.tif --output-dir preds/
"""

import argparse
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.engine.verbosity import set_verbosity
from hsft.eval.cli import add_inference_options, run_predict


def parse(argv):
    parser = command_line.Parser(prog="launch/predict.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    command_line.add_model(parser, "--checkpoint")
    command_line.add_output_dir(parser, help="directory for the masks and overlays", old=("--out",))
    command_line.add_overwrite(parser)
    command_line.add_verbose(parser)
    parser.add_argument("--no-fov", action="store_true",
                        help="keep the mask and the vessel fraction over the whole frame, not only the field of view")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation budget per image (default: 16)")
    add_inference_options(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    set_verbosity(args.verbose, deepspeed=False)
    return command_line.run("launch/predict.py", lambda: run_predict(
        args.checkpoint, args.images, args.output_dir, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, prompt=args.prompt,
        fov=not args.no_fov, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
