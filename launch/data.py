"""Dataset tools: write a synthetic set, or check a dataset on disk.

    python launch/data.py synth --output-dir data/synth --n 200 --seed 0 [--size 128]
    python launch/data.py check --data-format drive --data-root /data/DRIVE
"""

from __future__ import annotations

import argparse
import sys

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.data.check import check_dataset
from hsft.data.export import write_synthetic_set
from hsft.data.layouts import FORMATS


def _parser() -> argparse.ArgumentParser:
    parser = command_line.Parser(
        prog="launch/data.py",
        description="Retinal vessel dataset tools: generate a synthetic fundus set, or scan a dataset "
        "and report its splits, image sizes, vessel fraction and every problem found.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{synth,check}",
                                     parser_class=command_line.Parser)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic fundus set in the folder layout",
        description="Write N synthetic fundus images with exact vessel and FOV masks to OUT/images, "
        "OUT/masks and OUT/fov (PNG). Sample i uses generator seed S+i, so the same arguments "
        "always write the same files. Read the result with --data-format synthetic --data-root OUT (or folder).",
    )
    command_line.add_output_dir(synth, help="output directory (must not already hold images)", old=("--out",))
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
    command_line.add_data(check, required=True, formats=FORMATS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    found_problems = []

    def work() -> None:
        if args.command == "synth":
            count = write_synthetic_set(args.output_dir, args.n, args.seed, args.size, progress=not args.quiet)
            print(f"wrote {count} synthetic images to {args.output_dir} (images/, masks/, fov/)")
            return
        report = check_dataset(args.data_format, args.data_root)
        print(report.render())
        found_problems.append(not report.ok)

    code = command_line.run("launch/data.py", work)
    # check: exit 1 when the dataset has problems (listed above), as a linter does.
    return code if code else int(any(found_problems))


if __name__ == "__main__":
    sys.exit(main())
