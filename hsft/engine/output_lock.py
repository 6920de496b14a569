"""One output directory, one writer: an advisory lock held by rank 0 for the whole run.

The lock is `fcntl.flock` on `<output-dir>/.hsft.lock`. The kernel drops it when the holding process
dies, kill -9 included, so a lock left by a killed run is never in the way: the next run finds the
file, takes the lock and overwrites the owner's description. A second run while the first is alive
is refused with a message naming the first (pid, host, start time, command), read from the file.

flock is local to one machine (and unreliable on some network file systems); the owner's host
name in the message shows when two machines share a directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from hsft.engine import distributed
from hsft.errors import UserError

__all__ = ["LOCK_FILE", "OutputDirInUse", "OutputDirLock", "hold_output_dir"]

LOCK_FILE = ".hsft.lock"


class OutputDirInUse(UserError):
    pass


def _describe_owner(path: Path) -> str:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "another process (its description in the lock file is unreadable)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return (f"process {owner.get('pid')} on {owner.get('host')}, started {started}: "
            f"{owner.get('command', '?')}")


class OutputDirLock:
    """`with OutputDirLock(dir):` holds the lock; `acquire()` / `release()` for longer scopes."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputDirInUse(f"--output-dir {self.output_dir} is in use by another hsft run: "
                                     f"{_describe_owner(self.path)}; wait for it to finish or choose another "
                                     "--output-dir") from None
            # A releasing owner unlinks the file before closing it: make sure the locked file is the one
            # at the path now, or another run could lock a fresh file beside this one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                 "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(owner) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """Take the run's lock on rank 0 (the other ranks hold an unacquired handle); every rank raises
    OutputDirInUse when another run holds it. Call `release()` when the run ends."""
    lock = OutputDirLock(output_dir)
    error = None
    if distributed.is_main():
        try:
            lock.acquire()
        except OutputDirInUse as err:
            error = str(err)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise OutputDirInUse(error)
    return lock
