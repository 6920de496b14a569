"""Checkpoint writing: a crash at any point of a save leaves the previous checkpoint usable; only the newest
K are kept; frozen parameters are not written; each rank's RNG state is."""

from __future__ import annotations

import pytest
import torch

from hsft.config import TrainConfig
from hsft.engine import checkpoint, rng_state

from toy_training import ToyTask, run


CFG = TrainConfig(epochs=2, micro_batch=8, lr=0.01)


class Crash(Exception):
    pass


def test_crash_while_deepspeed_writes_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first, _ = run(tmp_path, TrainConfig(epochs=1, micro_batch=8, lr=0.01))
    engine_cls = type(first.engine)
    real_save = engine_cls.save_checkpoint

    def dies_halfway(self, save_dir, tag=None, **kwargs):
        real_save(self, save_dir, tag=tag, **kwargs)  # files written ...
        raise Crash  # ... but the process dies before the rename and the marker

    monkeypatch.setattr(engine_cls, "save_checkpoint", dies_halfway)
    with pytest.raises(Crash):
        run(tmp_path, CFG, resume=True)
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == "epoch0001"
    assert (ckpts / ".partial-epoch0002").is_dir() and not (ckpts / "epoch0002").exists()
    monkeypatch.undo()
    resumed, _ = run(tmp_path, CFG, resume=True)
    assert resumed.resumed_from.endswith("epoch0001") and resumed.optimizer_steps == 4
    assert checkpoint.latest_tag(ckpts) == "epoch0002"
    assert not any(p.name.startswith(".partial-") for p in ckpts.iterdir())  # the leftover is cleaned up


def test_crash_between_rename_and_marker_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, TrainConfig(epochs=1, micro_batch=8, lr=0.01))
    real_replace = checkpoint.os.replace

    def dies_at_the_marker(src, dst):
        if str(dst).endswith(checkpoint.MARKER):
            raise Crash
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dies_at_the_marker)
    with pytest.raises(Crash):
        run(tmp_path, CFG, resume=True)
    monkeypatch.undo()
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "epoch0002").is_dir() and checkpoint.latest_tag(ckpts) == "epoch0001"
    resumed, _ = run(tmp_path, CFG, resume=True)
    assert resumed.resumed_from.endswith("epoch0001") and checkpoint.latest_tag(ckpts) == "epoch0002"


@pytest.mark.parametrize("keep", [1, 2])
def test_only_the_newest_k_are_kept(tmp_path, keep):
    run(tmp_path, TrainConfig(epochs=3, micro_batch=8, lr=0.01), keep=keep)
    tags = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["epoch0002", "epoch0003"][-keep:]


def test_frozen_parameters_are_not_written_and_rng_state_is(tmp_path):
    task = ToyTask()
    task.module.linear.bias.requires_grad_(False)
    run(tmp_path, TrainConfig(epochs=1, micro_batch=8, lr=0.01), task=task)
    tag_dir = tmp_path / "checkpoints" / "epoch0001"
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    assert set(states["module"]) == {"linear.weight"}
    saved = rng_state.load(tag_dir, 0)
    assert saved is not None and set(saved) >= {"python", "numpy", "torch"}
    assert rng_state.load(tag_dir, 1) is None
