"""The training plans of HSFT and of the variants beside it, and the variant stages on the tiny model:
every variant takes HSFT's optimizer steps, and visits what its name says in the order it says."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from hsft.config import HSFTStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.stages import hsft, iterative, variants
from hsft.stages.mining import read_mined_dice
from hsft.stages.selection import by_difficulty, stream_over, weighted_by_difficulty, whole_set


@pytest.fixture(scope="module")
def pool():
    return [make_fundus(seed=200 + i, size=64) for i in range(10)]


@pytest.fixture(scope="module")
def dice(pool):
    # Sample i has Dice i / 10: sample 0 is the hardest.
    return {s.id: i / 10 for i, s in enumerate(pool)}


def _visits(plan, epochs, seed=0):
    return [i for e in range(epochs) for i in plan.epoch_indices(e, seed)]


def test_whole_set_visits_every_sample_once_an_epoch_in_a_seeded_order(pool):
    plan = whole_set(pool, "all")
    for epoch in range(3):
        assert sorted(plan.epoch_indices(epoch, 0)) == list(range(10))
    assert plan.epoch_indices(0, 0) != plan.epoch_indices(1, 0)
    assert plan.epoch_indices(0, 0) == whole_set(pool, "all").epoch_indices(0, 0)
    assert len(plan.order(0, global_batch=4, seed=0)) == 12  # wrapped to whole global batches


def test_stream_over_the_whole_pool_spreads_the_visits_evenly(pool):
    plan = stream_over(pool, per_epoch=4, describe="all")
    visits = _visits(plan, epochs=5)  # 20 visits of 10 samples
    assert all(len(plan.epoch_indices(e, 0)) == 4 for e in range(5))
    assert Counter(visits) == {i: 2 for i in range(10)}
    assert visits != _visits(plan, epochs=5, seed=1)


def test_curriculum_walks_from_easy_to_hard_and_the_anti_curriculum_back(pool, dice):
    easy_first = by_difficulty(pool, dice, per_epoch=3, epochs=4, easy_first=True, describe="c")
    visits = _visits(easy_first, epochs=4)
    difficulty = [dice[pool[i].id] for i in visits]
    assert difficulty == sorted(difficulty, reverse=True)  # easiest (highest Dice) first, never back
    assert set(visits) == set(range(10))  # 12 visits reach all 10 samples
    hard_first = by_difficulty(pool, dice, per_epoch=3, epochs=4, easy_first=False, describe="a")
    backwards = [dice[pool[i].id] for i in _visits(hard_first, epochs=4)]
    assert backwards == sorted(backwards) and backwards[0] == 0.0 and set(_visits(hard_first, epochs=4)) == set(range(10))
    assert easy_first.epoch_indices(0, 0) == easy_first.epoch_indices(0, 5)  # an order, not a shuffle


def test_loss_weighted_sampling_favours_the_samples_with_the_highest_loss(pool, dice):
    plan = weighted_by_difficulty(pool, dice, per_epoch=50, describe="w")
    counts = Counter(_visits(plan, epochs=40))
    hardest, easiest = counts[0], counts[9]  # loss 1.01 vs 0.11
    assert hardest > 4 * easiest
    assert plan.epoch_indices(3, 0) == weighted_by_difficulty(pool, dice, 50, "w").epoch_indices(3, 0)


def test_empty_pools_give_empty_plans(dice):
    for plan in (stream_over([], 3, "x"), by_difficulty([], dice, 3, 2, easy_first=True, describe="x"),
                 weighted_by_difficulty([], dice, 3, "x")):
        assert plan.per_epoch == 0 and plan.epoch_indices(0, 0) == []


def test_the_hard_set_limit_takes_the_hardest_part():
    hard = list("abcdefgh")
    assert HSFTStageConfig().limit(hard) == hard
    assert HSFTStageConfig(max_hard=3).limit(hard) == list("abc")
    assert HSFTStageConfig(hard_fraction=0.25).limit(hard) == list("ab")
    assert HSFTStageConfig(hard_fraction=0.01).limit(hard) == ["a"]
    assert HSFTStageConfig(hard_fraction=0.5, max_hard=2).limit(hard) == list("ab")
    for bad, match in (({"max_hard": 0}, "hsft.max_hard"), ({"hard_fraction": 0.0}, "hsft.hard_fraction"),
                       ({"rounds": 0}, "hsft.rounds"), ({"seg_form": "generate", "cache_features": False},
                                                        "hsft.seg_form")):
        with pytest.raises(ValueError, match=match):
            HSFTStageConfig(**bad).validate()


def _mined_run(make_context, pool, tmp_path, **changes):
    """A run context whose mining stage 'found' samples 0-3 hard (Dice 0.0-0.3), the rest easy."""
    ctx = make_context(SimpleNamespace(train=pool, val=[], test=[]), **changes)
    rows = [{"id": s.id, "dice": i / 10, "bucket": "x", "seg_emitted": True} for i, s in enumerate(pool)]
    (ctx.stage_dir("mining")).mkdir(parents=True)
    (ctx.stage_dir("mining") / "hard_samples.json").write_text(json.dumps({"hard": rows[:4], "all": rows}))
    return ctx


def test_every_variant_takes_hsfts_optimizer_steps_from_the_same_model(pool, tmp_path, make_context, tiny_model_dir):
    ctx = _mined_run(make_context, pool, tmp_path)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=2, micro_batch=1, grad_accum=2, lr=1e-3, min_lr=1e-5))
    assert read_mined_dice(ctx.stage_dir("mining"))[pool[9].id] == pytest.approx(0.9)
    steps, described = {}, {}
    for run in (hsft.run, variants.control, variants.all_data, variants.curriculum, variants.anti_curriculum,
                variants.loss_weighted, variants.easy_control):
        result = run(ctx, cfg, tiny_model_dir)
        name = "hsft" if run is hsft.run else run.__name__
        metrics = json.loads((ctx.stage_dir(name) / "metrics.json").read_text())
        steps[name] = metrics["optimizer_steps"]
        described[name] = result.summary["training_set"]
        assert result.summary["samples"] == 4  # the hard set's size, every epoch
        assert (ctx.stage_dir(name) / "model").is_dir()
    assert set(steps.values()) == {4}, steps  # 2 epochs x 4 samples / (1 x 2)
    assert "whole training split (10 samples)" in described["all_data"]
    assert "easiest to hardest" in described["curriculum"] and "hardest to easiest" in described["anti_curriculum"]


def test_hsft_on_the_k_hardest_trains_on_those_alone(pool, tmp_path, make_context, tiny_model_dir):
    ctx = _mined_run(make_context, pool, tmp_path)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=1, micro_batch=1, grad_accum=1, lr=1e-3), max_hard=2)
    result = hsft.run(ctx, cfg, tiny_model_dir)
    assert result.summary["samples"] == 2 and "the 2 hardest of the 4" in result.summary["training_set"]
    assert json.loads((ctx.stage_dir("hsft") / "metrics.json").read_text())["optimizer_steps"] == 2


def test_iterative_hsft_mines_again_before_every_round(pool, tmp_path, make_context, tiny_model_dir):
    ctx = make_context(SimpleNamespace(train=pool[:6], val=[], test=[]),
                       **{"mining.batch_size": 6, "mining.max_new_tokens": 8, "mining.tau": 1.0})
    cfg = HSFTStageConfig(train=TrainConfig(epochs=1, micro_batch=2, grad_accum=1, lr=1e-3), rounds=2)
    result = iterative.run(ctx, cfg, tiny_model_dir, ctx.cfg.mining)
    stage_dir = ctx.stage_dir("iterative")
    for number in (1, 2):
        assert (stage_dir / f"round{number}" / "mining" / "hard_samples.json").is_file()
        assert (stage_dir / f"round{number}" / "hsft" / "metrics.json").is_file()
    assert [r["round"] for r in result.summary["rounds"]] == [1, 2]
    assert result.summary["optimizer_steps"] == 6  # tau 1: every sample is hard, 3 steps a round
    assert result.model_dir == stage_dir / "model" and (stage_dir / "metrics.json").is_file()


def test_the_engine_loop_trains_in_the_plans_order(pool, tmp_path, make_context, tiny_model_dir, monkeypatch):
    ctx = _mined_run(make_context, pool, tmp_path)
    seen = []
    original = hsft.HSFTTask.make_batch

    def recording(self, indices, dtype, device):
        seen.extend(self.samples[i].id for i in indices)
        return original(self, indices, dtype, device)

    monkeypatch.setattr(hsft.HSFTTask, "make_batch", recording)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=2, micro_batch=2, grad_accum=1, lr=1e-3))
    variants.curriculum(ctx, cfg, tiny_model_dir)
    dice = read_mined_dice(ctx.stage_dir("mining"))
    assert len(seen) == 8 and [dice[i] for i in seen] == sorted((dice[i] for i in seen), reverse=True)


def test_the_unified_path_trains_on_the_generate_paths_seg_state(tiny_model, pool, monkeypatch):
    import torch

    from hsft.stages.objective import FeatureCache

    hidden_size = tiny_model.seg_hidden_states(*_batch_inputs(tiny_model, pool[:2])).shape[1]
    marker = torch.full((2, hidden_size), 7.0)

    def fake_generate(images, max_new_tokens):
        return SimpleNamespace(seg_hidden=marker, seg_emitted=torch.tensor([True, False]))

    monkeypatch.setattr(tiny_model, "generate_seg", fake_generate)
    teacher = FeatureCache(tiny_model, "response").batch(pool[:2], torch.float32, torch.device("cpu"))
    unified_cache = FeatureCache(tiny_model, "generate")
    unified = unified_cache.batch(pool[:2], torch.float32, torch.device("cpu"))
    assert torch.equal(unified.seg_hidden[0], marker[0])  # the state inference computes
    assert torch.equal(unified.seg_hidden[1], teacher.seg_hidden[1])  # no [SEG] generated: teacher-forced
    assert unified_cache.generate_fallbacks == [pool[1].id]


def _batch_inputs(model, samples):
    import torch

    from hsft.stages.batching import make_seg_batch

    batch = make_seg_batch(model, samples, form="response", dtype=torch.float32, device=torch.device("cpu"))
    return batch.images, batch.tokens
