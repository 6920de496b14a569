"""Exact resume: a LoRA stage with dropout on, in bf16, interrupted in the middle of an epoch and resumed
with --resume semantics, takes the same steps (every later loss) and ends with the same weights as the
uninterrupted stage. Runs the real stage entry on the tiny preset in-process (one-rank gloo group)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hsft.config import LoraStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.engine import checkpoint, rng_state
from hsft.stages import lora
from hsft.stages.training import Validation

from contexts import build_context


EPOCHS, SAMPLES, MICRO = 2, 4, 2
STEPS_PER_EPOCH = SAMPLES // MICRO


class Interrupted(Exception):
    """Stands in for the process dying: raised from inside the training loop."""


def _config() -> LoraStageConfig:
    train = TrainConfig(epochs=EPOCHS, micro_batch=MICRO, grad_accum=1, lr=5e-3, min_lr=1e-4, warmup_ratio=0.0)
    return LoraStageConfig(train=train, rank=4, alpha=8.0, dropout=0.3)


def _run(out: Path, start: Path, samples, *, resume: bool) -> dict:
    # A different global generator state before each run: the stage itself must seed what it draws.
    torch.manual_seed(len(str(out)) + int(resume))
    ctx = build_context(out, seed=7, precision="bf16", resume=resume,
                        splits=SimpleNamespace(train=samples, val=[], test=[]),
                        **{"mining.batch_size": 4, "mining.max_new_tokens": 8})
    lora.run(ctx, _config(), start)
    return json.loads((out / "lora" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def samples():
    return [make_fundus(seed=900 + i, size=64) for i in range(SAMPLES)]


def test_dropout_is_live_in_the_lora_stage(samples, tiny_model):
    """Without live dropout the resume test below could not tell restored RNG state from a reseed."""
    model = tiny_model
    task = lora.LoraTask(model, samples, _config(), Validation([], 1, 1))
    task.module.train()
    # lora_B starts at zero, which hides the dropout on lora_A's input until the first step moved it.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    batch = task.make_batch([0, 1], torch.float32, torch.device("cpu"))
    with torch.no_grad():
        first, second = task.module(batch)[0], task.module(batch)[0]
    assert float(first) != float(second)


def test_lora_interrupted_mid_epoch_resumes_exactly(tmp_path, tiny_model_dir, samples, monkeypatch):
    root, start = tmp_path, tiny_model_dir
    full = _run(root / "full", start, samples, resume=False)
    assert len(full["losses"]) == EPOCHS * STEPS_PER_EPOCH

    # Die at the second micro-batch of epoch 2: one step of that epoch is lost with the process.
    calls = {"n": 0}
    make_batch = lora.LoraTask.make_batch

    def dying_make_batch(self, indices, dtype, device):
        if calls["n"] == STEPS_PER_EPOCH + 1:
            raise Interrupted
        calls["n"] += 1
        return make_batch(self, indices, dtype, device)

    monkeypatch.setattr(lora.LoraTask, "make_batch", dying_make_batch)
    with pytest.raises(Interrupted):
        _run(root / "cut", start, samples, resume=False)
    monkeypatch.setattr(lora.LoraTask, "make_batch", make_batch)
    ckpts = root / "cut" / "lora" / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == "epoch0001"
    assert rng_state.file_for_rank(ckpts / "epoch0001", 0).is_file()

    resumed = _run(root / "cut", start, samples, resume=True)
    assert resumed["resumed_from"].endswith("epoch0001")
    # Every loss, bit for bit: the same data order and the same dropout masks after the checkpoint, and the
    # record of the steps before it from the checkpoint.
    assert resumed["losses"] == full["losses"]
    assert resumed["global_step_end"] == full["global_step_end"]
    a = load_file(str(root / "full" / "lora" / "trainable.safetensors"))
    b = load_file(str(root / "cut" / "lora" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(".lora_" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
