#!/usr/bin/env python
"""Compare groups of hsft runs (e.g. HSFT vs its matched-compute control over several seeds).

    python launch/compare_runs.py hsft=runs/exp/s0,runs/exp/s1 control=runs/exp/s0:control,runs/exp/s1:control

A run ends at its last main-line stage (HSFT), or at the stage named after a colon (DIR:control).
"""

import argparse
import json
import sys
from pathlib import Path

import _import_hsft  # noqa: F401  (first: makes `import hsft` find the package)

from hsft import command_line
from hsft.eval.runs import format_groups, summarize_groups


def main(argv=None) -> int:
    parser = command_line.Parser(prog="launch/compare_runs.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", metavar="LABEL=DIR[,DIR...]",
                        help="a label and the output directories of the runs in that group (DIR:STAGE ends a run at "
                             "that stage's row, e.g. DIR:control)")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")
    args = parser.parse_args(argv)
    groups = {}
    for item in args.groups:
        label, sep, dirs = item.partition("=")
        if not sep or not label or not dirs:
            parser.error(f"{item!r}: expected LABEL=DIR[,DIR...]")
        groups[label] = [d for d in dirs.split(",") if d]

    def work() -> None:
        rows = summarize_groups(groups)
        print(format_groups(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")

    return command_line.run("launch/compare_runs.py", work)


if __name__ == "__main__":
    sys.exit(main())
