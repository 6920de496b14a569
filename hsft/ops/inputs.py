"""Argument checks shared by the compiled ops and the pure-torch reference.

Both paths raise the same errors for the same bad input, so switching between the compiled
library and the fallback never changes what a caller sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "compute_dtype",
    "check_logits",
    "check_planes",
    "check_fov",
    "check_size",
    "check_reduction",
    "check_loss_weights",
    "check_mid_size",
    "REDUCTIONS",
]

REDUCTIONS = ("mean", "none")


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 for every other float type."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_logits(op: str, logits: torch.Tensor) -> None:
    """Logits are (N, h, w) or (N, 1, h, w) floating point with non-empty planes."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not (logits.dim() == 3 or (logits.dim() == 4 and logits.shape[1] == 1)):
        raise ValueError(f"{op}: logits must have shape (N, h, w) or (N, 1, h, w), got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{op}: logits must be float64, float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[-2] == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits planes must not be empty, got {tuple(logits.shape)}")


def check_planes(op: str, name: str, planes: torch.Tensor, logits: torch.Tensor, *, allow_float: bool) -> None:
    """A (N, H, W) target or field of view matching the logits' N and device."""
    if not isinstance(planes, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(planes).__name__}")
    if planes.dim() != 3:
        raise ValueError(f"{op}: {name} must have shape (N, H, W), got {tuple(planes.shape)}")
    if planes.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: {name} has {planes.shape[0]} masks but logits have {logits.shape[0]}")
    if planes.shape[1] == 0 or planes.shape[2] == 0:
        raise ValueError(f"{op}: {name} planes must not be empty, got {tuple(planes.shape)}")
    if planes.device != logits.device:
        raise ValueError(f"{op}: {name} is on {planes.device} but logits are on {logits.device}")
    allowed = planes.dtype in (torch.bool, torch.uint8) or (allow_float and planes.dtype.is_floating_point)
    if not allowed:
        kinds = "bool, uint8 or floating point" if allow_float else "bool or uint8"
        raise TypeError(f"{op}: {name} must be {kinds}, got {planes.dtype}")


def check_fov(op: str, fov: torch.Tensor | None, target: torch.Tensor, logits: torch.Tensor) -> None:
    """An optional field of view: a bool / uint8 (N, H, W) stack of the target's shape on the logits' device."""
    if fov is None:
        return
    check_planes(op, "fov", fov, logits, allow_float=False)
    if fov.shape != target.shape:
        raise ValueError(f"{op}: fov has shape {tuple(fov.shape)} but target has {tuple(target.shape)}")


def check_size(op: str, size: Sequence[int]) -> tuple[int, int]:
    """`size` is two positive ints (H, W)."""
    values = tuple(size)
    if len(values) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{op}: size must be two positive ints (H, W), got {size!r}")
    return values[0], values[1]


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_loss_weights(op: str, dice_weight: float, bce_weight: float, eps: float) -> None:
    if dice_weight < 0 or bce_weight < 0:
        raise ValueError(f"{op}: dice_weight and bce_weight must be >= 0, got {dice_weight} and {bce_weight}")
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def check_mid_size(op: str, mid_size: Sequence[int] | None, logits: torch.Tensor) -> tuple[int, int] | None:
    """The intermediate grid of a two-step resize: None, or two ints at least the logits' own sides
    (the first step must not shrink, as the release's 256 -> 1024 does not)."""
    if mid_size is None:
        return None
    values = tuple(mid_size)
    if len(values) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise ValueError(f"{op}: mid_size must be None or two positive ints (H, W), got {mid_size!r}")
    if values[0] < logits.shape[-2] or values[1] < logits.shape[-1]:
        raise ValueError(f"{op}: mid_size {values} is smaller than the logits ({logits.shape[-2]}, "
                         f"{logits.shape[-1]}); the two-step resize needs a first step that does not shrink")
    return values[0], values[1]
