"""What every command in launch/ shares: its parser, the options that mean the same everywhere, and how it
ends.

    parser = command_line.Parser(prog="launch/x.py", description=__doc__)
    command_line.add_output_dir(parser, old=("--out",))      # --output-dir (+ old spellings as aliases)
    command_line.add_overwrite(parser)                       # --overwrite
    command_line.add_model(parser, "--checkpoint")           # a model directory or a run's stage directory
    command_line.add_data(parser)                            # --data-format / --data-root
    command_line.add_verbose(parser)                         # --verbose
    args = parser.parse_args(argv)
    return command_line.run("launch/x.py", lambda: work(args))   # exit code: 0, 2 for bad input, ...

A misspelled option ends in one line naming the closest valid one, not a usage block. Whatever the
command writes goes under --output-dir, which it refuses to reuse unless --overwrite is given
(`prepare_output_dir`).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hsft.errors import BadValue, run_command

__all__ = ["Parser", "add_output_dir", "add_overwrite", "add_model", "add_data", "add_verbose",
           "prepare_output_dir", "closest_option", "run"]


def closest_option(word: str, options: Sequence[str]) -> str | None:
    """The valid option nearest to a misspelled `word` (e.g. --lora-rnak -> --lora-rank), or None."""
    name = word.split("=", 1)[0]
    long_options = [o for o in options if o.startswith("--")]
    found = difflib.get_close_matches(name, long_options, n=1, cutoff=0.6)
    return found[0] if found else None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: an unknown option names the closest valid one."""

    def parse_known_args(self, args=None, namespace=None):
        # A misspelled option is named before anything else (argparse would first report the options that
        # are missing, which the misspelling may be one of). A parser with sub-commands leaves the check to them.
        if self._subparsers is None:
            for word in sys.argv[1:] if args is None else args:
                if word == "--":
                    break
                name = word.split("=", 1)[0]
                if (word.startswith("--") and name not in self._option_string_actions
                        and not any(o.startswith(name) for o in self._option_string_actions)):
                    self.error(f"unrecognized arguments: {word}")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # argparse calls this and expects it not to return
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            words = unknown.group(1).split()
            option = next((w for w in words if w.startswith("-")), words[0])
            key = getattr(self, "moved_options", {}).get(option.split("=", 1)[0])
            near = closest_option(option, list(self._option_string_actions))
            if key is not None:  # a setting reached with --set (hsft.arguments), not an option of its own
                message = (f"unknown option {option}; {key} is set with --set {key}=VALUE "
                           f"({self.prog} --help-all lists every key)")
            else:
                message = f"unknown option {option}" + (f"; did you mean {near}?" if near else
                                                         f"; see {self.prog} --help")
        if os.environ.get("RANK", "0") == "0":  # every rank parses under the DeepSpeed launcher; one speaks
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def add_output_dir(parser: argparse.ArgumentParser, *, required: bool = True, default: str | None = None,
                   help: str = "directory everything is written to", old: Sequence[str] = ()) -> None:
    """--output-dir; `old` spellings (e.g. --out, --output) stay accepted as aliases."""
    parser.add_argument("--output-dir", *old, dest="output_dir", required=required and default is None,
                        default=default, metavar="DIR",
                        help=help + (f" (default: {default})" if default is not None else ""))


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier run wrote to --output-dir (without it, a non-empty "
                             "--output-dir is refused)")


def add_model(parser: argparse.ArgumentParser, flag: str = "--checkpoint", *, aliases: Sequence[str] = ("--model",),
              required: bool = True, help: str = "the model: a model directory, or a run's stage directory "
                                                 "holding model/ (e.g. runs/hsft/hsft)") -> None:
    parser.add_argument(flag, *aliases, dest=flag.lstrip("-").replace("-", "_"), required=required, metavar="DIR",
                        help=help)


def add_data(parser: argparse.ArgumentParser, *, required: bool = False, formats: Sequence[str] | None = None) -> None:
    """--data-format / --data-root, as the main command spells them (old: --format / --root)."""
    parser.add_argument("--data-format", "--format", dest="data_format", required=required, choices=formats,
                        default=None if required else "synthetic", help="dataset layout")
    parser.add_argument("--data-root", "--root", dest="data_root", required=required, default=None, metavar="DIR",
                        help="dataset directory")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show the libraries' informational logs too")


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, *, argument: str = "--output-dir") -> Path:
    """Refuse a non-empty output directory unless `overwrite`, which empties it first (so two runs' files,
    TensorBoard logs included, never mix); returns the path, created."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise BadValue(f"{argument} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise BadValue(f"{argument} {out}: already holds output; pass --overwrite to replace it, or choose "
                           f"another {argument}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(prog: str, action: Callable[[], object], *, resume_hint: str | None = None) -> int:
    """Run the command's work: one line and exit 2 for bad input, the traceback for a bug (hsft.errors)."""
    return run_command(prog, action, resume_hint=resume_hint)
