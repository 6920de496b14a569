"""Pure-torch reference of the hsft mask ops: the eager formulas.

These define what the compiled ops compute (the tests compare against them) and are the
fallback when the compiled library is missing. They materialise the full-resolution logits,
which is exactly what the compiled ops avoid.

Precision: float64 logits are computed in float64, every other float type in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hsft.ops.inputs import (
    check_fov,
    check_logits,
    check_loss_weights,
    check_mid_size,
    check_planes,
    check_reduction,
    check_size,
    compute_dtype,
)

__all__ = ["upsample_masks", "mask_loss", "dice_bce_loss", "mask_stats", "target_values"]


def _upsample(logits: torch.Tensor, size: tuple[int, int], mid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, H, W) bilinear upsampling (align_corners=False) in the compute dtype; with `mid_size`, in two
    steps through that grid (materialised here), as the release resizes its 1024 x 1024 masks."""
    planes = logits.reshape(logits.shape[0], 1, logits.shape[-2], logits.shape[-1]).to(compute_dtype(logits))
    if mid_size is not None:
        planes = F.interpolate(planes, size=mid_size, mode="bilinear", align_corners=False)
    return F.interpolate(planes, size=size, mode="bilinear", align_corners=False)[:, 0]


def target_values(target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Targets as values in [0, 1]: any non-zero bool / uint8 is 1; floats are used as they are."""
    if target.dtype in (torch.bool, torch.uint8):
        return (target != 0).to(dtype)
    return target.to(dtype)


def _target_positive(target: torch.Tensor) -> torch.Tensor:
    if target.dtype in (torch.bool, torch.uint8):
        return target != 0
    return target > 0.5


def upsample_masks(
    logits: torch.Tensor, size: Sequence[int], *, threshold: float | None = None
) -> torch.Tensor:
    """F.interpolate(bilinear, align_corners=False) to `size`; bool (value > threshold) if given."""
    op = "hsft.ops.reference.upsample_masks"
    check_logits(op, logits)
    out_size = check_size(op, size)
    values = _upsample(logits, out_size)
    out = values > threshold if threshold is not None else values.to(logits.dtype)
    return out.unsqueeze(1) if logits.dim() == 4 else out


def mask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    dice_weight: float = 1.0,
    bce_weight: float = 0.5,
    eps: float = 1e-8,
    mid_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-mask dice_weight * Dice loss + bce_weight * mean BCE-with-logits, shape (N,).

    With `fov`, only pixels where it is non-zero count: the Dice sums run over them and the BCE is
    their mean (0 for an empty field of view). With `mid_size` the logits are resized in two steps.
    """
    op = "hsft.ops.reference.mask_loss"
    check_logits(op, logits)
    check_planes(op, "target", target, logits, allow_float=True)
    check_fov(op, fov, target, logits)
    check_loss_weights(op, dice_weight, bce_weight, eps)
    mid = check_mid_size(op, mid_size, logits)
    z = _upsample(logits, (target.shape[1], target.shape[2]), mid)
    g = target_values(target, z.dtype)
    p = torch.sigmoid(z)
    bce_map = F.binary_cross_entropy_with_logits(z, g, reduction="none")
    if fov is None:
        intersection = (p * g).sum(dim=(1, 2))
        dice = 1.0 - (2.0 * intersection + eps) / (p.sum(dim=(1, 2)) + g.sum(dim=(1, 2)) + eps)
        bce = bce_map.mean(dim=(1, 2))
        return dice_weight * dice + bce_weight * bce
    inside = (fov != 0).to(z.dtype)
    p, g = p * inside, g * inside
    intersection = (p * g).sum(dim=(1, 2))
    dice = 1.0 - (2.0 * intersection + eps) / (p.sum(dim=(1, 2)) + g.sum(dim=(1, 2)) + eps)
    count = inside.sum(dim=(1, 2))
    bce = (bce_map * inside).sum(dim=(1, 2)) / count.clamp(min=1.0)
    return dice_weight * dice + bce_weight * bce


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    bce_weight: float = 0.5,
    eps: float = 1e-8,
    reduction: str = "mean",
    mid_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Dice + bce_weight * BCE of sigmoid(upsampled logits); see hsft.ops.dice_bce_loss."""
    check_reduction("hsft.ops.reference.dice_bce_loss", reduction)
    per_mask = mask_loss(logits, target, fov=fov, dice_weight=1.0, bce_weight=bce_weight, eps=eps,
                         mid_size=mid_size)
    return per_mask.mean() if reduction == "mean" else per_mask


def mask_stats(
    logits: torch.Tensor, target: torch.Tensor, *, fov: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, 4) int64 [intersection, |pred|, |target|, union] of (upsampled logits > 0) vs target."""
    op = "hsft.ops.reference.mask_stats"
    check_logits(op, logits)
    check_planes(op, "target", target, logits, allow_float=True)
    check_fov(op, fov, target, logits)
    pred = _upsample(logits, (target.shape[1], target.shape[2])) > 0
    gt = _target_positive(target)
    if fov is not None:
        inside = fov != 0
        pred = pred & inside
        gt = gt & inside
    intersection = (pred & gt).sum(dim=(1, 2))
    pred_count = pred.sum(dim=(1, 2))
    gt_count = gt.sum(dim=(1, 2))
    return torch.stack([intersection, pred_count, gt_count, pred_count + gt_count - intersection], dim=1)
