"""Regression guard on the CPU speed of the fused Dice+BCE op.

Fused forward + backward must stay well ahead of the eager formula (F.interpolate + sigmoid + BCE +
Dice) at a training shape, 8 masks 256^2 -> 1024^2, measured in the same process on the same
threads. The bound (3x) is a wide margin under what the kernels reach (BENCHMARKS.md); it catches a
kernel that stops being vectorised, not a few per cent. Both sides are timed alternately and the
fastest repeat of each is compared, so a neighbouring process slows both, not one.
"""

from __future__ import annotations

import time

import pytest
import torch

import hsft.ops as ops
from hsft.ops import reference

MIN_SPEEDUP = 3.0


def _fwd_bwd_seconds(fn, logits: torch.Tensor, target: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(logits, target).backward()
    elapsed = time.perf_counter() - start
    logits.grad = None
    return elapsed


@pytest.mark.skipif(not ops.library_status().loaded, reason=f"compiled ops not built: {ops.library_status().source}")
def test_fused_forward_backward_is_at_least_3x_eager_on_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 256, 256, generator=gen).requires_grad_(True)
    target = torch.rand(8, 1024, 1024, generator=gen) < 0.2
    fused, eager = [], []
    _fwd_bwd_seconds(ops.dice_bce_loss, logits, target)  # warm-up: thread pool, allocator
    for _ in range(3):
        fused.append(_fwd_bwd_seconds(ops.dice_bce_loss, logits, target))
        eager.append(_fwd_bwd_seconds(reference.dice_bce_loss, logits, target))
    speedup = min(eager) / min(fused)
    assert speedup >= MIN_SPEEDUP, (
        f"fused fwd+bwd {min(fused) * 1e3:.1f} ms vs eager {min(eager) * 1e3:.1f} ms on "
        f"{torch.get_num_threads()} threads: {speedup:.1f}x, below the {MIN_SPEEDUP}x floor")
