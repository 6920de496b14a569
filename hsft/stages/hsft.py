"""Stage 3, Hard Sample Aware Fine-tuning: train text_hidden_fcs and the SAM2 mask decoder on the
mined hard set alone with Dice + 0.5 * BCE, the vision encoder and the LLM frozen.

Because everything upstream of text_hidden_fcs is frozen, the SAM2 image features and the [SEG]
hidden state of a sample never change: they are computed once and reused every epoch
(`cache_features`, on by default).
"""

from __future__ import annotations

import random

import torch

from pathlib import Path

from hsft.config import HSFTStageConfig
from hsft.data import Sample
from hsft.engine.context import RunContext
from hsft.model import load_model
from hsft.stages.mining import read_hard_ids
from hsft.stages.objective import FeatureCache, SegObjective, SegTask
from hsft.stages.training import StageResult, Validation, model_dir, pass_model_on, train_stage

TRAINABLE = {"text_hidden_fcs", "mask_decoder"}


class HSFTTask(SegTask):
    name = "hsft"

    def __init__(self, model, samples: list[Sample], cfg: HSFTStageConfig, validation: Validation):
        if not samples:
            raise ValueError("HSFT: the hard set is empty (no training sample is below tau); raise --tau or "
                             "use --hard-quantile")
        super().__init__(model, samples, validation, form=cfg.seg_form)
        self.cfg = cfg
        model.set_trainable(TRAINABLE)
        self.module = SegObjective(model, lm_weight=0.0, mask_weight=1.0, bce_weight=cfg.bce_weight, eps=cfg.dice_eps)
        self.cache = FeatureCache(model, cfg.seg_form, on_device=cfg.cache_on_device) if cfg.cache_features else None

    def make_batch(self, indices: list[int], dtype: torch.dtype, device: torch.device):
        if self.cache is None:
            return super().make_batch(indices, dtype, device)
        return self.cache.batch([self.samples[i] for i in indices], dtype, device)

    def client_state(self) -> dict:
        return {"hard_set_ids": [s.id for s in self.samples], "cache": self.cache is not None}


def select_training_set(train: list[Sample], hard_ids: list[str], control: str, seed: int,
                        source: str = "hard_samples.json") -> list[Sample]:
    """The hard set (in mining order), or for the matched-compute control a random training subset of
    the same size, so HSFT's gain can be told apart from 'just more training'."""
    by_id = {s.id: s for s in train}
    unknown = [i for i in hard_ids if i not in by_id]
    if unknown:
        raise ValueError(f"{source}: names {len(unknown)} id(s) that are not in the training split, e.g. "
                         f"{', '.join(unknown[:5])}; was it mined on other data?")
    if control == "random":
        rng = random.Random(seed)
        return rng.sample(train, k=len(hard_ids))
    return [by_id[i] for i in hard_ids]


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    """Stage 3 from the model `start`, on the hard set that the mining stage wrote (or the control's subset)."""
    if start is None:
        raise ValueError("hsft: needs a starting model directory (--model, or an earlier stage)")
    hard_ids = read_hard_ids(ctx.stage_dir("mining"))
    train_set = select_training_set(ctx.splits.train, hard_ids, cfg.control, ctx.seed,
                                    source=str(ctx.stage_dir("mining") / "hard_samples.json"))
    summary = {"samples": len(train_set), "control": cfg.control, "cache": cfg.cache_features}
    what = ("a random training subset of the hard set's size (matched-compute control)" if cfg.control == "random"
            else "the hard set")
    note = f"- HSFT: {len(train_set)} samples ({what}), frozen-feature cache {'on' if cfg.cache_features else 'off'}"
    if not train_set:
        # A model with no training sample below tau has nothing to fine-tune on: pass it on unchanged so
        # the evaluation still runs, and say so.
        reason = (f"no training sample has Dice < tau = {ctx.cfg.mining.tau}; HSFT skipped, the input model is "
                  "passed on unchanged (raise --tau or use --hard-quantile to train)")
        result = pass_model_on(ctx, "hsft", Path(start), reason, summary)
        result.notes = [note + " -- skipped: empty hard set"]
        return result
    # In the training dtype up front: DeepSpeed's bf16 cast converts parameters, not buffers.
    task = HSFTTask(load_model(start, device=ctx.device, dtype=ctx.dtype), train_set, cfg, Validation.of(ctx))
    train_stage(ctx, task, cfg.train, load_input_model=lambda: load_model(start, dtype="float32"))
    return StageResult(model_dir=model_dir(ctx.stage_dir("hsft")), summary=summary, notes=[note])
