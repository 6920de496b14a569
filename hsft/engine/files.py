"""Files written atomically: every stage's JSON (rank 0 only), and the directory sync that makes a rename last."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hsft.engine import distributed


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` as JSON via a temporary file and a rename, so a reader never sees half a file
    (rank 0 only; the other ranks return at once)."""
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    tmp.replace(path)


def fsync_dir(path: Path) -> None:
    """Make the renames inside a directory durable, not only the renamed files' contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
