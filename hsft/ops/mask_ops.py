"""The public mask ops: compiled kernels when available, the pure-torch reference otherwise."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hsft.ops import library, reference
from hsft.ops.inputs import (
    check_fov,
    check_logits,
    check_loss_weights,
    check_mid_size,
    check_planes,
    check_reduction,
    check_size,
)

__all__ = ["dice_bce_loss", "mask_loss", "upsample_masks", "mask_stats"]


def mask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    dice_weight: float = 1.0,
    bce_weight: float = 0.5,
    eps: float = 1e-8,
    reduction: str = "mean",
    mid_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """dice_weight * Dice loss + bce_weight * mean BCE-with-logits, fused with the upsampling.

    The general form behind :func:`dice_bce_loss` (dice_weight=1); ``dice_weight=0`` gives the
    BCE term alone and ``bce_weight=0`` the Dice term alone, from the same kernels. Arguments
    and result as in :func:`dice_bce_loss`.
    """
    op = "hsft.ops.mask_loss"
    check_logits(op, logits)
    check_planes(op, "target", target, logits, allow_float=True)
    check_fov(op, fov, target, logits)
    check_loss_weights(op, dice_weight, bce_weight, eps)
    check_reduction(op, reduction)
    mid = check_mid_size(op, mid_size, logits)
    if library.has_kernel(logits.device):
        per_mask, _ = torch.ops.hsft.dice_bce_loss(logits, target, fov, float(dice_weight), float(bce_weight),
                                                   float(eps), None if mid is None else list(mid))
    else:
        per_mask = reference.mask_loss(logits, target, fov=fov, dice_weight=dice_weight, bce_weight=bce_weight,
                                       eps=eps, mid_size=mid)
    return per_mask.mean() if reduction == "mean" else per_mask


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
    """Dice + bce_weight * BCE-with-logits of low-resolution mask logits against full-size targets.

    The logits are upsampled bilinearly (align_corners=False) to the target's size inside the
    kernel, never materialised. Per mask, with p = sigmoid(upsampled logits) and g the target:

        1 - (2 sum(p g) + eps) / (sum p + sum g + eps) + bce_weight * mean(BCE-with-logits)

    With ``fov`` the sums and the mean run over the pixels inside the field of view only (the
    black border of a fundus image is then neither a true negative nor a BCE term); an empty field
    of view gives 0 (with eps > 0) and a zero gradient.

    Args:
        logits: (N, h, w) or (N, 1, h, w), float64 / float32 / bfloat16 / float16.
        target: (N, H, W), any H, W. bool / uint8 (any non-zero value is foreground) or floating
            point in [0, 1] (soft labels used as they are).
        fov: optional (N, H, W) bool / uint8 field of view (non-zero = inside), on the logits' device.
        bce_weight: weight of the BCE term (>= 0).
        eps: smoothing of the Dice ratio (>= 0).
        reduction: "mean" (scalar, mean over masks) or "none" (per-mask vector of shape (N,)).
        mid_size: optional (H', W') of an intermediate grid: the logits are resized to it first and
            then to the target's size, both bilinear align_corners=False, exactly as two
            F.interpolate calls would (in the compute dtype) but without storing the intermediate
            grid. The release's models resize their 256 x 256 masks to 1024 x 1024 and then to the
            image; H' >= h and W' >= w.

    Returns:
        float64 for float64 logits, float32 otherwise (bfloat16 / float16 logits are read as they
        are and computed in float32). Differentiable w.r.t. ``logits``: the forward also computes
        what the gradient needs, the backward is one elementwise pass; the gradient comes back in
        the logits' dtype and is deterministic (no floating-point atomics).
    """
    return mask_loss(logits, target, fov=fov, dice_weight=1.0, bce_weight=bce_weight, eps=eps, reduction=reduction,
                     mid_size=mid_size)


def upsample_masks(logits: torch.Tensor, size: Sequence[int], *, threshold: float | None = None) -> torch.Tensor:
    """Bilinear upsampling, the same sampling as F.interpolate(mode="bilinear", align_corners=False).

    The values agree with F.interpolate up to a few ulp (the summation order differs), so a value within
    rounding of `threshold` can fall on the other side of it than F.interpolate's would.

    Args:
        logits: (N, h, w) or (N, 1, h, w) floating point.
        size: (H, W) of the output.
        threshold: when given, returns the bool mask ``value > threshold`` instead of the values
            (compared in float32, or float64 for float64 logits) without writing the values.

    Returns:
        (N, H, W) for 3-D logits, (N, 1, H, W) for 4-D logits; the logits' dtype (bfloat16 /
        float16 are interpolated in float32 and rounded once), or bool with ``threshold``.
    """
    op = "hsft.ops.upsample_masks"
    check_logits(op, logits)
    out_size = check_size(op, size)
    if library.has_kernel(logits.device):
        thr = None if threshold is None else float(threshold)
        return torch.ops.hsft.upsample_masks(logits, list(out_size), thr)
    return reference.upsample_masks(logits, out_size, threshold=threshold)


def mask_stats(logits: torch.Tensor, target: torch.Tensor, *, fov: torch.Tensor | None = None) -> torch.Tensor:
    """Per-mask confusion counts of the thresholded upsampled prediction, never materialised.

    Prediction: upsampled logits > 0; target: non-zero for bool / uint8, > 0.5 for floats.

    Args:
        logits: (N, h, w) or (N, 1, h, w) floating point.
        target: (N, H, W) bool / uint8 / floating point.
        fov: optional (N, H, W) bool / uint8 field of view; pixels outside it are not counted.

    Returns:
        int64 tensor (N, 4): [intersection, |pred|, |target|, union].
    """
    op = "hsft.ops.mask_stats"
    check_logits(op, logits)
    check_planes(op, "target", target, logits, allow_float=True)
    check_fov(op, fov, target, logits)
    if library.has_kernel(logits.device):
        return torch.ops.hsft.mask_stats(logits, target, fov)
    return reference.mask_stats(logits, target, fov=fov)
