"""Stage 3, Hard Sample Aware Fine-tuning: train text_hidden_fcs and the SAM2 mask decoder on the
mined hard set alone with Dice + 0.5 * BCE, the vision encoder and the LLM frozen.

Because everything upstream of text_hidden_fcs is frozen, the SAM2 image features and the [SEG]
hidden state of a sample never change: they are computed once and reused every epoch
(`cache_features`, on by default).
"""

from __future__ import annotations

import random

import torch

from hsft.config import HSFTStageConfig, MiningConfig
from hsft.data import Sample
from hsft.stages.batching import make_seg_batch
from hsft.stages.mining import validation_metrics
from hsft.stages.objective import FeatureCache, SegObjective

TRAINABLE = {"text_hidden_fcs", "mask_decoder"}


class HSFTTask:
    name = "hsft"

    def __init__(self, model, samples: list[Sample], cfg: HSFTStageConfig, val_samples: list[Sample],
                 mining: MiningConfig, name: str = "hsft"):
        if not samples:
            raise ValueError("HSFT: the hard set is empty (no training sample is below tau); raise --tau or "
                             "use --hard-quantile")
        self.name = name
        self.model, self.samples, self.cfg = model, samples, cfg
        self.val_samples, self.mining = val_samples, mining
        model.set_trainable(TRAINABLE)
        self.module = SegObjective(model, lm_weight=0.0, mask_weight=1.0, bce_weight=cfg.bce_weight, eps=cfg.dice_eps)
        self.cache = FeatureCache(model, cfg.seg_form) if cfg.cache_features else None

    def __len__(self) -> int:
        return len(self.samples)

    def make_batch(self, indices: list[int], dtype: torch.dtype):
        samples = [self.samples[i] for i in indices]
        if self.cache is not None:
            return self.cache.batch(samples, dtype)
        return make_seg_batch(self.model, samples, form=self.cfg.seg_form, dtype=dtype)

    def evaluate(self, module) -> dict[str, float]:
        """Validation Dice and [SEG] rate of the inference path (generate), as the final evaluation measures it."""
        return validation_metrics(module.model, self.val_samples, self.mining)

    def client_state(self) -> dict:
        return {"hard_set_ids": [s.id for s in self.samples], "cache": self.cache is not None}


def select_training_set(train: list[Sample], hard_ids: list[str], control: str, seed: int) -> list[Sample]:
    """The hard set (in mining order), or for the matched-compute control a random training subset of
    the same size, so HSFT's gain can be told apart from 'just more training'."""
    by_id = {s.id: s for s in train}
    unknown = [i for i in hard_ids if i not in by_id]
    if unknown:
        raise ValueError(f"hard_samples.json names ids that are not in the training split: {unknown[:5]}; "
                         "was it mined on other data?")
    if control == "random":
        rng = random.Random(seed)
        return rng.sample(train, k=len(hard_ids))
    return [by_id[i] for i in hard_ids]
