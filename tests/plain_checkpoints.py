"""Tiny checkpoints in the formats users bring (a transformers InternVL with its tokenizer, without
[SEG], and a transformers SAM2), written by tests that build models from local directories."""

from __future__ import annotations

import json

from transformers import InternVLForConditionalGeneration, Sam2Model

from hsft.model.presets import PRESETS, internvl_config, sam2_config
from hsft.model.tokenizer import IM_END, IMG_CONTEXT, build_preset_tokenizer, single_token_id


def save_plain_checkpoints(root) -> tuple[str, str, InternVLForConditionalGeneration, Sam2Model]:
    """A tiny InternVL (tokenizer without [SEG], like a published VLM) and a tiny SAM2, as a user has them."""
    tokenizer = build_preset_tokenizer(384, include_seg=False)
    preset = PRESETS["tiny"]
    vlm = InternVLForConditionalGeneration(internvl_config(
        preset.vlm, vocab_size=len(tokenizer), image_token_id=single_token_id(tokenizer, IMG_CONTEXT),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=single_token_id(tokenizer, IM_END)))
    sam_cfg = sam2_config(preset.sam2)
    sam_cfg.mask_decoder_config.dynamic_multimask_via_stability = True  # the published default
    sam2 = Sam2Model(sam_cfg)
    vlm_dir, sam_dir = root / "internvl", root / "sam2"
    vlm.save_pretrained(vlm_dir)
    tokenizer.save_pretrained(vlm_dir)
    sam2.save_pretrained(sam_dir)
    with open(sam_dir / "preprocessor_config.json", "w", encoding="utf-8") as handle:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, handle)
    return str(vlm_dir), str(sam_dir), vlm, sam2
