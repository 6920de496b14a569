"""Stage checkpoints: DeepSpeed state + client state + every rank's RNG state, crash-safe and lean.

A checkpoint counts only once it is complete. Every rank writes into a hidden directory beside the
real ones (`.partial-<tag>`), all ranks meet at a barrier, rank 0 renames the directory to `<tag>`
and only then atomically replaces `COMPLETE` (a one-line file naming the tag). A crash (kill -9
included) at any point of a save therefore leaves `COMPLETE` naming the previous checkpoint, whose
directory is untouched; a left-over partial directory is removed by the next save.

Frozen parameters are not written (`exclude_frozen_parameters`): they are the input model's, which
the stage reloads anyway, and for a large model they are nearly all of the bytes. Only the newest
`keep` complete checkpoints of a stage are kept.

A checkpoint resumes on any number of ranks. ZeRO-2 gives each rank one slice of the flattened
optimizer state (fp32 master weights, AdamW moments), so DeepSpeed's ordinary load needs the number
of ranks that wrote it. When that number differs, rank 0 converts the checkpoint once into DeepSpeed's
universal format (one file per parameter and state, not partitioned) in `.universal-<tag>` beside it,
written under a `.partial-` name and renamed when whole, the original untouched; every rank then
loads its own new slice from it (`hsft.engine.universal`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hsft.engine import distributed, rng_state, universal, zero_state
from hsft.engine.files import fsync_dir
from hsft.engine.verbosity import quiet_stdout
from hsft.errors import BadValue

MARKER = "COMPLETE"
PARTIAL_PREFIX = ".partial-"


@contextmanager
def _frozen_aliases_left_out(engine):
    """DeepSpeed's exclude_frozen_parameters drops the frozen names of named_parameters(), which lists a
    tied tensor once: the LM head tied to the input embedding stayed in every checkpoint under its second
    name (151,936 x 896 floats, 545 MB a stage at Sa2VA-1B). Drop every frozen name, aliases included."""
    frozen = [name for name, param in engine.module.named_parameters(remove_duplicate=False)
              if not param.requires_grad]
    original = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        state = original(*args, **kwargs)
        if state is not None and kwargs.get("exclude_frozen_parameters"):
            for name in frozen:
                state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # the class's method again


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
    with _frozen_aliases_left_out(engine):
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
        fsync_dir(ckpt_dir)
        tmp = ckpt_dir / f".{MARKER}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(tag + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, ckpt_dir / MARKER)
        fsync_dir(ckpt_dir)
        prune(ckpt_dir, keep)
    distributed.barrier()


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
    # A universal copy only serves resuming from the checkpoint COMPLETE names, on another number of ranks.
    removed += [p for p in ckpt_dir.iterdir()
                if p.is_dir() and p.name.startswith(universal.PREFIX) and p.name != universal.PREFIX + str(current)]
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


@dataclass(frozen=True)
class ResumePoint:
    """The newest complete checkpoint of a stage, and how many ranks wrote it and now run."""

    ckpt_dir: Path
    tag: str
    saved_world: int | None  # None: no ZeRO optimizer state in it (nothing partitioned by rank)
    world: int

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def ranks_changed(self) -> bool:
        return self.saved_world is not None and self.saved_world != self.world


def resume_point(ckpt_dir: Path, world: int) -> ResumePoint | None:
    """Where `load` would resume from, or None when the stage has no complete checkpoint. Known before
    the engine is built, because DeepSpeed must be told at initialize to read a universal checkpoint."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    return ResumePoint(Path(ckpt_dir), tag, saved_world_size(Path(ckpt_dir) / tag), world)


def ds_config_for(point: ResumePoint | None, ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config to build the engine with for resuming from `point`."""
    if point is None or not point.ranks_changed:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load(engine, point: ResumePoint) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state and this rank's RNG state; return the client state.

    The engine must have been built with `ds_config_for(point, ...)`. The module state holds only the
    trainable parameters (frozen ones are excluded when saving), hence the non-strict module load; the
    trainable ones are checked against it by name. On another number of ranks the trainable parameters
    and their optimizer state come from the universal copy (DeepSpeed sets the module's weights from
    the fp32 master weights there); the client state, scheduler and RNG files from the original.
    """
    path = point.path
    load_dir, tag = point.ckpt_dir, point.tag
    if point.ranks_changed:
        load_dir = universal.ensure_converted(path)
    loaded, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True, load_module_strict=False)
    if loaded is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint {path}")
    if point.ranks_changed:
        _load_buffers(engine.module, path)
    saved = client_state.pop("hsft_trainable", None)
    if saved is not None:
        now = trainable_names(engine)
        if now != saved:
            missing = sorted(set(now) - set(saved))[:3]
            extra = sorted(set(saved) - set(now))[:3]
            raise BadValue(f"{path}: trained other parameters than this stage trains (missing {missing}, "
                             f"unexpected {extra}); was it written by another stage or configuration?")
    state = rng_state.load(path, distributed.rank())
    if state is not None:
        rng_state.restore(state)
    client_state["hsft_rng_restored"] = state is not None
    return client_state


def _load_buffers(module: torch.nn.Module, tag_dir: Path) -> None:
    # DeepSpeed's universal load skips the saved module state, which also holds the module's buffers (running
    # statistics, if a module keeps any): restore them as the ordinary load does.
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    buffers = {name for name, _ in module.named_buffers()}
    module.load_state_dict({name: value for name, value in saved.items() if name in buffers}, strict=False)


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
    with quiet_stdout():  # DeepSpeed prints "Processing zero checkpoint ..." and the shapes it finds
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float() for k, v in state.items()}


def saved_world_size(tag_dir: Path) -> int | None:
    """How many ranks wrote a checkpoint: one ZeRO optimizer-state file each (None: not a ZeRO checkpoint)."""
    return len(zero_state.optimizer_files(tag_dir)) or None


def trainable_names(engine) -> list[str]:
    """What `load` compares against: stored in the client state under "hsft_trainable"."""
    return sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
