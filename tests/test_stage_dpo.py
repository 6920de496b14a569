"""The DPO stage on the tiny model through the real loop (one-rank gloo group): pairs from the
inference pass, the first step at log 2, the stage directory, and the skip without pairs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from hsft.config import DPOStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.engine.loop import train
from hsft.eval.inference import generate_and_score
from hsft.model import load_model
from hsft.stages import dpo
from hsft.stages.report import stage_notes
from hsft.stages.training import Validation


class RecordingTB:
    """Collects what the loop logs (the TensorBoard writer's interface)."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def scalars(self, values, step):
        self.rows.append((step, dict(values)))

    def text(self, *args, **kwargs):
        pass

    def histogram(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def samples():
    return [make_fundus(seed=300 + i, size=64) for i in range(4)]


def test_inference_pairs_hold_the_predicted_masks(tiny_model_dir, samples):
    model = load_model(tiny_model_dir)
    threshold = 0.05
    kept, every = dpo.inference_pairs(model, samples, pair_threshold=threshold, batch_size=3, max_new_tokens=8)
    assert [p.sample.id for p in every] == [s.id for s in samples]
    assert [p.sample.id for p in kept] == [p.sample.id for p in every if p.dice < threshold]
    reference = {s.id: s.dice for s in generate_and_score(model, samples, batch_size=4, max_new_tokens=8, desc="t")}
    for pair in every:
        assert pair.rejected.shape == pair.sample.mask.shape and pair.rejected.dtype == bool
        assert pair.dice == pytest.approx(reference[pair.sample.id], abs=1e-9)  # the mining Dice
        assert pair.margin == pytest.approx(1.0 - pair.dice)


def test_dpo_task_through_the_loop_starts_at_log2_and_learns(tiny_model_dir, samples, tmp_path, make_context):
    model = load_model(tiny_model_dir)
    kept, _ = dpo.inference_pairs(model, samples, pair_threshold=1.0, batch_size=4, max_new_tokens=8)
    assert len(kept) >= 3  # an untrained model gets nothing right
    cfg = DPOStageConfig(train=TrainConfig(epochs=2, micro_batch=len(kept), grad_accum=1, lr=1e-3, min_lr=1e-3),
                         beta=0.5, normalisation="disagree")
    task = dpo.DPOTask(model, kept, cfg, Validation([], 4, 8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("text_hidden_fcs", "sam2.mask_decoder", "sam2.prompt_encoder"))
                             for n in trainable)
    tb = RecordingTB()
    result = train(task, cfg.train, make_context(), stage_dir=tmp_path, tb=tb)
    logged = [values for _, values in tb.rows if "dpo/loss" in values]
    names = {"dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/accuracies", "dpo/rewards/margins",
             "dpo/logps/chosen", "dpo/logps/rejected"}
    assert names <= set(logged[0])
    # step 0: the policy is the reference, so every reward is 0 and the loss is log 2
    assert logged[0]["dpo/loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert logged[0]["dpo/rewards/accuracies"] == 0.0
    # afterwards the ground truth is preferred
    assert logged[-1]["dpo/rewards/accuracies"] > 0.5 and logged[-1]["dpo/rewards/margins"] > 0
    assert result.losses[-1] < result.losses[0]
    assert task.cache.misses == len(kept)  # frozen features were computed once per pair


def test_dpo_stage_writes_its_directory_and_skips_cleanly_without_pairs(tiny_model_dir, samples, tmp_path,
                                                                        monkeypatch, make_context):
    splits = SimpleNamespace(train=samples, val=samples[:1], test=[])
    changes = {"mining.batch_size": 4, "mining.max_new_tokens": 8}
    cfg = DPOStageConfig(train=TrainConfig(epochs=1, micro_batch=2, grad_accum=1, lr=1e-4), pair_threshold=1.0)
    ctx = make_context(splits, output_dir=str(tmp_path / "run"), **changes)
    result = dpo.run(ctx, cfg, tiny_model_dir)
    assert result.model_dir == tmp_path / "run" / "dpo" / "model"
    trained = load_model(result.model_dir)
    metrics = json.loads((tmp_path / "run" / "dpo" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2 and "val_dice" in metrics["epochs"][0]
    assert json.loads((tmp_path / "run" / "dpo" / "pairs.json").read_text())["pairs"] == len(samples)
    assert result.summary["pairs"] == len(samples) and not result.summary["skipped"]
    assert "preference pairs" in stage_notes("dpo", result.summary)[0]
    assert trained.text_hidden_fcs[0].weight.dtype == torch.float32

    # No pair survives: the stage says so, trains nothing and passes its input on.
    monkeypatch.setattr(dpo, "inference_pairs", lambda model, samples, **kw: ([], []))
    ctx = make_context(splits, output_dir=str(tmp_path / "empty"), **changes)
    result = dpo.run(ctx, cfg, tiny_model_dir)
    metrics = json.loads((tmp_path / "empty" / "dpo" / "metrics.json").read_text())
    assert metrics["skipped"] and "no preference pair" in metrics["reason"] and result.summary["skipped"]
    start_fcs = (tiny_model_dir / "text_hidden_fcs.safetensors").read_bytes()
    assert (result.model_dir / "text_hidden_fcs.safetensors").read_bytes() == start_fcs
    load_model(result.model_dir)
