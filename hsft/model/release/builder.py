"""Write an hsft Sa2VA model in a released Sa2VA checkpoint's format: the release's tensor names,
config.json, tokenizer and safetensors shards.

This is how a checkpoint of a published size can exist without a download: build the architecture
at that size with random weights, then write it the way the release stores it. The names come from
the same plan the importer and the exporter follow (hsft.model.release.plan), read backwards, so
`import_sa2va` of the result gives the model's tensors back (in the dtype written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from hsft.model.release.configs import TILING_FIELDS, llm_heads
from hsft.model.release.keys import (
    fcs_renamer,
    internlm2_renamer,
    projector_renamer,
    qwen2_renamer,
    sam2_renamer,
    vision_renamer,
)
from hsft.model.release.plan import POINT_TABLE, SAM2_SHARED_POSITIONAL, plan_keys, to_release
from hsft.model.release.source import ReleaseError

__all__ = ["write_release_checkpoint", "release_state", "sam2_config_json"]

_VISION = "vlm.model.vision_tower."
_LLM = "vlm.model.language_model."
_LM_HEAD = "vlm.lm_head.weight"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _renamers(family: str):
    llm = qwen2_renamer() if family == "qwen2" else internlm2_renamer()
    return (vision_renamer(), projector_renamer(), *llm, sam2_renamer(), fcs_renamer())


def _hsft_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the plan's names ("vlm.", "sam2.", "fcs.")."""
    state = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = name.replace("text_hidden_fcs.", "fcs.", 1) if name.startswith("text_hidden_fcs.") else name
        state[key] = tensor.detach()
    return state


def _fused_name(key: str, family: str) -> str | None:
    """The hsft-side name the renamers know for `key`; None for a tensor the release does not store
    on its own (the k/v halves of a fused projection, a derived copy)."""
    if key.startswith(_VISION) and ".attention." in key:
        for part in ("k_proj", "v_proj"):
            if f".attention.{part}." in key:
                return None
        if ".attention.q_proj." in key:
            return key.replace(".attention.q_proj.", ".attention.qkv.")
    if family == "internlm2" and key.startswith(_LLM) and ".self_attn." in key:
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            return None
        if ".self_attn.q_proj." in key:
            return key.replace(".self_attn.q_proj.", ".self_attn.wqkv.")
    return key


def release_state(model, family: str = "qwen2") -> dict[str, torch.Tensor]:
    """The release's flat state dict of `model` (an hsft Sa2VAModel), in the model's dtypes. SAM2's
    positional matrix is stored once, the prompt encoder's (what the importer gives both copies)."""
    state = _hsft_state(model)
    tied = bool(getattr(model.vlm.config, "tie_word_embeddings", False))
    if tied:
        state.pop(_LM_HEAD, None)
    renamers = _renamers(family)
    release_keys = []
    for key in state:
        if key == SAM2_SHARED_POSITIONAL:
            continue  # transformers' second copy of the prompt encoder's positional matrix
        if key == POINT_TABLE:
            names = [f"{POINT_TABLE}.{row}" for row in range(state[key].shape[0])]
        else:
            name = _fused_name(key, family)
            names = [] if name is None else [name]
        for name in names:
            release = next((r.backward(name) for r in renamers if r.backward(name) is not None), None)
            if release is None:
                raise ReleaseError(f"model tensor {key!r} has no name in the release's format")
            release_keys.append(release)
    heads = llm_heads(model.vlm.config)
    out = {}
    for entry in plan_keys(release_keys, family):
        if entry.kind == "kept":
            raise ReleaseError(f"release tensor {entry.release_key!r} would not be imported back")
        out[entry.release_key] = to_release(entry, state, {}, heads).contiguous()
    return out


def _vision_config(config) -> dict:
    v = config.vision_config
    return {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_attention_heads,
            "num_hidden_layers": v.num_hidden_layers, "image_size": _side(v.image_size),
            "patch_size": _side(v.patch_size), "qkv_bias": bool(v.attention_bias),
            "qk_normalization": bool(getattr(v, "use_qk_norm", False)), "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "drop_path_rate": 0.0,
            "use_flash_attn": True, "num_channels": 3}


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _llm_config(config, family: str, dtype: torch.dtype) -> dict:
    t = config.text_config
    common = {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
              "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
              "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
              "rms_norm_eps": t.rms_norm_eps, "rope_theta": _rope_theta(t), "hidden_act": t.hidden_act}
    if family == "qwen2":
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "tie_word_embeddings": bool(config.tie_word_embeddings), "use_sliding_window": False,
                "torch_dtype": _DTYPE_NAMES[dtype], **common}
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
            "tie_word_embeddings": False, "rope_scaling": None, "torch_dtype": _DTYPE_NAMES[dtype], **common}


def _rope_theta(text_config) -> float:
    theta = getattr(text_config, "rope_theta", None)
    if theta is None:  # newer transformers keep it in rope_parameters
        theta = (getattr(text_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def write_release_checkpoint(model, directory: str | os.PathLike, *, family: str = "qwen2",
                             dtype: torch.dtype = torch.bfloat16, shards: int = 1) -> Path:
    """Write `model` to `directory` as a released Sa2VA checkpoint: config.json, `shards` safetensors
    files (with an index when more than one), the tokenizer. Returns the directory.

    The SAM2 sizes are not part of a release's config (its code builds Hiera-L); a model with other
    SAM2 sizes needs the importer's --sam2-config (write `model.sam2.config` with `sam2_config_json`).
    """
    if family not in ("qwen2", "internlm2"):
        raise ReleaseError(f"family: must be 'qwen2' or 'internlm2', got {family!r}")
    if dtype not in _DTYPE_NAMES:
        raise ReleaseError(f"dtype: must be bfloat16, float16 or float32, got {dtype}")
    if shards < 1:
        raise ReleaseError(f"shards: must be >= 1, got {shards}")
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise ReleaseError(f"{root}: output directory exists and is not empty")
    root.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.to(dtype) if value.is_floating_point() else value
               for key, value in release_state(model, family).items()}
    cfg = model.vlm.config
    conventions = model.conventions
    config = {
        "architectures": ["Sa2VAChatModel"], "model_type": "sa2va_chat",
        "auto_map": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                     "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"},
        "vision_config": _vision_config(cfg), "llm_config": _llm_config(cfg, family, dtype),
        "template": "qwen_chat" if family == "qwen2" else "internlm2_chat",
        "force_image_size": _side(cfg.vision_config.image_size), "downsample_ratio": float(cfg.downsample_ratio),
        "ps_version": "v2", "select_layer": -1, "use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
        **{name: getattr(conventions, name) for name in TILING_FIELDS},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    model.tokenizer.save_pretrained(root)
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: tensors[key] for key in keys[index::shards]}
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return root


def sam2_config_json(model, path: str | os.PathLike) -> Path:
    """The model's SAM2 sizes as a transformers Sam2Config JSON (the importer's --sam2-config)."""
    path = Path(path)
    path.write_text(json.dumps(model.sam2.config.to_dict(), indent=2, default=str), encoding="utf-8")
    return path
