"""Stage checkpoints: DeepSpeed state + client state, crash-safe, and the stage's weight export.

A checkpoint counts only once it is complete: DeepSpeed writes the tag directory, every rank reaches
a barrier, and only then does rank 0 atomically replace `COMPLETE` (a one-line file naming the tag).
A crash in the middle of a save therefore leaves `COMPLETE` pointing at the previous checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from hsft.engine import distributed

MARKER = "COMPLETE"


def save(engine, ckpt_dir: Path, tag: str, client_state: dict[str, Any], keep: int = 2) -> None:
    """Save a DeepSpeed checkpoint under ckpt_dir/tag and mark it complete; keep the newest `keep`."""
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    distributed.barrier()
    if distributed.is_main():
        tmp = ckpt_dir / f".{MARKER}.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, ckpt_dir / MARKER)
        _prune(ckpt_dir, tag, keep)
    distributed.barrier()


def _prune(ckpt_dir: Path, newest: str, keep: int) -> None:
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    old = [p for p in tags if p.name != newest][: max(0, len(tags) - keep)]
    for path in old:
        shutil.rmtree(path, ignore_errors=False)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag of the newest complete checkpoint, or None."""
    marker = Path(ckpt_dir) / MARKER
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def load(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state; return the client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint {Path(ckpt_dir) / tag}")
    return client_state


def fp32_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full-precision weights of the module from the newest complete checkpoint.

    Under bf16 the module holds bf16 copies; the fp32 master weights live (sharded) in the ZeRO
    optimizer state. DeepSpeed's own converter reassembles them, so the next stage starts from exactly
    what the optimizer held rather than a rounded copy.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise RuntimeError(f"no complete checkpoint under {ckpt_dir}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float() for k, v in state.items()}
