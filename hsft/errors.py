"""The errors a user can act on, and how every command reports them.

`UserError` is the one base class of input the user can fix: a bad option value, a missing or broken
file, an output directory that would be overwritten. A command prints such an error as one line and
exits 2. Anything else is a bug and keeps its traceback. `RunStopped` is a run that ended on purpose
before its end (non-finite training) and exits 3; an interrupt (Ctrl-C, SIGTERM) exits 130 with one
line saying how to continue.

The subclasses that also derive from a built-in exception (`BadValue` is a ValueError, `MissingFile` a
FileNotFoundError) let code that catches the built-in keep working.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

__all__ = ["UserError", "BadValue", "MissingFile", "RunStopped", "check", "run_command"]


class UserError(Exception):
    """Input the user can fix; the message names the file or option and what is wrong with it."""


class BadValue(UserError, ValueError):
    """An option or file holds a value that cannot be used."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the command needs does not exist."""


def check(condition: bool, name: str, message: str) -> None:
    """The configs' validation: a false `condition` is a BadValue naming the field `name`."""
    if not condition:
        raise BadValue(f"{name}: {message}")


class RunStopped(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps) after saving what can be resumed."""


def _is_first_rank() -> bool:
    # Only rank 0 speaks under the DeepSpeed launcher; every rank gets the same signal.
    return os.environ.get("RANK", "0") == "0"


def _raise_interrupt(signum, frame):  # noqa: ARG001 (signal handler signature)
    raise KeyboardInterrupt


def run_command(prog: str, action: Callable[[], object], *, resume_hint: str | None = None) -> int:
    """Run `action` as the command `prog` and return its exit code: 0 done, 2 a `UserError` (one line on
    stderr; HSFT_DEBUG=1 shows its traceback), 3 a `RunStopped`, 130 an interrupt (SIGINT or SIGTERM),
    after one line with `resume_hint` (how to continue) when given. A bug propagates with its traceback."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        action()
    except RunStopped as err:
        if _is_first_rank():
            print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 3
    except UserError as err:
        if os.environ.get("HSFT_DEBUG"):
            raise
        if _is_first_rank():
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _is_first_rank():
            print(f"{prog}: interrupted" + (f"; {resume_hint}" if resume_hint else ""), file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
