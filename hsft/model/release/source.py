"""Reading a released Sa2VA checkpoint directory (config, weight files, tokenizer), without running
any of its remote code, and checking it before any tensor is loaded.

Every problem is a `ReleaseError` whose message is one line naming the file or key at fault.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from hsft.errors import BadValue

__all__ = ["ReleaseError", "ReleaseSource", "read_release", "LLM_ARCHITECTURES", "TEMPLATES", "WEIGHTS_FILE",
           "WEIGHTS_INDEX"]

MODEL_TYPE = "sa2va_chat"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# LLM class of the release -> the transformers family hsft runs it as.
LLM_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}
# Chat templates of the release whose turn format hsft renders (see hsft.model.chat).
TEMPLATES = ("qwen_chat", "internlm2_chat")


class ReleaseError(BadValue):
    """A released checkpoint that cannot be imported (one line: file or key, and what is wrong)."""


@dataclass
class ReleaseSource:
    """A checked release directory: its config, where each tensor lives, and its shapes/dtypes."""

    directory: Path
    config: dict
    llm_family: str                         # "qwen2" | "internlm2"
    key_files: dict[str, str]               # tensor name -> weight file name (relative)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors dtype names: BF16, F32 ...

    @property
    def template(self) -> str:
        return str(self.config.get("template", "qwen_chat"))

    @property
    def weight_files(self) -> list[str]:
        return sorted(set(self.key_files.values()))


def _fail(where: os.PathLike | str, message: str) -> None:
    raise ReleaseError(f"{where}: {message}")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        _fail(path, f"not valid JSON ({err})")
    if not isinstance(data, dict):
        _fail(path, "expected a JSON object")
    return data


def _read_config(directory: Path) -> tuple[dict, str]:
    path = directory / "config.json"
    if not path.is_file():
        _fail(directory, "not a Sa2VA checkpoint directory (no config.json)")
    config = _read_json(path)
    if config.get("model_type") != MODEL_TYPE:
        _fail(path, f"not a Sa2VA checkpoint: model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    for name in ("vision_config", "llm_config"):
        if not isinstance(config.get(name), dict):
            _fail(path, f"{name} is missing; not a Sa2VA checkpoint")
    archs = config["llm_config"].get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in LLM_ARCHITECTURES:
        _fail(path, f"unsupported LLM architecture {arch!r} in llm_config.architectures; supported: "
                    f"{', '.join(LLM_ARCHITECTURES)}")
    template = config.get("template", "qwen_chat")
    if template not in TEMPLATES:
        _fail(path, f"unsupported chat template {template!r}; supported: {', '.join(TEMPLATES)}")
    if config.get("ps_version", "v2") != "v2":
        _fail(path, f"ps_version {config.get('ps_version')!r} is not supported (transformers' InternVL "
                    "implements the v2 pixel shuffle)")
    if config.get("select_layer", -1) != -1:
        _fail(path, f"select_layer {config.get('select_layer')!r} is not supported (only -1, the last layer)")
    if config.get("use_backbone_lora") or config.get("use_llm_lora"):
        _fail(path, "LoRA weights are not merged (use_backbone_lora / use_llm_lora is set); merge them first")
    return config, LLM_ARCHITECTURES[arch]


def _key_files(directory: Path) -> dict[str, str]:
    index_path = directory / WEIGHTS_INDEX
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            _fail(index_path, "has no weight_map")
        missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if missing:
            _fail(index_path, f"{len(missing)} shard(s) listed in the index are missing: {', '.join(missing)}")
        return {str(key): str(name) for key, name in weight_map.items()}
    if (directory / WEIGHTS_FILE).is_file():
        return {}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pth")):
        _fail(directory, "has only pickle weights (*.bin / *.pth); save the checkpoint as safetensors")
    _fail(directory, f"has no weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX})")
    return {}


def read_release(directory: str | os.PathLike) -> ReleaseSource:
    """Check `directory` as a released Sa2VA checkpoint and read its tensor table (not the tensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        _fail(directory, "checkpoint directory does not exist")
    config, family = _read_config(directory)
    key_files = _key_files(directory)
    sharded = bool(key_files)
    source = ReleaseSource(directory, config, family, dict(key_files))
    files = source.weight_files if sharded else [WEIGHTS_FILE]
    listed: dict[str, set[str]] = {}
    for name in files:
        try:
            with safe_open(directory / name, framework="pt") as handle:
                for key in handle.keys():
                    slice_ = handle.get_slice(key)
                    source.shapes[key] = tuple(int(s) for s in slice_.get_shape())
                    source.dtypes[key] = str(slice_.get_dtype())
                    listed.setdefault(name, set()).add(key)
                    if not sharded:
                        source.key_files[key] = name
        except (OSError, RuntimeError) as err:  # safetensors reports a corrupt header as either
            _fail(directory / name, f"not a readable safetensors file ({err})")
    for key, name in key_files.items():
        if key not in listed.get(name, set()):
            _fail(directory / WEIGHTS_INDEX, f"tensor {key!r} is listed in {name} but that shard does not hold it")
    return source
