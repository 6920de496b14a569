"""Training single rows of the LLM's input embedding and output layer: the [SEG] rows.

Sa2VA trains the embedding row and the output-layer row of its added [SEG] token. Making the whole
(151k x h) tables trainable would cost their full gradient and optimizer state and let weight decay
move every other row, so the rows are held as separate small parameters instead:

    rows = attach_seg_rows(model)      # model.seg_rows: trainable copies of the [SEG] rows
    ... train (the rows are in model.parameters(), part "llm"; requires_grad is True) ...
    state = seg_rows_state(model)      # {"seg_rows.token_ids", "seg_rows.input_rows"[, "seg_rows.output_rows"]}
    merge_seg_rows(model)              # write them into the tables and remove the hooks

While attached, a forward hook on the input embedding puts `input_rows` where the input ids are the
tokens, and a forward hook on the LM head computes those tokens' logits from `output_rows` (from
`input_rows` when the head is tied to the embedding, as in the Qwen2 releases). Before training the
model computes what it computed without them (the same rows); after merge_seg_rows the plain tables
hold the trained rows, so a saved or exported model needs nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TokenRows", "attach_seg_rows", "merge_seg_rows", "seg_rows_state", "load_seg_rows_state", "ATTRIBUTE"]

ATTRIBUTE = "seg_rows"


class TokenRows(nn.Module):
    """Trainable copies of some rows of an LLM's input embedding (and untied output layer)."""

    def __init__(self, embedding: nn.Embedding, lm_head: nn.Linear, token_ids: list[int]) -> None:
        super().__init__()
        if not token_ids or len(set(token_ids)) != len(token_ids):
            raise ValueError(f"token_ids: must be distinct and non-empty, got {token_ids}")
        rows = embedding.num_embeddings
        if any(not 0 <= i < rows for i in token_ids):
            raise ValueError(f"token_ids: {token_ids} outside the embedding's {rows} rows")
        if lm_head.bias is not None:
            raise ValueError("lm_head: an output layer with a bias is not supported")
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=embedding.weight.device))
        self.tied = lm_head.weight is embedding.weight
        self.input_rows = nn.Parameter(embedding.weight.detach()[self.token_ids].clone())
        self.output_rows = None if self.tied else nn.Parameter(lm_head.weight.detach()[self.token_ids].clone())
        self._embedding, self._lm_head = [embedding], [lm_head]  # lists: not registered as submodules
        self._handles = [embedding.register_forward_hook(self._embed_hook),
                         lm_head.register_forward_hook(self._head_hook)]

    def _embed_hook(self, module, args, output: Tensor) -> Tensor:
        ids = args[0]
        match = ids[..., None] == self.token_ids.to(ids.device)  # (..., K)
        if not bool(match.any()):
            return output
        rows = match.to(self.input_rows.dtype) @ self.input_rows  # the matched row, zeros elsewhere
        return torch.where(match.any(dim=-1, keepdim=True), rows.to(output.dtype), output)

    def _head_hook(self, module, args, output: Tensor) -> Tensor:
        hidden = args[0]
        weight = self.input_rows if self.tied else self.output_rows
        columns = (hidden.to(weight.dtype) @ weight.T).to(output.dtype)
        return output.index_copy(-1, self.token_ids.to(output.device), columns)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the rows into the tables and remove the hooks (this module is spent afterwards)."""
        embedding, lm_head = self._embedding[0], self._lm_head[0]
        embedding.weight[self.token_ids] = self.input_rows.to(embedding.weight.dtype)
        if not self.tied:
            lm_head.weight[self.token_ids] = self.output_rows.to(lm_head.weight.dtype)
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach_seg_rows(model) -> TokenRows:
    """Give `model` (a Sa2VAModel) trainable [SEG] rows as `model.seg_rows` (requires_grad True)."""
    if getattr(model, ATTRIBUTE, None) is not None:
        raise ValueError("the model already has seg_rows attached")
    rows = TokenRows(model.vlm.get_input_embeddings(), model.vlm.lm_head, [model.seg_token_id])
    setattr(model, ATTRIBUTE, rows)
    return rows


def merge_seg_rows(model) -> None:
    """Write model.seg_rows into the embedding / LM head and detach it (no-op without seg_rows)."""
    rows = getattr(model, ATTRIBUTE, None)
    if rows is None:
        return
    rows.merge()
    delattr(model, ATTRIBUTE)


def seg_rows_state(model) -> dict[str, Tensor]:
    """The attached rows as flat tensors for an adapter file (keys prefixed "seg_rows.")."""
    rows = getattr(model, ATTRIBUTE, None)
    if rows is None:
        return {}
    return {f"{ATTRIBUTE}.{name}": tensor.detach().cpu().contiguous() for name, tensor in rows.state_dict().items()}


def load_seg_rows_state(model, state: dict[str, Tensor]) -> None:
    """Attach rows to `model` from seg_rows_state's tensors, or from a file of trained parameters
    keyed by parameter name ("seg_rows.input_rows" ...); other keys are ignored."""
    prefix = f"{ATTRIBUTE}."
    own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not own:
        return
    # A file of trained parameters only (the LoRA stage's non_lora_trainable.safetensors) has no ids:
    # the rows are then the model's [SEG] row(s).
    own.setdefault("token_ids", torch.tensor([model.seg_token_id], dtype=torch.long))
    if own["token_ids"].tolist() != [model.seg_token_id]:
        raise ValueError(f"seg_rows: saved for token ids {own['token_ids'].tolist()}, the model's [SEG] is "
                         f"{model.seg_token_id}")
    rows = attach_seg_rows(model)
    rows.load_state_dict(own, strict=True)
