"""Finds and loads the compiled hsft op library.

Order: the file named by the environment variable HSFT_OPS_LIBRARY (an explicit request: a
bad path is an error), else the extension module ``hsft._C`` that ``pip install`` builds (found
by the normal import machinery, including scikit-build-core's editable-install finder). When
neither is there the package uses the pure-torch reference and warns once, saying how to build.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass

import torch

__all__ = ["ENV_VAR", "BUILD_HINT", "LibraryStatus", "load", "status", "has_kernel", "has_cuda_kernel",
           "OpsFallbackWarning"]

ENV_VAR = "HSFT_OPS_LIBRARY"
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root (needs cmake, ninja and a "
    f"C++ compiler), or point {ENV_VAR} at a built _C*.so"
)
OP_NAMES = ("dice_bce_loss", "dice_bce_loss_forward", "dice_bce_loss_backward", "upsample_masks", "mask_stats")


class OpsFallbackWarning(RuntimeWarning):
    """The compiled ops are unavailable and the pure-torch reference runs instead."""


@dataclass(frozen=True)
class LibraryStatus:
    loaded: bool
    source: str  # where the ops came from, or why they are missing


_status: LibraryStatus | None = None
# Per device type: whether the compiled ops run there (looked up once; cheap for torch.compile).
_kernel_cache: dict[str, bool] = {}


def _ops_registered() -> bool:
    return all(hasattr(torch.ops.hsft, name) for name in OP_NAMES)


def _load() -> LibraryStatus:
    if _ops_registered():
        return LibraryStatus(True, "already registered in this process")
    path = os.environ.get(ENV_VAR)
    if path:
        if not os.path.isfile(path):
            raise OSError(f"{ENV_VAR}={path!r} does not name a file; unset it or point it at a built _C*.so")
        torch.ops.load_library(path)
        if not _ops_registered():
            raise OSError(f"{ENV_VAR}={path!r} loaded but did not register the hsft ops {OP_NAMES}")
        return LibraryStatus(True, path)
    try:
        module = importlib.import_module("hsft._C")
    except ImportError as error:
        return LibraryStatus(False, f"hsft._C could not be imported ({error})")
    if not _ops_registered():
        return LibraryStatus(False, f"{module.__file__} did not register the hsft ops")
    return LibraryStatus(True, str(module.__file__))


def load() -> LibraryStatus:
    """Loads the library once per process; warns once when falling back to the reference."""
    global _status
    if _status is None:
        _status = _load()
        if not _status.loaded:
            warnings.warn(
                f"hsft.ops: compiled mask ops not available: {_status.source}; using the slower pure-torch "
                f"reference. To get them, {BUILD_HINT}.",
                OpsFallbackWarning,
                stacklevel=3,
            )
    return _status


def status() -> LibraryStatus:
    """Whether the compiled ops are in use, and where they came from (or why not)."""
    return load()


def has_cuda_kernel(op_name: str) -> bool:
    """True when the loaded library registered a CUDA kernel for ``hsft::<op_name>`` (needs no GPU)."""
    return load().loaded and torch._C._dispatch_has_kernel_for_dispatch_key(f"hsft::{op_name}", "CUDA")


def has_kernel(device: torch.device) -> bool:
    """True when the compiled ops have kernels for `device`'s type (fake/meta tensors count).

    Warns once per device type when the library is loaded but lacks that device (a CPU-only
    build given CUDA tensors): those calls use the reference.
    """
    cached = _kernel_cache.get(device.type)
    if cached is not None:
        return cached
    if not load().loaded:
        ok = False
    elif device.type == "meta":
        ok = True
    else:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
        ok = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("hsft::dice_bce_loss", key)
    _kernel_cache[device.type] = ok
    if not ok and _status is not None and _status.loaded:
        warnings.warn(
            f"hsft.ops: the compiled library has no {device.type} kernels (it was built without them); "
            f"{device.type} tensors use the pure-torch reference. To build the CUDA ops, install a CUDA build of "
            "torch and nvcc, then rebuild.",
            OpsFallbackWarning,
            stacklevel=3,
        )
    return ok
