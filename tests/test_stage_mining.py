"""Hard-sample mining on the tiny model, in-process (one-rank gloo group)."""

from __future__ import annotations

import pytest

from hsft.config import MiningConfig
from hsft.data import make_fundus
from hsft.engine.tensorboard import TBWriter
from hsft.stages import mining
from hsft.stages.report import stage_section


@pytest.fixture(scope="module")
def samples():
    return [make_fundus(seed=100 + i, size=64) for i in range(6)]


def test_bucket_table_counts_the_published_buckets():
    dices = [0.1, 0.29, 0.3, 0.45, 0.6, 0.7, 0.74, 0.8, 0.95, 1.0]
    table = mining.bucket_table(dices)
    assert [r["range"] for r in table] == ["< 0.30", "0.30-0.50", "0.50-0.65", "0.65-0.75", ">= 0.75"]
    assert [r["count"] for r in table] == [2, 2, 1, 2, 3]
    assert sum(r["percent"] for r in table) == pytest.approx(100.0)
    assert mining.bucket_of(0.2999) == table[0]["category"] and mining.bucket_of(0.75) == table[-1]["category"]


def test_mining_is_deterministic_and_applies_tau_or_quantile(tiny_model, samples, tmp_path):
    cfg = MiningConfig(tau=0.75, batch_size=4, max_new_tokens=8)
    first = mining.mine_hard_samples(tiny_model, samples, cfg)
    second = mining.mine_hard_samples(tiny_model, samples, cfg)
    assert [(s.id, s.dice) for s in first.samples] == [(s.id, s.dice) for s in second.samples]
    dices = [s.dice for s in first.samples]
    assert dices == sorted(dices)  # hardest first
    assert first.hard_ids == [s.id for s in first.samples if s.dice < 0.75]
    by_quantile = mining.mine_hard_samples(tiny_model, samples, MiningConfig(hard_quantile=0.5, batch_size=4,
                                                                              max_new_tokens=8))
    assert by_quantile.hard_ids == [s.id for s in first.samples[:3]]
    mining.write_mining(first, tmp_path, TBWriter(None), 0)
    assert mining.read_hard_ids(tmp_path) == first.hard_ids
    assert "hard set" in (tmp_path / "table.md").read_text()


def test_mining_stage_writes_the_hard_set_and_its_report_section(tiny_model_dir, samples, make_context, tmp_path):
    from types import SimpleNamespace

    ctx = make_context(SimpleNamespace(train=samples, val=[], test=[]),
                       **{"mining.batch_size": 4, "mining.max_new_tokens": 8, "mining.hard_quantile": 0.5})
    result = mining.run(ctx, ctx.cfg.mining, tiny_model_dir)
    assert result.model_dir is None  # mining trains nothing: the input model goes on
    assert result.summary["hard"] == 3 and result.summary["total"] == len(samples)
    assert mining.read_hard_ids(ctx.stage_dir("mining"))
    assert stage_section("mining", result.summary, ctx.cfg)[0].startswith("## Hard-sample mining")
    with pytest.raises(FileNotFoundError, match="run the 'mining' stage first"):
        mining.read_hard_ids(tmp_path / "nowhere")


def test_mining_runs_the_model_in_the_training_precision_on_the_runs_device(tiny_model_dir, samples, make_context,
                                                                           monkeypatch):
    from types import SimpleNamespace

    import torch

    seen = {}

    def record(model, train_samples, cfg):
        seen.update(dtype=model.dtype, device=model.device)
        one = mining.MinedSample(id=train_samples[0].id, dice=0.5, bucket="moderate", seg_emitted=True)
        return mining.MiningResult(samples=[one], hard_ids=[one.id], rule="recorded")

    monkeypatch.setattr(mining, "mine_hard_samples", record)
    ctx = make_context(SimpleNamespace(train=samples, val=[], test=[]), precision="bf16")
    mining.run(ctx, ctx.cfg.mining, tiny_model_dir)
    assert seen == {"dtype": torch.bfloat16, "device": ctx.device}
