"""The HSFT stage on the tiny model, in-process (one-rank gloo group)."""

from __future__ import annotations

import pytest
import torch

from hsft.config import HSFTStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.engine.loop import train
from hsft.engine.tensorboard import TBWriter
from hsft.model import ModelConfig, build_model
from hsft.stages.hsft import HSFTTask, hard_set, random_subset
from hsft.stages.training import Validation


@pytest.fixture(scope="module")
def samples():
    return [make_fundus(seed=100 + i, size=64) for i in range(6)]


def test_hard_set_and_the_controls_random_subset(samples):
    ids = [samples[3].id, samples[1].id]
    assert [s.id for s in hard_set(samples, ids)] == ids
    control = random_subset(samples, len(ids), 0)
    assert len(control) == 2 and len({s.id for s in control}) == 2 and all(s in samples for s in control)
    assert control == random_subset(samples, 2, 0) and control != random_subset(samples, 2, 1)
    with pytest.raises(ValueError, match="not in the training split"):
        hard_set(samples, ["nope"])


def _hsft_losses(samples, tmp_path, context, cache: bool, micro_batch: int = 1):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), seed=0)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=2, micro_batch=micro_batch, grad_accum=2, lr=1e-3, min_lr=1e-5),
                          cache_features=cache)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = HSFTTask(model, samples[:4], cfg, Validation([], 1, 1))
    task.before = before
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("text_hidden_fcs", "sam2.mask_decoder", "sam2.prompt_encoder"))
                             for n in trainable)
    result = train(task, cfg.train, context(), stage_dir=tmp_path, tb=TBWriter(None))
    return result, task


def test_cached_features_give_the_uncached_losses(samples, tmp_path, make_context):
    cached, task = _hsft_losses(samples, tmp_path / "cached", make_context, cache=True)
    uncached, _ = _hsft_losses(samples, tmp_path / "uncached", make_context, cache=False)
    assert cached.losses == uncached.losses
    assert task.cache.misses == 4 and len(task.cache) == 4  # computed once per sample over two epochs
    # Only text_hidden_fcs and the mask decoder moved; the vision encoder and the LLM are frozen.
    changed = {n for n, p in task.model.named_parameters() if not torch.equal(p.detach(), task.before[n])}
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert any(n.startswith("text_hidden_fcs") for n in changed)
    assert any(n.startswith("sam2.mask_decoder") for n in changed)
