"""Batches and the supervised mask loss: the field of view decides which pixels count, as in mining and
evaluation, and batches of mixed sizes give each sample's own loss."""

from __future__ import annotations

import torch

from hsft.ops import dice_bce_loss
from hsft.stages.batching import mask_loss_per_sample


def _case(seed: int, size: int, with_fov: bool):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    target = torch.rand(size, size, generator=g) > 0.7
    fov = None
    if with_fov:
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        fov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2
    return logits, target, fov


def test_only_pixels_inside_the_field_of_view_count():
    logits, target, fov = _case(0, 24, with_fov=True)
    loss = mask_loss_per_sample(logits, [target], [fov], bce_weight=0.5, eps=1e-8)
    flipped_outside = torch.where(fov, target, ~target)
    assert torch.equal(loss, mask_loss_per_sample(logits, [flipped_outside], [fov], bce_weight=0.5, eps=1e-8))
    flipped_inside = torch.where(fov, ~target, target)
    assert not torch.equal(loss, mask_loss_per_sample(logits, [flipped_inside], [fov], bce_weight=0.5, eps=1e-8))
    # Without a field of view every pixel counts, so the border changes the loss.
    assert not torch.equal(mask_loss_per_sample(logits, [target], [None], bce_weight=0.5, eps=1e-8),
                           mask_loss_per_sample(logits, [flipped_outside], [None], bce_weight=0.5, eps=1e-8))


def test_a_mixed_batch_gives_each_samples_own_loss():
    cases = [_case(1, 24, True), _case(2, 16, False), _case(3, 24, False), _case(4, 16, True)]
    logits = torch.cat([c[0] for c in cases])
    losses = mask_loss_per_sample(logits, [c[1] for c in cases], [c[2] for c in cases], bce_weight=0.5, eps=1e-8)
    for i, (single, target, fov) in enumerate(cases):
        expected = dice_bce_loss(single, target[None], fov=None if fov is None else fov[None], reduction="none")
        torch.testing.assert_close(losses[i:i + 1], expected, rtol=1e-12, atol=1e-12)
