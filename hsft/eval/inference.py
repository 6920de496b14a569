"""The one inference pass: the generate path (what a user's inference runs) over a list of samples,
sharded over ranks, every sample scored at its original resolution inside its field of view.

Mining, DPO pair building, every stage's epoch validation and the evaluator all go through
`sharded_map`, and per-sample Dice is always `hsft.eval.scoring.score_logits`, so the numbers the
stages act on are the numbers the report shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from hsft.data import Sample
from hsft.data.batches import chunks
from hsft.model.modes import eval_mode
from hsft.engine import distributed
from hsft.eval.scoring import binary_mask, score_logits

__all__ = ["ScoredSample", "sharded_map", "generate_and_score", "validation_metrics"]

R = TypeVar("R")


def sharded_map(samples: Sequence[Sample], batch_size: int, run_batch: Callable[[list[Sample], list[int]], list[R]],
                *, desc: str) -> list[R]:
    """`run_batch(batch, indices)` over this rank's share of `samples`, `batch_size` at a time; every
    rank's results gathered and returned, identical on every rank, in sample order.

    Each result must carry `.index` (the sample's position in `samples`): that is how the gathered
    list is put back in order, whatever the number of ranks.
    """
    mine = distributed.shard(list(range(len(samples))))
    local: list[R] = []
    with tqdm(total=len(mine), desc=desc, unit="img", disable=not distributed.is_main(), dynamic_ncols=True) as bar:
        for chunk in chunks(mine, batch_size):
            local.extend(run_batch([samples[i] for i in chunk], chunk))
            bar.update(len(chunk))
    results = sorted((r for part in distributed.all_gather_objects(local) for r in part), key=lambda r: r.index)
    if [r.index for r in results] != list(range(len(samples))):
        raise RuntimeError(f"{desc}: gathered {len(results)} results for {len(samples)} samples; the ranks did not "
                           "process the same sample list")
    return results


@dataclass
class ScoredSample:
    """One sample through the generate path."""

    index: int
    id: str
    dice: float  # at the original resolution, inside the FOV
    seg_emitted: bool  # False: no [SEG] was generated and the mask is empty
    packed_mask: bytes | None = None  # the predicted mask, bit-packed (only when asked for)

    def mask(self, size: tuple[int, int]) -> np.ndarray:
        """The predicted (H, W) bool mask (generate_and_score(..., keep_masks=True) only)."""
        if self.packed_mask is None:
            raise ValueError(f"sample {self.id}: the mask was not kept (pass keep_masks=True)")
        height, width = size
        bits = np.unpackbits(np.frombuffer(self.packed_mask, dtype=np.uint8), count=height * width)
        return bits.reshape(height, width).astype(bool)


@torch.no_grad()
def generate_and_score(model, samples: Sequence[Sample], *, batch_size: int, max_new_tokens: int, desc: str,
                       keep_masks: bool = False) -> list[ScoredSample]:
    """Every sample's generate-path Dice (and, with keep_masks, its predicted mask), sharded over ranks
    and gathered in sample order. The model runs in its own dtype on its own device."""
    def run_batch(batch: list[Sample], indices: list[int]) -> list[ScoredSample]:
        generated = model.generate_seg(model.preprocess([s.image for s in batch]).to(dtype=model.dtype),
                                       max_new_tokens=max_new_tokens)
        scored = []
        for row, (sample, index) in enumerate(zip(batch, indices)):
            logits = generated.mask_logits[row]
            packed = None
            if keep_masks:
                packed = np.packbits(binary_mask(logits, sample.size).cpu().numpy()).tobytes()
            scored.append(ScoredSample(index=index, id=sample.id, dice=score_logits(logits, sample.mask, sample.fov).dice,
                                       seg_emitted=bool(generated.seg_emitted[row]), packed_mask=packed))
        return scored

    with eval_mode(model):
        return sharded_map(samples, batch_size, run_batch, desc=desc)


def validation_metrics(model, samples: Sequence[Sample], *, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """The epoch metrics every training stage logs: mean Dice and [SEG] rate of the generate path on the
    validation split; {} without one."""
    if not samples:
        return {}
    scored = generate_and_score(model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, desc="val")
    return {"val_dice": sum(s.dice for s in scored) / len(scored),
            "val_seg_rate": sum(s.seg_emitted for s in scored) / len(scored)}
