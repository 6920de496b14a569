"""Metrics: hand-computed examples, FOV restriction, empty cases, pooled vs per-image."""

import pytest
import torch

from hsft.metrics import (
    EPS,
    counts_from_masks,
    counts_from_stats,
    dice_from_masks,
    per_image_metrics,
    pooled_metrics,
    summarize,
)


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# One 3x4 image, counted by hand:
#   pred    1 1 0 0     target  1 0 0 0     fov  1 1 1 1
#           1 1 0 0             1 1 1 0          1 1 1 1
#           0 0 0 1             0 0 0 0          0 0 1 1
PRED = _mask([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
TARGET = _mask([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
FOV = _mask([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])


def test_counts_by_hand():
    counts = counts_from_masks(PRED[None], TARGET[None])
    # tp: (0,0) (1,0) (1,1) = 3; fp: (0,1) (2,3) = 2; fn: (1,2) = 1; tn: 12 - 6 = 6
    assert counts.tolist() == [[3, 2, 1, 6]] and counts.dtype == torch.int64
    metrics = per_image_metrics(counts)
    assert metrics["dice"].item() == pytest.approx(6 / 9)
    assert metrics["iou"].item() == pytest.approx(3 / 6)
    assert metrics["sensitivity"].item() == pytest.approx(3 / 4)
    assert metrics["specificity"].item() == pytest.approx(6 / 8)
    assert metrics["precision"].item() == pytest.approx(3 / 5)
    assert all(value.dtype == torch.float64 for value in metrics.values())


def test_fov_restricts_every_count():
    counts = counts_from_masks(PRED[None], TARGET[None], FOV[None])
    # Outside the FOV: (2,0) (2,1), both true negatives -> tn drops by 2, nothing else changes...
    assert counts.tolist() == [[3, 2, 1, 4]]
    # ...and a prediction outside the FOV is not a false positive.
    fov = FOV.clone()
    fov[2, 3] = False
    assert counts_from_masks(PRED[None], TARGET[None], fov[None]).tolist() == [[3, 1, 1, 4]]


def test_empty_cases():
    empty = torch.zeros(1, 3, 4, dtype=torch.bool)
    vessels = TARGET[None]
    both_empty = per_image_metrics(counts_from_masks(empty, empty))
    for name in ("dice", "iou", "sensitivity", "specificity", "precision"):
        assert both_empty[name].item() == 1.0, name
    missed = per_image_metrics(counts_from_masks(empty, vessels))  # empty prediction, vessels present
    assert missed["dice"].item() < 1e-8 and missed["iou"].item() < 1e-8 and missed["sensitivity"].item() < 1e-8
    assert missed["precision"].item() == 1.0 and missed["specificity"].item() == 1.0
    hallucinated = per_image_metrics(counts_from_masks(vessels, empty))  # vessels predicted, none there
    assert hallucinated["dice"].item() < 1e-8 and hallucinated["precision"].item() < 1e-8
    assert hallucinated["sensitivity"].item() == 1.0 and hallucinated["specificity"].item() == pytest.approx(8 / 12)
    everything = torch.ones(1, 3, 4, dtype=torch.bool)
    assert per_image_metrics(counts_from_masks(everything, everything))["specificity"].item() == 1.0


def test_pooled_and_per_image_differ_as_expected():
    # Image 0: large and perfect. Image 1: tiny and completely missed.
    counts = torch.tensor([[90, 0, 0, 910], [0, 0, 10, 990]])
    per_image = per_image_metrics(counts)
    assert per_image["dice"].tolist() == pytest.approx([1.0, EPS / (10 + EPS)])
    pooled = pooled_metrics(counts)
    assert pooled["dice"] == pytest.approx(180 / 190)  # pixels weigh equally
    summary = summarize(counts)
    assert summary["n_images"] == 2
    assert summary["per_image_mean"]["dice"] == pytest.approx(0.5)  # images weigh equally
    assert summary["pooled"]["dice"] == pytest.approx(180 / 190)
    assert summary["per_image_std"]["dice"] == pytest.approx(0.5)
    assert set(summary["pooled"]) == set(summary["per_image_mean"]) == set(per_image)


def _stats_from_masks(pred, target, fov):
    """What hsft.ops.mask_stats returns: [intersection, pred, gt, union] inside the FOV."""
    pred, target = pred & fov, target & fov
    return torch.stack(
        [(pred & target).flatten(1).sum(1), pred.flatten(1).sum(1), target.flatten(1).sum(1),
         (pred | target).flatten(1).sum(1)],
        dim=1,
    )


def test_counts_from_stats_matches_counts_from_masks():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 9, 11, generator=generator) > 0.6
    target = torch.rand(5, 9, 11, generator=generator) > 0.7
    fov = torch.rand(5, 9, 11, generator=generator) > 0.2
    stats = _stats_from_masks(pred, target, fov)
    counts = counts_from_stats(stats, fov.flatten(1).sum(1))
    assert torch.equal(counts, counts_from_masks(pred, target, fov))
    # Without a FOV every pixel counts: an int broadcasts.
    everywhere = torch.ones_like(fov)
    assert torch.equal(
        counts_from_stats(_stats_from_masks(pred, target, everywhere), 9 * 11),
        counts_from_masks(pred, target),
    )


def test_inconsistent_stats_are_rejected():
    with pytest.raises(ValueError, match="image 1"):
        counts_from_stats(torch.tensor([[1, 2, 2, 3], [1, 2, 2, 4]]), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="image 0"):
        counts_from_stats(torch.tensor([[1, 2, 2, 3]]), torch.tensor([2]))  # union larger than the FOV
    with pytest.raises(ValueError, match="integer"):
        counts_from_stats(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), 10)


def test_dice_from_masks_and_input_checks():
    pred = torch.stack([PRED, torch.zeros_like(PRED)])
    target = torch.stack([TARGET, torch.zeros_like(TARGET)])
    assert dice_from_masks(pred, target).tolist() == pytest.approx([6 / 9, 1.0])
    with pytest.raises(ValueError, match="target"):
        dice_from_masks(pred, target[:1])
    with pytest.raises(ValueError, match="pred must be a bool tensor"):
        dice_from_masks(pred.float(), target)
    with pytest.raises(ValueError, match="at least one image"):
        summarize(torch.zeros(0, 4, dtype=torch.int64))
