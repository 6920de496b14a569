"""Which hsft tensor(s) each tensor of a released Sa2VA checkpoint becomes, and back.

`plan_keys` classifies every release key once; the importer and the exporter both follow the
same plan, so export is the exact inverse of import by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from hsft.model.release.keys import (
    fcs_renamer,
    internlm2_renamer,
    is_sam2_unused,
    merge_internlm2_wqkv,
    merge_vision_qkv,
    projector_renamer,
    qwen2_renamer,
    sam2_renamer,
    split_internlm2_wqkv,
    split_vision_qkv,
    vision_renamer,
)

__all__ = ["Entry", "plan_keys", "LlmHeads", "SAM2_SHARED_POSITIONAL", "SAM2_PROMPT_POSITIONAL", "to_hsft",
           "to_release", "PROMPT_ONLY"]

SAM2_PROMPT_POSITIONAL = "sam2.prompt_encoder.shared_embedding.positional_embedding"
SAM2_SHARED_POSITIONAL = "sam2.shared_image_embedding.positional_embedding"
POINT_TABLE = "sam2.prompt_encoder.point_embed.weight"
# Mapped into Sam2Model but never run by [SEG] prompting (point and mask prompts).
PROMPT_ONLY = ("sam2.prompt_encoder.point_embed.", "sam2.prompt_encoder.mask_embed.")

_POINT_ROW = re.compile(re.escape(POINT_TABLE) + r"\.(\d+)$")


@dataclass(frozen=True)
class LlmHeads:
    """Attention shape of the LLM, needed to split / merge InternLM2's wqkv."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Entry:
    """One release tensor: kind is "copy" (renamed), "vision_qkv" / "wqkv" (split into three),
    "point_row" (row `row` of SAM2's point-embedding table) or "kept" (not used by hsft: stored
    unchanged beside the model)."""

    release_key: str
    kind: str
    hsft_keys: tuple[str, ...] = ()
    row: int = -1


def _renamers(family: str):
    llm = qwen2_renamer() if family == "qwen2" else internlm2_renamer()
    return (vision_renamer(), projector_renamer(), *llm, sam2_renamer(), fcs_renamer())


def _entry(key: str, family: str) -> Entry:
    if is_sam2_unused(key):
        return Entry(key, "kept")
    for renamer in _renamers(family):
        target = renamer.forward(key)
        if target is None:
            continue
        if ".attention.qkv." in target:
            stem, _, param = target.rpartition(".attention.qkv.")
            return Entry(key, "vision_qkv", tuple(f"{stem}.attention.{p}_proj.{param}" for p in "qkv"))
        if ".self_attn.wqkv." in target:
            stem, _, param = target.rpartition(".self_attn.wqkv.")
            return Entry(key, "wqkv", tuple(f"{stem}.self_attn.{p}_proj.{param}" for p in "qkv"))
        row = _POINT_ROW.match(target)
        if row:
            return Entry(key, "point_row", (POINT_TABLE,), int(row.group(1)))
        return Entry(key, "copy", (target,))
    return Entry(key, "kept")


def plan_keys(keys, family: str) -> list[Entry]:
    """The plan of every release key (in the given order)."""
    return [_entry(key, family) for key in keys]


def to_hsft(entries: list[Entry], tensors: dict[str, Tensor], vision_width: int, heads: LlmHeads
            ) -> dict[str, Tensor]:
    """hsft state dict ("vlm.", "sam2.", "fcs." prefixes) from the release tensors of `entries`."""
    out: dict[str, Tensor] = {}
    rows: dict[int, Tensor] = {}
    for entry in entries:
        if entry.kind == "kept":
            continue
        tensor = tensors[entry.release_key]
        if entry.kind == "copy":
            out[entry.hsft_keys[0]] = tensor
        elif entry.kind == "vision_qkv":
            out.update(zip(entry.hsft_keys, split_vision_qkv(tensor, vision_width)))
        elif entry.kind == "wqkv":
            out.update(zip(entry.hsft_keys, split_internlm2_wqkv(tensor, heads.num_heads, heads.num_kv_heads,
                                                                  heads.head_dim)))
        elif entry.kind == "point_row":
            rows[entry.row] = tensor
    if rows:
        if sorted(rows) != list(range(len(rows))):
            raise ValueError(f"SAM2 point embeddings: rows {sorted(rows)} are not 0..{len(rows) - 1}")
        out[POINT_TABLE] = torch.cat([rows[i] for i in range(len(rows))], dim=0)
    if SAM2_PROMPT_POSITIONAL in out:
        # transformers keeps SAM2's one positional matrix twice (prompt encoder and image side)
        out[SAM2_SHARED_POSITIONAL] = out[SAM2_PROMPT_POSITIONAL].clone()
    return out


def to_release(entry: Entry, state: dict[str, Tensor], kept: dict[str, Tensor], heads: LlmHeads) -> Tensor:
    """The release tensor of `entry` from the hsft state dict (or the kept tensors)."""
    if entry.kind == "kept":
        return kept[entry.release_key]
    parts = [state[key] for key in entry.hsft_keys]
    if entry.kind == "copy":
        return parts[0]
    if entry.kind == "vision_qkv":
        return merge_vision_qkv(*parts)
    if entry.kind == "wqkv":
        return merge_internlm2_wqkv(*parts, heads.num_heads, heads.num_kv_heads, heads.head_dim)
    if entry.kind == "point_row":
        return parts[0][entry.row:entry.row + 1]
    raise ValueError(f"unknown plan entry kind {entry.kind!r}")
