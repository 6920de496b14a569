"""Saving and loading the whole Sa2VA-style composite.

Layout of a model directory:

    hsft_model.json               format name + version, prompt, text_hidden_fcs widths, image
                                  normalisation, dtype (written last: its presence marks a
                                  complete directory)
    vlm/                          a transformers InternVL checkpoint (config.json, safetensors,
                                  generation config) with the tokenizer, [SEG] included
    sam2/                         a transformers SAM2 checkpoint (config.json, safetensors)
    text_hidden_fcs.safetensors   the [SEG] projection
    release/                      only for a model imported from a released Sa2VA checkpoint: what
                                  export needs to give the release back (hsft.model.release)

vlm/ and sam2/ are ordinary checkpoints, so `ModelConfig(vlm=DIR/vlm, sam2=DIR/sam2)` also builds
from them (with a fresh text_hidden_fcs). Weights are stored in the model's dtype, so a round trip
is bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration, Sam2Model

from hsft.errors import BadValue, MissingFile
from hsft.model.build import load_sam2, load_vlm, torch_dtype
from hsft.model.chain import DELTA_FILE, ID_FILE, is_lean, load_lean
from hsft.model.config import Conventions, PromptConfig
from hsft.model.directory import META_FILE
from hsft.model.images import ImageNorm
from hsft.model.integrity import explain_load_failure
from hsft.model.sa2va import Sa2VAModel

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "is_model_directory", "save_model", "load_model", "export_standalone"]

FORMAT = "hsft-sa2va"
FORMAT_VERSION = 1
VLM_DIR = "vlm"
SAM2_DIR = "sam2"
FCS_FILE = "text_hidden_fcs.safetensors"
RELEASE_DIR = "release"


def is_model_directory(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a complete saved model (its metadata file is written last)."""
    return os.path.isfile(os.path.join(directory, META_FILE))


def save_model(model: Sa2VAModel, directory: str | os.PathLike) -> None:
    """Write the whole composite to `directory` (the layout above); the metadata file goes last."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    meta_path = os.path.join(directory, META_FILE)
    for stale in (META_FILE, ID_FILE, DELTA_FILE):
        # The directory is incomplete until the new metadata is written; new contents get a new id.
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    model.vlm.save_pretrained(os.path.join(directory, VLM_DIR))
    model.tokenizer.save_pretrained(os.path.join(directory, VLM_DIR))
    model.sam2.save_pretrained(os.path.join(directory, SAM2_DIR))
    fcs_state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.text_hidden_fcs.state_dict().items()}
    save_file(fcs_state, os.path.join(directory, FCS_FILE))
    _carry_release_files(model, directory)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prompt": asdict(model.prompt),
        "hidden_size": model.hidden_size,
        "fcs_hidden": model.fcs_hidden,
        "prompt_width": model.prompt_width,
        "vlm_norm": model.vlm_norm.to_dict(),
        "sam_norm": model.sam_norm.to_dict(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "conventions": asdict(model.conventions),
    }
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)


def _carry_release_files(model: Sa2VAModel, directory: str) -> None:
    """Copy an imported model's release/ directory along, so that every saved stage can be exported."""
    target = os.path.join(directory, RELEASE_DIR)
    source = model.release_dir
    if source is None or os.path.abspath(source) == os.path.abspath(target):
        return
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(source, target)


def _read_meta(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise MissingFile(f"model directory {directory!r} does not exist")
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise MissingFile(f"{directory!r} is not a complete hsft model directory: {META_FILE} is missing")
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except json.JSONDecodeError as err:
        raise BadValue(f"{meta_path}: not valid JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise BadValue(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BadValue(f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
                         f"(this hsft reads version {FORMAT_VERSION})")
    for name in (VLM_DIR, SAM2_DIR, FCS_FILE):
        if not os.path.exists(os.path.join(directory, name)):
            raise MissingFile(f"{directory!r} is not a complete hsft model directory: {name} is missing")
    return meta


def load_model(directory: str | os.PathLike, *, device: torch.device | str = "cpu",
               dtype: str | torch.dtype | None = None) -> Sa2VAModel:
    """The model saved in `directory`, in eval mode, on `device`, in its saved dtype unless `dtype` is
    given (a name such as "float32" or a torch.dtype). Every place that reads a model directory calls
    this; a lean directory (a stage's changes over its input model) resolves its chain here."""
    directory = os.fspath(directory)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if is_lean(directory):
        return load_lean(directory, load_model, dtype=dtype).to(device).eval()
    meta = _read_meta(directory)
    target = torch_dtype(dtype if dtype is not None else meta["dtype"])
    try:
        vlm, tokenizer, _ = load_vlm(os.path.join(directory, VLM_DIR), target, where=f"{directory}/{VLM_DIR}")
    except RuntimeError as err:
        raise BadValue(explain_load_failure(os.path.join(directory, VLM_DIR), InternVLForConditionalGeneration,
                                              err)) from None
    try:
        sam2, _ = load_sam2(os.path.join(directory, SAM2_DIR), target, where=f"{directory}/{SAM2_DIR}")
    except RuntimeError as err:
        raise BadValue(explain_load_failure(os.path.join(directory, SAM2_DIR), Sam2Model, err)) from None
    model = Sa2VAModel(
        vlm, sam2, tokenizer, PromptConfig(**meta["prompt"]), fcs_hidden=int(meta["fcs_hidden"]),
        vlm_norm=ImageNorm.from_dict(meta["vlm_norm"]), sam_norm=ImageNorm.from_dict(meta["sam_norm"]),
        conventions=Conventions.from_dict(meta.get("conventions")),
    )
    release = os.path.join(directory, RELEASE_DIR)
    if os.path.isdir(release):
        model.release_dir = release
    fcs_path = os.path.join(directory, FCS_FILE)
    try:
        model.text_hidden_fcs.load_state_dict(load_file(fcs_path), strict=True)
    except RuntimeError as err:
        raise BadValue(f"{fcs_path}: does not match the model's text_hidden_fcs ({err})") from err
    return model.to(device=device, dtype=target).eval()


def export_standalone(directory: str | os.PathLike, out: str | os.PathLike) -> None:
    """A self-contained (full) copy of a model directory, lean or not."""
    save_model(load_model(directory), out)
