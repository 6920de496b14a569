"""Every tensor a rank touches lives on the model's device. There is no GPU here, so the model goes
to the `meta` device instead (the compiled ops have fake implementations for it): any tensor left on
the CPU meets a meta tensor and the call fails, as a CPU target meets CUDA logits on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsft.data import make_fundus
from hsft.engine import distributed
from hsft.eval.scoring import confusion_counts
from hsft.stages import dpo
from hsft.stages.batching import make_seg_batch
from hsft.stages.objective import FeatureCache, SegObjective

META = torch.device("meta")


@pytest.fixture
def samples():
    return [make_fundus(seed=700 + i, size=64) for i in range(2)]


@pytest.fixture
def meta_model(tiny_model, monkeypatch):
    """The tiny model on the meta device. The language model's forward needs data-dependent shapes
    (image-token positions) that meta tensors cannot give, so its [SEG] state is stubbed with a meta
    tensor; the SAM2 encoder, the projection, the mask decoder and the fused ops run for real."""
    model = tiny_model.to(META)
    monkeypatch.setattr(model, "seg_hidden_states",
                        lambda images, tokens: torch.zeros(len(tokens.input_ids), model.hidden_size, device=META))
    return model


def _devices(*tensors) -> set[torch.device]:
    return {t.device for t in tensors}


def test_a_training_batch_lives_on_the_models_device(meta_model, samples):
    batch = make_seg_batch(meta_model, samples, form="response", dtype=torch.float32, device=META)
    assert _devices(batch.images.vlm_pixels, batch.images.sam_pixels, batch.tokens.input_ids,
                    batch.tokens.attention_mask, batch.tokens.labels, *batch.masks, *batch.fovs) == {META}


def test_the_cached_objective_runs_on_the_models_device(meta_model, samples):
    cache = FeatureCache(meta_model, "response", on_device=True)
    batch = cache.batch(samples, torch.float32, META)
    assert _devices(batch.seg_hidden, *batch.masks, *batch.fovs, batch.sam_features.image_embedding) == {META}
    loss, terms = SegObjective(meta_model, lm_weight=0.0, mask_weight=1.0)(batch)
    assert loss.device == META and loss.shape == () and {"mask_loss", "dice_loss", "bce"} <= set(terms)


def test_the_feature_cache_keeps_features_in_host_memory_and_hands_them_to_the_device(tiny_model, samples):
    cache = FeatureCache(tiny_model, "response")
    cache.batch(samples, torch.float32, torch.device("cpu"))
    stored_features, stored_hidden = cache._store[samples[0].id]
    assert stored_hidden.device.type == "cpu" and stored_features.feat_s0.device.type == "cpu"
    # A filled cache in host memory, asked for a batch on another device: every tensor is moved there.
    batch = cache.batch(samples, torch.float32, META)
    assert cache.misses == len(samples)  # nothing recomputed
    assert _devices(batch.seg_hidden, batch.sam_features.image_embedding, batch.sam_features.feat_s0,
                    batch.sam_features.feat_s1, *batch.masks, *batch.fovs) == {META}


def test_a_dpo_batch_and_its_loss_live_on_the_models_device(meta_model, samples):
    task = dpo.DPOTask.__new__(dpo.DPOTask)  # the reference log-likelihoods need real values: set by hand
    task.pairs = [dpo.MaskPair(s, np.zeros_like(s.mask), 0.5, True) for s in samples]
    task.cache = FeatureCache(meta_model, dpo.SEG_FORM, on_device=True)
    task.reference = {s.id: (-0.5, -0.7) for s in samples}
    batch = task.make_batch([0, 1], torch.float32, META)
    assert _devices(*batch.chosen, *batch.rejected, *batch.fovs, batch.reference_chosen, batch.reference_rejected,
                    batch.margin, batch.seg_hidden) == {META}
    loss, _ = dpo.MaskDPOObjective(meta_model, dpo.DPOStageConfig())(batch)
    assert loss.device == META


def test_scoring_moves_the_target_and_fov_to_the_logits(samples, monkeypatch):
    from hsft.eval import scoring

    # Turning counts into metrics checks their values, which meta tensors do not have.
    monkeypatch.setattr(scoring.metrics, "counts_from_stats", lambda stats, fov_pixels: stats)
    sample = samples[0]
    logits = torch.zeros(16, 16, device=META)
    counts = confusion_counts(logits, sample.mask, sample.fov)
    assert counts.device == META and counts.shape == (1, 4)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("backend, expected", [("nccl", "cuda"), ("gloo", "cpu")])
def test_collectives_reduce_tensors_on_the_backends_device(monkeypatch, backend, expected):
    seen = []

    def all_reduce(tensor, op=None):
        seen.append(tensor.device.type)
        raise _Stop

    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.collective_device().type == expected
    if expected == "cuda":  # no GPU here: check where the tensor would be made without making it
        monkeypatch.setattr(distributed, "collective_device", lambda: META)
        expected = "meta"
    for reduce in (lambda: distributed.mean_over_ranks([1.0, 2.0]), lambda: distributed.any_rank(True)):
        with pytest.raises(_Stop):
            reduce()
    assert seen == [expected, expected]
