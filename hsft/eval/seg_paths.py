"""Runs the three [SEG] paths on one batch of samples and measures each sample.

1. forward:  teacher-forced prompt + the training response ("Sure, [SEG]."), as stage 1 trains;
2. prompt:   teacher-forced, [SEG] appended to the user's instruction (the HSFT "prompt" form);
3. generate: greedy generation with the KV cache, exactly as a user's inference runs; a sample
             whose answer has no [SEG] gets an empty mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

from hsft.data import Sample
from hsft.eval.records import TEACHER_FORCED, SampleRecord
from hsft.eval.scoring import binary_mask, score_logits

__all__ = ["PathOutputs", "as_processor_list", "run_paths", "measure_batch"]


@dataclass
class PathOutputs:
    """Per path: (B, h, w) mask logits; the teacher-forced paths' and generate's [SEG] states."""

    mask_logits: dict[str, Tensor]
    seg_hidden: dict[str, Tensor]
    seg_embedding: dict[str, Tensor]
    text: list[str]
    seg_emitted: Tensor
    num_seg: Tensor


def as_processor_list(logits_processor) -> LogitsProcessorList | None:
    """None, one LogitsProcessor, or an iterable of them -> what generate_seg takes."""
    if logits_processor is None or isinstance(logits_processor, LogitsProcessorList):
        return logits_processor
    if isinstance(logits_processor, LogitsProcessor) or not isinstance(logits_processor, Iterable):
        return LogitsProcessorList([logits_processor])
    return LogitsProcessorList(list(logits_processor))


@torch.no_grad()
def run_paths(model, images: Sequence, *, max_new_tokens: int, logits_processor=None) -> PathOutputs:
    """All three paths on one batch of (H, W, 3) uint8 images (model in eval mode)."""
    batch = model.preprocess(list(images)).to(dtype=model.dtype)
    n = len(batch)
    # The three paths differ only in the text: the SAM2 image features are computed once for all.
    sam_feats = model.sam_features(batch.sam_pixels)
    logits, hidden, embedding = {}, {}, {}
    for path, form in (("forward", "response"), ("prompt", "prompt")):
        out = model.forward_seg(batch, model.tokenize(n, form=form, tiles=batch.num_tiles), sam_feats=sam_feats)
        logits[path], hidden[path], embedding[path] = out.mask_logits, out.seg_hidden, out.seg_embedding
    generated = model.generate_seg(batch, max_new_tokens=max_new_tokens, sam_feats=sam_feats,
                                   logits_processor=as_processor_list(logits_processor))
    logits["generate"], hidden["generate"] = generated.mask_logits, generated.seg_hidden
    embedding["generate"] = generated.seg_embedding
    return PathOutputs(logits, hidden, embedding, list(generated.text), generated.seg_emitted.cpu(),
                       generated.num_seg.cpu())


def _cosines(first: Tensor, second: Tensor, emitted: Tensor) -> list[float | None]:
    # Upcast: bf16 states would put the cosine's own rounding (~1e-2) into the report.
    values = F.cosine_similarity(first.float(), second.float(), dim=-1).cpu().tolist()
    return [v if bool(e) else None for v, e in zip(values, emitted.tolist())]


def measure_batch(outputs: PathOutputs, samples: Sequence[Sample], indices: Sequence[int]) -> list[SampleRecord]:
    """One SampleRecord per sample of the batch; `indices` are the samples' positions in the full list."""
    emitted = outputs.seg_emitted
    cos_hidden = {p: _cosines(outputs.seg_hidden[p], outputs.seg_hidden["generate"], emitted) for p in TEACHER_FORCED}
    cos_embedding = {p: _cosines(outputs.seg_embedding[p], outputs.seg_embedding["generate"], emitted)
                     for p in TEACHER_FORCED}
    records = []
    for row, (sample, index) in enumerate(zip(samples, indices)):
        scores = {path: score_logits(logits[row], sample.mask, sample.fov)
                  for path, logits in outputs.mask_logits.items()}
        agreement = {}
        for path in TEACHER_FORCED:
            # The teacher-forced mask plays the ground truth's role: Dice is symmetric, and the
            # generate logits go through the same upsampling as everywhere else.
            reference = binary_mask(outputs.mask_logits[path][row], sample.size)
            agreement[path] = score_logits(outputs.mask_logits["generate"][row], reference, sample.fov).dice
        records.append(SampleRecord(
            index=int(index), id=sample.id, source=sample.source, height=sample.size[0], width=sample.size[1],
            has_fov=sample.fov is not None, scores=scores, text=outputs.text[row],
            seg_emitted=bool(emitted[row]), num_seg=int(outputs.num_seg[row]),
            cosine_hidden={p: cos_hidden[p][row] for p in TEACHER_FORCED},
            cosine_embedding={p: cos_embedding[p][row] for p in TEACHER_FORCED},
            agreement_dice=agreement,
        ))
    return records
