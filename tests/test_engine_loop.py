"""The shared DeepSpeed loop on a toy regression task: accumulation, clipping, schedule, the
non-finite guard, checkpoints and resume. Runs in-process on a one-rank gloo group."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from hsft.config import TrainConfig
from hsft.engine import checkpoint
from hsft.engine.ds_config import DeepSpeedConfigError, apply_precision, load_ds_config, stage_ds_config
from hsft.engine.loop import NonFiniteTrainingError, epoch_order, param_groups
from hsft.engine.schedule import cosine_with_warmup

from launch_scripts import REPO, ZERO2
from toy_training import ToyModule, ToyTask, run


def test_shipped_configs_are_concrete_and_auto_is_refused(tmp_path):
    for name in ("zero2.json", "zero2_offload.json"):
        cfg = load_ds_config(REPO / "ds_configs" / name)
        assert cfg["zero_optimization"]["stage"] == 2
        assert cfg["bf16"]["enabled"] is True
    bad = tmp_path / "bad.json"
    bad.write_text('{"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(DeepSpeedConfigError, match=r"bad.json.*bf16.enabled"):
        load_ds_config(bad)
    with pytest.raises(DeepSpeedConfigError, match="no such file"):
        load_ds_config(tmp_path / "missing.json")
    merged = stage_ds_config(apply_precision(load_ds_config(ZERO2), "fp32"),
                             TrainConfig(micro_batch=3, grad_accum=5, clip=0.25))
    assert (merged["train_micro_batch_size_per_gpu"], merged["gradient_accumulation_steps"]) == (3, 5)
    assert merged["gradient_clipping"] == 0.25 and merged["bf16"]["enabled"] is False
    assert "train_batch_size" not in merged


def test_schedule_warmup_cosine_and_floor():
    lrs = [cosine_with_warmup(s, 10, 2, 1.0, 0.1) for s in range(12)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_param_groups_only_trainable_and_no_decay_for_1d():
    module = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    module[0].requires_grad_(False)
    groups = param_groups(module, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(module[2].weight)} and groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in groups[1]["params"]} == {id(module[1].weight), id(module[1].bias), id(module[2].bias)}
    module.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        param_groups(module, 0.1)


def test_epoch_order_covers_every_sample_and_pads_to_global_batches():
    order = epoch_order(10, 4, seed=1, epoch=0)
    assert len(order) == 12 and set(order) == set(range(10))
    assert order != epoch_order(10, 4, seed=1, epoch=1)
    assert order == epoch_order(10, 4, seed=1, epoch=0)


def test_loss_decreases_and_lr_follows_schedule(tmp_path):
    cfg = TrainConfig(epochs=3, micro_batch=4, grad_accum=1, lr=0.5, min_lr=0.05, warmup_ratio=0.25, clip=0)
    task = ToyTask()
    initial = task.evaluate(task.module)["mse"]
    result, _ = run(tmp_path, cfg, task=task)
    assert result.optimizer_steps == 12 and result.skipped_steps == 0
    assert result.epoch_metrics[-1]["mse"] < 0.25 * initial
    assert result.last_lr == pytest.approx(cosine_with_warmup(12, 12, 3, 0.5, 0.05))
    assert (tmp_path / "checkpoints" / "COMPLETE").read_text().strip() == "epoch0003"


def test_accumulation_matches_a_bigger_micro_batch(tmp_path):
    big, _ = run(tmp_path / "a", TrainConfig(epochs=1, micro_batch=4, grad_accum=1, lr=0.05, clip=0))
    acc, _ = run(tmp_path / "b", TrainConfig(epochs=1, micro_batch=2, grad_accum=2, lr=0.05, clip=0))
    wa = big.weights["linear.weight"]
    wb = acc.weights["linear.weight"]
    torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_update_and_grad_norm_is_pre_clip(tmp_path):
    cfg = TrainConfig(epochs=1, micro_batch=16, grad_accum=1, lr=1.0, min_lr=1.0, weight_decay=0.0, clip=1e-3)
    task = ToyTask(scale=100.0)
    before = task.module.linear.weight.detach().clone()
    result, _ = run(tmp_path, cfg, task=task)
    engine = result.engine
    assert engine.get_global_grad_norm() > 1.0  # the reported norm is the one before clipping
    # AdamW's first step moves each weight by ~lr regardless of scale, so compare against plain SGD-like
    # behaviour through the optimizer state: the stored first moment is (1 - beta1) * clipped grad.
    state = engine.optimizer.optimizer.state
    exp_avg = torch.cat([s["exp_avg"].flatten() for s in state.values()])
    assert exp_avg.norm() <= (1 - 0.9) * 1e-3 * 1.01
    assert not torch.equal(before, engine.module.linear.weight.detach())


class PartlyTrainedModule(ToyModule):
    """The toy regression with a frozen layer and a trainable parameter the loss never reaches (its
    gradient stays None), as in the stages: only `linear` receives gradients."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        x, y, ids = batch
        return super().forward((self.frozen(x) * 0 + x, y, ids))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_logged_grad_norm_is_the_pre_clip_norm_over_the_trainable_parameters(tmp_path, precision, grad_accum):
    task = ToyTask(n=12, scale=10.0)
    task.module = PartlyTrainedModule()
    micro_batch = 2
    order = epoch_order(len(task), micro_batch * grad_accum, seed=3, epoch=0)
    # The first optimizer step's gradient, by hand: the mean over the accumulated micro-batches.
    reference = PartlyTrainedModule()
    reference.load_state_dict(task.module.state_dict())
    for k in range(grad_accum):
        batch = task.make_batch(order[k * micro_batch:(k + 1) * micro_batch], torch.float32, torch.device("cpu"))
        (reference(batch)[0] / grad_accum).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in reference.linear.parameters()]))
    cfg = TrainConfig(epochs=1, micro_batch=micro_batch, grad_accum=grad_accum, lr=1e-3, clip=0.5)
    result, _ = run(tmp_path, cfg, task=task, precision=precision)
    assert len(result.grad_norms) == result.optimizer_steps == 12 // (micro_batch * grad_accum)
    assert expected > cfg.clip  # clipping is active: the logged norm must be the one before it
    assert result.grad_norms[0] == pytest.approx(float(expected), rel=1e-5 if precision == "fp32" else 3e-2)
    assert all(math.isfinite(g) and g > 0 for g in result.grad_norms)


def test_non_finite_loss_skips_the_step_and_repeats_stop_without_saving(tmp_path):
    # One poisoned sample: its window is skipped, training goes on.
    task = ToyTask(poison={5})
    cfg = TrainConfig(epochs=1, micro_batch=1, grad_accum=1, lr=0.01, clip=1.0)
    result, _ = run(tmp_path / "once", cfg, task=task)
    assert result.skipped_steps == 1 and result.optimizer_steps == 16
    assert all(torch.isfinite(p).all() for p in result.engine.module.parameters())
    assert result.engine.skipped_steps == 1
    assert result.skipped == [{"step": result.skipped[0]["step"], "epoch": 1, "reason": "non-finite loss",
                               "samples": ["#5"]}]
    # Every sample poisoned: stop after max_nonfinite_steps with a clear message; the unfinished epoch is
    # not saved, so there is no checkpoint to resume from and the message says so.
    task = ToyTask(poison=set(range(16)))
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row.*restarts the stage from its start"):
        run(tmp_path / "always", TrainConfig(epochs=1, micro_batch=1, lr=0.01, max_nonfinite_steps=3), task=task)
    assert checkpoint.latest_tag(tmp_path / "always" / "checkpoints") is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, precision):
    cfg = TrainConfig(epochs=3, micro_batch=2, grad_accum=2, lr=0.02, min_lr=0.001, warmup_ratio=0.1)
    full, _ = run(tmp_path / "full", cfg, precision=precision, keep=3)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir() if p.is_dir()) == \
        ["epoch0001", "epoch0002", "epoch0003"]
    # Simulate a crash after epoch 1: only the epoch-1 checkpoint survives.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    ckpts = interrupted / "checkpoints"
    for tag in ("epoch0002", "epoch0003"):
        shutil.rmtree(ckpts / tag, ignore_errors=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "epoch0002", ckpts / "epoch0002")
    (ckpts / "COMPLETE").write_text("epoch0002\n")
    resumed, _ = run(interrupted, cfg, resume=True, precision=precision)
    assert resumed.resumed_from.endswith("epoch0002")
    # The stage's record holds every step, the ones before the checkpoint from the checkpoint itself.
    assert resumed.losses == full.losses and resumed.grad_norms == full.grad_norms
    assert [e["epoch"] for e in resumed.epoch_metrics] == [1, 2, 3]
    assert resumed.global_step == full.global_step


def test_resume_with_another_global_batch_continues_the_schedule_from_the_epoch_boundary(tmp_path):
    """--resume may change the micro-batch (as resuming on another number of ranks needs): the epochs after
    the checkpoint take the new global batch's number of steps, and the learning rate continues from the
    epoch boundary's place in the new step count, as an uninterrupted run at the new global batch has it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    small = TrainConfig(epochs=2, micro_batch=2, grad_accum=1, lr=0.02, min_lr=0.001, warmup_ratio=0.1)
    large = TrainConfig(epochs=2, micro_batch=4, grad_accum=1, lr=0.02, min_lr=0.001, warmup_ratio=0.1)
    full, task = run(tmp_path / "full", small, keep=2)
    ckpts = tmp_path / "full" / "checkpoints"
    shutil.rmtree(ckpts / "epoch0002")  # a crash in epoch 2: epoch 1's checkpoint is the last complete one
    (ckpts / checkpoint.MARKER).write_text("epoch0001\n")
    resumed, _ = run(tmp_path / "full", large, resume=True)
    reference, _ = run(tmp_path / "large", large)
    small_steps, large_steps = len(task) // 2, len(task) // 4
    assert resumed.resumed_from.endswith("epoch0001")
    assert resumed.losses[:small_steps] == full.losses[:small_steps]
    assert len(resumed.losses) == small_steps + large_steps

    def lrs(run_dir: Path) -> list[float]:
        events = EventAccumulator(str(run_dir / "tb"))
        events.Reload()
        return [e.value for e in events.Scalars("toy/lr")]

    # The second epoch's learning rates are the uninterrupted large-batch run's; the restored scheduler alone
    # stands at step 8 of the new 2 x 4 steps, the end of the schedule.
    assert lrs(tmp_path / "full")[small_steps:] == pytest.approx(lrs(tmp_path / "large")[large_steps:], rel=1e-6)
    assert resumed.last_lr == pytest.approx(reference.last_lr, rel=1e-6)


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    result, _ = run(tmp_path, TrainConfig(epochs=2, micro_batch=8, lr=0.01))
    ckpts = tmp_path / "checkpoints"
    # A half-written newer tag without the marker update is ignored.
    (ckpts / "epoch0003").mkdir()
    assert checkpoint.latest_tag(ckpts) == "epoch0002"


def test_offload_config_trains_the_same_steps(tmp_path):
    cfg = TrainConfig(epochs=1, micro_batch=4, grad_accum=1, lr=0.05, clip=0)
    plain, _ = run(tmp_path / "plain", cfg)
    offload, _ = run(tmp_path / "offload", cfg, config="zero2_offload.json")
    torch.testing.assert_close(offload.engine.module.linear.weight.detach(),
                               plain.engine.module.linear.weight.detach(), rtol=1e-5, atol=1e-6)
