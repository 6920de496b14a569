"""Results of the two [SEG] paths."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["SegForwardOutput", "SegGenerateOutput"]


@dataclass
class SegForwardOutput:
    """Teacher-forced path (differentiable).

    mask_logits: (B, h, w) logits at the model's mask_size, in the model's dtype (callers upcast);
    seg_hidden: (B, H) LLM last-layer hidden state at the [SEG] token;
    seg_embedding: (B, C) text_hidden_fcs(seg_hidden), the mask decoder's sparse prompt;
    lm_loss: mean next-token cross-entropy over the labelled tokens (float32), when requested;
    lm_logits: (B, L, V) the LLM's logits, when lm_loss was requested.
    """

    mask_logits: Tensor
    seg_hidden: Tensor
    seg_embedding: Tensor
    lm_loss: Tensor | None = None
    lm_logits: Tensor | None = None


@dataclass
class SegGenerateOutput:
    """Greedy-generation path (no gradients).

    text: the decoded answer of each sample up to its end token, special tokens kept (so [SEG]
        shows);
    seg_emitted: (B,) bool, whether the answer contains a [SEG];
    num_seg: (B,) int64, how many [SEG] tokens the answer contains;
    seg_index: (B,) int64, position of the first [SEG] among the generated tokens, -1 if none;
    seg_hidden: (B, H) last-layer hidden state at the first generated [SEG], zeros where none;
    seg_embedding: (B, C) text_hidden_fcs(seg_hidden), zeros where none;
    mask_logits: (B, h, w) decoded from seg_hidden where emitted; EMPTY_MASK_LOGIT everywhere in
        rows without a [SEG], so every threshold gives an empty mask;
    generated_ids: (B, T) the generated token ids (padding after a row's end token).
    """

    text: list[str]
    seg_emitted: Tensor
    num_seg: Tensor
    seg_index: Tensor
    seg_hidden: Tensor
    seg_embedding: Tensor
    mask_logits: Tensor
    generated_ids: Tensor
