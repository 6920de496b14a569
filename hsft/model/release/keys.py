"""Tensor names of a released Sa2VA checkpoint and their hsft (transformers) counterparts.

A release stores one flat state dict:

    vision_model.*                     InternViT (fused attn.qkv)
    mlp1.{0,1,3}.*                     projector: LayerNorm, Linear, (GELU), Linear
    language_model.model.* / .lm_head  Qwen2ForCausalLM names, or InternLM2 names (fused
    language_model.output              attention.wqkv) for InternLM2 checkpoints
    grounding_encoder.sam2_model.*     the original SAM2 module names
    text_hidden_fcs.{0,2}.*            the [SEG] projection

hsft keeps the InternVL part as a transformers `InternVLForConditionalGeneration` (keys of its
state dict below, "vlm."), SAM2 as a transformers `Sam2Model` ("sam2."), and the projection as
"fcs.". Every mapping here is a pure renaming except four reshapes, each with its exact inverse:
the InternViT qkv split, the InternLM2 wqkv split, SAM2's four point embeddings stacked into one
table, and SAM2's positional matrix, which transformers holds twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SAM2_PREFIX",
    "SAM2_UNUSED_PREFIXES",
    "split_vision_qkv",
    "merge_vision_qkv",
    "split_internlm2_wqkv",
    "merge_internlm2_wqkv",
    "Renamer",
    "vision_renamer",
    "projector_renamer",
    "qwen2_renamer",
    "internlm2_renamer",
    "sam2_renamer",
    "fcs_renamer",
    "is_sam2_unused",
]

SAM2_PREFIX = "grounding_encoder.sam2_model."
# SAM2 modules that segmenting one image never runs: the video memory (attention, encoder,
# temporal encodings), object pointers and the memory mask downsampler.
SAM2_UNUSED_PREFIXES = (
    "memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr",
    "obj_ptr_proj.", "obj_ptr_tpos_proj.", "mask_downsample.", "no_obj_embed_spatial",
)


def is_sam2_unused(release_key: str) -> bool:
    """True for a SAM2 tensor (release name) that image segmentation does not use."""
    if not release_key.startswith(SAM2_PREFIX):
        return False
    return release_key[len(SAM2_PREFIX):].startswith(SAM2_UNUSED_PREFIXES)


# ---------------------------------------------------------------------------- fused projections
def split_vision_qkv(qkv: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """InternViT's fused qkv (3*width rows: all q rows, then k, then v) -> q, k, v."""
    if qkv.shape[0] != 3 * width:
        raise ValueError(f"expected {3 * width} rows (3 x {width}), got shape {tuple(qkv.shape)}")
    return tuple(part.clone() for part in qkv.split(width, dim=0))  # type: ignore[return-value]


def merge_vision_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.cat([q, k, v], dim=0)


def split_internlm2_wqkv(wqkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """InternLM2's fused wqkv -> q, k, v projections in Llama's layout.

    The rows are grouped by key/value head: for each of the num_kv_heads groups, the group's
    num_heads / num_kv_heads query heads, then its key head, then its value head (head_dim rows
    each). Query head j of group g becomes Llama query head g * (num_heads / num_kv_heads) + j,
    which is the head that shares key/value head g in Llama's grouped attention.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    groups = num_heads // num_kv_heads
    rows = num_kv_heads * (groups + 2) * head_dim
    if wqkv.shape[0] != rows:
        raise ValueError(f"expected {rows} rows ({num_kv_heads} kv heads x ({groups} + 2) x {head_dim}), "
                         f"got shape {tuple(wqkv.shape)}")
    tail = wqkv.shape[1:]
    grouped = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *tail)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *tail).clone()
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *tail).clone()
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *tail).clone()
    return q, k, v


def merge_internlm2_wqkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int, head_dim: int
                         ) -> Tensor:
    groups = num_heads // num_kv_heads
    tail = q.shape[1:]
    grouped = torch.cat([
        q.reshape(num_kv_heads, groups, head_dim, *tail),
        k.reshape(num_kv_heads, 1, head_dim, *tail),
        v.reshape(num_kv_heads, 1, head_dim, *tail),
    ], dim=1)
    return grouped.reshape(num_kv_heads * (groups + 2) * head_dim, *tail)


# ---------------------------------------------------------------------------- renaming
# A rule pairs a release-name template with an hsft-name template. Templates are whole key
# suffixes (after the part's prefix) in which {n} / {m} stand for a number and {p} for one name
# segment (weight, bias, q_proj ...). The first rule whose template matches the whole suffix
# wins, in either direction, so every renaming has an exact inverse (tested over all keys).
_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "m": r"(?P<m>\d+)", "p": r"(?P<p>[A-Za-z_][A-Za-z0-9_]*)"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    regex = "".join(_PLACEHOLDERS[piece] if i % 2 else re.escape(piece) for i, piece in enumerate(parts))
    return re.compile(regex + "$")


@dataclass(frozen=True)
class Renamer:
    """Release <-> hsft key renaming for one part (see the rule format above)."""

    release_prefix: str
    hsft_prefix: str
    rules: tuple[tuple[str, str], ...]

    def _rename(self, key: str, prefixes: tuple[str, str], side: int) -> str | None:
        if not key.startswith(prefixes[0]):
            return None
        rest = key[len(prefixes[0]):]
        for rule in self.rules:
            match = _compile(rule[side]).match(rest)
            if match:
                return prefixes[1] + rule[1 - side].format(**match.groupdict())
        return None

    def forward(self, key: str) -> str | None:
        """The hsft name of release key `key`, or None when no rule of this part matches."""
        return self._rename(key, (self.release_prefix, self.hsft_prefix), 0)

    def backward(self, key: str) -> str | None:
        """The release name of hsft key `key`, or None when no rule of this part matches."""
        return self._rename(key, (self.hsft_prefix, self.release_prefix), 1)


def vision_renamer() -> Renamer:
    layer = "encoder.layers.{n}."
    out = "encoder.layer.{n}."
    return Renamer("vision_model.", "vlm.model.vision_tower.", (
        ("embeddings.class_embedding", "embeddings.cls_token"),
        ("embeddings.position_embedding", "embeddings.position_embeddings"),
        ("embeddings.patch_embedding.{p}", "embeddings.patch_embeddings.projection.{p}"),
        (layer + "attn.qkv.{p}", out + "attention.qkv.{p}"),  # split into q/k/v_proj by the importer
        (layer + "attn.proj.{p}", out + "attention.projection_layer.{p}"),
        (layer + "attn.q_norm.{p}", out + "attention.q_norm.{p}"),
        (layer + "attn.k_norm.{p}", out + "attention.k_norm.{p}"),
        (layer + "ls1", out + "lambda_1"),
        (layer + "ls2", out + "lambda_2"),
        (layer + "norm1.{p}", out + "layernorm_before.{p}"),
        (layer + "norm2.{p}", out + "layernorm_after.{p}"),
        (layer + "mlp.fc1.{p}", out + "mlp.fc1.{p}"),
        (layer + "mlp.fc2.{p}", out + "mlp.fc2.{p}"),
    ))


def projector_renamer() -> Renamer:
    return Renamer("mlp1.", "vlm.model.multi_modal_projector.", (
        ("0.{p}", "layer_norm.{p}"),
        ("1.{p}", "linear_1.{p}"),
        ("3.{p}", "linear_2.{p}"),
    ))


def qwen2_renamer() -> tuple[Renamer, Renamer]:
    """The Qwen2 release already uses transformers' names: only the prefixes move."""
    layer = "layers.{n}."
    return (
        Renamer("language_model.model.", "vlm.model.language_model.", (
            ("embed_tokens.weight", "embed_tokens.weight"),
            ("norm.weight", "norm.weight"),
            (layer + "self_attn.{p}.weight", layer + "self_attn.{p}.weight"),
            (layer + "self_attn.{p}.bias", layer + "self_attn.{p}.bias"),
            (layer + "mlp.{p}.weight", layer + "mlp.{p}.weight"),
            (layer + "{p}.weight", layer + "{p}.weight"),  # the two RMSNorms
        )),
        Renamer("language_model.lm_head.", "vlm.lm_head.", (("weight", "weight"),)),
    )


def internlm2_renamer() -> tuple[Renamer, Renamer]:
    """InternLM2 names -> transformers' Llama names (the wqkv split is the importer's)."""
    layer = "layers.{n}."
    return (
        Renamer("language_model.model.", "vlm.model.language_model.", (
            ("tok_embeddings.weight", "embed_tokens.weight"),
            ("norm.weight", "norm.weight"),
            (layer + "attention.wqkv.{p}", layer + "self_attn.wqkv.{p}"),
            (layer + "attention.wo.{p}", layer + "self_attn.o_proj.{p}"),
            (layer + "feed_forward.w1.{p}", layer + "mlp.gate_proj.{p}"),
            (layer + "feed_forward.w2.{p}", layer + "mlp.down_proj.{p}"),
            (layer + "feed_forward.w3.{p}", layer + "mlp.up_proj.{p}"),
            (layer + "attention_norm.weight", layer + "input_layernorm.weight"),
            (layer + "ffn_norm.weight", layer + "post_attention_layernorm.weight"),
        )),
        Renamer("language_model.output.", "vlm.lm_head.", (("weight", "weight"),)),
    )


def _three_layer_head(release: str, hsft: str) -> tuple[tuple[str, str], ...]:
    """SAM's 3-layer MLP heads: layers.0/1/2 -> proj_in / layers.0 / proj_out."""
    return ((release + "layers.0.{p}", hsft + "proj_in.{p}"),
            (release + "layers.1.{p}", hsft + "layers.0.{p}"),
            (release + "layers.2.{p}", hsft + "proj_out.{p}"))


def sam2_renamer() -> Renamer:
    """Original SAM2 module names -> transformers' Sam2Model (the image path only).

    Two tensors are not plain renames: the four point embeddings (point_embeddings.{n}.weight,
    one row each) become one table, and the prompt encoder's positional matrix also serves as
    Sam2Model's shared_image_embedding; the importer handles both.
    """
    trunk, backbone = "image_encoder.trunk.", "vision_encoder.backbone."
    block, out_block = trunk + "blocks.{n}.", backbone + "blocks.{n}."
    pe, hpe = "sam_prompt_encoder.", "prompt_encoder."
    dec, hdec = "sam_mask_decoder.", "mask_decoder."
    layer, hlayer = dec + "transformer.layers.{n}.", hdec + "transformer.layers.{n}."
    final, hfinal = dec + "transformer.final_attn_token_to_image.", hdec + "transformer.final_attn_token_to_image."
    return Renamer(SAM2_PREFIX, "sam2.", (
        (trunk + "pos_embed", backbone + "pos_embed"),
        (trunk + "pos_embed_window", backbone + "pos_embed_window"),
        (trunk + "patch_embed.proj.{p}", backbone + "patch_embed.projection.{p}"),
        (block + "norm1.{p}", out_block + "layer_norm1.{p}"),
        (block + "norm2.{p}", out_block + "layer_norm2.{p}"),
        (block + "attn.qkv.{p}", out_block + "attn.qkv.{p}"),
        (block + "attn.proj.{p}", out_block + "attn.proj.{p}"),
        (block + "mlp.layers.0.{p}", out_block + "mlp.proj_in.{p}"),
        (block + "mlp.layers.1.{p}", out_block + "mlp.proj_out.{p}"),
        (block + "proj.{p}", out_block + "proj.{p}"),
        ("image_encoder.neck.convs.{n}.conv.{p}", "vision_encoder.neck.convs.{n}.{p}"),
        ("no_mem_embed", "no_memory_embedding"),
        (pe + "pe_layer.positional_encoding_gaussian_matrix", hpe + "shared_embedding.positional_embedding"),
        (pe + "point_embeddings.{n}.weight", hpe + "point_embed.weight.{n}"),  # rows of one table
        (pe + "not_a_point_embed.weight", hpe + "not_a_point_embed.weight"),
        (pe + "no_mask_embed.weight", hpe + "no_mask_embed.weight"),
        (pe + "mask_downscaling.0.{p}", hpe + "mask_embed.conv1.{p}"),
        (pe + "mask_downscaling.1.{p}", hpe + "mask_embed.layer_norm1.{p}"),
        (pe + "mask_downscaling.3.{p}", hpe + "mask_embed.conv2.{p}"),
        (pe + "mask_downscaling.4.{p}", hpe + "mask_embed.layer_norm2.{p}"),
        (pe + "mask_downscaling.6.{p}", hpe + "mask_embed.conv3.{p}"),
        (layer + "{p}.out_proj.weight", hlayer + "{p}.o_proj.weight"),
        (layer + "{p}.out_proj.bias", hlayer + "{p}.o_proj.bias"),
        (layer + "norm{m}.{p}", hlayer + "layer_norm{m}.{p}"),
        (layer + "mlp.layers.0.{p}", hlayer + "mlp.proj_in.{p}"),
        (layer + "mlp.layers.1.{p}", hlayer + "mlp.proj_out.{p}"),
        (layer + "self_attn.{p}.weight", hlayer + "self_attn.{p}.weight"),
        (layer + "self_attn.{p}.bias", hlayer + "self_attn.{p}.bias"),
        (layer + "cross_attn_token_to_image.{p}.weight", hlayer + "cross_attn_token_to_image.{p}.weight"),
        (layer + "cross_attn_token_to_image.{p}.bias", hlayer + "cross_attn_token_to_image.{p}.bias"),
        (layer + "cross_attn_image_to_token.{p}.weight", hlayer + "cross_attn_image_to_token.{p}.weight"),
        (layer + "cross_attn_image_to_token.{p}.bias", hlayer + "cross_attn_image_to_token.{p}.bias"),
        (final + "out_proj.{p}", hfinal + "o_proj.{p}"),
        (final + "{p}.weight", hfinal + "{p}.weight"),
        (final + "{p}.bias", hfinal + "{p}.bias"),
        (dec + "transformer.norm_final_attn.{p}", hdec + "transformer.layer_norm_final_attn.{p}"),
        (dec + "output_upscaling.0.{p}", hdec + "upscale_conv1.{p}"),
        (dec + "output_upscaling.1.{p}", hdec + "upscale_layer_norm.{p}"),
        (dec + "output_upscaling.3.{p}", hdec + "upscale_conv2.{p}"),
        *_three_layer_head(dec + "output_hypernetworks_mlps.{n}.", hdec + "output_hypernetworks_mlps.{n}."),
        *_three_layer_head(dec + "iou_prediction_head.", hdec + "iou_prediction_head."),
        *_three_layer_head(dec + "pred_obj_score_head.", hdec + "pred_obj_score_head."),
        (dec + "iou_token.weight", hdec + "iou_token.weight"),
        (dec + "mask_tokens.weight", hdec + "mask_tokens.weight"),
        (dec + "obj_score_token.weight", hdec + "obj_score_token.weight"),
        (dec + "conv_s0.{p}", hdec + "conv_s0.{p}"),
        (dec + "conv_s1.{p}", hdec + "conv_s1.{p}"),
    ))


def fcs_renamer() -> Renamer:
    return Renamer("text_hidden_fcs.", "fcs.", (("0.{p}", "0.{p}"), ("2.{p}", "2.{p}")))
