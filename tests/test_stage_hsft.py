"""The HSFT stage on the tiny model, in-process (one-rank gloo group)."""

from __future__ import annotations

import pytest
import torch

from hsft.config import HSFTStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.engine.loop import train
from hsft.engine.tensorboard import TBWriter
from hsft.model import ModelConfig, build_model
from hsft.stages.hsft import NOT_A_POINT, UNREACHED_BY_THE_LOSS, HSFTTask, hard_set, random_subset
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


def _hsft_losses(samples, tmp_path, context, cache: bool, micro_batch: int = 1, compile: str = "off"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), seed=0)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=2, micro_batch=micro_batch, grad_accum=2, lr=1e-3, min_lr=1e-5),
                          cache_features=cache, compile=compile)
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


def test_the_compiled_cached_step_trains_as_the_eager_one(samples, tmp_path, make_context):
    eager, eager_task = _hsft_losses(samples, tmp_path / "eager", make_context, cache=True)
    compiled, task = _hsft_losses(samples, tmp_path / "compiled", make_context, cache=True, compile="default")
    assert task.module._decode_cached is not task.model.decode_masks  # the compiled function is what ran
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-6)
    unreached = {n for n, p in eager_task.model.named_parameters() if p.requires_grad} - {
        n for n, p in task.model.named_parameters() if p.requires_grad}
    assert unreached and all(n.startswith(UNREACHED_BY_THE_LOSS + (NOT_A_POINT,)) for n in unreached)
    for (name, a), (_, b) in zip(eager_task.model.named_parameters(), task.model.named_parameters()):
        if name in unreached:  # frozen when compiled; eager training only weight-decays them
            torch.testing.assert_close(b, task.before[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("changes,message", [
    ({"compile": "fast"}, "hsft.compile: must be one of"),
    ({"compile": "default", "cache_features": False}, "needs the feature cache"),
])
def test_compile_settings_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        HSFTStageConfig(**changes).validate()
