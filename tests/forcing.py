"""Logits processors that make greedy generation emit, or never emit, chosen tokens (hidden states do
not depend on the logits processing, so forced generations exercise the real [SEG] path)."""

import torch
from transformers import LogitsProcessor


class ForceTokens(LogitsProcessor):
    """Makes greedy generation emit exactly `token_ids` after a prompt of `prompt_length` tokens."""

    def __init__(self, prompt_length: int, token_ids: list[int]):
        self.prompt_length, self.token_ids = prompt_length, token_ids

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step >= len(self.token_ids):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids[step]] = 0.0
        return forced


class ForbidToken(LogitsProcessor):
    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token_id] = float("-inf")
        return scores
