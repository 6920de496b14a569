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
from hsft.stages.objective import FeatureCache, SegObjective, SegTask

TRAINABLE = {"text_hidden_fcs", "mask_decoder"}


class HSFTTask(SegTask):
    name = "hsft"

    def __init__(self, model, samples: list[Sample], cfg: HSFTStageConfig, val_samples: list[Sample],
                 mining: MiningConfig):
        if not samples:
            raise ValueError("HSFT: the hard set is empty (no training sample is below tau); raise --tau or "
                             "use --hard-quantile")
        super().__init__(model, samples, val_samples, mining, form=cfg.seg_form)
        self.cfg = cfg
        model.set_trainable(TRAINABLE)
        self.module = SegObjective(model, lm_weight=0.0, mask_weight=1.0, bce_weight=cfg.bce_weight, eps=cfg.dice_eps)
        self.cache = FeatureCache(model, cfg.seg_form) if cfg.cache_features else None

    def make_batch(self, indices: list[int], dtype: torch.dtype):
        if self.cache is None:
            return super().make_batch(indices, dtype)
        return self.cache.batch([self.samples[i] for i in indices], dtype)

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
