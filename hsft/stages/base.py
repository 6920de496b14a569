"""Stage 0, for the embedded default only: pre-train the tiny preset on synthetic pools disjoint from
the fine-tuning data. It stands in for a generic pre-trained Sa2VA, in two phases as Sa2VA itself was
built (`encoder_pool_size` > 0, the default):

1. a stand-in for SAM2's own broad pre-training: the SAM2 image encoder and mask decoder alone (mask
   loss, no text) on images of every colour style and the target's difficulty range;
2. a stand-in for Sa2VA's training: every other module (vision tower, projector, LLM,
   text_hidden_fcs, mask decoder; CE + Dice/BCE) on the source domain (`source` "other-style":
   desaturated, clean easy images, hsft.data.source_domain), with phase 1's image encoder frozen, as
   Sa2VA keeps SAM2's. The source masks follow a coarser annotation protocol than the target's
   (`source_mask_dilation` px wider).

So later stages start from a model that answers "Sure, [SEG]." and segments the target moderately
well, with a generic image encoder (as real Sa2VA has: the published method keeps it frozen in every
stage) and a mask decoder fitted to another domain and protocol: something for LoRA to adapt, and real
hard samples for HSFT. Measured (BENCHMARKS.md, "Stage-0 stand-ins"): with one phase (every module on the source pool),
the frozen encoder, which had seen only the source colours, bounded every later stage, and LoRA moved
held-out Dice by nothing measurable. `source` "target" pre-trains on the target distribution itself.

With `referring` (off by default) every pool image is asked three questions whose masks differ (the
vessels, the optic disc, the field of view; hsft.data.source_domain.REFERRING_QUESTIONS), so the mask
decoder must read the [SEG] state, and the target's own question is new to the model. Measured (BENCHMARKS.md,
"Stage-0 stand-ins"): stage 0 then answers the target question with about the whole field of view, and LoRA does
not move that, so the default pre-trains on the target's question alone.

The result is cached under $HSFT_CACHE (default ~/.cache/hsft) keyed by everything that shapes it,
so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hsft.config import BaseStageConfig, DataConfig, ModelConfig
from hsft.data import Sample, synthetic_pool
from hsft.data.batches import chunks
from hsft.data.source_domain import (ask_referring_questions, dilate_masks, every_style_pool, pool_seeds,
                                     source_domain_pool)
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.tensorboard import TBWriter
from hsft.eval.scoring import score_logits
from hsft.model import PARTS, build_model
from hsft.model.checkpoint import load_model
from hsft.model.features import SamFeatures
from hsft.model.modes import eval_mode
from hsft.stages.batching import SegBatch, fovs_on, masks_on
from hsft.stages.objective import SegObjective, SegTask
from hsft.stages.training import StageResult, Validation, is_complete, model_dir, recorded_step, train_stage

CACHE_FORMAT = 4
ALL_PARTS = frozenset(PARTS)
# The broad image pre-training of the two-phase stage 0 (SAM2's own stand-in): no text.
ENCODER_PARTS = frozenset({"sam2_encoder", "mask_decoder"})


def cache_root(cfg: BaseStageConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("HSFT_CACHE", Path.home() / ".cache" / "hsft"))


def cache_key(cfg: BaseStageConfig, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, precision: str) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "base": asdict(cfg) | {"cache_dir": None},
                       "model": asdict(model_cfg), "size": data_cfg.synthetic_size, "seed": seed,
                       "precision": precision}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class BaseTask(SegTask):
    """Every module on CE + Dice/BCE over the pool; `questions` (sample id -> instruction) replaces the
    model's default question for the samples it names."""

    name = "base"

    def __init__(self, model, pool: list[Sample], cfg: BaseStageConfig, validation: Validation,
                 questions: dict[str, str] | None = None, parts: frozenset[str] = ALL_PARTS, lm_weight: float = 1.0):
        super().__init__(model, pool, validation)
        self.cfg = cfg
        self.questions = questions or {}
        model.set_trainable(parts)
        self.module = SegObjective(model, lm_weight=lm_weight, mask_weight=cfg.mask_loss_weight)
        # With the image encoder frozen its features never change: computed once per image, not per step.
        self.image_features: dict[str, SamFeatures] | None = None if "sam2_encoder" in parts else {}

    def make_batch(self, indices: list[int], dtype: torch.dtype, device: torch.device) -> SegBatch:
        samples = [self.samples[i] for i in indices]
        default = self.model.prompt.instruction
        tokens = self.model.tokenize(len(samples), form=self.form,
                                     instruction=[self.questions.get(s.id, default) for s in samples])
        images = self.model.preprocess([s.image for s in samples]).to(device=device, dtype=dtype)
        return SegBatch(ids=[s.id for s in samples], images=images, tokens=tokens.to(device),
                        masks=masks_on(samples, device), fovs=fovs_on(samples, device),
                        sam_feats=self._frozen_image_features(samples, images))

    @torch.no_grad()
    def _frozen_image_features(self, samples: list[Sample], images) -> SamFeatures | None:
        if self.image_features is None:
            return None
        if any(s.id not in self.image_features for s in samples):
            feats = self.model.sam_features(images.sam_pixels)
            for i, sample in enumerate(samples):
                self.image_features.setdefault(sample.id, feats.index(i))
        return SamFeatures.cat([self.image_features[s.id] for s in samples])


@dataclass
class MaskValidation:
    """Phase 1's epoch metric: the mask Dice with [SEG] teacher-forced (the forward path), since that
    phase trains no text and its model does not yet answer with [SEG]."""

    samples: list[Sample]
    batch_size: int

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        dice = []
        device = next(model.parameters()).device
        with eval_mode(model):
            for chunk in chunks(self.samples, self.batch_size):
                batch = model.preprocess([s.image for s in chunk]).to(device=device, dtype=model.dtype)
                tokens = model.tokenize(len(chunk), form="response", tiles=batch.num_tiles).to(device)
                logits = model.forward_seg(batch, tokens).mask_logits
                dice += [score_logits(logits[i], s.mask, s.fov).dice for i, s in enumerate(chunk)]
        return {"val_forward_dice": sum(dice) / len(dice)}


def pool_for(cfg: BaseStageConfig, data_cfg: DataConfig, seed: int) -> tuple[list[Sample], list[Sample], dict[str, str]]:
    """(training pool, a small held-aside part of the pool for the epoch Dice, the question of each pool
    sample that is not asked the default one), disjoint from the fine-tuning splits by construction of the
    synthetic seed ranges. The held-aside images are asked the target's own question about the vessels."""
    make = source_domain_pool if cfg.source == "other-style" else synthetic_pool
    held_out = max(4, cfg.pool_size // 16)
    pool = make(cfg.pool_size + held_out, seed=seed, size=data_cfg.synthetic_size)
    if cfg.source_mask_dilation:
        pool = dilate_masks(pool, cfg.source_mask_dilation)
    if not cfg.referring:
        return pool[:cfg.pool_size], pool[cfg.pool_size:], {}
    referring = ask_referring_questions(pool[:cfg.pool_size], pool_seeds(cfg.pool_size, seed))
    return [r.sample for r in referring], pool[cfg.pool_size:], {r.sample.id: r.instruction for r in referring}


def run(ctx: RunContext, cfg: BaseStageConfig, start: Path | None) -> StageResult:
    """Pre-train the embedded tiny model (or reuse the cached pre-training) into `<out>/base/`."""
    if start is not None:
        raise ValueError("stage 'base' pre-trains the embedded tiny model from scratch; it takes no input model")
    run_cfg = ctx.cfg
    # The stand-in pre-training has its own precision (fp32 by default: bf16 is slow on CPUs). It trains
    # inside the cache directory itself, so an interrupted pre-training resumes with --resume; the run-wide
    # step starts at 0 there, so every run that reuses the cache continues from the same step.
    base_ctx = ctx.with_precision(cfg.precision or ctx.precision).at_step(0)
    cached = cache_root(cfg) / f"base-{cache_key(cfg, run_cfg.model, run_cfg.data, ctx.seed, base_ctx.precision)}"
    if not is_complete(cached):
        if distributed.is_main():
            print(f"[base] pre-training the embedded tiny model (cached afterwards under {cached})")
        pool, held, questions = pool_for(cfg, run_cfg.data, ctx.seed)
        validation = Validation(held, ctx.inference.batch_size, ctx.inference.max_new_tokens)
        load_start = lambda: build_model(run_cfg.model, seed=ctx.seed)  # noqa: E731
        parts = ALL_PARTS
        if cfg.encoder_pool_size:
            # Phase 1: the image encoder and mask decoder on images of every style, as SAM2 is pre-trained on
            # broad data; its own directory inside the cache, so an interrupted phase resumes.
            encoder_dir = cached / "encoder"
            if not is_complete(encoder_dir):
                broad = every_style_pool(cfg.encoder_pool_size, seed=ctx.seed, size=run_cfg.data.synthetic_size,
                                         skip=len(pool) + len(held))
                torch.manual_seed(ctx.seed)
                task = BaseTask(load_start(), broad, cfg, MaskValidation(held, ctx.inference.batch_size),
                                parts=ENCODER_PARTS, lm_weight=0.0)
                task.name = "base/encoder"  # the phase's name in its progress bar and log lines
                train_stage(base_ctx, task, cfg.train, stage_dir=encoder_dir, tb=TBWriter(None),
                            load_input_model=load_start)
            load_start = lambda: load_model(model_dir(encoder_dir))  # noqa: E731
            # Phase 2: the Sa2VA part on the source pool, the image encoder frozen, as Sa2VA trains.
            parts = ALL_PARTS - {"sam2_encoder"}
        torch.manual_seed(ctx.seed)
        task = BaseTask(load_start(), pool, cfg, validation, questions, parts=parts)
        train_stage(base_ctx, task, cfg.train, stage_dir=cached, tb=TBWriter(None), load_input_model=load_start)
        if distributed.is_main():
            for phase in (cached, cached / "encoder"):  # the weights are what is reused
                shutil.rmtree(phase / "checkpoints", ignore_errors=True)
    elif distributed.is_main():
        print(f"[base] reusing the pre-trained embedded model cached at {cached}")
    stage_dir = ctx.stage_dir("base")
    if distributed.is_main():
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        shutil.copytree(cached, stage_dir)
    distributed.barrier()
    summary = {"cache": str(cached), "source": cfg.source, "pool_size": cfg.pool_size,
               "encoder_pool_size": cfg.encoder_pool_size, "source_mask_dilation": cfg.source_mask_dilation,
               "referring": cfg.referring}
    return StageResult(model_dir=model_dir(stage_dir), summary=summary, global_step=recorded_step(cached))
