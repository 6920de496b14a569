"""The source domain of the embedded default's stage 0: another style than the target data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hsft.data import load_splits, make_fundus
from hsft.data.config import DataConfig
from hsft.data.source_domain import (MIN_STRENGTH, SOURCE_DIFFICULTY, dilate_masks, every_style_pool,
                                     source_domain_pool, to_source_style)
from hsft.data.synthetic import POOL_SEED_BASE


def test_pool_is_deterministic_and_disjoint_from_the_splits():
    pool = source_domain_pool(4, seed=0, size=48)
    again = source_domain_pool(4, seed=0, size=48)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(pool, again))
    splits = load_splits(DataConfig(synthetic_train=4, synthetic_test=2, synthetic_size=48))
    ids = {s.id for s in splits.train + splits.val + splits.test}
    assert not ids & {s.id for s in pool}


def test_source_style_is_another_colour_and_population_with_the_same_annotation():
    target = make_fundus(POOL_SEED_BASE, 64)
    source = source_domain_pool(1, seed=0, size=64)[0]
    easy = make_fundus(POOL_SEED_BASE, 64, difficulty=SOURCE_DIFFICULTY)
    assert np.array_equal(source.mask, easy.mask) and np.array_equal(source.fov, easy.fov)
    def red_over_green(sample):
        red, green = (sample.image[..., c][sample.fov].mean() for c in (0, 1))
        return red / green

    # The target photograph is a saturated red; the full source rendering is nearly grey, and every
    # pool image is blended at least MIN_STRENGTH of the way towards it.
    restyled = to_source_style(target)
    assert restyled.id != target.id and np.array_equal(restyled.mask, target.mask)
    assert red_over_green(target) > 1.5 and red_over_green(restyled) < 1.2
    assert red_over_green(source) < red_over_green(make_fundus(POOL_SEED_BASE, 64, difficulty=SOURCE_DIFFICULTY))
    assert 0 < MIN_STRENGTH < 1


def test_every_pool_image_is_asked_three_questions_whose_masks_differ():
    from hsft.data.source_domain import REFERRING_QUESTIONS, pool_seeds, referring_source_pool
    from hsft.data.synthetic import optic_disc_mask
    from hsft.model.config import PromptConfig

    items = referring_source_pool(2, seed=0, size=64)
    images = source_domain_pool(2, seed=0, size=64)
    assert [item.instruction for item in items] == [q for _ in images for _, q in REFERRING_QUESTIONS]
    # The target's own question is none of them: it is new to stage 0.
    assert PromptConfig().instruction not in {q for _, q in REFERRING_QUESTIONS}
    for k, image in enumerate(images):
        vessels, disc, fov = (item.sample for item in items[3 * k:3 * k + 3])
        assert all(np.array_equal(s.image, image.image) for s in (vessels, disc, fov))
        assert np.array_equal(vessels.mask, image.mask) and np.array_equal(fov.mask, image.fov)
        # The disc is a compact blob inside the field of view, unlike the vessels and the aperture.
        assert 0.005 < disc.mask.sum() / image.fov.sum() < 0.05 and not (disc.mask & ~image.fov).any()
        assert len({vessels.mask.tobytes(), disc.mask.tobytes(), fov.mask.tobytes()}) == 3
        # Asked for the field of view, every pixel counts (inside it the answer would be trivial).
        assert fov.fov is None and vessels.fov is not None and disc.fov is not None
    assert len({item.sample.id for item in items}) == len(items)
    # The disc mask is the disc that was drawn: it is the brightest part of the image.
    seed = pool_seeds(1)[0]
    sample = make_fundus(seed, 64)
    disc = optic_disc_mask(seed, 64)
    brightness = sample.image.astype(float).sum(-1)
    assert brightness[disc].mean() > brightness[sample.fov & ~disc].mean() + 100


def test_stage_0_asks_each_pool_sample_its_own_question(tiny_model):
    import torch

    from hsft.config import BaseStageConfig
    from hsft.stages.base import BaseTask, pool_for
    from hsft.stages.training import Validation

    cfg = BaseStageConfig(pool_size=8, referring=True)
    pool, held, questions = pool_for(cfg, DataConfig(synthetic_size=48), 0)
    assert len(pool) == 24 and len(held) == 4 and set(questions) == {s.id for s in pool}
    task = BaseTask(tiny_model, pool, cfg, Validation([], 1, 1), questions)
    batch = task.make_batch([0, 1, 2], torch.float32, torch.device("cpu"))
    texts = [tiny_model.chat.tokenizer.decode(ids) for ids in batch.tokens.input_ids]
    assert [q for q in questions.values()][:3] == [questions[s.id] for s in pool[:3]]
    for text, sample in zip(texts, pool[:3]):
        assert questions[sample.id] in text
    assert [m.sum().item() for m in batch.masks] == [int(s.mask.sum()) for s in pool[:3]]
    # Without referring (the default), the pool is the plain images, asked the default question.
    plain, _, none = pool_for(BaseStageConfig(pool_size=8), DataConfig(synthetic_size=48), 0)
    assert len(plain) == 8 and none == {}


def test_dilated_masks_grow_by_exactly_the_pixels_asked_inside_the_field_of_view():
    import torch
    import torch.nn.functional as F

    pool = source_domain_pool(2, seed=0, size=64)
    for pixels in (1, 2):
        for original, dilated in zip(pool, dilate_masks(pool, pixels)):
            # Reference: a 3 x 3 max filter `pixels` times (zero padding at the border).
            grown = torch.from_numpy(original.mask).float()[None, None]
            for _ in range(pixels):
                grown = F.max_pool2d(grown, 3, stride=1, padding=1)
            assert np.array_equal(dilated.mask, grown[0, 0].bool().numpy() & original.fov)
            assert dilated.mask.sum() > original.mask.sum() and np.array_equal(dilated.image, original.image)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(pool, dilate_masks(pool, 0)))
    with pytest.raises(ValueError, match="pixels"):
        dilate_masks(pool, -1)


def test_every_style_pool_spans_the_target_and_source_colours_and_skips_the_source_pool():
    source = source_domain_pool(6, seed=0, size=48)
    broad = every_style_pool(40, seed=0, size=48, skip=6)
    assert not {s.id for s in source} & {s.id for s in broad}
    # The same generator seeds as the source pool's next images, in the target's difficulty range.
    assert broad[0].id == source_domain_pool(7, seed=0, size=48)[6].id
    assert np.array_equal(broad[0].mask, make_fundus(POOL_SEED_BASE + 6, 48).mask)

    def red_over_green(sample):
        red, green = (sample.image[..., c][sample.fov].mean() for c in (0, 1))
        return red / green

    ratios = [red_over_green(s) for s in broad]
    # Some images keep nearly the target's saturated red, some are nearly the source's grey.
    assert max(ratios) > 1.4 and min(ratios) < 1.2


def test_two_phase_stage_0_trains_the_image_encoder_first_then_keeps_it_frozen(make_context, tmp_path):
    """Phase 1 (SAM2's stand-in) trains only the SAM2 image encoder and mask decoder; phase 2 trains the
    rest on the source pool with phase 1's image encoder unchanged, as Sa2VA keeps SAM2's."""
    import torch
    from safetensors.torch import load_file

    from hsft.model import build_model, load_model
    from hsft.model.config import ModelConfig
    from hsft.stages import base
    from hsft.stages.base import ENCODER_PARTS

    ctx = make_context(**{"base.pool_size": 8, "base.encoder_pool_size": 8, "base.train.epochs": 1,
                          "base.train.micro_batch": 4, "base.cache_dir": str(tmp_path / "cache"),
                          "data.synthetic_size": 32, "data.synthetic_train": 4, "data.synthetic_test": 2})
    result = base.run(ctx, ctx.cfg.base, None)
    cached = Path(result.summary["cache"])
    phase_1, phase_2 = (load_file(str(d / "trainable.safetensors")) for d in (cached / "encoder", cached))
    fresh = build_model(ModelConfig(preset="tiny"), seed=ctx.seed)
    part_of = {name: fresh._part_of(name) for name, _ in fresh.named_parameters()}
    assert {part_of[n] for n in phase_1} == set(ENCODER_PARTS)
    assert "sam2_encoder" not in {part_of[n] for n in phase_2} and "llm" in {part_of[n] for n in phase_2}
    encoder = dict(load_model(cached / "encoder" / "model", dtype="float32").named_parameters())
    final = dict(load_model(result.model_dir, dtype="float32").named_parameters())
    initial = dict(fresh.named_parameters())
    for name, part in part_of.items():
        if part == "sam2_encoder":
            assert torch.equal(final[name], encoder[name]), name  # phase 2 left it as phase 1 made it
    assert any(not torch.equal(encoder[n], initial[n]) for n, p in part_of.items() if p == "sam2_encoder")
    assert any(not torch.equal(final[n], initial[n]) for n, p in part_of.items() if p == "llm")
    from hsft.stages.report import stage_notes

    assert "then every other module, the image encoder frozen" in stage_notes("base", result.summary)[0]


def test_stage_0_second_phase_encodes_each_image_once_and_gives_the_uncached_loss(tiny_model, monkeypatch):
    import dataclasses

    import torch

    from hsft.config import BaseStageConfig
    from hsft.stages.base import ALL_PARTS, BaseTask, pool_for
    from hsft.stages.training import Validation

    cfg = BaseStageConfig(pool_size=8)
    pool, _, _ = pool_for(cfg, DataConfig(synthetic_size=48), 0)
    task = BaseTask(tiny_model, pool, cfg, Validation([], 1, 1), parts=ALL_PARTS - {"sam2_encoder"})
    calls = []
    encode = tiny_model.sam_features
    monkeypatch.setattr(tiny_model, "sam_features", lambda pixels: calls.append(len(pixels)) or encode(pixels))
    first = task.make_batch([0, 1, 2], torch.float32, torch.device("cpu"))
    again = task.make_batch([2, 1, 0], torch.float32, torch.device("cpu"))
    assert calls == [3] and torch.equal(again.sam_feats.image_embedding[0], first.sam_feats.image_embedding[2])
    cached_loss, _ = task.module(first)
    uncached_loss, _ = task.module(dataclasses.replace(first, sam_feats=None))
    assert calls == [3, 3] and torch.allclose(cached_loss, uncached_loss, rtol=1e-6, atol=1e-7)
    # While the image encoder trains (phase 1, or one phase), every step encodes its images.
    assert BaseTask(tiny_model, pool, cfg, Validation([], 1, 1)).make_batch([0], torch.float32,
                                                                             torch.device("cpu")).sam_feats is None
