"""Dataset tools: write a synthetic set, or check a dataset on disk.

    python launch/data.py synth --out data/synth --n 200 --seed 0 [--size 128]
    python launch/data.py check --format drive --root /data/DRIVE
"""

from __future__ import annotations

import argparse
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft.data.check import check_dataset
from hsft.data.export import write_synthetic_set
from hsft.data.layouts import FORMATS
from hsft.data.sample import DatasetError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/data.py",
        description="Retinal vessel dataset tools: generate a synthetic fundus set, or scan a dataset "
        "and report its splits, image sizes, vessel fraction and every problem found.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{synth,check}")

    synth = commands.add_parser(
        "synth",
        help="write a synthetic fundus set in the folder layout",
        description="Write N synthetic fundus images with exact vessel and FOV masks to OUT/images, "
        "OUT/masks and OUT/fov (PNG). Sample i uses generator seed S+i, so the same arguments "
        "always write the same files. Read the result with --format synthetic --root OUT (or folder).",
    )
    synth.add_argument("--out", required=True, help="output directory (must not already hold images)")
    synth.add_argument("--n", type=int, required=True, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="first generator seed (default 0)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    check = commands.add_parser(
        "check",
        help="scan a dataset and list every problem",
        description="Scan both splits of a dataset, decode every file, and print the number of images "
        "per split, image sizes, the vessel fraction inside the FOV and every problem found "
        "(unreadable files, size mismatches, unpaired images or masks, empty directories). "
        "Exits with status 1 when there is any problem.",
    )
    check.add_argument("--format", required=True, choices=FORMATS, help="dataset layout")
    check.add_argument("--root", required=True, help="dataset directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "synth":
            count = write_synthetic_set(args.out, args.n, args.seed, args.size, progress=not args.quiet)
            print(f"wrote {count} synthetic images to {args.out} (images/, masks/, fov/)")
            return 0
        report = check_dataset(args.format, args.root)
    except (DatasetError, ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
