"""Export an hsft model directory that was imported from a released Sa2VA checkpoint back to the
release's format: the same tensor names, files, dtypes and shapes, the source's config, tokenizer
and remote code, so that the release's own code loads it.

Every tensor comes from the (possibly fine-tuned) hsft model, except those kept beside it at import
(release/kept.safetensors), which are written back unchanged. Import followed by export gives back
every tensor of the source bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from hsft.model.chain import chain_of
from hsft.model.checkpoint import is_model_directory, load_model
from hsft.model.release.configs import config_with_tiling, llm_heads
from hsft.model.release.importer import FILES_DIR, KEPT_FILE, LAYOUT_FILE
from hsft.model.release.plan import Entry, to_release
from hsft.model.release.source import ReleaseError

__all__ = ["export_sa2va"]

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _release_dir(model_dir: Path) -> Path:
    """The release/ directory of `model_dir`, or, for a lean directory (a stage's changes over its input
    model), of the full directory its chain of input models ends in."""
    if not model_dir.is_dir():
        raise ReleaseError(f"{model_dir}: model directory does not exist")
    if not is_model_directory(model_dir):
        raise ReleaseError(f"{model_dir}: not a complete hsft model directory (hsft_model.json is missing)")
    release = next((d / "release" for d in chain_of(model_dir) if (d / "release" / LAYOUT_FILE).is_file()), None)
    if release is None:
        raise ReleaseError(f"{model_dir}: was not imported from a released Sa2VA checkpoint (no "
                           f"release/{LAYOUT_FILE}); export writes the source's configuration back and needs it")
    for name in (KEPT_FILE, FILES_DIR):
        if not (release / name).exists():
            raise ReleaseError(f"{release.parent}: release/{name} is missing (incomplete copy of the model "
                               "directory)")
    return release


def export_sa2va(model_dir: str | os.PathLike, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the release-format checkpoint of the hsft model in `model_dir` to `output_dir`."""
    from safetensors.torch import load_file

    model_dir, output = Path(model_dir), Path(output_dir)
    release = _release_dir(model_dir)
    layout = json.loads((release / LAYOUT_FILE).read_text(encoding="utf-8"))
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ReleaseError(f"{output}: output directory exists and is not empty (use --overwrite)")
    model = load_model(str(model_dir))
    state = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = name.replace("text_hidden_fcs.", "fcs.", 1) if name.startswith("text_hidden_fcs.") else name
        state[key] = tensor.detach()
    if layout["tied_lm_head"]:
        state["vlm.lm_head.weight"] = state["vlm.model.language_model.embed_tokens.weight"]
    heads = llm_heads(model.vlm.config)
    kept = load_file(str(release / KEPT_FILE))

    shards: dict[str, dict[str, torch.Tensor]] = {}
    for item in layout["tensors"]:
        entry = Entry(item["key"], item["kind"], tuple(item["hsft"]), int(item["row"]))
        try:
            tensor = to_release(entry, state, kept, heads)
        except KeyError as err:
            raise ReleaseError(f"{model_dir}: the model has no tensor {err.args[0]!r} for "
                               f"{entry.release_key!r}") from err
        if list(tensor.shape) != item["shape"]:
            raise ReleaseError(f"{model_dir}: {entry.release_key!r} would have shape {list(tensor.shape)}, the "
                               f"release has {item['shape']}")
        dtype = _DTYPES.get(item["dtype"])
        if dtype is not None:
            tensor = tensor.to(dtype)
        shards.setdefault(item["file"], {})[entry.release_key] = tensor.contiguous().cpu()

    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for name, tensors in shards.items():
        metadata = layout["file_metadata"].get(name) or {"format": "pt"}
        save_file(tensors, str(output / name), metadata=metadata)
    for path in sorted((release / FILES_DIR).iterdir()):
        if path.is_file():
            shutil.copy2(path, output / path.name)
    # The tiling the model was trained and evaluated with goes back into the release's config.
    config = output / "config.json"
    if config.is_file():
        text = config.read_text(encoding="utf-8")
        updated = config_with_tiling(text, asdict(model.conventions))
        if updated != text:
            config.write_text(updated, encoding="utf-8")
    return output
