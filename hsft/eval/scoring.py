"""Scores one path's low-resolution mask logits against a full-resolution reference mask.

The logits are upsampled (bilinear, align_corners=False) to the reference's size and thresholded
at 0 inside `hsft.ops.mask_stats`, which counts without materialising the upsampled mask; the
counts become metrics through `hsft.metrics`, so the evaluator's numbers are by construction the
project's metric definitions (FOV-aware, Dice epsilon included).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hsft import metrics
from hsft.eval.records import PathScores
from hsft.ops import mask_stats, upsample_masks

__all__ = ["confusion_counts", "score_logits", "binary_mask"]


def _as_batch(mask: np.ndarray | Tensor, device: torch.device) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(mask)) if isinstance(mask, np.ndarray) else mask
    return tensor.to(device=device, dtype=torch.bool)[None]


def confusion_counts(logits: Tensor, target: np.ndarray | Tensor, fov: np.ndarray | Tensor | None) -> Tensor:
    """(1, 4) counts (tp, fp, fn, tn) of (logits > 0 after upsampling to target's (H, W)) against
    `target`, on the logits' device: the target and FOV go to the logits, never the reverse.

    logits: (h, w) low-resolution logits of one sample; target: (H, W) bool; fov: (H, W) bool or
    None (then every pixel counts).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected one (h, w) map, got shape {tuple(logits.shape)}")
    device = logits.device
    target_batch = _as_batch(target, device)
    fov_batch = _as_batch(fov, device) if fov is not None else None
    stats = mask_stats(logits[None].float(), target_batch, fov=fov_batch)
    if fov_batch is not None:
        fov_pixels = fov_batch.sum(dim=(1, 2))
    else:
        fov_pixels = torch.tensor([target_batch[0].numel()], device=device)
    return metrics.counts_from_stats(stats, fov_pixels)


def score_logits(logits: Tensor, target: np.ndarray | Tensor, fov: np.ndarray | Tensor | None) -> PathScores:
    """Metrics of (logits > 0 after upsampling to target's (H, W)) against `target` (see confusion_counts):
    the one definition of a sample's Dice that mining, DPO pairs, validation and evaluation share."""
    counts = confusion_counts(logits, target, fov)
    values = metrics.per_image_metrics(counts)
    tp, fp, fn, tn = (int(v) for v in counts[0].tolist())
    return PathScores(
        dice=float(values["dice"][0]), iou=float(values["iou"][0]),
        sensitivity=float(values["sensitivity"][0]), specificity=float(values["specificity"][0]),
        precision=float(values["precision"][0]), tp=tp, fp=fp, fn=fn, tn=tn,
    )


def binary_mask(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) bool mask of one sample's (h, w) logits at the original size: the same upsampling and
    threshold as score_logits, materialised (for overlays, predictions and path-vs-path Dice)."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected one (h, w) map, got shape {tuple(logits.shape)}")
    return upsample_masks(logits[None].float(), size, threshold=0.0)[0].bool()
