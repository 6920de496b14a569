"""Fake (meta) implementations of the compiled hsft ops, registered in one place.

The C++ library defines the schemas, the device kernels and the autograd of ``hsft::dice_bce_loss``
(csrc/torch/autograd.cpp: its forward runs ``hsft::dice_bce_loss_forward``, which also returns the
gradient's adjoint planes, its backward ``hsft::dice_bce_loss_backward``). This module tells
fake-tensor tracing (torch.compile, torch.export) the output shapes of every op.
"""

from __future__ import annotations

import torch

__all__ = ["register"]

_registered = False


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_loss_inputs(logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None) -> None:
    torch._check(logits.dim() in (3, 4), lambda: "hsft::dice_bce_loss: logits must be 3-D or 4-D")
    torch._check(target.dim() == 3, lambda: "hsft::dice_bce_loss: target must be (N, H, W)")
    torch._check(fov is None or fov.shape == target.shape, lambda: "hsft::dice_bce_loss: fov must match target")


def _dice_bce_loss_fake(
    logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None, dice_weight: float, bce_weight: float,
    eps: float, mid_size: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_loss_inputs(logits, target, fov)
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=_compute_dtype(logits)), logits.new_empty((n, 5), dtype=torch.float64)


def _dice_bce_loss_forward_fake(
    logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None, dice_weight: float, bce_weight: float,
    eps: float, mid_size: list[int] | None, with_adjoint: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, sums = _dice_bce_loss_fake(logits, target, fov, dice_weight, bce_weight, eps, mid_size)
    shape = (logits.shape[0], 3, logits.shape[-2], logits.shape[-1]) if with_adjoint else (0,)
    return loss, sums, logits.new_empty(shape, dtype=_compute_dtype(logits))


def _dice_bce_loss_backward_fake(
    grad_loss: torch.Tensor, sums: torch.Tensor, adjoint: torch.Tensor, dice_weight: float, bce_weight: float,
    eps: float, dtype: torch.dtype,
) -> torch.Tensor:
    return adjoint.new_empty((adjoint.shape[0], adjoint.shape[2], adjoint.shape[3]), dtype=dtype)


def _upsample_masks_fake(logits: torch.Tensor, size: list[int], threshold: float | None) -> torch.Tensor:
    dtype = torch.bool if threshold is not None else logits.dtype
    shape = (logits.shape[0], size[0], size[1]) if logits.dim() == 3 else (logits.shape[0], 1, size[0], size[1])
    return logits.new_empty(shape, dtype=dtype)


def _mask_stats_fake(logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None) -> torch.Tensor:
    return logits.new_empty((logits.shape[0], 4), dtype=torch.int64)


def register() -> None:
    """Registers the fake implementations; call once after the library is loaded."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("hsft::dice_bce_loss", _dice_bce_loss_fake)
    torch.library.register_fake("hsft::dice_bce_loss_forward", _dice_bce_loss_forward_fake)
    torch.library.register_fake("hsft::dice_bce_loss_backward", _dice_bce_loss_backward_fake)
    torch.library.register_fake("hsft::upsample_masks", _upsample_masks_fake)
    torch.library.register_fake("hsft::mask_stats", _mask_stats_fake)
    _registered = True
