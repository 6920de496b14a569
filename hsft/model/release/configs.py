"""transformers configs for a released Sa2VA checkpoint: InternVL (vision + projector + LLM) from
its config.json, SAM2 from the release's fixed Hiera-L sizes or a given config file."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import InternVLConfig, LlamaConfig, Qwen2Config, Sam2Config, Sam2VisionConfig

from hsft.model.release.plan import LlmHeads
from hsft.model.release.source import ReleaseError, ReleaseSource

__all__ = ["internvl_config", "sam2_config", "hiera_large_config", "llm_heads", "TILING_FIELDS", "tiling_fields",
           "config_with_tiling"]

# The release config's tiling fields and the values its predict_forward uses (which the published
# config.json files also record); a missing field means that value.
TILING_FIELDS = {"dynamic_image_size": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "use_thumbnail": True}

# Keys of the release's llm_config that belong to its training set-up, not to the architecture.
_LLM_DROP = ("architectures", "auto_map", "_name_or_path", "torch_dtype", "dtype", "transformers_version",
             "attn_implementation", "_attn_implementation_autoset", "use_flash_attn", "model_type",
             "bias", "rope_scaling")


def hiera_large_config() -> Sam2Config:
    """SAM2 as the release's code builds it: Hiera-L at 1024 px (its sizes are not in config.json)."""
    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=144, num_attention_heads=2, image_size=[1024, 1024],
        blocks_per_stage=[2, 6, 36, 4], embed_dim_per_stage=[144, 288, 576, 1152],
        num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 16, 8],
        global_attention_blocks=[23, 33, 43], window_positional_embedding_background_size=[7, 7],
    )
    vision = dict(model_type="sam2_vision_model", backbone_config=backbone,
                  backbone_channel_list=[1152, 576, 288, 144], fpn_hidden_size=256,
                  backbone_feature_sizes=[[256, 256], [128, 128], [64, 64]])
    return Sam2Config(vision_config=vision, prompt_encoder_config=dict(hidden_size=256, image_size=1024),
                      mask_decoder_config=dict(hidden_size=256, dynamic_multimask_via_stability=False))


def sam2_config(path: str | None) -> Sam2Config:
    """Hiera-L by default; else a transformers Sam2VisionConfig JSON (as to_json_file writes it, with
    its backbone_config) or a whole Sam2Config JSON."""
    if path is None:
        return hiera_large_config()
    file = Path(path)
    if not file.is_file():
        raise ReleaseError(f"--sam2-config {path}: file does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReleaseError(f"--sam2-config {path}: not valid JSON ({err})") from err
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind == "sam2":
        config = Sam2Config.from_dict(data)
    elif kind == "sam2_vision_model":
        vision = Sam2VisionConfig.from_dict(data)
        width = int(vision.fpn_hidden_size)
        size = int(vision.backbone_config.image_size[0])
        config = Sam2Config(vision_config=vision.to_dict(),
                            prompt_encoder_config=dict(hidden_size=width, image_size=size),
                            mask_decoder_config=dict(hidden_size=width, iou_head_hidden_dim=width))
    else:
        raise ReleaseError(f"--sam2-config {path}: model_type is {kind!r}, expected 'sam2_vision_model' "
                           "(a Sam2VisionConfig) or 'sam2'")
    config.mask_decoder_config.dynamic_multimask_via_stability = False
    return config


def _qwen2(llm: dict, tie: bool) -> Qwen2Config:
    fields = {k: v for k, v in llm.items() if k not in _LLM_DROP}
    fields["tie_word_embeddings"] = tie
    if llm.get("rope_scaling"):
        fields["rope_scaling"] = llm["rope_scaling"]
    return Qwen2Config(**fields)


def _internlm2_as_llama(llm: dict, where: Path) -> LlamaConfig:
    scaling = llm.get("rope_scaling")
    rope_scaling = None
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise ReleaseError(f"{where}: llm_config.rope_scaling type {kind!r} is not supported "
                               "(dynamic or linear)")
        rope_scaling = {"rope_type": kind, "factor": float(scaling["factor"])}
    try:
        return LlamaConfig(
            vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=llm["num_attention_heads"],
            num_key_value_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
            hidden_act=llm.get("hidden_act", "silu"), max_position_embeddings=llm.get("max_position_embeddings", 2048),
            rms_norm_eps=llm.get("rms_norm_eps", 1e-6), rope_theta=llm.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling, attention_bias=bool(llm.get("bias", False)), tie_word_embeddings=False,
            bos_token_id=llm.get("bos_token_id", 1), eos_token_id=llm.get("eos_token_id", 2),
            pad_token_id=llm.get("pad_token_id", 0),
        )
    except KeyError as err:
        raise ReleaseError(f"{where}: llm_config has no {err.args[0]!r}") from err


def internvl_config(source: ReleaseSource, *, image_token_id: int, tie_word_embeddings: bool) -> InternVLConfig:
    where = source.directory / "config.json"
    cfg = source.config
    vision = dict(cfg["vision_config"])
    image_size = int(cfg.get("force_image_size") or vision.get("image_size", 448))
    patch = int(vision.get("patch_size", 14))
    ratio = float(cfg.get("downsample_ratio", 0.5))
    try:
        vision_fields = dict(
            hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
            image_size=image_size, patch_size=patch, hidden_act=vision.get("hidden_act", "gelu"),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6), norm_type=vision.get("norm_type", "layer_norm"),
            attention_bias=bool(vision.get("qkv_bias", True)), use_qk_norm=bool(vision.get("qk_normalization", False)),
            use_absolute_position_embeddings=True, use_mean_pooling=True,
        )
    except KeyError as err:
        raise ReleaseError(f"{where}: vision_config has no {err.args[0]!r}") from err
    if source.llm_family == "qwen2":
        text = _qwen2(cfg["llm_config"], tie_word_embeddings)
    else:
        text = _internlm2_as_llama(cfg["llm_config"], where)
    tokens = int(round((image_size // patch) ** 2 * ratio ** 2))
    return InternVLConfig(vision_config=vision_fields, text_config=text.to_dict(), image_token_id=image_token_id,
                          image_seq_length=tokens, downsample_ratio=ratio, tie_word_embeddings=text.tie_word_embeddings)


def llm_heads(config: InternVLConfig) -> LlmHeads:
    text = config.text_config
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return LlmHeads(heads, int(text.num_key_value_heads or heads), int(head_dim))


def tiling_fields(config: dict, where: Path) -> dict:
    """The four tiling fields of a release config (defaults: TILING_FIELDS), checked; the names are
    those of hsft.model.config.Conventions."""
    values = {}
    for name, default in TILING_FIELDS.items():
        value = config.get(name, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ReleaseError(f"{where}: {name} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReleaseError(f"{where}: {name} must be a positive integer, got {value!r}")
        values[name] = value
    if values["max_dynamic_patch"] < values["min_dynamic_patch"]:
        raise ReleaseError(f"{where}: max_dynamic_patch ({values['max_dynamic_patch']}) is below "
                           f"min_dynamic_patch ({values['min_dynamic_patch']})")
    return values


def config_with_tiling(text: str, conventions: dict) -> str:
    """The release config.json `text` with the model's tiling (`conventions`: Conventions as a dict)
    written into it. Unchanged, byte for byte, when the config already says the same (a field it
    leaves out counts as its TILING_FIELDS value)."""
    config = json.loads(text)
    wanted = {name: conventions[name] for name in TILING_FIELDS}
    if all(config.get(name, default) == wanted[name] for name, default in TILING_FIELDS.items()):
        return text
    config.update(wanted)
    return json.dumps(config, indent=2) + "\n"
