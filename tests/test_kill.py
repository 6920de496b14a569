"""kill -9 in the middle of an epoch: the main command under the DeepSpeed launcher on 2 ranks is killed with
SIGKILL, process group and all, in its second LoRA epoch; `--resume` then takes exactly the uninterrupted
run's later steps (LoRA dropout on, each rank with its own masks) and ends with its weights. The stage's
record is the uninterrupted run's too: metrics.json, the report's loss line and TensorBoard's loss scalars
hold every step once, in order. The killed run's lock on the output directory is taken over.

One rank's exact resume (dropout masks and data order restored) is asserted in-process by test_resume.py
and through the real command by test_main_command.py's resume after a crash; a resume on another number
of ranks by test_resume_ranks.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsft.engine.output_lock import LOCK_FILE

from launch_scripts import LAUNCH, ZERO2, deepspeed_command, kill_after_checkpoint, run_launched


SAMPLES, EPOCHS, RANKS = 16, 2, 2


def _command(out: Path, start: Path) -> list[str]:
    # Global batch 2 (one sample per rank); fp32 because the point here is the kill, not bf16.
    return deepspeed_command(LAUNCH / "hsft.py", [
        "--deepspeed", str(ZERO2), "--model", str(start), "--stages", "lora", "--output-dir", str(out),
        "--precision", "fp32", "--data-synthetic-train", str(SAMPLES), "--data-synthetic-test", "2",
        "--data-synthetic-size", "64", "--data-val-fraction", "0", "--lora-epochs", str(EPOCHS),
        "--lora-micro-batch", "1", "--lora-grad-accum", "1", "--lora-rank", "4", "--lora-dropout", "0.2"],
        ranks=RANKS)


def _tb_losses(log_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) as TensorBoard shows them: events an interrupted run logged after its checkpoint are purged.
    TensorBoard keeps float32, so a loss matches metrics.json's float to float32's rounding (6e-8 relative),
    well inside 1e-6 and far from any change one training step makes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("lora/loss")]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path, tiny_model_dir):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_launched(_command(full, tiny_model_dir), tmp_path)
    kill_after_checkpoint(_command(cut, tiny_model_dir), tmp_path, cut / "lora" / "checkpoints")  # in epoch 2
    assert (cut / LOCK_FILE).is_file()  # left behind by the killed run
    run_launched(_command(cut, tiny_model_dir) + ["--resume"], tmp_path)

    expected = json.loads((full / "lora" / "metrics.json").read_text())
    resumed = json.loads((cut / "lora" / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("epoch0001")
    assert len(expected["losses"]) == EPOCHS * SAMPLES // 2
    for key in ("losses", "grad_norms", "first_loss", "last_loss", "optimizer_steps", "global_step_end", "skipped"):
        assert resumed[key] == expected[key], key
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    loss_lines = [[line for line in (run / "report.md").read_text().splitlines() if "loss" in line]
                  for run in (full, cut)]
    assert loss_lines[0] and loss_lines[0] == loss_lines[1]
    assert _tb_losses(cut / "tb" / "lora") == _tb_losses(full / "tb" / "lora") == \
        list(enumerate(expected["losses"], start=1))
    a = load_file(str(full / "lora" / "trainable.safetensors"))
    b = load_file(str(cut / "lora" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
