"""Stage checkpoints: DeepSpeed state + client state + every rank's RNG state, crash-safe and lean.

A checkpoint counts only once it is complete. Every rank writes into a hidden directory beside the
real ones (`.partial-<tag>`), all ranks meet at a barrier, rank 0 renames the directory to `<tag>`
and only then atomically replaces `COMPLETE` (a one-line file naming the tag). A crash (kill -9
included) at any point of a save therefore leaves `COMPLETE` naming the previous checkpoint, whose
directory is untouched; a left-over partial directory is removed by the next save.

Frozen parameters are not written (`exclude_frozen_parameters`): they are the input model's, which
the stage reloads anyway, and for a large model they are nearly all of the bytes. Only the newest
`keep` complete checkpoints of a stage are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


from hsft.engine import distributed, rng_state

MARKER = "COMPLETE"
PARTIAL_PREFIX = ".partial-"


def save(engine, ckpt_dir: Path, tag: str, client_state: dict[str, Any], keep: int = 1) -> None:
    """Save a DeepSpeed checkpoint as ckpt_dir/tag, mark it complete, keep the newest `keep`."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ckpt_dir = Path(ckpt_dir)
    partial = PARTIAL_PREFIX + tag
    if distributed.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)  # from a save that crashed
    distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    rng_state.save(ckpt_dir / partial, distributed.rank())
    distributed.barrier()
    if distributed.is_main():
        final = ckpt_dir / tag
        if final.exists():
            # Only an incomplete leftover can sit here: COMPLETE never names a tag that is saved again.
            shutil.rmtree(final)
        os.replace(ckpt_dir / partial, final)
        _fsync_dir(ckpt_dir)
        tmp = ckpt_dir / f".{MARKER}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(tag + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, ckpt_dir / MARKER)
        _fsync_dir(ckpt_dir)
        prune(ckpt_dir, keep)
    distributed.barrier()


def _fsync_dir(path: Path) -> None:
    # Makes the renames themselves durable, not only the files' contents.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` checkpoints (by tag name, which sorts by step), never the one
    `COMPLETE` names, and any partial directory left by a crashed save; returns what was removed."""
    ckpt_dir = Path(ckpt_dir)
    current = latest_tag(ckpt_dir)
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if current is not None:
        # Tags after the complete one are leftovers of a save that crashed before its marker.
        tags = [p for p in tags if p.name <= current]
    removed = [p for p in tags[:max(0, len(tags) - keep)] if p.name != current]
    removed += [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PARTIAL_PREFIX)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag of the newest complete checkpoint, or None."""
    marker = Path(ckpt_dir) / MARKER
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def load(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state and this rank's RNG state; return the client state.

    The module state holds only the trainable parameters (frozen ones are excluded when saving), hence
    the non-strict module load; the trainable ones are checked against it by name.
    """
    path = Path(ckpt_dir) / tag
    saved_world = saved_world_size(path)
    if saved_world not in (None, distributed.world_size()):
        # DeepSpeed partitions ZeRO optimizer state by rank and cannot re-partition it on load.
        raise ValueError(f"{path}: written by {saved_world} rank(s), this run has {distributed.world_size()}; "
                         f"resuming on another number of ranks is not supported: resume with {saved_world} rank(s)")
    loaded, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True, load_module_strict=False)
    if loaded is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint {path}")
    saved = client_state.pop("hsft_trainable", None)
    if saved is not None:
        now = sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
        if now != saved:
            missing = sorted(set(now) - set(saved))[:3]
            extra = sorted(set(saved) - set(now))[:3]
            raise ValueError(f"{path}: trained other parameters than this stage trains (missing {missing}, "
                             f"unexpected {extra}); was it written by another stage or configuration?")
    state = rng_state.load(path, distributed.rank())
    if state is not None:
        rng_state.restore(state)
    client_state["hsft_rng_restored"] = state is not None
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
def saved_world_size(tag_dir: Path) -> int | None:
    """How many ranks wrote a checkpoint: one ZeRO optimizer-state file each (None: not a ZeRO checkpoint)."""
    files = list(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(files) or None


def trainable_names(engine) -> list[str]:
    """What `load` compares against: stored in the client state under "hsft_trainable"."""
    return sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
