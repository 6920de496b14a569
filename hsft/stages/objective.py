"""The training objective every supervised stage wraps in DeepSpeed: LM cross-entropy on the response
(with [SEG]) plus the Dice + BCE mask loss, each with its own weight.

The module holds the whole Sa2VA model (frozen parts included) so DeepSpeed sees one module; which
parameters train is decided before `deepspeed.initialize` by the stage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from hsft.data import Sample
from hsft.stages.batching import SegBatch, fovs_on, make_seg_batch, mask_loss_per_sample, masks_on
from hsft.stages.training import Validation


class SegTask:
    """The TrainTask shape shared by the supervised stages (base, LoRA, HSFT): a list of samples fed
    through the teacher-forced [SEG] path in the given form, and the generate path's validation Dice
    at every epoch end. Subclasses set `name`, freeze what they do not train and build `module`."""

    name = "seg"
    module: nn.Module

    def __init__(self, model: nn.Module, samples: list[Sample], validation: Validation, form: str = "response"):
        if not samples:
            raise ValueError(f"{self.name}: the training set is empty")
        self.model, self.samples, self.validation, self.form = model, samples, validation, form

    def __len__(self) -> int:
        return len(self.samples)

    def sample_ids(self, indices: list[int]) -> list[str]:
        return [self.samples[i].id for i in indices]

    def make_batch(self, indices: list[int], dtype: torch.dtype, device: torch.device):
        return make_seg_batch(self.model, [self.samples[i] for i in indices], form=self.form, dtype=dtype,
                              device=device)

    def evaluate(self, module) -> dict[str, float]:
        return self.validation(module.model)

    def client_state(self) -> dict:
        return {}


@dataclass
class CachedSegBatch:
    """A micro-batch whose frozen features (SAM2 image features, LLM hidden state at [SEG]) were
    computed once and reused: only text_hidden_fcs and the mask decoder run."""

    ids: list[str]
    sam_features: object  # hsft.model.SamFeatures
    seg_hidden: torch.Tensor  # (B, H)
    masks: list[torch.Tensor]
    fovs: list[torch.Tensor | None]


class SegObjective(nn.Module):
    def __init__(self, model: nn.Module, *, lm_weight: float, mask_weight: float, bce_weight: float = 0.5,
                 eps: float = 1e-8, cached_decode=None):
        super().__init__()
        self.model = model
        self.lm_weight, self.mask_weight = lm_weight, mask_weight
        self.bce_weight, self.eps = bce_weight, eps
        # How a cached batch is decoded: model.decode_masks (at the decoder's size: the loss does the
        # release convention's two resizes itself), or the same replayed as CUDA graphs.
        self.cached_decode = (cached_decode if cached_decode is not None
                              else functools.partial(model.decode_masks, at_decoder_size=True))

    def forward(self, batch: SegBatch | CachedSegBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lm_loss = None
        if isinstance(batch, CachedSegBatch):
            logits = self.cached_decode(batch.sam_features, batch.seg_hidden)
        else:
            out = self.model.forward_seg(batch.images, batch.tokens, compute_lm_loss=self.lm_weight > 0,
                                         masks_at_decoder_size=True,
                                         sam_feats=batch.sam_feats, full_lm_logits=False)
            logits, lm_loss = out.mask_logits, out.lm_loss
        terms: dict[str, torch.Tensor] = {}
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.mask_weight > 0:
            mid_size = self.model.loss_mid_size(logits)
            mask_loss = mask_loss_per_sample(logits, batch.masks, batch.fovs, bce_weight=self.bce_weight,
                                             eps=self.eps, mid_size=mid_size).mean()
            with torch.no_grad():
                dice_only = mask_loss_per_sample(logits, batch.masks, batch.fovs, bce_weight=0.0, eps=self.eps,
                                                 mid_size=mid_size).mean()
            terms["mask_loss"] = mask_loss.detach()
            terms["dice_loss"] = dice_only
            if self.bce_weight > 0:
                terms["bce"] = (mask_loss.detach() - dice_only) / self.bce_weight
            loss = loss + self.mask_weight * mask_loss
        if lm_loss is not None:
            terms["lm_loss"] = lm_loss.detach().float()
            loss = loss + self.lm_weight * lm_loss.float()
        return loss, terms


class FeatureCache:
    """Frozen per-sample features, computed the first time a sample is batched and reused after.

    Each rank fills it for the samples it is handed, at most once each. Features are computed on the
    micro-batch exactly as the uncached forward would compute them (same batch, same dtype), so the
    cached loss is the uncached loss. They are kept in host memory (pinned where a GPU will read them)
    unless `on_device`: about 8 MB a sample for the published 1024-px SAM2 in bf16, so a few thousand
    hard samples would otherwise fill a GPU.
    """

    def __init__(self, model: nn.Module, form: str, *, on_device: bool = False, max_new_tokens: int = 16):
        self.model, self.form, self.on_device = model, form, on_device
        self.max_new_tokens = max_new_tokens
        self._store: dict[str, tuple[object, torch.Tensor]] = {}
        self.misses = 0
        # form "generate": samples whose generate pass emitted no [SEG], trained on the teacher-forced state.
        self.generate_fallbacks: list[str] = []

    def __len__(self) -> int:
        return len(self._store)

    def _generate_path_states(self, images, teacher_forced: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
        """The [SEG] states inference computes (one greedy generate pass; the upstream model is frozen, so
        they never change), with the teacher-forced state where the generate pass emitted no [SEG]."""
        generated = self.model.generate_seg(images, max_new_tokens=self.max_new_tokens)
        emitted = generated.seg_emitted.to(teacher_forced.device)
        self.generate_fallbacks += [s.id for s, ok in zip(samples, emitted.tolist()) if not ok]
        return torch.where(emitted[:, None], generated.seg_hidden.to(teacher_forced.dtype), teacher_forced)

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.on_device or tensor.device.type == "cpu":
            return tensor
        return tensor.to("cpu").pin_memory()

    @torch.no_grad()
    def batch(self, samples: list[Sample], dtype: torch.dtype, device: torch.device) -> CachedSegBatch:
        missing = [s for s in samples if s.id not in self._store]
        if missing:
            self.misses += len(missing)
            teacher_form = "response" if self.form == "generate" else self.form
            fresh = make_seg_batch(self.model, missing, form=teacher_form, dtype=dtype, device=device)
            feats = self.model.sam_features(fresh.images.sam_pixels)
            hidden = self.model.seg_hidden_states(fresh.images, fresh.tokens)
            if self.form == "generate":
                hidden = self._generate_path_states(fresh.images, hidden, missing)
            for i, sample in enumerate(missing):
                self._store[sample.id] = (feats.index(i).map(self._keep), self._keep(hidden[i:i + 1]))
        feats = [self._store[s.id][0] for s in samples]
        hidden = torch.cat([self._store[s.id][1] for s in samples])
        return CachedSegBatch(ids=[s.id for s in samples],
                              sam_features=type(feats[0]).cat(feats).to(device, non_blocking=True),
                              seg_hidden=hidden.to(device, non_blocking=True), masks=masks_on(samples, device),
                              fovs=fovs_on(samples, device))
