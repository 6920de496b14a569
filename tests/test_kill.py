"""kill -9 in the middle of an epoch: the main command under the DeepSpeed launcher (1 rank and 2 ranks) is
killed with SIGKILL, process group and all, in its second LoRA epoch; `--resume` then takes exactly the
uninterrupted run's later steps (LoRA dropout on) and ends with its weights. The stage's record is the
uninterrupted run's too: metrics.json, the report's loss line and TensorBoard's loss scalars hold every
step once, in order. The killed run's lock on the output directory is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsft.model import save_model
from hsft.engine import checkpoint
from hsft.engine.output_lock import LOCK_FILE

from tests.launch_scripts import DEEPSPEED, REPO
SAMPLES, EPOCHS = 16, 2


def _command(out: Path, start: Path, ranks: int) -> list[str]:
    # The same global batch (2) on 1 and 2 ranks; fp32 because the point here is the kill, not bf16.
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(29700 + os.getpid() % 200 + ranks),
            str(REPO / "launch" / "hsft.py"), "--deepspeed", str(REPO / "ds_configs" / "zero2.json"),
            "--model", str(start), "--stages", "lora", "--output-dir", str(out), "--precision", "fp32",
            "--data-synthetic-train", str(SAMPLES), "--data-synthetic-test", "2", "--data-synthetic-size", "64",
            "--data-val-fraction", "0", "--lora-epochs", str(EPOCHS), "--lora-micro-batch", str(2 // ranks),
            "--lora-grad-accum", "1", "--lora-rank", "4", "--lora-dropout", "0.2"]


def _env(tmp: Path) -> dict:
    return {**os.environ, "HSFT_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], tmp: Path) -> None:
    proc = subprocess.run(cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def _kill_in_second_epoch(cmd: list[str], tmp: Path, ckpts: Path) -> None:
    proc = subprocess.Popen(cmd, cwd=tmp, env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while checkpoint.latest_tag(ckpts) != "epoch0001":
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its first epoch finished"
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.1)  # a step or so into epoch 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, as `kill -9 -PGID` would
        proc.wait()
    # Killed in the middle of epoch 2: nothing after the epoch-1 boundary is marked complete.
    assert checkpoint.latest_tag(ckpts) == "epoch0001"


def _tb_losses(log_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) as TensorBoard shows them: events an interrupted run logged after its checkpoint are purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("lora/loss")]


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    from hsft.model import build_model
    from hsft.model.config import ModelConfig

    path = tmp_path_factory.mktemp("kill") / "start"
    save_model(build_model(ModelConfig(preset="tiny"), seed=0), path)
    return path


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path, start_model, ranks):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(_command(full, start_model, ranks), tmp_path)
    _kill_in_second_epoch(_command(cut, start_model, ranks), tmp_path, cut / "lora" / "checkpoints")
    assert (cut / LOCK_FILE).is_file()  # left behind by the killed run
    _run(_command(cut, start_model, ranks) + ["--resume"], tmp_path)

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
