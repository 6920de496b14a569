"""What the mask decoder needs from the SAM2 image encoder, as one cacheable value.

When the vision side is frozen (the HSFT stage), these tensors are computed once per sample and
reused every epoch; `Sa2VAModel.decode_masks` on cached features equals the uncached forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["SamFeatures"]


@dataclass
class SamFeatures:
    """SAM2 image features of a batch, exactly as transformers' Sam2Model hands them to its decoder.

    image_embedding: (B, C, h/4, w/4) lowest-resolution FPN level with SAM2's no-memory embedding
        added (single-image mode);
    feat_s0: (B, C/8, h, w) and feat_s1: (B, C/4, h/2, w/2): the two high-resolution FPN levels
        after the decoder's 1x1 projections (conv_s0 / conv_s1), where (h, w) is the mask size.
    """

    image_embedding: Tensor
    feat_s0: Tensor
    feat_s1: Tensor

    def __len__(self) -> int:
        return int(self.image_embedding.shape[0])

    def map(self, fn) -> SamFeatures:
        """`fn` applied to every tensor."""
        return SamFeatures(*(fn(getattr(self, f.name)) for f in fields(self)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
           non_blocking: bool = False) -> SamFeatures:
        return self.map(lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking))

    def detach(self) -> SamFeatures:
        return self.map(Tensor.detach)

    def index(self, i: int) -> SamFeatures:
        """Sample i as a batch of one (the batch dimension is kept)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for a batch of {len(self)}")
        return self.map(lambda t: t[i:i + 1])

    def select(self, indices: Sequence[int]) -> SamFeatures:
        rows = [int(i) for i in indices]
        return self.map(lambda t: t[rows])

    @staticmethod
    def cat(items: Sequence[SamFeatures]) -> SamFeatures:
        if not items:
            raise ValueError("SamFeatures.cat: nothing to concatenate")
        return SamFeatures(*(torch.cat([getattr(item, f.name) for item in items]) for f in fields(SamFeatures)))
