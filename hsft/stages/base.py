"""Stage 0, for the embedded default only: pre-train the tiny preset (every module) on a synthetic
pool disjoint from the fine-tuning data. It stands in for the published pre-trained checkpoint, so
later stages start from a model that already answers "Sure, [SEG]." and segments moderately well,
which leaves real hard samples for HSFT.

The result is cached under $HSFT_CACHE (default ~/.cache/hsft) keyed by everything that shapes it,
so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from hsft.config import BaseStageConfig, DataConfig, MiningConfig, ModelConfig
from hsft.data import Sample, synthetic_pool
from hsft.engine import distributed
from hsft.stages.objective import SegObjective, SegTask

CACHE_FORMAT = 1


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
    name = "base"

    def __init__(self, model, pool: list[Sample], cfg: BaseStageConfig, val_samples: list[Sample],
                 mining: MiningConfig):
        super().__init__(model, pool, val_samples, mining)
        self.cfg = cfg
        model.set_trainable({"vision", "projector", "llm", "text_hidden_fcs", "sam2_encoder", "mask_decoder"})
        self.module = SegObjective(model, lm_weight=1.0, mask_weight=cfg.mask_loss_weight)


def pool_for(cfg: BaseStageConfig, data_cfg: DataConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training pool, a small held-aside part of the pool for the epoch Dice), both disjoint from the
    fine-tuning splits by construction of the synthetic seed ranges."""
    pool = synthetic_pool(cfg.pool_size + max(4, cfg.pool_size // 16), seed=seed, size=data_cfg.synthetic_size)
    return pool[:cfg.pool_size], pool[cfg.pool_size:]


def copy_cached(cached: Path, dest: Path) -> None:
    if distributed.is_main():
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(cached, dest)
    distributed.barrier()
