"""Segmentation metrics: Dice, IoU, sensitivity, specificity, precision.

Everything starts from per-image confusion counts, an int64 (N, 4) tensor with columns
[tp, fp, fn, tn], counted inside the field of view (FOV) when one is given. From the counts:

- per image (`per_image_metrics`): one value per image, then averaged by `summarize` as
  "per_image_mean" -- every image weighs the same;
- pooled (`pooled_metrics`): the counts are summed over the dataset first, then one value is
  computed -- every pixel weighs the same, so large or vessel-rich images dominate.

The two differ whenever images differ in size or difficulty; reports label which is which.

Every metric has the form (numerator + eps) / (denominator + eps) with eps = 1e-8. So a metric
whose denominator is zero (nothing to measure) is exactly 1.0, and one whose numerator is zero
while its denominator is not is ~0 (at most eps). The empty cases, spelled out per metric:

    dice         = (2tp + eps) / (2tp + fp + fn + eps)
                   empty prediction and empty ground truth -> 1.0 (perfect agreement on "no vessel");
                   exactly one of them empty -> ~0.
    iou          = (tp + eps) / (tp + fp + fn + eps); same empty cases as Dice.
    sensitivity  = (tp + eps) / (tp + fn + eps)       (recall, true positive rate)
                   empty ground truth -> 1.0 whatever the prediction (no vessel could be missed).
    specificity  = (tn + eps) / (tn + fp + eps)       (true negative rate)
                   no background pixel in the FOV -> 1.0.
    precision    = (tp + eps) / (tp + fp + eps)       (positive predictive value)
                   empty prediction -> 1.0 whatever the ground truth (no false claim was made);
                   Dice and sensitivity are what expose a missed vessel tree.

Metrics are float64 so that pooled counts of large datasets (~1e9 pixels) stay exact.
"""

from __future__ import annotations

import torch

__all__ = [
    "EPS",
    "METRIC_NAMES",
    "counts_from_masks",
    "counts_from_stats",
    "per_image_metrics",
    "pooled_metrics",
    "summarize",
    "dice_from_masks",
]

EPS = 1e-8
METRIC_NAMES = ("dice", "iou", "sensitivity", "specificity", "precision")


def _check_masks(name: str, mask: torch.Tensor, shape: torch.Size | None = None) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        described = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape (N, H, W), got {described}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} like pred")


def counts_from_masks(pred: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None = None) -> torch.Tensor:
    """int64 (N, 4) [tp, fp, fn, tn] of bool (N, H, W) masks, counted inside `fov` when given."""
    _check_masks("pred", pred)
    _check_masks("target", target, pred.shape)
    if fov is not None:
        _check_masks("fov", fov, pred.shape)
        pred = pred & fov
        target = target & fov
        negatives = fov
    else:
        negatives = torch.ones_like(pred)
    tp = (pred & target).flatten(1).sum(1)
    fp = (pred & ~target).flatten(1).sum(1)
    fn = (~pred & target).flatten(1).sum(1)
    tn = (negatives & ~pred & ~target).flatten(1).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64)


def counts_from_stats(stats: torch.Tensor, fov_pixels: torch.Tensor | int) -> torch.Tensor:
    """[tp, fp, fn, tn] from mask statistics (N, 4) [intersection, pred, gt, union].

    This is the bridge from `hsft.ops.mask_stats(logits, target, fov)`, which counts predicted
    (logit > 0), ground-truth, intersection and union pixels inside the FOV without materialising
    the full-resolution mask. `fov_pixels` is the number of pixels counted per image: the FOV size
    (N,), or H * W when there is no FOV (an int is broadcast to every image).
    """
    if not isinstance(stats, torch.Tensor) or stats.dim() != 2 or stats.shape[1] != 4:
        raise ValueError(f"stats must be a tensor of shape (N, 4), got {getattr(stats, 'shape', type(stats))}")
    if stats.is_floating_point():
        raise ValueError(f"stats must be integer counts, got {stats.dtype}")
    stats = stats.to(torch.int64)
    fov_pixels = torch.as_tensor(fov_pixels, dtype=torch.int64, device=stats.device)
    if fov_pixels.dim() == 0:
        fov_pixels = fov_pixels.expand(stats.shape[0])
    if fov_pixels.shape != (stats.shape[0],):
        raise ValueError(f"fov_pixels must have shape ({stats.shape[0]},), got {tuple(fov_pixels.shape)}")
    intersection, pred, gt, union = stats.unbind(1)
    # These identities hold for any correct counter; a violation means a bug upstream, and
    # silently clamping it would corrupt every metric downstream.
    consistent = (
        (intersection >= 0)
        & (intersection <= torch.minimum(pred, gt))
        & (union == pred + gt - intersection)
        & (union <= fov_pixels)
    )
    if not bool(consistent.all()):
        bad = int((~consistent).nonzero()[0, 0])
        raise ValueError(
            f"inconsistent mask statistics for image {bad}: [intersection, pred, gt, union] = "
            f"{stats[bad].tolist()} with {int(fov_pixels[bad])} FOV pixels"
        )
    return torch.stack([intersection, pred - intersection, gt - intersection, fov_pixels - union], dim=1)


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.dim() != 2 or counts.shape[1] != 4:
        got = getattr(counts, "shape", type(counts).__name__)
        raise ValueError(f"counts must be a tensor of shape (N, 4) [tp, fp, fn, tn], got {got}")
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    return counts.to(torch.float64)


def _metrics(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, tn: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "dice": (2 * tp + EPS) / (2 * tp + fp + fn + EPS),
        "iou": (tp + EPS) / (tp + fp + fn + EPS),
        "sensitivity": (tp + EPS) / (tp + fn + EPS),
        "specificity": (tn + EPS) / (tn + fp + EPS),
        "precision": (tp + EPS) / (tp + fp + EPS),
    }


def per_image_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each metric per image: name -> float64 (N,). Empty cases as in the module docstring."""
    return _metrics(*_check_counts(counts).unbind(1))


def pooled_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Each metric over the whole dataset: counts are summed over images first."""
    counts = _check_counts(counts)
    if counts.shape[0] == 0:
        raise ValueError("pooled metrics need at least one image")
    return {name: float(value) for name, value in _metrics(*counts.sum(0).unbind(0)).items()}


def summarize(counts: torch.Tensor) -> dict:
    """Per-image mean (and population std) and pooled values of every metric, labelled as such.

    {"n_images": N,
     "per_image_mean": {metric: float}, "per_image_std": {metric: float},
     "pooled": {metric: float}}
    """
    per_image = per_image_metrics(counts)
    if counts.shape[0] == 0:
        raise ValueError("summarize needs at least one image")
    return {
        "n_images": int(counts.shape[0]),
        "per_image_mean": {name: float(values.mean()) for name, values in per_image.items()},
        "per_image_std": {name: float(values.std(correction=0)) for name, values in per_image.items()},
        "pooled": pooled_metrics(counts),
    }


def dice_from_masks(pred: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image Dice (float64 (N,)) of bool (N, H, W) masks, inside `fov` when given."""
    return per_image_metrics(counts_from_masks(pred, target, fov))["dice"]
