"""A stage checkpoint written by N ranks resumes on M ranks (2 -> 1 and 1 -> 2), through the main command
under the DeepSpeed launcher on CPU: a LoRA stage killed with SIGKILL in its second epoch resumes on the
other number of ranks from DeepSpeed's universal copy of its epoch-1 checkpoint.

What is exactly true and asserted: right after the load, the engine holds the checkpoint's trained
weights, fp32 master weights, both AdamW moments (each re-partitioned over the new ranks) and
scheduler step, bit for bit; the original checkpoint is not modified; the log says once that the rank
count changed. What is not bit for bit and why: the later losses of a 2-rank run resumed on 1 rank
differ from the uninterrupted 2-rank run's in the last digits, because one rank averages the global
batch's loss before backward where two ranks average two gradients (another rounding); so they are
compared with a tolerance (fp32, no dropout, the same global batch). With dropout on, a rank draws its
own masks, so the losses of a resumed 1 -> 2 run are only checked to continue sensibly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsft.config import TrainConfig
from hsft.engine import checkpoint, rng_state, universal, zero_state
from hsft.engine.schedule import build_scheduler, move_to_step
from test_engine_loop import run
from test_kill import DEEPSPEED, REPO, _env, _kill_in_second_epoch, _run, start_model  # noqa: F401 (fixture)

SAMPLES, EPOCHS = 16, 2
PROBE = REPO / "tests" / "resume_probe.py"


def _args(out: Path, start: Path, *, precision: str, micro_batch: int, dropout: float) -> list[str]:
    return [str(REPO / "launch" / "hsft.py"), "--deepspeed", str(REPO / "ds_configs" / "zero2.json"),
            "--model", str(start), "--stages", "lora", "--output-dir", str(out), "--precision", precision,
            "--data-synthetic-train", str(SAMPLES), "--data-synthetic-test", "2", "--data-synthetic-size", "64",
            "--data-val-fraction", "0", "--lora-epochs", str(EPOCHS), "--lora-micro-batch", str(micro_batch),
            "--lora-grad-accum", "1", "--lora-rank", "4", "--lora-dropout", str(dropout), "--keep-checkpoints", "2"]


def _launch(ranks: int, args: list[str], port: int) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), *args]


def _resume_with_probe(ranks: int, args: list[str], tmp: Path, port: int) -> str:
    probe_args = [str(PROBE), *args[1:], "--resume"]
    env = {**_env(tmp), "HSFT_PROBE_DIR": str(tmp / "probe")}
    proc = subprocess.run(_launch(ranks, probe_args, port), cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
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


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, start_model):
    """fp32, no dropout, global batch 2 on both (2 ranks x 1, 1 rank x 2): every step sees the same samples."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    port = 29100 + os.getpid() % 300
    _run(_launch(2, _args(full, start_model, precision="fp32", micro_batch=1, dropout=0.0), port), tmp_path)
    _kill_in_second_epoch(_launch(2, _args(cut, start_model, precision="fp32", micro_batch=1, dropout=0.0), port),
                          tmp_path, cut / "lora" / "checkpoints")
    ckpts = cut / "lora" / "checkpoints"
    assert checkpoint.saved_world_size(ckpts / "epoch0001") == 2
    before = _digests(ckpts / "epoch0001")

    log = _resume_with_probe(1, _args(cut, start_model, precision="fp32", micro_batch=2, dropout=0.0),
                             tmp_path, port)
    assert log.count("the checkpoint was written by 2 rank(s), this run has 1") == 1, log[-4000:]
    _assert_loaded_state_is_the_checkpoint(ckpts / "epoch0001", tmp_path / "probe" / "loaded", "fp32")
    _assert_converted_beside_and_original_untouched(ckpts, before)
    assert checkpoint.saved_world_size(ckpts / "epoch0002") == 1

    expected = json.loads((full / "lora" / "metrics.json").read_text())
    resumed = json.loads((cut / "lora" / "metrics.json").read_text())
    steps_per_epoch = SAMPLES // 2
    assert resumed["resumed_from"].endswith("epoch0001")
    assert len(resumed["losses"]) == 2 * steps_per_epoch
    assert resumed["losses"][:steps_per_epoch] == expected["losses"][:steps_per_epoch]  # the checkpoint's record
    assert resumed["losses"][steps_per_epoch:] == pytest.approx(expected["losses"][steps_per_epoch:], rel=1e-4)
    a = load_file(str(full / "lora" / "trainable.safetensors"))
    b = load_file(str(cut / "lora" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_one_rank_checkpoint_resumes_on_two_ranks(tmp_path, start_model):
    """bf16 with LoRA dropout, the same micro-batch on both, so the global batch doubles (2 -> 4)."""
    cut = tmp_path / "cut"
    port = 29400 + os.getpid() % 300
    args = _args(cut, start_model, precision="bf16", micro_batch=2, dropout=0.2)
    _kill_in_second_epoch(_launch(1, args, port), tmp_path, cut / "lora" / "checkpoints")
    ckpts = cut / "lora" / "checkpoints"
    before = _digests(ckpts / "epoch0001")

    log = _resume_with_probe(2, args, tmp_path, port)
    assert log.count("the checkpoint was written by 1 rank(s), this run has 2") == 1, log[-4000:]
    assert "no RNG state for start from a seed derived" in log and "the global batch is 4" in log
    _assert_loaded_state_is_the_checkpoint(ckpts / "epoch0001", tmp_path / "probe" / "loaded", "bf16")
    _assert_converted_beside_and_original_untouched(ckpts, before)
    assert checkpoint.saved_world_size(ckpts / "epoch0002") == 2
    # Rank 0 continued its own saved stream; rank 1 had none and drew from its derived seed.
    assert rng_state.file_for_rank(ckpts / "epoch0002", 1).is_file()

    resumed = json.loads((cut / "lora" / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("epoch0001")
    # The first epoch's 8 steps from the checkpoint's record, then the second on global batch 4: 16 / 4 steps,
    # each finite and of a plausible size.
    losses = resumed["losses"]
    assert len(losses) == SAMPLES // 2 + SAMPLES // 4 and all(0.0 < loss < 10.0 for loss in losses)


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
