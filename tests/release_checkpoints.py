"""Tiny released-Sa2VA checkpoints written the way the release stores them: its config.json fields,
its exact tensor names (InternViT, mlp1, Qwen2 or InternLM2, the original SAM2 modules,
text_hidden_fcs) and a tokenizer with its added tokens. The names and shapes are written out here
from the release's module structure, independently of hsft's mapping, so that the import tests check
the mapping against them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from hsft.model.tokenizer import build_preset_tokenizer


@dataclass(frozen=True)
class TinySizes:
    vision: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 64
    image: int = 64
    patch: int = 8
    llm: int = 64
    llm_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    llm_mlp: int = 128
    sam_image: int = 128
    hiera: tuple = (8, 16, 32, 64)
    hiera_heads: tuple = (1, 1, 2, 2)
    windows: tuple = (8, 4, 4, 2)
    sam_width: int = 32
    decoder_mlp: int = 64
    decoder_heads: int = 2
    iou_hidden: int = 32
    fcs_hidden: int = 64  # the release's text_hidden_fcs is Linear(h, h) -> ReLU -> Linear(h, 256)


SIZES = TinySizes()
ROPE_THETA = 1_000_000.0  # Qwen2.5's; a converter that dropped it would fall back to 10000
RELEASE_TOKENS = ("<p>", "</p>", "<vp>", "</vp>")


def sam2_config_dict(s: TinySizes = SIZES) -> dict:
    """The tiny SAM2's sizes as a transformers Sam2Config JSON (what --sam2-config takes)."""
    size = s.sam_image
    return {
        "model_type": "sam2",
        "vision_config": {
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model", "hidden_size": s.hiera[0],
                "num_attention_heads": s.hiera_heads[0],
                "image_size": [size, size], "blocks_per_stage": [1, 1, 1, 1], "embed_dim_per_stage": list(s.hiera),
                "num_attention_heads_per_stage": list(s.hiera_heads), "window_size_per_stage": list(s.windows),
                "global_attention_blocks": [], "window_positional_embedding_background_size": [7, 7],
            },
            "backbone_channel_list": list(reversed(s.hiera)),
            "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
            "fpn_hidden_size": s.sam_width,
        },
        "prompt_encoder_config": {"hidden_size": s.sam_width, "image_size": size, "patch_size": 16},
        "mask_decoder_config": {"hidden_size": s.sam_width, "mlp_dim": s.decoder_mlp,
                                "num_attention_heads": s.decoder_heads, "iou_head_hidden_dim": s.iou_hidden},
    }


def _shapes_vision(s: TinySizes) -> dict[str, tuple]:
    c, n = s.vision, (s.image // s.patch) ** 2
    out = {"vision_model.embeddings.class_embedding": (1, 1, c),
           "vision_model.embeddings.position_embedding": (1, n + 1, c),
           "vision_model.embeddings.patch_embedding.weight": (c, 3, s.patch, s.patch),
           "vision_model.embeddings.patch_embedding.bias": (c,)}
    for i in range(s.vision_layers):
        p = f"vision_model.encoder.layers.{i}."
        out.update({p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                    p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,), p + "ls1": (c,), p + "ls2": (c,),
                    p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (s.vision_mlp, c), p + "mlp.fc1.bias": (s.vision_mlp,),
                    p + "mlp.fc2.weight": (c, s.vision_mlp), p + "mlp.fc2.bias": (c,)})
    shuffled = c * 4
    out.update({"mlp1.0.weight": (shuffled,), "mlp1.0.bias": (shuffled,), "mlp1.1.weight": (s.llm, shuffled),
                "mlp1.1.bias": (s.llm,), "mlp1.3.weight": (s.llm, s.llm), "mlp1.3.bias": (s.llm,)})
    return out


def _shapes_qwen2(s: TinySizes, vocab: int) -> dict[str, tuple]:
    h, d = s.llm, s.llm // s.heads
    out = {"language_model.model.embed_tokens.weight": (vocab, h), "language_model.model.norm.weight": (h,),
           "language_model.lm_head.weight": (vocab, h)}
    for i in range(s.llm_layers):
        p = f"language_model.model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.weight": (s.kv_heads * d, h), p + "self_attn.k_proj.bias": (s.kv_heads * d,),
                    p + "self_attn.v_proj.weight": (s.kv_heads * d, h), p + "self_attn.v_proj.bias": (s.kv_heads * d,),
                    p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (s.llm_mlp, h),
                    p + "mlp.up_proj.weight": (s.llm_mlp, h), p + "mlp.down_proj.weight": (h, s.llm_mlp),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return out


def _shapes_internlm2(s: TinySizes, vocab: int) -> dict[str, tuple]:
    h, d = s.llm, s.llm // s.heads
    out = {"language_model.model.tok_embeddings.weight": (vocab, h), "language_model.model.norm.weight": (h,),
           "language_model.output.weight": (vocab, h)}
    for i in range(s.llm_layers):
        p = f"language_model.model.layers.{i}."
        out.update({p + "attention.wqkv.weight": ((s.heads + 2 * s.kv_heads) * d, h), p + "attention.wo.weight": (h, h),
                    p + "feed_forward.w1.weight": (s.llm_mlp, h), p + "feed_forward.w3.weight": (s.llm_mlp, h),
                    p + "feed_forward.w2.weight": (h, s.llm_mlp), p + "attention_norm.weight": (h,),
                    p + "ffn_norm.weight": (h,)})
    return out


def _linear(out: dict, name: str, rows: int, cols: int) -> None:
    out[name + ".weight"], out[name + ".bias"] = (rows, cols), (rows,)


def _norm(out: dict, name: str, width: int) -> None:
    out[name + ".weight"], out[name + ".bias"] = (width,), (width,)


def _shapes_sam2(s: TinySizes) -> dict[str, tuple]:
    r, d = "grounding_encoder.sam2_model.", s.sam_width
    out: dict[str, tuple] = {r + "image_encoder.trunk.pos_embed": (1, s.hiera[0], 7, 7),
                             r + "image_encoder.trunk.pos_embed_window": (1, s.hiera[0], s.windows[0], s.windows[0]),
                             r + "image_encoder.trunk.patch_embed.proj.weight": (s.hiera[0], 3, 7, 7),
                             r + "image_encoder.trunk.patch_embed.proj.bias": (s.hiera[0],)}
    dims_in = (s.hiera[0], *s.hiera[:-1])
    for i, (din, dout) in enumerate(zip(dims_in, s.hiera)):  # one block per stage
        b = f"{r}image_encoder.trunk.blocks.{i}."
        _norm(out, b + "norm1", din)
        _linear(out, b + "attn.qkv", 3 * dout, din)
        _linear(out, b + "attn.proj", dout, dout)
        _norm(out, b + "norm2", dout)
        _linear(out, b + "mlp.layers.0", 4 * dout, dout)
        _linear(out, b + "mlp.layers.1", dout, 4 * dout)
        if din != dout:
            _linear(out, b + "proj", dout, din)
    for k, channels in enumerate(reversed(s.hiera)):
        out[f"{r}image_encoder.neck.convs.{k}.conv.weight"] = (d, channels, 1, 1)
        out[f"{r}image_encoder.neck.convs.{k}.conv.bias"] = (d,)
    pe = r + "sam_prompt_encoder."
    out[pe + "pe_layer.positional_encoding_gaussian_matrix"] = (2, d // 2)
    for k in range(4):
        out[f"{pe}point_embeddings.{k}.weight"] = (1, d)
    out[pe + "not_a_point_embed.weight"] = (1, d)
    out[pe + "no_mask_embed.weight"] = (1, d)
    out[pe + "mask_downscaling.0.weight"], out[pe + "mask_downscaling.0.bias"] = (4, 1, 2, 2), (4,)
    _norm(out, pe + "mask_downscaling.1", 4)
    out[pe + "mask_downscaling.3.weight"], out[pe + "mask_downscaling.3.bias"] = (16, 4, 2, 2), (16,)
    _norm(out, pe + "mask_downscaling.4", 16)
    out[pe + "mask_downscaling.6.weight"], out[pe + "mask_downscaling.6.bias"] = (d, 16, 1, 1), (d,)
    dec = r + "sam_mask_decoder."

    def attention(name: str, internal: int) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            _linear(out, f"{name}.{proj}", internal, d)
        _linear(out, f"{name}.out_proj", d, internal)

    for i in range(2):
        t = f"{dec}transformer.layers.{i}."
        attention(t + "self_attn", d)
        attention(t + "cross_attn_token_to_image", d // 2)
        attention(t + "cross_attn_image_to_token", d // 2)
        for k in range(1, 5):
            _norm(out, f"{t}norm{k}", d)
        _linear(out, t + "mlp.layers.0", s.decoder_mlp, d)
        _linear(out, t + "mlp.layers.1", d, s.decoder_mlp)
    attention(dec + "transformer.final_attn_token_to_image", d // 2)
    _norm(out, dec + "transformer.norm_final_attn", d)
    out[dec + "iou_token.weight"], out[dec + "mask_tokens.weight"] = (1, d), (4, d)
    out[dec + "obj_score_token.weight"] = (1, d)
    out[dec + "output_upscaling.0.weight"], out[dec + "output_upscaling.0.bias"] = (d, d // 4, 2, 2), (d // 4,)
    _norm(out, dec + "output_upscaling.1", d // 4)
    out[dec + "output_upscaling.3.weight"], out[dec + "output_upscaling.3.bias"] = (d // 4, d // 8, 2, 2), (d // 8,)
    out[dec + "conv_s0.weight"], out[dec + "conv_s0.bias"] = (d // 8, d, 1, 1), (d // 8,)
    out[dec + "conv_s1.weight"], out[dec + "conv_s1.bias"] = (d // 4, d, 1, 1), (d // 4,)
    for k in range(4):
        m = f"{dec}output_hypernetworks_mlps.{k}.layers."
        _linear(out, m + "0", d, d)
        _linear(out, m + "1", d, d)
        _linear(out, m + "2", d // 8, d)
    _linear(out, dec + "iou_prediction_head.layers.0", s.iou_hidden, d)
    _linear(out, dec + "iou_prediction_head.layers.1", s.iou_hidden, s.iou_hidden)
    _linear(out, dec + "iou_prediction_head.layers.2", 4, s.iou_hidden)
    _linear(out, dec + "pred_obj_score_head.layers.0", d, d)
    _linear(out, dec + "pred_obj_score_head.layers.1", d, d)
    _linear(out, dec + "pred_obj_score_head.layers.2", 1, d)
    out[r + "no_mem_embed"] = (1, 1, d)
    # video-memory parts (a few representatives of each module the release stores)
    out[r + "no_mem_pos_enc"] = (1, 1, d)
    out[r + "maskmem_tpos_enc"] = (7, 1, 1, 16)
    out[r + "no_obj_ptr"] = (1, d)
    _linear(out, r + "memory_attention.layers.0.self_attn.q_proj", d, d)
    _norm(out, r + "memory_attention.norm", d)
    out[r + "memory_encoder.out_proj.weight"], out[r + "memory_encoder.out_proj.bias"] = (16, d, 1, 1), (16,)
    _linear(out, r + "obj_ptr_proj.layers.0", d, d)
    out[r + "mask_downsample.weight"], out[r + "mask_downsample.bias"] = (1, 1, 4, 4), (1,)
    return out


def release_shapes(family: str, vocab: int, s: TinySizes = SIZES) -> dict[str, tuple]:
    llm = _shapes_qwen2(s, vocab) if family == "qwen2" else _shapes_internlm2(s, vocab)
    fcs = {"text_hidden_fcs.0.weight": (s.fcs_hidden, s.llm), "text_hidden_fcs.0.bias": (s.fcs_hidden,),
           "text_hidden_fcs.2.weight": (s.sam_width, s.fcs_hidden), "text_hidden_fcs.2.bias": (s.sam_width,)}
    return {**_shapes_vision(s), **llm, **_shapes_sam2(s), **fcs}


def release_tensors(shapes: dict[str, tuple], dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values; norm and layer-scale weights near 1 so that activations stay in range."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator) * 0.2
        if key.endswith(("norm.weight", "ls1", "ls2")) or ".norm" in key and key.endswith(".weight"):
            value = 1.0 + value * 0.5
        tensors[key] = value.to(dtype)
    return tensors


def release_config(family: str, vocab: int, *, tie: bool, template: str | None = None, s: TinySizes = SIZES) -> dict:
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": s.vision,
              "intermediate_size": s.vision_mlp, "num_attention_heads": s.vision_heads,
              "num_hidden_layers": s.vision_layers, "image_size": s.image, "patch_size": s.patch, "qkv_bias": True,
              "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
              "drop_path_rate": 0.0, "use_flash_attn": True, "num_channels": 3}
    common = {"vocab_size": vocab, "hidden_size": s.llm, "intermediate_size": s.llm_mlp,
              "num_hidden_layers": s.llm_layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": ROPE_THETA, "hidden_act": "silu"}
    if family == "qwen2":
        llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": tie,
               "use_sliding_window": False, "torch_dtype": "bfloat16", **common}
    else:
        llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
               "tie_word_embeddings": False, "rope_scaling": None,
               "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}, **common}
    return {
        "architectures": ["Sa2VAChatModel"], "model_type": "sa2va_chat",
        "auto_map": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                     "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"},
        "vision_config": vision, "llm_config": llm,
        "template": template or ("qwen_chat" if family == "qwen2" else "internlm2_chat"),
        "force_image_size": s.image, "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1,
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False, "torch_dtype": "bfloat16",
    }


def release_tokenizer(*, with_seg: bool = True, bos: bool = False):
    tokenizer = build_preset_tokenizer(400, include_seg=with_seg)
    tokenizer.add_tokens(list(RELEASE_TOKENS), special_tokens=True)
    if bos:
        tokenizer.add_special_tokens({"bos_token": "<s>"})
    return tokenizer


def write_release(root: Path, *, family: str = "qwen2", dtype: torch.dtype = torch.bfloat16, shards: int = 1,
                  tie: bool = True, seed: int = 0, with_seg: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny release directory (config.json, weights in `shards` safetensors files, tokenizer, a
    stand-in for its remote code); returns it and its tensors."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = release_tokenizer(with_seg=with_seg, bos=family == "internlm2")
    vocab = len(tokenizer) + 3  # published checkpoints keep spare embedding rows
    shapes = release_shapes(family, vocab)
    if family == "qwen2" and tie:
        del shapes["language_model.lm_head.weight"]
    tensors = release_tensors(shapes, dtype, seed)
    config = release_config(family, vocab, tie=tie)
    (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(root)
    (root / "modeling_sa2va_chat.py").write_text("# the release's remote code (not run by hsft)\n", encoding="utf-8")
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for index in range(shards):
            name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {key: tensors[key] for key in keys[index::shards]}
            save_file(part, str(root / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in part})
        index_data = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                      "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2), encoding="utf-8")
    (root / "tiny_sam2.json").unlink(missing_ok=True)
    return root, tensors


def write_sam2_config(path: Path) -> str:
    path.write_text(json.dumps(sam2_config_dict()), encoding="utf-8")
    return str(path)
