"""A stage checkpoint written by N ranks resumes on M ranks, through the main command under the DeepSpeed
launcher on CPU: a 1-rank LoRA stage killed with SIGKILL in its second epoch resumes on 2 ranks from
DeepSpeed's universal copy of its epoch-1 checkpoint, keeping the global batch (micro-batch 2 on one rank,
1 on each of two).

What is exactly true and asserted: right after the load, the engine holds the checkpoint's trained
weights, fp32 master weights, both AdamW moments (each re-partitioned over the new ranks) and
scheduler step, bit for bit; the original checkpoint is not modified; the log says once that the rank
count changed, and the new rank, which has no saved RNG state, draws from a derived seed. What is not bit
for bit and why: two ranks average two gradients where one rank averages the global batch's loss before
backward (another rounding), so the later steps are compared with the uninterrupted 1-rank run within
bounds derived below (fp32, no dropout, the same samples at every step).

Fewer ranks take the same path (the universal copy re-partitioned over the new world); a resume with
another global batch, whose epochs have another number of steps, is checked in-process in
test_engine_loop.py, and the new rank's seed in test_a_new_rank_gets_its_own_deterministic_seed below."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsft.config import TrainConfig
from hsft.engine import checkpoint, rng_state, universal, zero_state
from hsft.engine.schedule import build_scheduler, move_to_step

from launch_scripts import (LAUNCH, REPO, ZERO2, deepspeed_command, kill_after_checkpoint, launcher_env,
                            run_launched)
from toy_training import run


SAMPLES, EPOCHS = 16, 2
PROBE = REPO / "tests" / "resume_probe.py"


def _args(out: Path, start: Path, *, micro_batch: int) -> list[str]:
    return ["--deepspeed", str(ZERO2), "--model", str(start), "--stages", "lora", "--output-dir", str(out),
            "--precision", "fp32", "--data-synthetic-train", str(SAMPLES), "--data-synthetic-test", "2",
            "--data-synthetic-size", "64", "--data-val-fraction", "0", "--lora-epochs", str(EPOCHS),
            "--lora-micro-batch", str(micro_batch), "--lora-grad-accum", "1", "--lora-rank", "4",
            "--lora-dropout", "0", "--keep-checkpoints", "2"]


def _resume_with_probe(ranks: int, args: list[str], tmp: Path) -> str:
    env = {**launcher_env(tmp), "HSFT_PROBE_DIR": str(tmp / "probe")}
    proc = run_launched(deepspeed_command(PROBE, [*args, "--resume"], ranks=ranks), tmp, env=env)
    return proc.stdout + proc.stderr


def _digests(tag_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tag_dir.iterdir()) if p.is_file()}


def _assert_loaded_state_is_the_checkpoint(saved: Path, probe: Path, precision: str) -> None:
    """The engine's state right after the load (probe) equals the checkpoint's, parameter by parameter."""
    expected, loaded = zero_state.consolidated_state(saved), zero_state.consolidated_state(probe)
    assert sorted(expected) == sorted(loaded) and any(".lora_A." in name for name in expected)
    for name, states in expected.items():
        for key, value in states.items():
            assert torch.equal(loaded[name][key], value), f"{name} {key}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    saved_model = torch.load(saved / "mp_rank_00_model_states.pt", weights_only=False)
    probe_model = torch.load(probe / "mp_rank_00_model_states.pt", weights_only=False)
    for name, states in expected.items():
        # The module's weights: the saved module's, which are the fp32 master weights in the run's precision.
        assert probe_model["module"][name].dtype == dtype
        assert torch.equal(probe_model["module"][name], saved_model["module"][name]), name
        assert torch.equal(probe_model["module"][name], states["fp32"].to(dtype)), name
    assert probe_model["lr_scheduler"]["last_epoch"] == saved_model["lr_scheduler"]["last_epoch"] == SAMPLES // 2
    assert probe_model["lr_scheduler"]["_last_lr"] == saved_model["lr_scheduler"]["_last_lr"]


def _assert_converted_beside_and_original_untouched(ckpts: Path, before: dict[str, str]) -> None:
    assert _digests(ckpts / "epoch0001") == before
    assert not any(p.name.startswith(universal.PARTIAL_PREFIX) for p in ckpts.iterdir())
    # The copy served the resume and is dropped once a newer checkpoint is complete.
    assert checkpoint.latest_tag(ckpts) == "epoch0002"
    assert not (ckpts / (universal.PREFIX + "epoch0001")).exists()


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_ranks(tmp_path, tiny_model_dir):
    """fp32, no dropout, global batch 2 on both (1 rank x 2, 2 ranks x 1): every step sees the same samples."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    one_rank = _args(cut, tiny_model_dir, micro_batch=2)
    run_launched(deepspeed_command(LAUNCH / "hsft.py", _args(full, tiny_model_dir, micro_batch=2)), tmp_path)
    kill_after_checkpoint(deepspeed_command(LAUNCH / "hsft.py", one_rank), tmp_path, cut / "lora" / "checkpoints")
    ckpts = cut / "lora" / "checkpoints"
    assert checkpoint.saved_world_size(ckpts / "epoch0001") == 1
    before = _digests(ckpts / "epoch0001")

    log = _resume_with_probe(2, _args(cut, tiny_model_dir, micro_batch=1), tmp_path)
    assert log.count("the checkpoint was written by 1 rank(s), this run has 2") == 1, log[-4000:]
    assert "no RNG state for start from a seed derived" in log
    assert "the global batch is" not in log  # kept: an epoch has the same steps
    _assert_loaded_state_is_the_checkpoint(ckpts / "epoch0001", tmp_path / "probe" / "loaded", "fp32")
    _assert_converted_beside_and_original_untouched(ckpts, before)
    assert checkpoint.saved_world_size(ckpts / "epoch0002") == 2
    # Rank 0 continued its own saved stream; rank 1 had none and drew from its derived seed.
    assert rng_state.file_for_rank(ckpts / "epoch0002", 1).is_file()

    expected = json.loads((full / "lora" / "metrics.json").read_text())
    resumed = json.loads((cut / "lora" / "metrics.json").read_text())
    steps_per_epoch = SAMPLES // 2
    assert resumed["resumed_from"].endswith("epoch0001")
    assert len(resumed["losses"]) == 2 * steps_per_epoch
    assert resumed["losses"][:steps_per_epoch] == expected["losses"][:steps_per_epoch]  # the checkpoint's record
    # What must be told apart: a resume that lost or mis-partitioned the state (fresh moments, another step of
    # the schedule, other weights) from one that differs in float summation order only. The first changes the
    # next step's loss (same weights, same samples) at once and every weight by about lr per step; the second
    # starts at a relative 1e-7 and, through AdamW's m / sqrt(v), can reach about lr only on the few weights
    # whose gradient is near zero. So: the losses within 1e-4 relative, and under 1% of the weights apart by
    # a tenth of lr or more, none by more than the whole epoch's steps at lr.
    assert resumed["losses"][steps_per_epoch:] == pytest.approx(expected["losses"][steps_per_epoch:], rel=1e-4)
    lr = expected["train_config"]["lr"]
    a = load_file(str(full / "lora" / "trainable.safetensors"))
    b = load_file(str(cut / "lora" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[name].double() - b[name].double()).abs().flatten() for name in a])
    share_apart = (diffs > lr / 10).double().mean().item()
    assert share_apart < 0.01, f"{share_apart:.2%} of the weights differ by more than lr/10"
    assert diffs.max().item() < lr * steps_per_epoch


def test_the_schedule_moves_to_a_step_as_if_stepped_there():
    """What a resume with another global batch relies on to continue the schedule from an epoch boundary."""
    param = torch.nn.Parameter(torch.zeros(1))
    stepped = torch.optim.AdamW([param], lr=1.0)
    schedule = build_scheduler(stepped, total_steps=10, warmup_steps=2, peak=1.0, floor=0.1)
    for _ in range(5):
        stepped.step()
        schedule.step()
    moved = torch.optim.AdamW([param], lr=1.0)
    moved_schedule = build_scheduler(moved, total_steps=10, warmup_steps=2, peak=1.0, floor=0.1)
    move_to_step(moved_schedule, 5)
    assert moved_schedule.last_epoch == schedule.last_epoch == 5
    assert moved.param_groups[0]["lr"] == stepped.param_groups[0]["lr"] != 1.0


def test_a_new_rank_gets_its_own_deterministic_seed():
    seeds = {rng_state.seed_for_new_rank(7, rank, epoch) for rank in range(4) for epoch in range(3)}
    assert len(seeds) == 12
    assert rng_state.seed_for_new_rank(7, 1, 1) == rng_state.seed_for_new_rank(7, 1, 1)
    assert rng_state.seed_for_new_rank(7, 1, 1) != rng_state.seed_for_new_rank(8, 1, 1)


def test_a_failed_conversion_is_one_error_and_leaves_only_a_partial_directory(tmp_path, monkeypatch):
    """In-process on one rank: the conversion's crash safety and what the universal copy holds."""
    run(tmp_path, TrainConfig(epochs=1, micro_batch=8, lr=0.01))
    ckpts = tmp_path / "checkpoints"
    before = _digests(ckpts / "epoch0001")

    def crashes(source, out, log):
        out.mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(universal, "_convert", crashes)
    message = (r"epoch0001: converting to DeepSpeed's universal format failed: OSError: disk full "
               r"\(see .*\.partial-universal-epoch0001/conversion.log\)")
    with pytest.raises(RuntimeError, match=message):
        universal.ensure_converted(ckpts / "epoch0001")
    assert (ckpts / ".partial-universal-epoch0001").is_dir()
    assert not (ckpts / ".universal-epoch0001").exists()
    monkeypatch.undo()

    load_dir = universal.ensure_converted(ckpts / "epoch0001")
    assert load_dir == ckpts / ".universal-epoch0001" and not (ckpts / ".partial-universal-epoch0001").exists()
    assert _digests(ckpts / "epoch0001") == before
    expected = zero_state.consolidated_state(ckpts / "epoch0001")
    for name, states in expected.items():
        for key in zero_state.STATE_KEYS:
            whole = torch.load(load_dir / "epoch0001" / "zero" / name / f"{key}.pt", weights_only=False)["param"]
            assert torch.equal(whole.float(), states[key]), f"{name} {key}"
    # The next complete checkpoint makes the copy useless; pruning removes it.
    checkpoint.prune(ckpts, keep=1)
    assert (ckpts / ".universal-epoch0001").is_dir()  # still the newest checkpoint's copy
    (ckpts / "epoch0002").mkdir()
    (ckpts / checkpoint.MARKER).write_text("epoch0002\n")
    checkpoint.prune(ckpts, keep=1)
    assert not (ckpts / ".universal-epoch0001").exists() and not (ckpts / "epoch0001").exists()
