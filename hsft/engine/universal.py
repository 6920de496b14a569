"""Convert a ZeRO-2 checkpoint into DeepSpeed's universal format, to resume it on another number of ranks.

The universal format stores every trainable parameter's fp32 master weights and AdamW moments whole,
one file each (`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`), so each rank of any world size
can cut its own ZeRO slice from them (`"checkpoint": {"load_universal": true}` in the DeepSpeed
config). DeepSpeed's converter (`deepspeed.checkpoint.ds_to_universal`) does the work; this module
runs it once, on rank 0, into `<checkpoints>/.universal-<tag>/<tag>` and makes that crash-safe: the
conversion is written under a `.partial-` name (which the next save removes if a crash leaves it)
and renamed into place only when whole, and the checkpoint it reads is never written to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

from hsft.engine import distributed
from hsft.engine.files import fsync_dir

__all__ = ["PREFIX", "ensure_converted"]

PREFIX = ".universal-"
# Starts with the checkpoint module's partial prefix, so the next save removes a crashed conversion's leftover.
PARTIAL_PREFIX = ".partial-universal-"
LOG_NAME = "conversion.log"


def ensure_converted(tag_dir: Path) -> Path:
    """The load directory of `tag_dir`'s universal copy (holding `<tag>/`), converted first by rank 0 if
    it does not exist yet; every rank returns once it is there, or raises the conversion's error."""
    tag_dir = Path(tag_dir)
    ckpt_dir, tag = tag_dir.parent, tag_dir.name
    final = ckpt_dir / (PREFIX + tag)
    error = None
    if distributed.is_main() and not final.is_dir():
        try:
            _convert_atomically(tag_dir, final)
        except Exception as exc:  # handed to every rank below, so none waits for a copy that never comes
            error = f"{tag_dir}: converting to DeepSpeed's universal format failed: {type(exc).__name__}: {exc}"
    error = distributed.broadcast_object(error)
    if error is not None:
        raise RuntimeError(f"{error} (see {ckpt_dir / (PARTIAL_PREFIX + tag) / LOG_NAME})")
    if not (final / tag).is_dir():
        raise RuntimeError(f"{final}: the universal copy of {tag_dir} is missing on this rank "
                           "(is the checkpoint directory on a file system every node sees?)")
    return final


def _convert_atomically(tag_dir: Path, final: Path) -> None:
    ckpt_dir, tag = tag_dir.parent, tag_dir.name
    partial = ckpt_dir / (PARTIAL_PREFIX + tag)
    shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that crashed
    partial.mkdir()
    _convert(tag_dir, partial / tag, partial / LOG_NAME)
    os.replace(partial, final)
    fsync_dir(ckpt_dir)


def _convert(source: Path, out: Path, log: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = SimpleNamespace(
        input_folder=str(source), output_folder=str(out),
        # In-process and sequential: the trainable state is small (it excludes frozen parameters), and
        # worker processes would compete with the training ranks for the same cores.
        num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # hsft's ZeRO-2 checkpoints carry no universal-checkpoint metadata (no tensor or pipeline
        # parallelism to describe); the converter then only needs its version key.
        inject_missing_state=True,
    )
    # The converter prints its progress; it goes to a log beside the copy, not into the training log.
    with open(log, "w", encoding="utf-8") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        ds_to_universal(args)
