"""Mining and the HSFT stage on the tiny model, in-process (one-rank gloo group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hsft.config import HSFTStageConfig, MiningConfig, TrainConfig
from hsft.data import make_fundus
from hsft.engine.ds_config import load_ds_config
from hsft.engine.loop import train
from hsft.engine.tensorboard import TBWriter
from hsft.model import ModelConfig, build_model
from hsft.stages import mining
from hsft.stages.hsft import HSFTTask, select_training_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def samples():
    return [make_fundus(seed=100 + i, size=64) for i in range(6)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"), seed=0)


def test_bucket_table_counts_the_published_buckets():
    dices = [0.1, 0.29, 0.3, 0.45, 0.6, 0.7, 0.74, 0.8, 0.95, 1.0]
    table = mining.bucket_table(dices)
    assert [r["range"] for r in table] == ["< 0.30", "0.30-0.50", "0.50-0.65", "0.65-0.75", ">= 0.75"]
    assert [r["count"] for r in table] == [2, 2, 1, 2, 3]
    assert sum(r["percent"] for r in table) == pytest.approx(100.0)
    assert mining.bucket_of(0.2999) == table[0]["category"] and mining.bucket_of(0.75) == table[-1]["category"]


def test_mining_is_deterministic_and_applies_tau_or_quantile(model, samples, tmp_path):
    cfg = MiningConfig(tau=0.75, batch_size=4, max_new_tokens=8)
    first = mining.mine_hard_samples(model, samples, cfg)
    second = mining.mine_hard_samples(model, samples, cfg)
    assert [(s.id, s.dice) for s in first.samples] == [(s.id, s.dice) for s in second.samples]
    dices = [s.dice for s in first.samples]
    assert dices == sorted(dices)  # hardest first
    assert first.hard_ids == [s.id for s in first.samples if s.dice < 0.75]
    # The Dice is the generate path's, at original resolution, through the metrics module.
    by_quantile = mining.mine_hard_samples(model, samples, MiningConfig(hard_quantile=0.5, batch_size=4,
                                                                         max_new_tokens=8))
    assert by_quantile.hard_ids == [s.id for s in first.samples[:3]]
    mining.write_mining(first, tmp_path, TBWriter(None), 0)
    assert mining.read_hard_ids(tmp_path) == first.hard_ids
    assert "hard set" in (tmp_path / "table.md").read_text()


def test_select_training_set_and_matched_control(samples):
    ids = [samples[3].id, samples[1].id]
    assert [s.id for s in select_training_set(samples, ids, "none", 0)] == ids
    control = select_training_set(samples, ids, "random", 0)
    assert len(control) == 2 and all(s in samples for s in control)
    with pytest.raises(ValueError, match="not in the training split"):
        select_training_set(samples, ["nope"], "none", 0)


def _hsft_losses(samples, tmp_path, cache: bool, micro_batch: int = 1):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), seed=0)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=2, micro_batch=micro_batch, grad_accum=2, lr=1e-3, min_lr=1e-5),
                          cache_features=cache)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = HSFTTask(model, samples[:4], cfg, [], MiningConfig())
    task.before = before
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("text_hidden_fcs", "sam2.mask_decoder", "sam2.prompt_encoder"))
                             for n in trainable)
    result = train(task, cfg.train, load_ds_config(REPO / "ds_configs" / "zero2.json"), stage_dir=tmp_path,
                   tb=TBWriter(None), seed=0, precision="fp32")
    return result, task


def test_cached_features_give_the_uncached_losses(samples, tmp_path):
    cached, task = _hsft_losses(samples, tmp_path / "cached", cache=True)
    uncached, _ = _hsft_losses(samples, tmp_path / "uncached", cache=False)
    assert cached.losses == uncached.losses
    assert task.cache.misses == 4 and len(task.cache) == 4  # computed once per sample over two epochs
    # Only text_hidden_fcs and the mask decoder moved; the vision encoder and the LLM are frozen.
    changed = {n for n, p in task.model.named_parameters() if not torch.equal(p.detach(), task.before[n])}
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert any(n.startswith("text_hidden_fcs") for n in changed)
    assert any(n.startswith("sam2.mask_decoder") for n in changed)
