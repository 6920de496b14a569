"""Turning samples into model inputs and masks into losses, the same way in every stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsft.data import Sample
from hsft.ops import dice_bce_loss


@dataclass
class SegBatch:
    """A micro-batch for the teacher-forced [SEG] path: images, tokens and full-resolution masks."""

    ids: list[str]
    images: object  # hsft.model.ImageBatch
    tokens: object  # hsft.model.TokenBatch
    masks: list[torch.Tensor]  # each (H, W) bool at the sample's original size
    fovs: list[torch.Tensor | None]  # each (H, W) bool field of view, None where the data have none
    # The images' SAM2 features when the image encoder is frozen and they were computed before (stage
    # 0's second phase); None: the forward computes them.
    sam_feats: object | None = None  # hsft.model.SamFeatures


def make_seg_batch(model, samples: list[Sample], *, form: str, dtype: torch.dtype, device: torch.device) -> SegBatch:
    """The teacher-forced micro-batch of `samples`, every tensor on `device` (the rank's accelerator),
    pixels in `dtype`."""
    images = model.preprocess([s.image for s in samples]).to(device=device, dtype=dtype)
    tokens = model.tokenize(len(samples), form=form, tiles=images.num_tiles).to(device)
    return SegBatch(ids=[s.id for s in samples], images=images, tokens=tokens, masks=masks_on(samples, device),
                    fovs=fovs_on(samples, device))


def masks_on(samples: list[Sample], device: torch.device) -> list[torch.Tensor]:
    """The samples' full-resolution ground-truth masks on `device`, where the logits they meet live."""
    return [torch.from_numpy(s.mask).to(device) for s in samples]


def fovs_on(samples: list[Sample], device: torch.device) -> list[torch.Tensor | None]:
    """The samples' fields of view on `device` (None for a sample without one): the loss counts the
    pixels inside, as mining and evaluation do."""
    return [torch.from_numpy(s.fov).to(device) if s.fov is not None else None for s in samples]


def mask_loss_per_sample(logits: torch.Tensor, masks: list[torch.Tensor], fovs: list[torch.Tensor | None], *,
                         bce_weight: float, eps: float, mid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Dice + bce_weight * BCE of each low-res logit map against its full-resolution mask, inside the
    sample's field of view where it has one, shape (B,). With mid_size the logits are resized through
    that grid first (the release's convention; see Sa2VA.loss_mid_size), inside the fused op.

    Samples of one size go through the fused op together; a batch of mixed sizes (the generic folder
    format allows it) is split into same-size groups, since the op takes one target size per call, and
    samples without a field of view go apart from those with one, so that no all-true plane is read.
    """
    by_size: dict[tuple[tuple[int, ...], bool], list[int]] = {}
    for i, mask in enumerate(masks):
        by_size.setdefault((tuple(mask.shape), fovs[i] is not None), []).append(i)
    parts = []
    for (_, has_fov), idx in by_size.items():
        target = torch.stack([masks[i] for i in idx])
        fov = torch.stack([fovs[i] for i in idx]) if has_fov else None
        parts.append((idx, dice_bce_loss(logits[idx], target, fov=fov, bce_weight=bce_weight, eps=eps,
                                         reduction="none", mid_size=mid_size)))
    if len(parts) == 1:
        return parts[0][1]
    order = torch.tensor([i for idx, _ in parts for i in idx], device=logits.device)
    losses = torch.cat([loss for _, loss in parts])
    return losses[torch.argsort(order)]
