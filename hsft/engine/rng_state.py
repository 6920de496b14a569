"""The random-number state of one rank, saved with every checkpoint and restored on resume.

Reseeding on resume is not enough: dropout masks (LoRA dropout is on by default) and anything else
drawn from the global generators depend on every draw made before, so a resumed stage only
reproduces the uninterrupted run when it continues from the very same generator states. Each rank
draws its own dropout masks, so each rank saves its own file next to DeepSpeed's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["capture", "file_for_rank", "load", "restore", "save", "seed_for_new_rank"]

FORMAT_VERSION = 1


def file_for_rank(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_state_rank{rank:03d}.pt"


def capture() -> dict[str, Any]:
    """The python, numpy, torch CPU and (when present) CUDA generator states of this process."""
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"RNG state format {state.get('format_version')!r} is not supported "
                         f"(this hsft reads version {FORMAT_VERSION})")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(f"the RNG state holds {len(cuda_states)} CUDA generator(s), this process sees "
                             f"{torch.cuda.device_count()} device(s)")
        torch.cuda.set_rng_state_all(cuda_states)


def save(tag_dir: Path, rank: int) -> None:
    """Write this rank's generator states into a checkpoint's tag directory."""
    path = file_for_rank(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture(), path)


def load(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    """This rank's saved states, or None when the checkpoint holds none for this rank (it was written
    by fewer ranks than now run, or by an hsft that saved no RNG state)."""
    path = file_for_rank(tag_dir, rank)
    if not path.is_file():
        return None
    # The file holds numpy arrays and tuples besides tensors, and was written by this module.
    return torch.load(path, weights_only=False)


def seed_for_new_rank(seed: int, rank: int, epoch: int) -> int:
    """The seed of a rank that resumes from a checkpoint holding no RNG state for it (written by fewer ranks).

    Ranks the checkpoint has a state for restore it; there is no state that "would have been" this
    rank's, so it gets one derived from (run seed, rank, epoch of the resume point) through numpy's
    SeedSequence: deterministic (resuming again on the same ranks draws the same masks), different
    for every rank (no two ranks share dropout masks) and for every resume epoch, and unrelated to the
    streams seeded from the run seed itself.
    """
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint32)[0])
