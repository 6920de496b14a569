"""Load a DeepSpeed JSON config and write the run's settings into it.

Shipped configs hold concrete values only: DeepSpeed does not resolve "auto" outside the Hugging Face
Trainer, and an unresolved "auto" inside a sub-block silently disables that block (bf16 among them),
so any "auto" is refused here with the key that holds it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hsft.engine.config import PRECISIONS, TrainConfig
from hsft.errors import BadValue

# Keys this module owns: they are derived from the stage's TrainConfig and the world size.
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DeepSpeedConfigError(BadValue):
    pass


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if isinstance(node, str) and node.strip().lower() == "auto" else []


# Values hsft itself reads: their JSON type is checked strictly, because Python's truthiness would
# read "false" as true (DeepSpeed's own validation coerces such strings, hsft's reading would not).
_TYPED_KEYS: dict[tuple[str, ...], tuple[type, ...]] = {
    ("bf16", "enabled"): (bool,),
    ("fp16", "enabled"): (bool,),
    ("zero_optimization", "stage"): (int,),
    ("gradient_clipping",): (int, float),
    ("steps_per_print",): (int,),
    ("wall_clock_breakdown",): (bool,),
    ("train_micro_batch_size_per_gpu",): (int,),
    ("gradient_accumulation_steps",): (int,),
    ("train_batch_size",): (int,),
}
_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number"}


def _check_types(config: dict, path: Path) -> None:
    """Refuse a value of the wrong type with the key that holds it, before DeepSpeed meets it mid-setup."""
    for keys, types in _TYPED_KEYS.items():
        node: Any = config
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                raise DeepSpeedConfigError(f"--deepspeed {path}: {key} must be a JSON object, got {node!r}")
        if not isinstance(node, dict) or keys[-1] not in node:
            continue
        value = node[keys[-1]]
        # bool is an int in Python; JSON true is no stage number and no batch size.
        wrong = isinstance(value, bool) and bool not in types or not isinstance(value, types)
        if wrong:
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            raise DeepSpeedConfigError(f"--deepspeed {path}: {'.'.join(keys)} must be {expected}, got {value!r}")
    # The blocks DeepSpeed parses with its own models: their errors, as one line naming the key.
    import pydantic
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for block, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                         ("fp16", DeepSpeedFP16Config)):
        if block not in config:
            continue
        try:
            model(**config[block])
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in (block, *first["loc"]))
            raise DeepSpeedConfigError(f"--deepspeed {path}: {where}: {first['msg']} (got {first.get('input')!r})") \
                from None


def load_ds_config(path: str | Path) -> dict:
    """Read and sanity-check a DeepSpeed JSON file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"--deepspeed {path}: no such file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"--deepspeed {path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed {path}: the top level must be a JSON object")
    autos = _find_auto(config)
    if autos:
        raise DeepSpeedConfigError(
            f"--deepspeed {path}: 'auto' is only resolved by the Hugging Face Trainer; give concrete values for "
            + ", ".join(autos)
        )
    _check_types(config, path)
    if "optimizer" in config or "scheduler" in config:
        raise DeepSpeedConfigError(
            f"--deepspeed {path}: remove the 'optimizer'/'scheduler' blocks; hsft builds torch AdamW over the "
            "trainable parameters and its own cosine schedule from the stage settings"
        )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"--deepspeed {path}: zero_optimization.stage={stage}; hsft supports 0, 1 and 2")
    return config


def precision_of(config: dict) -> str:
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    return "bf16" if config.get("bf16", {}).get("enabled", False) else "fp32"


def apply_precision(base: dict, precision: str) -> dict:
    """A copy of `base` that trains in `precision` ("bf16" or "fp32")."""
    if precision not in PRECISIONS:
        raise DeepSpeedConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    config = copy.deepcopy(base)
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    config["fp16"] = {**config.get("fp16", {}), "enabled": False}
    return config


def stage_ds_config(base: dict, train: TrainConfig) -> dict:
    """A copy of `base` (precision already applied) with the stage's batch sizes and clipping written in."""
    config = copy.deepcopy(base)
    for key in _BATCH_KEYS:
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = train.micro_batch
    config["gradient_accumulation_steps"] = train.grad_accum
    config["gradient_clipping"] = train.clip
    if precision_of(config) == "fp16":
        raise DeepSpeedConfigError("fp16 is not supported (no loss scaling here); use bf16 or fp32")
    if config.get("bf16", {}).get("enabled", False):
        # The non-finite guard relies on DeepSpeed skipping steps whose gradients are not finite.
        config["bf16"]["check_grad_overflow"] = True
    # torch AdamW is not one of DeepSpeed's tested optimizers; it is what we want on CPU and GPU alike.
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 10**9)
    return config
