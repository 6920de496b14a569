"""Why a saved checkpoint does not load, in one line.

transformers refuses a tensor whose shape differs from what config.json describes, but its exception
only says "look at the report above" (the report goes to the log). This module reads the safetensors
headers and the shapes the config implies (a model built on the meta device, no memory) and names
the file, the tensor and both shapes.

Files written by transformers may use older key names than the model class (InternVL stores
`language_model.model.layers...` for the class's `model.language_model.layers...`), so names are
compared with their `model` components dropped; a tensor that matches no name is not judged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["explain_load_failure", "find_shape_mismatch"]


def _normalise(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "model")


def _file_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    shapes = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                shapes[_normalise(key)] = (tuple(handle.get_slice(key).get_shape()), path)
    return shapes


def find_shape_mismatch(directory: str | os.PathLike, model_cls) -> str | None:
    """"<file>: tensor <name> has shape (...), <config> describes (...)" for the first tensor whose stored
    shape differs from the config's, or None when none does."""
    from transformers import AutoConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    with torch.device("meta"):
        model = model_cls(config)
    expected = {_normalise(name): tuple(t.shape) for name, t in model.state_dict().items()}
    for name, (shape, path) in sorted(_file_shapes(directory).items()):
        if name in expected and expected[name] != shape:
            return (f"{path}: tensor {name} has shape {list(shape)}, but {directory / 'config.json'} describes "
                    f"{list(expected[name])}")
    return None


def explain_load_failure(directory: str | os.PathLike, model_cls, error: Exception) -> str:
    """One line for a checkpoint that transformers could not load."""
    try:
        mismatch = find_shape_mismatch(directory, model_cls)
    except (OSError, ValueError, KeyError) as diagnosis_error:
        mismatch = None
        error = f"{error}; the files could not be inspected either ({diagnosis_error})"
    return mismatch or f"{directory}: cannot be loaded ({str(error).strip().splitlines()[-1]})"
