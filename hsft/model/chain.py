"""Lean model directories: a stage's model holds only the tensors that differ from its input model, plus
a reference to that input model; loading follows the chain of references.

A full model directory (hsft.model.checkpoint) holds every weight. Each stage of a run changes a small
part of the model (LoRA merges into the attention projections, HSFT trains the projection and the mask
decoder), so writing every stage in full multiplies the size of the model by the number of stages.
A lean directory holds:

    hsft_model.json      {"format": "hsft-sa2va-delta", "base": <input model, relative path>,
                          "base_id": <the input model's id>, "id": <this directory's id>, "dtype": ...}
    delta.safetensors    the Sa2VA state-dict entries that differ (bitwise) from the input model's

The metadata file is written last, as in a full directory. `base_id` guards against a changed input:
overwriting the stage a lean directory refers to makes loading fail with a clear message instead of
silently combining tensors of two runs. `hsft.model.checkpoint.export_standalone` writes a self-contained
copy.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hsft.errors import BadValue, MissingFile

__all__ = [
    "DELTA_FILE",
    "DELTA_FORMAT",
    "chain_of",
    "directory_id",
    "is_lean",
    "load_lean",
    "make_lean",
    "write_lean",
]

DELTA_FORMAT = "hsft-sa2va-delta"
DELTA_FILE = "delta.safetensors"
META_FILE = "hsft_model.json"
ID_FILE = "hsft_model_id"  # beside a full directory's metadata: its id, for the lean directories that refer to it
_MAX_CHAIN = 32
# (input dtype, stage dtype) pairs in which every input value is exactly representable
_EXACT_WIDENINGS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def _meta(directory: Path) -> dict:
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadValue(f"{path}: not valid JSON ({err})") from None


def is_lean(directory: str | os.PathLike) -> bool:
    path = Path(directory) / META_FILE
    return path.is_file() and _meta(Path(directory)).get("format") == DELTA_FORMAT


def directory_id(directory: str | os.PathLike) -> str:
    """A model directory's id (created for a full directory on first use)."""
    directory = Path(directory)
    if is_lean(directory):
        return _meta(directory)["id"]
    id_path = directory / ID_FILE
    if not id_path.is_file():
        tmp = id_path.with_suffix(".tmp")
        tmp.write_text(uuid.uuid4().hex + "\n")
        os.replace(tmp, id_path)
    return id_path.read_text().strip()


def _base_of(directory: Path) -> Path:
    """The input model: by the relative path first (the whole run directory moved), then by the absolute
    one (the lean directory alone was copied elsewhere), and only with the id it was written against."""
    meta = _meta(directory)
    candidates = [(directory / meta["base"]).resolve(), Path(meta.get("base_absolute", meta["base"]))]
    present = [base for base in candidates if (base / META_FILE).is_file()]
    for base in present:
        if directory_id(base) == meta["base_id"]:
            return base
    if present:
        raise BadValue(f"{directory}: its input model {present[0]} was replaced after this directory was written "
                         "(ids differ); re-run this stage or export self-contained copies with --standalone")
    raise MissingFile(f"{directory}: a lean model directory whose input model {candidates[0]} is missing; keep "
                            "the run's earlier stages, or write self-contained directories with --standalone")


def chain_of(directory: str | os.PathLike) -> list[Path]:
    """The directory, its input model, that one's input ... down to a full directory."""
    chain = [Path(directory).resolve()]
    while is_lean(chain[-1]):
        if len(chain) > _MAX_CHAIN:
            raise BadValue(f"{directory}: the chain of input models is longer than {_MAX_CHAIN} (a cycle?)")
        chain.append(_base_of(chain[-1]))
    return chain


def _write_meta(directory: Path, base: Path, dtype: str) -> None:
    """The metadata that makes `directory` (its delta already written) a lean model over `base`: written
    last and atomically, so a crash before it leaves no half-lean directory."""
    meta = {"format": DELTA_FORMAT, "base": os.path.relpath(base.resolve(), directory.resolve()),
            "base_absolute": str(base.resolve()), "base_id": directory_id(base), "id": uuid.uuid4().hex,
            "dtype": dtype}
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / META_FILE)


def make_lean(directory: str | os.PathLike, base: str | os.PathLike, load_model) -> int:
    """Turn the full model directory `directory` into a lean one over `base`; returns the tensors kept.
    `load_model(dir)` is the model loader (hsft.model.load_model).

    Crash-safe: the delta is written first, the metadata replaced next (from then on the directory loads
    as lean), and the full weights are removed last.
    """
    directory, base = Path(directory), Path(base)
    if is_lean(directory):
        return len(load_file(str(directory / DELTA_FILE)))
    model = load_model(str(directory))
    reference = load_model(str(base))
    if model.dtype != reference.dtype:
        if (reference.dtype, model.dtype) not in _EXACT_WIDENINGS:
            return -1  # a delta across these dtypes would not be bit-exact: stay full
        # A stage that trains a bfloat16 import writes float32 (its trained weights unrounded); every
        # frozen tensor is the input's value widened exactly, which is what loading the input in float32
        # gives back, so only the trained tensors need storing. (Compared tensor by tensor below: a
        # widened copy of the whole input would be another 4 GB at Sa2VA-1B.)
    ours, theirs = model.state_dict(), reference.state_dict()
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        return -1  # another architecture: nothing to share
    delta, stored = {}, set()
    for name, tensor in ours.items():
        if torch.equal(tensor, theirs[name].to(tensor.dtype)):
            continue
        storage = tensor.untyped_storage().data_ptr()
        if storage in stored:
            continue  # a tied tensor (an LM head sharing the embedding): loading the first sets both
        stored.add(storage)
        delta[name] = tensor.detach().contiguous().cpu()
    save_file(delta, str(directory / DELTA_FILE))
    _write_meta(directory, base, str(model.dtype).removeprefix("torch."))
    for name in os.listdir(directory):
        if name not in (META_FILE, DELTA_FILE):
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return len(delta)


def _dtype_of(directory: Path) -> str | None:
    """The dtype a model directory (full or lean) was saved in, from its metadata alone."""
    return _meta(directory).get("dtype")


def write_lean(directory: str | os.PathLike, base: str | os.PathLike, tensors: dict[str, torch.Tensor], *,
               dtype: str = "float32") -> bool:
    """Write `directory` as a lean model over `base` straight from the tensors a stage trained (Sa2VA
    state-dict names), without building the whole model: a stage that trains a known set of tensors and
    keeps every other one as it came in has exactly those tensors as its changes. Returns False, writing
    nothing, when a lean directory in `dtype` over `base` would not load bit-exact (a narrowing dtype).

    This is what a training stage writes at real size: the full model written, re-read and compared by
    `make_lean` costs two extra copies of the model in memory (8 GB at Sa2VA-1B in float32) and its size
    on disk, for a result this gives directly. Crash-safe as `make_lean`: the metadata goes last."""
    directory, base = Path(directory), Path(base)
    base_dtype = _dtype_of(base)
    if base_dtype != dtype and (getattr(torch, str(base_dtype), None), getattr(torch, dtype)) not in _EXACT_WIDENINGS:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(directory):
        path = directory / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    save_file({name: tensor.detach().to(getattr(torch, dtype)).contiguous().cpu() for name, tensor in tensors.items()},
              str(directory / DELTA_FILE))
    _write_meta(directory, base, dtype)
    return True


def load_lean(directory: str | os.PathLike, load_base, *, dtype: str | None = None):
    """The model of a lean directory: its input model's, loaded with `load_base(directory, dtype=...)`
    (the model loader, which resolves the input's own chain), with this directory's tensors."""
    from hsft.model.build import torch_dtype

    directory = Path(directory)
    chain_of(directory)  # every link exists and is the one referred to
    meta = _meta(directory)
    model = load_base(str(_base_of(directory)), dtype=meta["dtype"])
    delta_path = directory / DELTA_FILE
    if not delta_path.is_file():
        raise MissingFile(f"{directory}: lean model directory without its {DELTA_FILE}")
    delta = load_file(str(delta_path))
    state = model.state_dict()
    for name, tensor in delta.items():
        if name not in state:
            raise BadValue(f"{delta_path}: tensor {name} is not in the model")
        if state[name].shape != tensor.shape:
            raise BadValue(f"{delta_path}: tensor {name} has shape {list(tensor.shape)}, the model's is "
                             f"{list(state[name].shape)}")
    model.load_state_dict(delta, strict=False)
    target = torch_dtype(dtype if dtype is not None else meta["dtype"])
    return model.to(target).eval()
