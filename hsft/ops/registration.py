"""Autograd and fake (meta) implementations of the compiled hsft ops, registered in one place.

The C++ library defines the schemas and the device kernels; this module tells autograd how
to differentiate ``hsft::dice_bce_loss`` (through the ``hsft::dice_bce_loss_backward`` op,
which returns the gradient w.r.t. the low-resolution logits directly) and tells fake-tensor
tracing (torch.compile, torch.export) the output shapes of every op.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["register"]

_registered = False


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _dice_bce_loss_fake(
    logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None, dice_weight: float, bce_weight: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(logits.dim() in (3, 4), lambda: "hsft::dice_bce_loss: logits must be 3-D or 4-D")
    torch._check(target.dim() == 3, lambda: "hsft::dice_bce_loss: target must be (N, H, W)")
    torch._check(fov is None or fov.shape == target.shape, lambda: "hsft::dice_bce_loss: fov must match target")
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=_loss_dtype(logits)), logits.new_empty((n, 5), dtype=torch.float64)


def _dice_bce_loss_backward_fake(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    fov: torch.Tensor | None,
    sums: torch.Tensor,
    dice_weight: float,
    bce_weight: float,
    eps: float,
) -> torch.Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _upsample_masks_fake(logits: torch.Tensor, size: list[int], threshold: float | None) -> torch.Tensor:
    dtype = torch.bool if threshold is not None else logits.dtype
    shape = (logits.shape[0], size[0], size[1]) if logits.dim() == 3 else (logits.shape[0], 1, size[0], size[1])
    return logits.new_empty(shape, dtype=dtype)


def _mask_stats_fake(logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None) -> torch.Tensor:
    return logits.new_empty((logits.shape[0], 4), dtype=torch.int64)


def _dice_bce_loss_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    logits, target, fov, dice_weight, bce_weight, eps = inputs
    _, sums = output
    ctx.save_for_backward(logits, target, fov, sums)
    ctx.mark_non_differentiable(sums)
    ctx.weights = (dice_weight, bce_weight, eps)


def _dice_bce_loss_backward(
    ctx: Any, grad_loss: torch.Tensor, grad_sums: torch.Tensor | None
) -> tuple[torch.Tensor | None, None, None, None, None, None]:
    logits, target, fov, sums = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        dice_weight, bce_weight, eps = ctx.weights
        grad_logits = torch.ops.hsft.dice_bce_loss_backward(
            grad_loss, logits, target, fov, sums, dice_weight, bce_weight, eps
        )
    return grad_logits, None, None, None, None, None


def register() -> None:
    """Registers the Python-side implementations; call once after the library is loaded."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("hsft::dice_bce_loss", _dice_bce_loss_fake)
    torch.library.register_fake("hsft::dice_bce_loss_backward", _dice_bce_loss_backward_fake)
    torch.library.register_fake("hsft::upsample_masks", _upsample_masks_fake)
    torch.library.register_fake("hsft::mask_stats", _mask_stats_fake)
    torch.library.register_autograd(
        "hsft::dice_bce_loss", _dice_bce_loss_backward, setup_context=_dice_bce_loss_setup_context
    )
    _registered = True
