"""Building the model: from an embedded preset, or from real local checkpoints.

Nothing is downloaded: presets are constructed from configs (hsft.model.presets) with a locally
trained tokenizer; checkpoints load with `local_files_only=True`.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
    Sam2Model,
)

from hsft.errors import BadValue, MissingFile
from hsft.model.config import DTYPES, ModelConfig
from hsft.model.images import IMAGENET_NORM, ImageNorm
from hsft.model.presets import PRESETS, internvl_config, sam2_config
from hsft.model.sa2va import Sa2VAModel
from hsft.model.tokenizer import IM_END, IMG_CONTEXT, add_seg_token, build_preset_tokenizer, single_token_id

__all__ = ["build_model", "torch_dtype", "load_vlm", "load_sam2"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BadValue(f"dtype: must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def build_model(cfg: ModelConfig, *, seed: int = 0) -> Sa2VAModel:
    """The Sa2VA-style model `cfg` describes, in eval mode and cfg.dtype.

    Deterministic given `seed` (fresh weights: the preset's, text_hidden_fcs, new embedding rows);
    the global torch RNG is left as it was.
    """
    cfg.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _from_checkpoints(cfg) if cfg.from_checkpoints else _from_preset(cfg)
    return model.to(torch_dtype(cfg.dtype)).eval()


def _from_preset(cfg: ModelConfig) -> Sa2VAModel:
    preset = PRESETS[cfg.preset]
    tokenizer = build_preset_tokenizer(preset.vocab_size)
    vlm_cfg = internvl_config(
        preset.vlm,
        vocab_size=len(tokenizer),
        image_token_id=single_token_id(tokenizer, IMG_CONTEXT),
        pad_token_id=int(tokenizer.pad_token_id),
        eos_token_id=single_token_id(tokenizer, IM_END),
    )
    vlm = InternVLForConditionalGeneration(vlm_cfg)
    _set_generation_ids(vlm, tokenizer)
    sam2 = Sam2Model(sam2_config(preset.sam2))
    return Sa2VAModel(vlm, sam2, tokenizer, cfg.prompt, fcs_hidden=cfg.fcs_hidden)


def _from_checkpoints(cfg: ModelConfig) -> Sa2VAModel:
    dtype = torch_dtype(cfg.dtype)
    vlm, tokenizer, vlm_norm = load_vlm(cfg.vlm, dtype, where="model.vlm")
    sam2, sam_norm = load_sam2(cfg.sam2, dtype, where="model.sam2")
    return Sa2VAModel(vlm, sam2, tokenizer, cfg.prompt, fcs_hidden=cfg.fcs_hidden, vlm_norm=vlm_norm,
                      sam_norm=sam_norm)


def _check_checkpoint_dir(directory: str, model_type: str, where: str) -> None:
    if not os.path.isdir(directory):
        raise MissingFile(f"{where}: checkpoint directory {directory!r} does not exist")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise MissingFile(f"{where}: {directory!r} has no config.json (not a transformers checkpoint)")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in _WEIGHT_FILES):
        raise MissingFile(f"{where}: {directory!r} has no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    found = AutoConfig.from_pretrained(directory, local_files_only=True).model_type
    if found != model_type:
        raise BadValue(f"{where}: {directory!r} holds a {found!r} checkpoint, expected {model_type!r}")


def _image_norm(directory: str) -> ImageNorm:
    """mean/std from the checkpoint's preprocessor_config.json when present, else ImageNet's."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.isfile(path):
        return IMAGENET_NORM
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if "image_mean" in data and "image_std" in data:
        return ImageNorm.from_dict({"mean": data["image_mean"], "std": data["image_std"]})
    return IMAGENET_NORM


def _set_generation_ids(vlm: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    vlm.generation_config.eos_token_id = single_token_id(tokenizer, IM_END)
    vlm.generation_config.pad_token_id = int(tokenizer.pad_token_id)


def load_vlm(directory: str, dtype: torch.dtype, *, where: str
             ) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase, ImageNorm]:
    """InternVL checkpoint + its tokenizer with [SEG] added (embeddings grown if [SEG] is new)."""
    _check_checkpoint_dir(directory, "internvl", where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MissingFile(f"{where}: no usable tokenizer in {directory!r}: {err}") from err
    vlm = InternVLForConditionalGeneration.from_pretrained(directory, local_files_only=True, dtype=dtype)
    add_seg_token(tokenizer, where=f"{where} tokenizer in {directory!r}")
    if tokenizer.pad_token is None:
        # Padded positions are masked out, so any token serves; the end token is always present.
        tokenizer.pad_token = IM_END
    rows = vlm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        # Never shrink: published checkpoints keep spare rows beyond the tokenizer's length.
        vlm.resize_token_embeddings(len(tokenizer))
    _set_generation_ids(vlm, tokenizer)
    return vlm, tokenizer, _image_norm(directory)


def load_sam2(directory: str, dtype: torch.dtype, *, where: str) -> tuple[Sam2Model, ImageNorm]:
    _check_checkpoint_dir(directory, "sam2", where)
    sam2 = Sam2Model.from_pretrained(directory, local_files_only=True, dtype=dtype)
    return sam2, _image_norm(directory)
