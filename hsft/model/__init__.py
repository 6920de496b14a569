"""The Sa2VA-style model: InternVL + [SEG] + text_hidden_fcs + SAM2 mask decoder (see sa2va.py).

Exports resolve lazily, so `from hsft.model.config import ModelConfig` (done by hsft.config for
every command) does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Sa2VAModel": "hsft.model.sa2va",
    "PARTS": "hsft.model.sa2va",
    "EMPTY_MASK_LOGIT": "hsft.model.sa2va",
    "ModelConfig": "hsft.model.config",
    "PromptConfig": "hsft.model.config",
    "Conventions": "hsft.model.config",
    "build_model": "hsft.model.build",
    "load_model": "hsft.model.checkpoint",
    "save_model": "hsft.model.checkpoint",
    "is_model_directory": "hsft.model.checkpoint",
    "ImageBatch": "hsft.model.images",
    "TokenBatch": "hsft.model.chat",
    "SamFeatures": "hsft.model.features",
    "SegForwardOutput": "hsft.model.outputs",
    "SegGenerateOutput": "hsft.model.outputs",
    "PRESETS": "hsft.model.presets",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from hsft.model.build import build_model
    from hsft.model.checkpoint import is_model_directory, load_model, save_model
    from hsft.model.chat import TokenBatch
    from hsft.model.config import Conventions, ModelConfig, PromptConfig
    from hsft.model.features import SamFeatures
    from hsft.model.images import ImageBatch
    from hsft.model.outputs import SegForwardOutput, SegGenerateOutput
    from hsft.model.presets import PRESETS
    from hsft.model.sa2va import EMPTY_MASK_LOGIT, PARTS, Sa2VAModel


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hsft.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
