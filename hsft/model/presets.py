"""Embedded model sizes, built locally from transformers configs (nothing is downloaded).

`tiny` is the embedded default (well under 1M parameters, so the whole pipeline runs on a laptop
CPU in minutes); `small` is a few million parameters for runs that want more capacity. Both keep
the published architecture (InternVL vision tower + pixel shuffle + projector + Qwen2, SAM2 Hiera +
FPN + prompt encoder + two-way mask decoder), only narrower and shallower.

This module only describes sizes; transformers is imported inside the builders so that reading
the preset names (hsft.model.config does) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import InternVLConfig, Sam2Config

__all__ = ["VlmSpec", "Sam2Spec", "Preset", "PRESETS", "internvl_config", "sam2_config"]


@dataclass(frozen=True)
class VlmSpec:
    """InternVL vision tower (ViT) + Qwen2 language model."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    max_positions: int = 1024

    @property
    def image_tokens(self) -> int:
        """Tokens per image after InternVL's 0.5 pixel shuffle."""
        side = self.image_size // self.patch_size
        return (side // 2) ** 2


@dataclass(frozen=True)
class Sam2Spec:
    """SAM2: Hiera backbone (4 stages, stride 4/8/16/32), FPN, prompt encoder and mask decoder."""

    image_size: int
    hiera_dims: tuple[int, int, int, int]
    hiera_blocks: tuple[int, int, int, int]
    hiera_heads: tuple[int, int, int, int]
    # Window of each stage's windowed attention. The first block of a pooled stage uses the previous
    # stage's window halved by the query pooling, so every window must be even and tile its stage.
    hiera_windows: tuple[int, int, int, int]
    hiera_global_blocks: tuple[int, ...]
    width: int  # FPN, prompt encoder and mask decoder width: the sparse-prompt width C
    decoder_mlp: int
    decoder_heads: int


@dataclass(frozen=True)
class Preset:
    name: str
    vlm: VlmSpec
    sam2: Sam2Spec
    vocab_size: int  # of the locally trained BPE tokenizer, special tokens included


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        vlm=VlmSpec(
            image_size=64, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
            vision_intermediate=64, llm_hidden=64, llm_layers=2, llm_heads=4, llm_kv_heads=2,
            llm_intermediate=128,
        ),
        sam2=Sam2Spec(
            image_size=384, hiera_dims=(8, 16, 32, 64), hiera_blocks=(1, 1, 1, 1), hiera_heads=(1, 1, 2, 2),
            hiera_windows=(8, 8, 16, 8), hiera_global_blocks=(), width=64, decoder_mlp=128, decoder_heads=4,
        ),
        vocab_size=384,
    ),
    "small": Preset(
        name="small",
        vlm=VlmSpec(
            image_size=112, patch_size=8, vision_hidden=96, vision_layers=2, vision_heads=4,
            vision_intermediate=384, llm_hidden=192, llm_layers=4, llm_heads=6, llm_kv_heads=2,
            llm_intermediate=512,
        ),
        sam2=Sam2Spec(
            image_size=512, hiera_dims=(16, 32, 64, 128), hiera_blocks=(1, 2, 3, 1), hiera_heads=(1, 1, 2, 4),
            hiera_windows=(8, 8, 8, 16), hiera_global_blocks=(5,), width=128, decoder_mlp=512, decoder_heads=4,
        ),
        vocab_size=512,
    ),
}


def internvl_config(spec: VlmSpec, *, vocab_size: int, image_token_id: int, pad_token_id: int,
                    eos_token_id: int) -> InternVLConfig:
    from transformers import InternVLConfig

    vision = dict(
        hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, intermediate_size=spec.vision_intermediate,
        image_size=spec.image_size, patch_size=spec.patch_size,
    )
    text = dict(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=spec.llm_hidden,
        num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads, intermediate_size=spec.llm_intermediate,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
    )
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=spec.image_tokens, downsample_ratio=0.5, tie_word_embeddings=True,
    )


def sam2_config(spec: Sam2Spec) -> Sam2Config:
    from transformers import Sam2Config

    size = spec.image_size
    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=spec.hiera_dims[0], num_attention_heads=spec.hiera_heads[0],
        image_size=[size, size], blocks_per_stage=list(spec.hiera_blocks),
        embed_dim_per_stage=list(spec.hiera_dims), num_attention_heads_per_stage=list(spec.hiera_heads),
        window_size_per_stage=list(spec.hiera_windows), global_attention_blocks=list(spec.hiera_global_blocks),
    )
    vision = dict(
        model_type="sam2_vision_model", backbone_config=backbone,
        backbone_channel_list=list(reversed(spec.hiera_dims)),
        # the three highest-resolution stages (strides 4, 8, 16) feed the decoder
        backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
        fpn_hidden_size=spec.width,
    )
    prompt = dict(hidden_size=spec.width, image_size=size, patch_size=16)
    decoder = dict(
        hidden_size=spec.width, mlp_dim=spec.decoder_mlp, num_attention_heads=spec.decoder_heads,
        iou_head_hidden_dim=spec.width,
        # One mask per [SEG] prompt, the same in training and inference (see Sa2VAModel.decode_masks).
        dynamic_multimask_via_stability=False,
    )
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
