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


def _hsft_losses(samples, tmp_path, context, cache: bool, micro_batch: int = 1, cuda_graph: bool = False):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), seed=0)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=2, micro_batch=micro_batch, grad_accum=2, lr=1e-3, min_lr=1e-5),
                          cache_features=cache, cuda_graph=cuda_graph)
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


def _replay_without_a_gpu(captures: list):
    """What torch.cuda.make_graphed_callables hands back, without a GPU: forward and backward as one autograd
    node, every trainable parameter's gradient written into a buffer that each replay reuses (as a graph's
    static outputs are), no gradient allowed to be missing. `captures` records each capture's input shapes."""
    def capture(module, sample_args):
        captures.append([tuple(a.shape) for a in sample_args])
        params = tuple(p for p in module.parameters() if p.requires_grad)
        static_grads = [torch.empty_like(p) for p in params]

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                with torch.enable_grad():
                    ctx.out = module(*inputs[:len(sample_args)])
                return ctx.out.detach()

            @staticmethod
            def backward(ctx, grad):
                grads = torch.autograd.grad(ctx.out, params, grad, allow_unused=False)
                for buffer, g in zip(static_grads, grads):
                    buffer.copy_(g)
                return (None,) * len(sample_args) + tuple(b.detach() for b in static_grads)

        return lambda *args: Replay.apply(*args, *params)
    return capture


def test_the_replayed_decoder_trains_as_the_eager_one(samples, tmp_path, make_context, monkeypatch):
    """--hsft-cuda-graph through the real training loop and DeepSpeed: the eager losses and weights, the
    heads the loss never reaches frozen, one capture per micro-batch shape."""
    from hsft.stages import graphed_decode

    captures = []
    monkeypatch.setattr(graphed_decode, "capture_cuda_graphs", _replay_without_a_gpu(captures))
    eager, eager_task = _hsft_losses(samples, tmp_path / "eager", make_context, cache=True)
    replayed, task = _hsft_losses(samples, tmp_path / "replayed", make_context, cache=True, cuda_graph=True)
    assert len(task.graphed) == 1 and len(captures) == 1  # micro-batch 1 over 4 samples: one shape
    assert replayed.losses == pytest.approx(eager.losses, rel=1e-5, abs=1e-7)
    frozen = {n for n, p in eager_task.model.named_parameters() if p.requires_grad} - {
        n for n, p in task.model.named_parameters() if p.requires_grad}
    assert frozen and all(n.startswith(graphed_decode.UNREACHED_BY_THE_LOSS + (graphed_decode.NOT_A_POINT,))
                          for n in frozen)
    for (name, a), (_, b) in zip(eager_task.model.named_parameters(), task.model.named_parameters()):
        if name in frozen:  # eager training only weight-decays them
            torch.testing.assert_close(b, task.before[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graphs_need_the_feature_cache():
    with pytest.raises(ValueError, match="hsft.cuda_graph: .*needs the feature cache"):
        HSFTStageConfig(cuda_graph=True, cache_features=False).validate()
